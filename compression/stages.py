"""A method's training schedule: named stages, and the one protocol they talk through.

A multi-stage method (OptEmbed: supernet, search, retrain, compact) owns its schedule
as a list of ``Stage``. Whoever trains (the project's trainer, or any loop) runs the stages in
order; a stage with ``run=None`` is that trainer's standard loop, any other stage's
``run`` gets a ``StageContext`` and returns its metrics. The context is the whole of
what a stage may ask of training: train for n epochs, evaluate, log, the model and
the compressed module. Nothing here knows who implements it, so the library depends
on no trainer (as torchrec's managed-collision modules own their id-transform
lifecycle instead of reaching into their caller).

Example::

    def search(ctx: StageContext) -> dict[str, float]:
        auc = ctx.evaluate(max_batches=4)["auc"]
        ctx.log({"search_auc": auc}, step=0)
        return {"search_val_auc": auc}

    Stage("search", run=search, params={"generations": 30})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from compression.base import CompressedEmbeddingBagCollection


# (epoch, its validation metrics) -> (metrics to log, the validation metrics now, or None: unchanged)
EpochHook = Callable[[int, Mapping[str, float]], tuple[dict[str, float], Optional[dict[str, float]]]]


class StageContext(Protocol):
    """What a stage's ``run`` may use: the model, its compressed module, training and
    evaluation on the job's data, and logging to the stage's record."""

    @property
    def model(self) -> nn.Module:
        """The whole model (its embedding module is ``module``), on ``device``."""
        ...

    @property
    def module(self) -> CompressedEmbeddingBagCollection:
        """The compressed embedding module the schedule belongs to."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the model trains and evaluates."""
        ...

    def fit(self, epochs: Optional[int] = None, on_epoch: Optional[EpochHook] = None) -> dict[str, float]:
        """Train with the standard loop for ``epochs`` (None: the trainer's own number),
        early stopping and best-epoch restore included; resumes an interrupted stage.
        ``on_epoch(epoch, val_metrics)`` runs after each epoch's validation (a guard
        that checks what the epoch did, and may undo some of it): it returns metrics to
        log, and, if it changed the model, the validation metrics that now hold.
        Returns ``val_<metric>`` of the best epoch, ``samples_per_s``, ``step_time_ms``
        and ``epochs_run``."""
        ...

    def steps(self, epochs: Optional[int] = None) -> int:
        """Training steps ``fit(epochs)`` takes at most (a schedule within a stage, e.g. a
        pruning ramp, is laid out over them)."""
        ...

    def evaluate(self, max_batches: Optional[int] = None) -> dict[str, float]:
        """Metrics (``auc``, ``logloss`` ...) on the validation split, or its first
        ``max_batches`` batches."""
        ...

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics at ``step`` of this stage (e.g. a search generation's best AUC)."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters of this stage found while it runs (e.g. the dims a search chose)."""
        ...


@dataclass
class Stage:
    """One named step of a method's training schedule.

    ``run`` gets a ``StageContext`` and returns a dict of metrics; ``None`` means the
    trainer's standard training loop. Each stage of a multi-stage schedule is logged
    as a nested run. ``checkpoint=False``: a cheap stage that changes the module's
    structure (e.g. ``quantize``), re-run after an interruption instead of restored
    from a checkpoint. ``at_budget=False``: the stage's model is not yet the one the budget
    sizes (a supernet, a search over a full-size table, a full table before it is merged),
    so its validation figures must not be compared with other methods' (a search that
    stops trials early compares only figures of models at their budget).
    """

    name: str
    run: Callable[[StageContext], dict[str, float]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint: bool = True
    at_budget: bool = True


def compact_then_finetune(
    name: str,
    compact: Callable[[], None],
    count_bytes: Callable[[], int],
    finetune_epochs: int = 0,
    extra: Callable[[], dict[str, float]] | None = None,
    train_at_budget: bool = True,
) -> list[Stage]:
    """``train`` -> ``name`` (``compact()`` turns the module into its deployed form, in
    place; its metrics: validation after it, the bytes before and after, ``extra()``) ->
    ``finetune`` for ``finetune_epochs`` if any. The schedule of DPQ's pack and dedup's
    merge. ``train_at_budget=False``: the trained form is not yet at the budget (dedup's
    full tables before the merge).

    Example::

        compact_then_finetune("pack", self.pack, lambda: memory_report(self).bytes, 1)
    """

    def run(ctx: StageContext) -> dict[str, float]:
        before = count_bytes()
        compact()
        ctx.model.to(ctx.device)
        metrics = {f"val_{k}": v for k, v in ctx.evaluate().items()}
        return {**metrics, "training_bytes": float(before), "embedding_bytes": float(count_bytes()),
                **(extra() if extra is not None else {})}  # fmt: skip

    out = [Stage("train", at_budget=train_at_budget), Stage(name, run=run, checkpoint=False)]
    if finetune_epochs:
        out.append(Stage("finetune", run=lambda ctx: ctx.fit(finetune_epochs), params={"epochs": finetune_epochs}))
    return out


def schedule(stages: list[Stage], post: list[Stage]) -> list[Stage]:
    """The method's own ``stages`` then the ``post``-training ones its config asks for
    (quantization), refusing two stages of one name (their records would collide)."""
    out = [*stages, *post]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a schedule needs distinct stage names, got {names}")
    return out
