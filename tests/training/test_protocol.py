"""The training protocol's pieces: embedding optimizer choice, L2 of the tables, gradient
clipping, learning-rate decay on a validation plateau, the BARS trainer config."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import recsys.training.optim as optim_module
from compression import NoCompression, compress
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2Config, DeepFMConfig
from recsys.training import Callback, Trainer, TrainerConfig
from recsys.training.optim import (
    ForeachRowWiseAdagrad,
    add_embedding_l2,
    build_optimizers,
    embedding_l2_value,
)
from recsys.training.step import TrainStep


def model_and_module(ds, dim=8):
    module = compress(embedding_tables(ds.schema, dim), NoCompression())
    return DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense)), module


@pytest.mark.parametrize(
    "name,cls", [("rowwise_adagrad", ForeachRowWiseAdagrad), ("adam", torch.optim.Adam), ("adagrad", torch.optim.Adagrad), ("sgd", torch.optim.SGD)]
)
def test_the_embedding_rows_get_the_optimizer_asked_for(tiny_dataset, name, cls):
    model, module = model_and_module(tiny_dataset)
    opts = build_optimizers(model, module, TrainerConfig(sparse_optimizer=name, sparse_lr=0.01))
    assert type(opts.named["sparse"]) is cls
    rows = {id(p) for p in module.table_parameters()}
    assert {id(p) for g in opts.named["sparse"].param_groups for p in g["params"]} == rows
    assert not rows & {id(p) for g in opts.named["dense"].param_groups for p in g["params"]}
    assert type(opts.named["dense"]) is torch.optim.Adam and opts.named["dense"].defaults["fused"]


@pytest.mark.parametrize("path", ["torch ops", "kernel"])
def test_foreach_rowwise_adagrad_is_torchrecs_update(monkeypatch, path):
    """Tables of several shapes, a table without a gradient in some steps, then a
    checkpoint moved between the two: the same rows and the same state every step; with
    weight decay (TorchRec's own step) too. With torch's ops bit for bit; with the CPU
    kernel to float rounding (its square root is correctly rounded, torch's vectorized one
    is not always), every table in the kernel's one call."""
    calls = []
    if path == "kernel":
        if optim_module.kernel() is None:
            pytest.skip("no C++ compiler or ninja here: the optimizer runs as torch ops")
        real = optim_module.kernel()
        monkeypatch.setattr(optim_module, "kernel", lambda: calls.append(1) or real)
        same = partial(torch.testing.assert_close, rtol=1e-6, atol=1e-7)
    else:
        monkeypatch.setattr(optim_module, "kernel", lambda: None)

        def same(x, y, msg=None):
            assert torch.equal(x, y), msg

    torch.manual_seed(0)
    shapes = [(50, 8), (7, 16), (1000, 4), (3, 1)]
    for kw in ({"lr": 0.05}, {"lr": 0.05, "eps": 1e-6}, {"lr": 0.05, "weight_decay": 0.01}):
        a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        oa, ob = RowWiseAdagrad(a, **kw), ForeachRowWiseAdagrad(b, **kw)
        for step in range(6):
            if step == 3:  # a checkpoint of one loaded into the other
                ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # (as torch.load gives it)
            for i, (p, q) in enumerate(zip(a, b)):
                g = None if (i == 1 and step % 2) else torch.randn(p.shape) * 10 ** (i - 2)
                p.grad, q.grad = g, None if g is None else g.clone()
            oa.step()
            ob.step()
            for p, q in zip(a, b):
                same(p, q, msg=str((kw, step)))
                same(oa.state[p]["sum"], ob.state[q]["sum"])
                assert torch.equal(oa.state[p]["step"], ob.state[q]["step"])
    assert len(calls) == (12 if path == "kernel" else 0)  # six steps each of the two plain settings


def test_a_table_the_kernel_cannot_take_sends_the_group_to_torch_ops():
    """A non-contiguous gradient: the kernel declines (touching nothing) and the foreach
    ops make TorchRec's update, bit for bit."""
    if optim_module.kernel() is None:
        pytest.skip("no C++ compiler or ninja here: the optimizer runs as torch ops")
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(40, 8)), torch.nn.Parameter(torch.randn(30, 4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob = RowWiseAdagrad(a, lr=0.05), ForeachRowWiseAdagrad(b, lr=0.05)
    for _ in range(3):
        grads = [torch.randn(40, 8), torch.randn(4, 30).t()]  # the second not contiguous
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g
        oa.step()
        ob.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q) and torch.equal(oa.state[p]["sum"], ob.state[q]["sum"])


def test_an_unknown_embedding_optimizer_is_named(tiny_dataset):
    model, module = model_and_module(tiny_dataset)
    with pytest.raises(ValueError, match="sparse_optimizer must be one of .* got 'adamw'"):
        build_optimizers(model, module, TrainerConfig(sparse_optimizer="adamw"))


def test_table_l2_is_the_gradient_of_half_lambda_squared_norm():
    w = torch.nn.Parameter(torch.randn(6, 3))
    lam = 0.05
    (0.5 * lam * w.pow(2).sum()).backward()
    expected = w.grad.clone()
    w.grad = None
    add_embedding_l2([w], lam, "table")  # no task gradient yet: L2 alone
    torch.testing.assert_close(w.grad, expected)
    assert embedding_l2_value([w], lam) == pytest.approx(float(0.5 * lam * w.detach().pow(2).sum()))


def test_batch_rows_l2_touches_only_the_rows_with_a_gradient():
    w = torch.nn.Parameter(torch.randn(5, 2))
    w.grad = torch.zeros(5, 2)
    w.grad[1] = 1.0
    w.grad[3, 0] = -2.0
    add_embedding_l2([w], 0.5, "batch_rows")
    torch.testing.assert_close(w.grad[[0, 2, 4]], torch.zeros(3, 2))
    torch.testing.assert_close(w.grad[1], 1.0 + 0.5 * w.detach()[1])
    torch.testing.assert_close(w.grad[3], torch.tensor([-2.0, 0.0]) + 0.5 * w.detach()[3])
    with pytest.raises(ValueError, match="embedding_l2_mode"):
        add_embedding_l2([w], 0.5, "rows")


def test_a_step_clips_the_global_gradient_norm_and_applies_l2(tiny_dataset):
    model, module = model_and_module(tiny_dataset)
    cfg = TrainerConfig(clip_grad_norm=1e-3, embedding_l2=0.1, sparse_optimizer="sgd", sparse_lr=0.0, dense_lr=0.0)
    step = TrainStep(model, module, build_optimizers(model, module, cfg), cfg)
    batch = next(iter(BatchLoader(tiny_dataset, "train", 64)))
    step(batch)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert float(norm) == pytest.approx(1e-3, rel=1e-4)
    # every row has a gradient: the table L2 reaches rows the batch never looked up
    table = module.table_parameters()[0]
    assert bool(table.grad.ne(0).all())


class _Epochs(Callback):
    def __init__(self):
        self.metrics = []

    def on_epoch_end(self, epoch, metrics, step):
        self.metrics.append(metrics)


def test_learning_rates_decay_on_every_plateau_and_training_stops_after_patience(tiny_dataset):
    torch.manual_seed(0)
    model, module = model_and_module(tiny_dataset)
    # min_delta 1.0: no epoch can improve on the first, so every later one is a plateau
    cfg = TrainerConfig(epochs=10, batch_size=256, device="cpu", progress="off", patience=3, min_delta=1.0,
                        lr_decay=0.1, min_lr=1e-5, dense_lr=1e-3, sparse_lr=1e-2)  # fmt: skip
    rec = _Epochs()
    loaders = [BatchLoader(tiny_dataset, s, 256, shuffle=s == "train") for s in ("train", "val", "test")]
    result = Trainer(cfg, callbacks=[rec]).run(model, module, *loaders)
    assert result.fit.epochs_run == 4 and result.fit.stopped_early and result.fit.best_epoch == 1
    assert "lr" not in rec.metrics[0]
    # the largest rate (the tables' 1e-2) after 1, 2, 3 plateaus; never below min_lr
    assert [m["lr"] for m in rec.metrics[1:]] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert result.fit.fit_s > 0 and result.fit.fit_samples_per_s > 0


def test_adam_rows_with_table_l2_train_deepfm(tiny_dataset):
    """The BARS protocol end to end on the tiny planted-signal data: it learns."""
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=6, batch_size=128, device="cpu", progress="off", sparse_optimizer="adam",
                        sparse_lr=1e-2, dense_lr=1e-2, embedding_l2=1e-4, clip_grad_norm=10.0, lr_decay=0.1,
                        patience=2, min_delta=1e-6)  # fmt: skip
    mcfg = DeepFMConfig(embedding_dim=8, deep_layers=[32], batch_norm=True, dropout=0.1, embedding_init_std=1e-4)
    module = compress(embedding_tables(tiny_dataset.schema, mcfg.table_dim(), mcfg.embedding_init_std), NoCompression())
    model = mcfg.build(module, len(tiny_dataset.schema.dense))
    loaders = [BatchLoader(tiny_dataset, s, 128, shuffle=s == "train") for s in ("train", "val", "test")]
    result = Trainer(cfg).run(model, module, *loaders)
    assert result.test["auc"] > 0.7
    # Adam keeps two moments per element of every row
    rows = sum(p.numel() for p in module.table_parameters())
    assert result.fit.optimizer_bytes >= 8 * rows
