"""Training: the loop, metrics, optimizers and checkpoints."""

from recsys.training.callbacks import Callback
from recsys.training.metrics import binary_metrics, evaluate, predict
from recsys.training.trainer import (
    FitResult,
    RunResult,
    StageContext,
    Trainer,
    TrainerConfig,
    resolve_device,
)

__all__ = [
    "Callback",
    "FitResult",
    "RunResult",
    "StageContext",
    "Trainer",
    "TrainerConfig",
    "binary_metrics",
    "evaluate",
    "predict",
    "resolve_device",
]
