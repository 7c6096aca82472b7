"""The trainer's side of ``compression.stages.StageContext``: what a method's stage gets.

A multi-stage method (OptEmbed's supernet, search, retrain) talks to training only
through this: the model and its compressed module, ``fit`` (the trainer's standard loop
on this job's data), ``evaluate`` on validation, and logging to the stage's record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from compression.base import CompressedEmbeddingBagCollection
from compression.stages import EpochHook, Stage
from recsys.data.loader import BatchLoader
from recsys.training.metrics import evaluate

if TYPE_CHECKING:
    from recsys.training.trainer import Trainer


@dataclass
class StageContext:
    """The trainer's side of ``compression.stages.StageContext``: what a stage's ``run``
    gets (the model and module, the loop on this job's data, the callbacks to log to)."""

    trainer: Trainer
    model: nn.Module
    module: CompressedEmbeddingBagCollection
    train: BatchLoader
    val: BatchLoader
    stage: Stage
    checkpoint_dir: Path | None

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def fit(self, epochs: Optional[int] = None, on_epoch: Optional[EpochHook] = None) -> dict[str, float]:
        fit = self.trainer.fit(self.model, self.module, self.train, self.val, self.checkpoint_dir, epochs=epochs,
                               on_epoch=on_epoch)  # fmt: skip
        return {**{f"val_{k}": v for k, v in fit.best_val.items()}, "samples_per_s": fit.samples_per_s,
                "step_time_ms": fit.step_time_ms, "epochs_run": float(fit.epochs_run)}

    def steps(self, epochs: Optional[int] = None) -> int:
        return (epochs or self.trainer.cfg.epochs) * len(self.train)

    def evaluate(self, max_batches: Optional[int] = None) -> dict[str, float]:
        return evaluate(self.model, self.val, self.trainer.device, max_batches=max_batches)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for cb in self.trainer.callbacks:
            cb.on_step(step, dict(metrics))

    def log_params(self, params: Mapping[str, Any]) -> None:
        for cb in self.trainer.callbacks:
            cb.on_params(dict(params))
