"""Successive halving among trials that are fair to compare: an Optuna pruner.

Optuna's ``SuccessiveHalvingPruner`` ranks a trial against every trial of the study.
Across compression methods and their settings that compares unlike things, so here a
trial is ranked only against its rivals:

- a candidate's default settings against the other candidates' defaults (group
  ``defaults``: the first round, where the methods meet on even terms, each as its
  authors set it; the full table is not in it, it is the reference);
- any other setting of a candidate against that candidate's trials (its tuning).

At each rung (epoch ``min_resource·η^k``) a trial goes on only if its best validation
AUC so far is in the top ``1/η`` of its rivals that reached that epoch (asynchronously,
as ASHA: a trial with fewer than ``η`` rivals there goes on when it leads). The best so
far, because the trainer restores its best epoch; it also keeps a staged method, whose
early epochs belong to a supernet or an unpruned table, from being judged on the dip
where it turns into its deployed form.

Example::

    study = optuna.create_study(direction="maximize", pruner=PerCandidateHalving(1, 3))
    # enqueued trials carry params["candidate"] and user_attrs["group"];
    # in the objective: trial.report(val_auc, epoch); if trial.should_prune(): stop
"""

from __future__ import annotations

import math

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

_SEEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class PerCandidateHalving(BasePruner):
    """Asynchronous successive halving among a trial's rivals (see the module)."""

    def __init__(self, min_resource: int = 1, reduction_factor: int = 3) -> None:
        if min_resource < 1 or reduction_factor < 2:
            raise ValueError(f"min_resource >= 1 and reduction_factor >= 2, got {min_resource}, {reduction_factor}")
        self.min_resource = min_resource
        self.eta = reduction_factor

    def is_rung(self, step: int) -> bool:
        """Whether ``step`` is ``min_resource·η^k`` for some k >= 0."""
        if step < self.min_resource or step % self.min_resource:
            return False
        k = math.log(step // self.min_resource, self.eta)
        return abs(k - round(k)) < 1e-9

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not self.is_rung(step):
            return False
        value = best_until(trial, step)
        others = [
            best_until(t, step)
            for t in study.get_trials(deepcopy=False, states=_SEEN)
            if t.number != trial.number and rivals(trial, t) and reached(t, step)
        ]
        ranked = sorted([*others, value], reverse=True)
        keep = max(1, len(ranked) // self.eta)
        return value < ranked[keep - 1]


DEFAULTS = "defaults"


def rivals(a: FrozenTrial, b: FrozenTrial) -> bool:
    """Trials of one candidate, or two candidates' default settings (group ``defaults``)."""
    if a.params.get("candidate") == b.params.get("candidate"):
        return True
    return a.user_attrs.get("group") == DEFAULTS and b.user_attrs.get("group") == DEFAULTS


def best_until(trial: FrozenTrial, step: int) -> float:
    """The trial's best reported value at or before ``step`` (the trainer keeps its best epoch)."""
    values = [v for s, v in trial.intermediate_values.items() if s <= step and v == v]
    return max(values) if values else -math.inf


def reached(trial: FrozenTrial, step: int) -> bool:
    """Whether the trial's training got to ``step`` (or ended before it by itself)."""
    last = trial.last_step
    return last is not None and (last >= step or trial.state == TrialState.COMPLETE)
