"""A pruned model checked against itself unpruned: what pruning costs, and backing off.

A method that prunes while it trains (OptEmbed's supernet, its thresholds deciding) can
prune rows the loss still wants: the training loss barely notices rows that rare ids
use, the validation AUC does. After each epoch of such a stage the guard evaluates the
model on validation data with its pruning as it stands and with none of it (the same
weights), and with each field alone pruned: what pruning costs in AUC, in all and per
field, logged beside the rows kept. When the cost exceeds ``tolerance``, pruning backs
off: the method's pruning level, between the last one the guard accepted (0) and the
current one (1), is bisected to the deepest level that costs at most the tolerance, set
there, and pruning stops.

A method takes part through a ``Prunable``; ``PruningGuard.epoch`` is an
``EpochHook`` (``compression.stages``) for the stage's ``ctx.fit``.

Example::

    guard = PruningGuard(module.prunable(ctx), tolerance=0.001)
    ctx.fit(epochs, on_epoch=guard.epoch)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Optional, Protocol

# bisection steps of a back-off: the level is found to 1/2^BISECT of the epoch's pruning
BISECT = 5


class Prunable(Protocol):
    """What the guard asks of a method that prunes while it trains."""

    def fields(self) -> Sequence[str]:
        """The names of the pruned units (tables), in order."""
        ...

    def evaluate(self) -> Mapping[str, float]:
        """Validation metrics of the model as it stands (``auc`` among them)."""
        ...

    def opened(self, fields: Sequence[int]) -> AbstractContextManager[None]:
        """Within it, these fields are not pruned (the same weights)."""
        ...

    def level(self, x: float) -> None:
        """Set the pruning between the last accepted (0.0) and the epoch's own (1.0)."""
        ...

    def accept(self) -> None:
        """The pruning as it stands becomes the last accepted level."""
        ...

    def stop(self) -> None:
        """Pruning stays where it is for the rest of the stage."""
        ...

    @property
    def stopped(self) -> bool:
        """Whether a back-off stopped pruning (state of the model: it resumes with it)."""
        ...


class PruningGuard:
    """Checks each epoch's pruning against the unpruned model; backs off over ``tolerance``.

    ``tolerance=None``: measure and log only (a budget that must be met, say)."""

    def __init__(self, target: Prunable, tolerance: Optional[float] = 0.001) -> None:
        self.target = target
        self.tolerance = tolerance

    def epoch(self, epoch: int, val: Mapping[str, float]) -> tuple[dict[str, float], Optional[dict[str, float]]]:
        """The ``EpochHook``: the cost of the epoch's pruning (all, and per field), and after
        a back-off the validation metrics that now hold."""
        t, names = self.target, list(self.target.fields())
        everything = range(len(names))
        with t.opened(everything):
            unpruned = float(t.evaluate()["auc"])
        pruned = float(val["auc"])
        out = {"val_auc_unpruned": unpruned, "prune_cost_auc": unpruned - pruned}
        for i, name in enumerate(names):  # each field alone pruned
            with t.opened([j for j in everything if j != i]):
                out[f"prune_cost_auc.{name}"] = unpruned - float(t.evaluate()["auc"])
        if t.stopped or self.tolerance is None or unpruned - pruned <= self.tolerance:
            if not t.stopped:
                t.accept()
            return out, None
        lo, hi = 0.0, 1.0  # the deepest level within the tolerance
        for _ in range(BISECT):
            mid = (lo + hi) / 2
            t.level(mid)
            if unpruned - float(t.evaluate()["auc"]) <= self.tolerance:
                lo = mid
            else:
                hi = mid
        t.level(lo)
        t.accept()
        t.stop()
        now = dict(t.evaluate())
        out.update(prune_backed_off_to=lo, prune_cost_auc_after=unpruned - float(now["auc"]))
        return out, now
