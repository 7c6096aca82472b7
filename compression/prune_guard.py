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
``EpochHook`` (``compression.stages``) for the stage's ``ctx.fit``. A method whose learned
thresholds hard-mask rows (OptEmbed's supernet) uses ``ThresholdPruning``, over its
``thresholds``, the state ``add_guard_state`` registers and the fields its forward reads
unmasked (``open_units``).

Not guarded: PEP's soft threshold shrinks every element it keeps, so its model read
without the thresholds is another model, not the same one unpruned (on the tests' tiny
set, tables read raw score 0.02 AUC below the same tables thresholded at their 90th
percentile); and in its paper setting its thresholds fall (99.5-100% of the elements kept).
The budgeted prunings meet a count the user set, and keep no unpruned model to compare
with while they train: PEP's and DeepLight's floor zero the elements they cut, ITEP hands
a pruned id's row to another id; AutoSrh prunes once, to the budget, after its search.

Example::

    add_guard_state(module)                      # in the module's __init__, after its thresholds
    guard = PruningGuard(ThresholdPruning(module, lambda: ctx.evaluate()), tolerance=0.001)
    ctx.fit(epochs, on_epoch=guard.epoch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Optional, Protocol

import torch
from torch import nn

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


class ThresholdPruned(Protocol):
    """A module whose learned ``thresholds`` (one row per field) prune what it reads."""

    units: list[str]
    thresholds: nn.Parameter
    guard_thresholds: torch.Tensor  # the last thresholds the guard accepted
    guard_stopped: torch.Tensor  # a bool: a back-off froze the thresholds
    open_units: frozenset[int]  # fields its forward reads unpruned (the guard's look)


def add_guard_state(module: nn.Module) -> None:
    """Register the guard's state on a ``ThresholdPruned`` (buffers: it resumes with the
    model) once its ``thresholds`` exist; the module sets ``open_units`` (empty) itself."""
    thresholds = module.thresholds
    assert isinstance(thresholds, torch.Tensor)
    module.register_buffer("guard_thresholds", thresholds.detach().clone())
    module.register_buffer("guard_stopped", torch.zeros((), dtype=torch.bool, device=thresholds.device))


def drop_guard_state(module: nn.Module) -> None:
    """Remove it (the deployed form has no thresholds)."""
    del module.guard_thresholds, module.guard_stopped


class ThresholdPruning:
    """The ``Prunable`` of a ``ThresholdPruned``: a level between the accepted thresholds
    (0) and the epoch's (1) is their linear blend; stopping freezes them."""

    def __init__(self, module: ThresholdPruned, evaluate: Callable[[], Mapping[str, float]]) -> None:
        self.m, self._evaluate = module, evaluate
        self._epoch_thresholds: torch.Tensor | None = None

    def fields(self) -> list[str]:
        return self.m.units

    def evaluate(self) -> Mapping[str, float]:
        return self._evaluate()

    @contextlib.contextmanager
    def opened(self, fields: Sequence[int]) -> Iterator[None]:
        before, self.m.open_units = self.m.open_units, frozenset(fields)
        try:
            yield
        finally:
            self.m.open_units = before

    def level(self, x: float) -> None:
        if self._epoch_thresholds is None:
            self._epoch_thresholds = self.m.thresholds.detach().clone()
        accepted = self.m.guard_thresholds
        with torch.no_grad():
            self.m.thresholds.copy_(accepted + x * (self._epoch_thresholds - accepted))

    def accept(self) -> None:
        self.m.guard_thresholds.copy_(self.m.thresholds.detach())
        self._epoch_thresholds = None

    def stop(self) -> None:
        self.m.guard_stopped.fill_(True)

    @property
    def stopped(self) -> bool:
        return bool(self.m.guard_stopped)
