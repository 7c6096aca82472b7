"""What training returns: one stage's ``FitResult`` and a whole schedule's ``RunResult``."""

from __future__ import annotations

from dataclasses import dataclass, field

from compression.api import CompressedEmbeddingBagCollection


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
    # wall time of the whole stage, validation included, and training samples per second
    # of it (how FuxiCTR reports its speed: rows x epochs / fit time)
    fit_s: float = float("nan")
    fit_samples_per_s: float = float("nan")


@dataclass
class RunResult:
    """A whole schedule: the result of each stage and the final test metrics."""

    stages: dict[str, dict[str, float]]
    test: dict[str, float]
    fit: FitResult | None
    # the module the schedule ended with when it is not the one passed in (a sharded run's
    # post-training stages run on rank 0's unsharded copy); None on the other ranks' results
    module: CompressedEmbeddingBagCollection | None = None
    # the validation metrics of the model the schedule ended with (after every stage, a
    # quantize stage included): what a search selects on; empty on the other ranks
    val: dict[str, float] = field(default_factory=dict)
    # training samples of every stage together (the cost of the run)
    trained_samples: int = 0
    # the test metrics of the module's other deployed forms (``alternatives()``), by name
    alternatives: dict[str, dict[str, float]] = field(default_factory=dict)
