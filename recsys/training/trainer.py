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

import copy
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compression.base import CompressedEmbeddingBagCollection, Stage
from compression.memory import optimizer_state_bytes
from recsys.data.loader import BatchLoader
from recsys.training import checkpoint
from recsys.training.callbacks import Callback
from recsys.training.metrics import evaluate
from recsys.training.optim import Optimizers, build_optimizers


@dataclass
class TrainerConfig:
    """How to train. Learning rates: Adam for dense parameters, row-wise Adagrad for tables."""

    epochs: int = 3
    batch_size: int = 512
    eval_batch_size: int = 8192
    dense_lr: float = 1e-3
    sparse_lr: float = 0.05
    weight_decay: float = 0.0
    patience: int = 1
    min_delta: float = 0.0
    device: str = "auto"
    num_threads: Optional[int] = None
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    max_steps_per_epoch: Optional[int] = None
    progress: str = "auto"
    seed: int = 0


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but this machine has no CUDA device")
    return torch.device(name)


@dataclass
class FitResult:
    """What one training stage produced."""

    best_val: dict[str, float]
    best_epoch: int
    epochs_run: int
    steps: int
    samples_per_s: float
    step_time_ms: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    # optimizer state held for the embedding rows (row-wise Adagrad: one float per row)
    optimizer_bytes: int | None = None


@dataclass
class RunResult:
    """A whole schedule: the result of each stage and the final test metrics."""

    stages: dict[str, dict[str, float]]
    test: dict[str, float]
    fit: FitResult | None


@dataclass
class StageContext:
    """What a custom stage's ``run`` gets: the trainer, model, module and data."""

    trainer: Trainer
    model: nn.Module
    module: CompressedEmbeddingBagCollection
    train: BatchLoader
    val: BatchLoader
    stage: Stage
    checkpoint_dir: Path | None


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = resolve_device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

    # -- the schedule ------------------------------------------------------------------
    def run(
        self,
        model: nn.Module,
        module: CompressedEmbeddingBagCollection,
        train: BatchLoader,
        val: BatchLoader,
        test: BatchLoader,
    ) -> RunResult:
        """Run every stage of ``module``'s schedule, then evaluate on ``test``."""
        model.to(self.device)
        stages = module.schedule()
        results: dict[str, dict[str, float]] = {}
        last_fit: FitResult | None = None
        for stage in stages:
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
        test_metrics = evaluate(model, test, self.device)
        return RunResult(stages=results, test=test_metrics, fit=last_fit)

    # -- the standard loop -------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        module: CompressedEmbeddingBagCollection,
        train: BatchLoader,
        val: BatchLoader,
        ckdir: Path | None = None,
    ) -> FitResult:
        """Train with early stopping on validation AUC; the best epoch's weights are kept."""
        cfg = self.cfg
        model.to(self.device).train()
        opts = build_optimizers(model, module, cfg)
        state = _LoopState()
        state_path = ckdir / "last.pt" if ckdir else None
        saved = checkpoint.load(state_path) if state_path else None
        if saved is not None:
            state.restore(saved, model, opts)
        steps_per_epoch = len(train)
        show = {"auto": sys.stderr.isatty(), "on": True, "off": False}[cfg.progress]

        while state.epoch < cfg.epochs and not state.stopped:
            bar = tqdm(
                total=steps_per_epoch, initial=state.batch, disable=not show,
                desc=f"epoch {state.epoch + 1}/{cfg.epochs}", leave=False,
            )
            for batch in train.epoch(state.epoch, start_batch=state.batch):
                t0 = time.perf_counter()
                batch = batch.to(self.device)
                logits = model(batch.dense_features, batch.sparse_features).reshape(-1)
                loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
                reg = module.regularization()
                total = loss + reg if reg is not None else loss
                opts.zero_grad()
                total.backward()
                opts.step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                state.step_times.append(dt)
                state.train_time += dt
                state.samples += len(batch.labels)
                state.batch += 1
                state.global_step += 1
                loss_value = float(loss.detach())
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
                if state_path and cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0:
                    checkpoint.save_atomic(state.snapshot(model, opts), state_path)
            bar.close()
            val_metrics = evaluate(model, val, self.device)
            state.end_epoch(val_metrics, model, cfg)
            epoch_metrics = {f"val_{k}": v for k, v in val_metrics.items()}
            epoch_metrics["epoch"] = float(state.epoch)
            epoch_metrics.update(module.training_metrics())  # e.g. OptEmbed's thresholds
            for cb in self.callbacks:
                cb.on_epoch_end(state.epoch, epoch_metrics, state.global_step)
            if state_path:
                checkpoint.save_atomic(state.snapshot(model, opts), state_path)

        if state.best_state is not None:
            model.load_state_dict(state.best_state)
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
            optimizer_bytes=optimizer_state_bytes(opts, module.table_parameters()),
        )


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
    samples: int = 0
    step_times: list[float] = field(default_factory=list)

    def end_epoch(self, val: dict[str, float], model: nn.Module, cfg: TrainerConfig) -> None:
        self.epoch += 1
        self.batch = 0
        self.history.append(val)
        auc = val["auc"]
        if auc > self.best_auc + cfg.min_delta or self.best_state is None:
            self.best_auc, self.best_epoch, self.best_val = auc, self.epoch, val
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
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
