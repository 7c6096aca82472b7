"""The training loop: epochs with validation AUC, early stopping, best-model restore,
checkpoints that resume to the same result, and a compressed module's stages.

The trainer knows nothing of MLflow or of compression methods: it reports through
callbacks, and runs whatever stages the embedding module's ``schedule()`` lists (its
``stages()``, then ``quantize`` when its config asks; a stage with ``run=None`` is
this standard loop).

Example::

    trainer = Trainer(TrainerConfig(epochs=3), checkpoint_dir=Path("ckpt"))
    result = trainer.run(model, ebc, train_loader, val_loader, test_loader)
    result.test["auc"]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import recsys.training.checkpoint as checkpoint
from compression.base import CompressedEmbeddingBagCollection
from compression.config_checks import ConfigError, bounded, one_of
from compression.stages import EpochHook
from recsys.data.loader import BatchLoader
from recsys.data.prefetch import prefetch
from recsys.training.backends import Backend, LocalBackend
from recsys.training.callbacks import Callback
from recsys.training.fused import FusedTables, config_refusal
from recsys.training.optim import L2_MODES, SPARSE_OPTIMIZERS, Optimizers
from recsys.training.results import FitResult, RunResult
from recsys.training.stage_context import StageContext
from recsys.training.step import TrainStep


@dataclass
class TrainerConfig:
    """How to train (``recsys.training.optim`` says what each protocol knob means).

    Dense parameters train with Adam (``dense_lr``, ``weight_decay``); the embedding
    rows with ``sparse_optimizer`` at ``sparse_lr``, with ``embedding_l2``. After an
    epoch whose validation AUC does not beat the best by ``min_delta``, every learning
    rate is multiplied by ``lr_decay`` (BARS: 0.1, not below ``min_lr``); after
    ``patience`` such epochs in a row training stops, and the best epoch's weights are
    restored. ``clip_grad_norm`` clips the global gradient norm (BARS: 10).
    ``trainer=bars`` is the BARS/FuxiCTR protocol.
    """

    epochs: int = bounded(3, ge=1)
    batch_size: int = bounded(512, ge=1)
    eval_batch_size: int = bounded(8192, ge=1)
    dense_lr: float = bounded(1e-3, gt=0)
    sparse_lr: float = bounded(0.05, gt=0)
    sparse_optimizer: str = one_of("rowwise_adagrad", *SPARSE_OPTIMIZERS)
    weight_decay: float = bounded(0.0, ge=0)
    embedding_l2: float = bounded(0.0, ge=0)
    embedding_l2_mode: str = one_of("table", *L2_MODES)
    lr_decay: float = bounded(1.0, gt=0, le=1)
    min_lr: float = bounded(1e-6, ge=0)
    clip_grad_norm: Optional[float] = bounded(None, gt=0)
    patience: int = bounded(1, ge=1)
    min_delta: float = bounded(0.0, ge=0)
    device: str = "auto"
    num_threads: Optional[int] = bounded(None, ge=1)
    # glibc keeps freed activations in the process (recsys.training.malloc), set by the
    # training step: +5% on a BARS DeepFM step
    keep_freed_memory: bool = True
    log_every_steps: int = bounded(50, ge=0)
    checkpoint_every_steps: int = bounded(0, ge=0)
    # a step checkpoint is skipped until this long after the last one (epoch ends always save):
    # with big tables each save writes the model twice (it and the best epoch's) and the rows'
    # optimizer state, 20% of a fused run's fit on 4.5M ids at every 200 steps
    checkpoint_min_interval_s: float = bounded(0.0, ge=0)
    max_steps_per_epoch: Optional[int] = bounded(None, ge=1)
    # training batches made ahead on a thread while the step runs (0: made in the loop)
    prefetch_batches: int = bounded(0, ge=0)
    progress: str = one_of("auto", "auto", "on", "off")
    seed: int = 0
    # hold each split in memory (None: when its file is under 2 GiB; False: stream row groups)
    in_memory: Optional[bool] = None
    # train the rows of methods that allow it with fbgemm's fused optimizer, in the backward, on
    # the rows a batch touched (``recsys.training.fused``; one process, not sharded)
    fused_tables: bool = False

    def __post_init__(self) -> None:
        if self.fused_tables and (why := config_refusal(self)) is not None:
            raise ConfigError(why)


def search_space(cfg: TrainerConfig) -> dict[str, tuple[float, ...]]:
    """The trainer's knobs a search tunes for every method, around ``cfg``'s values: the
    embedding rows' learning rate (a third, as is, three times) and their L2 (none, as is;
    1e-4 where ``cfg`` has none). What a row's gradient looks like changes with the method
    (shared rows, pruned rows), so these are tuned per method, the full table's included.

    Example::

        search_space(TrainerConfig(sparse_lr=0.05, embedding_l2=1e-4))
        # {'sparse_lr': (0.0167, 0.05, 0.15), 'embedding_l2': (0.0, 0.0001)}
        search_space(TrainerConfig(sparse_lr=0.05, fused_tables=True))  # {'sparse_lr': (0.0167, 0.05, 0.15)}
    """
    lr, l2 = cfg.sparse_lr, cfg.embedding_l2 or 1e-4
    space: dict[str, tuple[float, ...]] = {"sparse_lr": (_round(lr / 3), lr, _round(lr * 3))}
    if not cfg.fused_tables:  # (fused tables take no embedding L2: recsys.training.fused)
        space["embedding_l2"] = (0.0, l2)
    return space


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but this machine has no CUDA device")
    return torch.device(name)


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: Path | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = resolve_device(cfg.device)
        # samples trained by this trainer so far, every stage and fit together (reported
        # with each epoch's metrics as ``trained_samples``, so a callback sees the cost)
        self.trained_samples = 0
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # where the model lives: this process, or sharded by DMP (recsys.training.sharded)
        self.backend: Backend = backend if backend is not None else LocalBackend(self.device)

    # -- the schedule ------------------------------------------------------------------
    def run(
        self,
        model: nn.Module,
        module: CompressedEmbeddingBagCollection,
        train: BatchLoader,
        val: BatchLoader,
        test: BatchLoader | None,
    ) -> RunResult:
        """Run every stage of ``module``'s schedule, then evaluate the final model on
        ``val`` and on ``test`` (``test=None``: the test split is not read, as in a search
        that selects on validation).

        Sharded (``ShardedBackend``): training stages run on every rank; a stage with its
        own ``run`` (post-training quantization) runs on rank 0 with the model gathered
        unsharded, and the other ranks return there (``test`` empty).
        """
        self.backend.prepare(model)
        stages = module.schedule()
        results: dict[str, dict[str, float]] = {}
        last_fit: FitResult | None = None
        replaced = None
        start_samples = self.trained_samples
        for stage in stages:
            if stage.run is not None:  # needs the model whole in this process
                loaders = (train, val) if test is None else (train, val, test)
                whole, self.backend = self.backend.gather(model, loaders)
                if whole is None:  # a rank other than 0: its part is done
                    return RunResult(stages=results, test={}, fit=last_fit,
                                     trained_samples=self.trained_samples - start_samples)
                if whole is not model:
                    model = whole
                    module = replaced = next(m for m in model.modules() if isinstance(m, CompressedEmbeddingBagCollection))
            ckdir = self.checkpoint_dir / stage.name if self.checkpoint_dir and stage.checkpoint else None
            done = checkpoint.load(ckdir / "done.pt") if ckdir else None
            for cb in self.callbacks:
                cb.on_stage_start(stage, len(stages))
            if done is not None:  # finished before an interruption: restore, don't redo
                model.load_state_dict(done["model"])
                metrics = done["metrics"]
            elif stage.run is None:
                last_fit = self.fit(model, module, train, val, ckdir)
                metrics = {f"val_{k}": v for k, v in last_fit.best_val.items()}
                metrics.update(samples_per_s=last_fit.samples_per_s, step_time_ms=last_fit.step_time_ms)
            else:
                metrics = stage.run(StageContext(self, model, module, train, val, stage, ckdir))
            if ckdir is not None and done is None:
                checkpoint.save_atomic({"model": model.state_dict(), "metrics": metrics}, ckdir / "done.pt")
            results[stage.name] = metrics
            for cb in self.callbacks:
                cb.on_stage_end(stage, metrics, len(stages))
        val_metrics = self.backend.evaluate(model, val)
        test_metrics = self.backend.evaluate(model, test) if test is not None else {}
        others: dict[str, dict[str, float]] = {}
        if test is not None:
            for name, form in module.alternatives().items():
                with form:  # another budget deployed from the same training, on the same test split
                    others[name] = self.backend.evaluate(model, test)
        return RunResult(stages=results, test=test_metrics, fit=last_fit, module=replaced, val=val_metrics,
                         trained_samples=self.trained_samples - start_samples, alternatives=others)

    # -- the standard loop -------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        module: CompressedEmbeddingBagCollection,
        train: BatchLoader,
        val: BatchLoader,
        ckdir: Path | None = None,
        epochs: Optional[int] = None,
        on_epoch: Optional[EpochHook] = None,
    ) -> FitResult:
        """Train for ``epochs`` (default ``cfg.epochs``) with early stopping on validation
        AUC; the best epoch's weights are kept. ``on_epoch``: see ``compression.stages``."""
        cfg = self.cfg
        epochs = epochs or cfg.epochs
        self.backend.prepare(model)
        model.train()
        fused = FusedTables.fuse(module, cfg) if cfg.fused_tables and isinstance(self.backend, LocalBackend) else None
        try:
            return self._fit(model, module, train, val, ckdir, epochs, on_epoch, fused)
        finally:
            if fused is not None:
                fused.unfuse()

    def _fit(self, model: nn.Module, module: CompressedEmbeddingBagCollection, train: BatchLoader, val: BatchLoader,
             ckdir: Path | None, epochs: int, on_epoch: Optional[EpochHook], fused: FusedTables | None) -> FitResult:  # fmt: skip
        cfg = self.cfg
        opts = self.backend.optimizers(model, module, cfg) if fused is None else fused.optimizers(model, module, cfg)
        state = _LoopState()
        state_path = ckdir / "last.pt" if ckdir else None
        saved = checkpoint.load(state_path) if state_path else None
        if saved is not None:
            state.restore(saved, model, opts)
        steps_per_epoch = len(train)
        last_saved = time.perf_counter()
        show = {"auto": sys.stderr.isatty(), "on": True, "off": False}[cfg.progress]
        step = TrainStep(model, module, opts, cfg, self.backend.loss, self.backend.reg_scale)

        while state.epoch < epochs and not state.stopped:
            epoch_start = time.perf_counter()
            bar = tqdm(
                total=steps_per_epoch, initial=state.batch, disable=not show,
                desc=f"epoch {state.epoch + 1}/{epochs}", leave=False,
            )
            for batch in prefetch(train.epoch(state.epoch, start_batch=state.batch), cfg.prefetch_batches):
                t0 = time.perf_counter()
                loss_value, n_samples = step(batch.to(self.device))
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                state.step_times.append(dt)
                state.train_time += dt
                state.samples += n_samples
                self.trained_samples += n_samples
                state.batch += 1
                state.global_step += 1
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss became {loss_value} at epoch {state.epoch + 1}, step "
                        f"{state.global_step}; lower trainer.dense_lr / trainer.sparse_lr"
                    )
                bar.update(1)
                if cfg.log_every_steps and state.global_step % cfg.log_every_steps == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}")
                    for cb in self.callbacks:
                        cb.on_step(state.global_step, {"train_loss": loss_value})
                if (state_path and cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0
                        and time.perf_counter() - last_saved >= cfg.checkpoint_min_interval_s):  # fmt: skip
                    checkpoint.save_atomic(state.snapshot(model, opts), state_path)
                    last_saved = time.perf_counter()
            bar.close()
            val_metrics = self.backend.evaluate(model, val)
            hooked: dict[str, float] = {}
            if on_epoch is not None:  # a stage's guard: it may change the model, and so val
                hooked, now = on_epoch(state.epoch + 1, val_metrics)
                val_metrics = now if now is not None else val_metrics
            state.end_epoch(val_metrics, model, cfg, epochs, self.backend.snapshot)
            epoch_metrics = {f"val_{k}": v for k, v in val_metrics.items()}
            epoch_metrics.update(hooked)
            epoch_metrics["epoch"] = float(state.epoch)
            epoch_metrics["trained_samples"] = float(self.trained_samples)
            if state.bad_epochs and cfg.lr_decay != 1.0:  # a plateau: every rate x lr_decay
                epoch_metrics["lr"] = opts.decay_lr(cfg.lr_decay, cfg.min_lr)
            epoch_metrics.update(module.training_metrics())  # e.g. OptEmbed's thresholds
            state.wall_time += time.perf_counter() - epoch_start
            if state_path:  # the checkpoint first: a failing callback (tracking) costs no training
                checkpoint.save_atomic(state.snapshot(model, opts), state_path)
                last_saved = time.perf_counter()
            for cb in self.callbacks:
                cb.on_epoch_end(state.epoch, epoch_metrics, state.global_step)

        if state.best_state is not None and state.best_epoch != state.epoch:
            self.backend.restore(model, state.best_state)
        times = state.step_times[min(5, len(state.step_times) // 2):] or [float("nan")]
        return FitResult(
            best_val=state.best_val,
            best_epoch=state.best_epoch,
            epochs_run=state.epoch,
            steps=state.global_step,
            samples_per_s=state.samples / state.train_time if state.train_time else float("nan"),
            step_time_ms=1000 * statistics.median(times),
            stopped_early=state.stopped,
            history=state.history,
            # sharded: each rank's share is counted by recsys.training.distributed.rank_bytes
            optimizer_bytes=self._optimizer_bytes(opts, module, fused),
            fit_s=state.wall_time,
            fit_samples_per_s=state.samples / state.wall_time if state.wall_time else float("nan"),
        )

    def _optimizer_bytes(self, opts: Optimizers, module: CompressedEmbeddingBagCollection,
                         fused: FusedTables | None) -> int | None:  # fmt: skip
        held = self.backend.optimizer_bytes(opts, module)
        return held if fused is None or held is None else held + fused.state_bytes()


@dataclass
class _LoopState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    train_time: float = 0.0
    wall_time: float = 0.0
    samples: int = 0
    step_times: list[float] = field(default_factory=list)

    def end_epoch(
        self, val: dict[str, float], model: nn.Module, cfg: TrainerConfig, epochs: int,
        snapshot: Callable[[nn.Module], Any],
    ) -> None:
        self.epoch += 1
        self.batch = 0
        self.history.append(val)
        auc = val["auc"]
        if auc > self.best_auc + cfg.min_delta or self.best_epoch == 0:
            self.best_auc, self.best_epoch, self.best_val = auc, self.epoch, val
            # a copy is needed only if a later epoch may be worse: none after the last one
            self.best_state = snapshot(model) if self.epoch < epochs else None
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            self.stopped = self.bad_epochs >= cfg.patience

    def snapshot(self, model: nn.Module, opts: Optimizers) -> dict[str, Any]:
        return {
            "loop": {k: v for k, v in self.__dict__.items()},
            "model": model.state_dict(),
            "optimizers": opts.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, saved: dict[str, Any], model: nn.Module, opts: Optimizers) -> None:
        self.__dict__.update(saved["loop"])
        model.load_state_dict(saved["model"])
        opts.load_state_dict(saved["optimizers"])
        torch.set_rng_state(saved["torch_rng"])
