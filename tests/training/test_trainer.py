import math

import pytest
import torch

from compression import NoCompression, compress
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2Config
from recsys.training import Callback, Trainer, TrainerConfig


def setup(ds, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = TrainerConfig(epochs=3, batch_size=64, eval_batch_size=256, device="cpu", progress="off",
                        log_every_steps=1, patience=5, **overrides)
    module = compress(embedding_tables(ds.schema, 8), NoCompression(), seed=seed)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, cfg.batch_size if s == "train" else 256, shuffle=s == "train", seed=seed)
               for s in ("train", "val", "test")]
    return cfg, module, model, loaders


class Recorder(Callback):
    def __init__(self, fail_at=None):
        self.steps, self.epochs, self.fail_at = [], [], fail_at

    def on_step(self, step, metrics):
        self.steps.append((step, metrics["train_loss"]))
        if self.fail_at is not None and step == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")

    def on_epoch_end(self, epoch, metrics, step):
        self.epochs.append(metrics)


def test_training_learns_the_planted_signal(tiny_dataset):
    cfg, module, model, (tr, va, te) = setup(tiny_dataset)
    rec = Recorder()
    result = Trainer(cfg, callbacks=[rec]).run(model, module, tr, va, te)
    assert result.test["auc"] > 0.7
    assert len(rec.epochs) == 3 and rec.steps
    # row-wise Adagrad: one fp32 accumulator per row, plus a scalar step count per table
    fields = tiny_dataset.schema.sparse
    assert result.fit.optimizer_bytes == sum(f.cardinality * 4 for f in fields) + 4 * len(fields)
    assert result.fit.samples_per_s > 0


def test_early_stopping_restores_the_best_epoch(tiny_dataset):
    # a huge learning rate overfits fast: validation AUC peaks, then falls
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, dense_lr=0.05, sparse_lr=2.0)
    cfg.epochs, cfg.patience = 8, 1
    result = Trainer(cfg).run(model, module, tr, va, te)
    fit = result.fit
    best = max(h["auc"] for h in fit.history)
    assert fit.best_val["auc"] == best
    assert fit.best_epoch == [h["auc"] for h in fit.history].index(best) + 1
    assert fit.stopped_early and fit.epochs_run == fit.best_epoch + 1 < cfg.epochs  # patience 1
    # the restored weights are the best epoch's: re-evaluating val gives its AUC
    from recsys.training import evaluate
    assert evaluate(model, va, torch.device("cpu"))["auc"] == pytest.approx(best, abs=1e-7)


def test_resume_after_interruption_gives_the_same_result(tiny_dataset, tmp_path):
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7)
    ref = Trainer(cfg).run(model, module, tr, va, te)

    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[Recorder(fail_at=50)], checkpoint_dir=tmp_path).run(model, module, tr, va, te)
    assert (tmp_path / "train" / "last.pt").is_file()
    # a fresh process would build everything anew from a different seed's init
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, seed=0, checkpoint_every_steps=7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the resumed weights must come from the checkpoint
    rec = Recorder()
    resumed = Trainer(cfg, callbacks=[rec], checkpoint_dir=tmp_path).run(model, module, tr, va, te)
    assert rec.steps[0][0] == 50  # continued from the step-49 checkpoint (every 7 steps)
    assert resumed.test == ref.test
    assert resumed.fit.history == ref.fit.history


def test_non_finite_loss_stops_with_a_clear_message(tiny_dataset):
    cfg, module, model, (tr, va, te) = setup(tiny_dataset)
    with torch.no_grad():
        next(model.head.parameters()).fill_(math.nan)
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        Trainer(cfg).run(model, module, tr, va, te)


def test_fused_tables_train_as_the_plain_ones_and_resume(tiny_dataset, tmp_path):
    """``fused_tables``: fbgemm's fused row-wise Adagrad in the backward gives the plain run's
    epochs and test metrics (to float rounding) and its row state, leaves plain TorchRec tables
    behind, and an interrupted fused run resumes from its checkpoint (the fused optimizer's
    state included) to the uninterrupted fused run's result."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7)
    plain = Trainer(cfg).run(model, module, tr, va, te)
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, fused_tables=True)
    fused = Trainer(cfg).run(model, module, tr, va, te)
    assert fused.test == pytest.approx(plain.test, abs=2e-4)
    for a, b in zip(fused.fit.history, plain.fit.history):
        assert a == pytest.approx(b, abs=2e-4)
    # one fp32 accumulator a row, as the plain run's, without its per-table step counts
    fields = tiny_dataset.schema.sparse
    assert fused.fit.optimizer_bytes == plain.fit.optimizer_bytes - 4 * len(fields) == sum(f.cardinality * 4 for f in fields)
    assert type(module.ebc) is EmbeddingBagCollection and list(module.table_parameters())

    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, fused_tables=True)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[Recorder(fail_at=50)], checkpoint_dir=tmp_path).run(model, module, tr, va, te)
    assert type(module.ebc) is EmbeddingBagCollection  # put back after the interruption too
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, fused_tables=True)
    resumed = Trainer(cfg, checkpoint_dir=tmp_path).run(model, module, tr, va, te)
    assert resumed.test == fused.test and resumed.fit.history == fused.fit.history


def test_step_checkpoints_wait_for_their_minimum_interval(tiny_dataset, tmp_path, monkeypatch):
    """``checkpoint_min_interval_s``: a step checkpoint comes only that long after the last
    save (epoch ends always save), so big tables are not written every few seconds."""
    import recsys.training.checkpoint as checkpoint

    saves = []
    real = checkpoint.save_atomic
    monkeypatch.setattr(checkpoint, "save_atomic", lambda obj, path: (saves.append(path.name), real(obj, path)))
    for interval, expected_step_saves in ((0.0, None), (3600.0, 0)):
        saves.clear()
        cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, checkpoint_min_interval_s=interval)
        Trainer(cfg, checkpoint_dir=tmp_path / str(interval)).fit(model, module, tr, va, tmp_path / str(interval))
        step_saves = saves.count("last.pt") - cfg.epochs  # one save at every epoch end
        if expected_step_saves is None:
            assert step_saves == cfg.epochs * len(tr) // 7  # every 7th step, counted over the epochs
        else:
            assert step_saves == expected_step_saves


def test_prefetched_batches_train_the_same_model_and_resume(tiny_dataset, tmp_path):
    """``prefetch_batches``: batches made on a thread give the same epochs and test metrics,
    and an interrupted run stops its producer and resumes to the same result."""
    import threading

    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7)
    plain = Trainer(cfg).run(model, module, tr, va, te)
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, prefetch_batches=3)
    ahead = Trainer(cfg).run(model, module, tr, va, te)
    assert ahead.fit.history == plain.fit.history and ahead.test == plain.test
    with pytest.raises(KeyboardInterrupt):
        cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, prefetch_batches=3)
        Trainer(cfg, callbacks=[Recorder(fail_at=50)], checkpoint_dir=tmp_path).run(model, module, tr, va, te)
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())
    cfg, module, model, (tr, va, te) = setup(tiny_dataset, checkpoint_every_steps=7, prefetch_batches=3)
    resumed = Trainer(cfg, checkpoint_dir=tmp_path).run(model, module, tr, va, te)
    assert resumed.fit.history == plain.fit.history and resumed.test == plain.test
