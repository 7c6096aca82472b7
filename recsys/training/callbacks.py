"""Hooks through which the trainer reports (MLflow logging lives in experiments/)."""

from __future__ import annotations

from compression.stages import Stage


class TrainingStopped(Exception):
    """Raised by a callback to end training before its schedule does (a search's pruner
    stopping a trial that has fallen behind); whoever runs the trainer records the run as
    stopped, with this message as the reason, not as failed."""


class Callback:
    """Override what you need; every hook is a no-op by default."""

    def on_stage_start(self, stage: Stage, n_stages: int) -> None: ...

    def on_stage_end(self, stage: Stage, metrics: dict[str, float], n_stages: int) -> None: ...

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_params(self, params: dict[str, object]) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], step: int) -> None: ...
