"""The search: an Optuna study whose trials are the planned points, stopped early.

Why Optuna directly and not Hydra's Optuna sweeper: a sweeper's trial is a whole Hydra
job that returns one number when it ends, so no pruner can see a trial's epochs; and
the sweeper (1.3.0) declares optuna < 3. Here each trial reports its validation AUC
after every epoch (``trial.report``) and asks the pruner (``PerCandidateHalving``)
whether to go on.

The plan (every candidate's default point, then their other points round by round) is
enqueued once into the study, so every worker (processes on this machine, or on others
pointed at the same RDB storage) pops a different point: none runs twice, none is lost.
A worker killed outright leaves its trial RUNNING; the storage's heartbeat marks it
failed after a grace period and puts its point back (``RetryHeartbeatStaleTrialCallback``);
a worker stopped by Ctrl-C or SIGTERM puts its point back itself. The point's trial
directory keeps its checkpoints, so the retried trial continues where it stopped. (The
storage, and how workers open it safely: ``study_storage``.)

Only epochs of a model at its budget are reported to the pruner (``Stage.at_budget``):
a supernet's or a full-size search's validation AUC is not its method's at the budget.

Round 0 holds every candidate's default settings, pruned against each other (so the
methods meet on even terms and the weak ones cost a rung); later rounds tune each
candidate. Between rounds, candidates fall behind: a point of round r (r >= 1) runs only
if its candidate's best validation AUC so far (a finished trial's, or the best epoch of
one stopped early) ranks in the top ``max(finalists, ceil(M / 2^r))`` of the M
candidates (halving over methods); the others are recorded as pruned with the reason,
at no cost. The full table (the reference) is tuned through all its points.

The compute budget (training samples, summed over every trial in the study, and this
invocation's wall time) stops the search early enough to leave what the finalists will
take: ``seeds`` runs each of the best candidates' and the reference's best trials, at
what those trials cost.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from compression import BudgetError, IdOutOfRangeError, MethodConfigError
from compression.errors import EmbcompError
from compression.stages import Stage
from experiments.advise.candidates import Point
from experiments.advise.config import AdviseConfig
from experiments.advise.pruner import PerCandidateHalving
from experiments.advise.study_storage import GRACE_BEATS
from experiments.advise.study_storage import open_study as open_study  # (imported from here)
from experiments.advise.study_storage import storage as storage
from experiments.interrupts import interrupted, stop_requested
from experiments.job_summary import JobSummary
from recsys.training.callbacks import Callback, TrainingStopped

PLAN_ATTR = "embcomp.plan"
WORKER = f"{socket.gethostname()}:{os.getpid()}"
PARENT_ATTR = "embcomp.parent_run"

# (a point, the trial's number, callbacks for the trainer) -> the job's summary; a job the
# store already holds complete gives its summary from disk, one out of reach raises BudgetError
Runner = Callable[[Point, int, list[Callback]], JobSummary]


class AdviseError(EmbcompError, ValueError):
    """A search that cannot start or go on as asked (the message says why and what to do)."""


class _TrialError(Exception):
    """A trial that cannot finish (its method refused, its loss diverged): recorded as
    failed with the reason, and the search goes on."""


def plan_study(study: optuna.Study, plan: list[Point], digest: str) -> None:
    """Queue every point of ``plan`` once (idempotent: a resumed search queues nothing new).
    A study planned with other candidates or settings is refused."""
    done = study.user_attrs.get(PLAN_ATTR)
    if done is not None and done != digest:
        raise AdviseError(
            f"study '{study.study_name}' was planned for other candidates or settings; rerun with the arguments "
            "it was started with, or name a new study (advise.study=<name>)"
        )
    if done == digest:
        return
    for p in plan:  # skip_if_exists: a planning cut short by a kill resumes where it stopped
        study.enqueue_trial(p.params(), user_attrs=p.attrs(), skip_if_exists=True)
    study.set_user_attr(PLAN_ATTR, digest)


def wait_for_plan(study: optuna.Study, timeout_s: float = 600) -> optuna.Study:
    """A ``worker_only`` process: wait until the main process has planned the study."""
    end = time.monotonic() + timeout_s
    while PLAN_ATTR not in study.user_attrs:
        if time.monotonic() > end:
            raise AdviseError(f"study '{study.study_name}' was not planned within {timeout_s:.0f} s: start the main "
                              "process (without advise.worker_only) first")  # fmt: skip
        time.sleep(2)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage, pruner=study.pruner)
    return study


@dataclass
class Budget:
    """What the search may spend: training samples in all (the study's), and seconds of
    this invocation; ``None``: no limit of that kind."""

    samples: float | None
    seconds: float | None
    started: float

    def exhausted(self, spent: float, reserve: tuple[float, float]) -> str | None:
        """Why no further trial may start (None: one may), keeping ``reserve`` (samples,
        seconds) for the finalists."""
        if self.samples is not None and spent + reserve[0] >= self.samples:
            return f"{spent:,.0f} samples trained and {reserve[0]:,.0f} kept for the finalists, of {self.samples:,.0f}"
        elapsed = time.monotonic() - self.started
        if self.seconds is not None and elapsed + reserve[1] >= self.seconds:
            return f"{elapsed / 60:.1f} minutes spent and {reserve[1] / 60:.1f} kept for the finalists, of {self.seconds / 60:.1f}"
        return None


class _Report(Callback):
    """Each epoch's validation AUC to the trial; stops the trial when the pruner says so.

    Epochs count from the start of the job (the cost), but only those of a stage whose
    model is at its budget are reported: a supernet's or a full-size search's figures
    (``Stage.at_budget``) are not that method's at the budget, and would outrank the
    methods that train at it from the first epoch."""

    def __init__(self, trial: optuna.Trial, prune: bool, say: Callable[[str], None] = print, name: str = "") -> None:
        self.trial = trial
        self.prune = prune
        self.say = say
        self.name = name
        self.epochs = 0
        self.samples = 0.0
        self.at_budget = True

    def on_stage_start(self, stage: Stage, n_stages: int) -> None:
        self.at_budget = stage.at_budget

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], step: int) -> None:
        self.epochs += 1
        self.samples = float(metrics.get("trained_samples", self.samples))
        self.trial.set_user_attr("trained_samples", self.samples)
        auc = metrics.get("val_auc")
        if auc is None or not self.prune or not self.at_budget:
            return
        self.trial.report(float(auc), self.epochs)
        stop = self.trial.should_prune()
        pruner = self.trial.study.pruner
        if isinstance(pruner, PerCandidateHalving) and pruner.is_rung(self.epochs):  # progress at each rung
            self.say(f"[advise]   {self.name} epoch {self.epochs} (a rung): validation AUC {auc:.4f}, "
                     + ("stopped" if stop else "goes on"))  # fmt: skip
        if stop:
            raise TrainingStopped(f"stopped after epoch {self.epochs}: validation AUC {auc:.4f}, behind its "
                                  "rivals at that epoch")  # fmt: skip


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The study's planned trials that ended complete, with a value."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "point" in t.user_attrs and t.value is not None]  # fmt: skip


def learned(t: FrozenTrial) -> bool:
    return "not_learned" not in t.user_attrs


def best_by_candidate(trials: list[FrozenTrial], reference: bool = False) -> dict[str, FrozenTrial]:
    """Each candidate's best finished trial that learned (the reference's too if asked)."""
    best: dict[str, FrozenTrial] = {}
    for t in trials:
        name = t.params["candidate"]
        wanted = learned(t) and (reference or not t.user_attrs.get("reference"))
        if wanted and (name not in best or t.value > best[name].value):  # type: ignore[operator]
            best[name] = t
    return best


def standing(trials: list[FrozenTrial]) -> dict[str, float]:
    """Each compressed candidate's best validation AUC so far: its finished trials' values
    and the best epoch of those stopped early (a candidate whose defaults were stopped at
    the first rung stands where they were stopped)."""
    best: dict[str, float] = {}
    for t in trials:
        if "point" not in t.user_attrs or t.user_attrs.get("reference") or not learned(t) or "skipped" in t.user_attrs:
            continue
        if t.state == TrialState.COMPLETE and t.value is not None:
            v = t.value
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            v = max(t.intermediate_values.values())
        else:
            continue
        name = t.params["candidate"]
        best[name] = max(v, best.get(name, -math.inf))
    return best


def spent_samples(study: optuna.Study) -> float:
    return sum(float(t.user_attrs.get("trained_samples", 0.0)) for t in study.get_trials(deepcopy=False))


class Search:
    """One worker's loop over the study: pop a point, train it, report, until the plan or
    the budget runs out."""

    def __init__(
        self, study: optuna.Study, points: dict[str, Point], runner: Runner, advise: AdviseConfig, budget: Budget,
        say: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        self.study = study
        self.points = points
        self.runner = runner
        self.advise = advise
        self.budget = budget
        self.say = say
        self.current: tuple[int, Point] | None = None  # the trial this worker took, and its point
        self.stopped: str | None = None

    def run(self) -> None:
        while True:
            if stop_requested():  # a SIGTERM whose KeyboardInterrupt a library swallowed
                raise KeyboardInterrupt("terminated")
            with warnings.catch_warnings():  # (Optuna marks the heartbeat API experimental)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(self.study)
            self.reclaim_unstarted()
            if not self.advise.grid and (why := self.budget.exhausted(spent_samples(self.study), self.reserve())):
                self.stopped = why
                self.say(f"[advise] compute budget reached: {why}; no further trials")
                return
            states = {t.state for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))}
            if TrialState.WAITING not in states:
                if TrialState.RUNNING in states:  # another worker's, or a dead one's within its grace
                    time.sleep(self.advise.heartbeat_s / 2)
                    continue
                return
            self.current = None
            try:
                self.study.optimize(self.objective, n_trials=1, catch=(_TrialError,), gc_after_trial=False)
            except BaseException as e:
                if not interrupted(e):
                    raise
                self.requeue()
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise KeyboardInterrupt(str(e)) from e

    def reclaim_unstarted(self) -> None:
        """Fail and queue again a trial taken by a worker that died before its first
        heartbeat (Optuna's stale check skips a trial that has none): RUNNING, its
        objective never started (no ``started`` attr of its own number), for longer than
        the grace period."""
        grace = GRACE_BEATS * self.advise.heartbeat_s
        now = datetime.datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start
            if t.user_attrs.get("started") == t.number or started is None or (now - started).total_seconds() < grace:
                continue
            try:
                if not self.study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker reclaimed it first
                continue
            point = self.points.get(t.user_attrs.get("point", ""))
            if point is not None:
                self.study.enqueue_trial(point.params(), user_attrs=point.attrs(), skip_if_exists=False)

    def requeue(self) -> None:
        """Put the interrupted trial's point back in the queue, its trial ended FAIL, unless
        Optuna had recorded it finished: a stop anywhere from the objective's first line
        to Optuna's record (while it writes the trial's params, trains, writes its results)
        loses no point and trains none twice."""
        if self.current is None:
            return
        number, p = self.current
        storage = self.study._storage
        trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number))
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return
        if trial.state == TrialState.RUNNING:  # stopped while Optuna recorded it: no next run waits for it
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        self.study.enqueue_trial(p.params(), user_attrs=p.attrs(), skip_if_exists=False)
        self.say(f"[advise] interrupted: {p.candidate.name} {p.settings()} will be trained again on the next run")

    def reserve(self) -> tuple[float, float]:
        """Samples and seconds the finalists will need: ``seeds`` runs of each of the best
        candidates' best trials and the reference's, at what those trials cost."""
        best = best_by_candidate(finished(self.study))
        top = sorted(best.values(), key=lambda t: t.value, reverse=True)[: self.advise.finalists]  # type: ignore[arg-type, return-value]
        ref = best_by_candidate([t for t in finished(self.study) if t.user_attrs.get("reference")], reference=True)
        chosen = [*top, *ref.values()]
        per_seed = (sum(float(t.user_attrs.get("trained_samples", 0)) for t in chosen),
                    sum(float(t.user_attrs.get("wall_s", 0)) for t in chosen))  # fmt: skip
        return per_seed[0] * self.advise.seeds, per_seed[1] * self.advise.seeds

    def behind(self, point: Point) -> str | None:
        """Why this point's candidate gets no further trials (halving over candidates)."""
        if point.candidate.reference or point.default or self.advise.grid:
            return None
        best = standing(self.study.get_trials(deepcopy=False))
        name = point.candidate.name
        if name not in best:
            return None
        ranked = sorted(best, key=lambda k: best[k], reverse=True)
        keep = max(self.advise.finalists, math.ceil(len(ranked) / 2**point.round))
        place = ranked.index(name)
        if place < keep:
            return None
        return (f"candidate behind: its best validation AUC {best[name]:.4f} ranks {place + 1} of {len(ranked)}; "
                f"round {point.round} goes on with the top {keep}")  # fmt: skip

    def objective(self, trial: optuna.Trial) -> float:
        point = self.points.get(trial.user_attrs.get("point", ""))
        if point is None:  # a trial the plan did not queue (another worker took the last point)
            trial.set_user_attr("skipped", "not in the plan")
            raise optuna.TrialPruned("not in the plan")
        self.current = (trial.number, point)
        space = dict(point.candidate.space)
        trial.suggest_categorical("candidate", [c for c in self.candidates()])
        for key, _ in point.values:  # (the queued point fixes each value)
            trial.suggest_categorical(f"{point.candidate.name}.{key.split('.', 1)[1]}", list(space[key]))
        trial.set_user_attr("worker", WORKER)
        # a beat of our own before "started": Optuna's heartbeat thread may not have written
        # its first yet, and a worker killed then would leave a trial that neither the stale
        # check (no heartbeat) nor reclaim_unstarted ("started") takes back: the study waits forever
        storage = self.study._storage
        if is_heartbeat_enabled(storage) and isinstance(storage, BaseHeartbeat):
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("started", trial.number)  # (a retried trial carries its first one's attrs)
        if point.candidate.reference:
            trial.set_user_attr("reference", True)
        if (why := self.behind(point)) is not None:
            trial.set_user_attr("skipped", why)
            self._progress(trial, point, "skipped: " + why)
            raise optuna.TrialPruned(why)
        report = _Report(trial, not self.advise.grid, self.say, f"{point.candidate.name} {point.settings()}")
        start = time.monotonic()
        try:
            summary = self.runner(point, trial.number, [] if self.advise.grid else [report])
        except TrainingStopped as e:
            trial.set_user_attr("wall_s", time.monotonic() - start)
            trial.set_user_attr("stopped", str(e))
            self._progress(trial, point, f"pruned after epoch {report.epochs}")
            raise optuna.TrialPruned(str(e)) from None
        except (BudgetError, MethodConfigError, IdOutOfRangeError, FloatingPointError) as e:
            trial.set_user_attr("wall_s", time.monotonic() - start)
            trial.set_user_attr("error", str(e).splitlines()[0][:300])
            self._progress(trial, point, f"failed: {e}")
            raise _TrialError(str(e)) from None
        m = summary.metrics
        attrs: dict[str, Any] = {k: float(m[k]) for k in RECORDED if k in m}
        attrs.update(wall_s=time.monotonic() - start, run_id=summary.run_id or "")
        if summary.per_seed is not None:  # the grid: seeds' sums and test figures
            attrs["trained_samples"] = sum(float(s.get("trained_samples", 0)) for s in summary.per_seed.values())
            attrs["per_seed"] = summary.per_seed
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        from recsys.training.metrics import not_learned

        if (why := not_learned(m, "final_val_")) is not None:
            trial.set_user_attr("not_learned", why)
        self._progress(trial, point, f"validation AUC {m['final_val_auc']:.4f}" + (f" (failed: {why})" if why else ""))
        return float(m["final_val_auc"])

    def candidates(self) -> list[str]:
        return sorted({p.candidate.name for p in self.points.values()})

    def _progress(self, trial: optuna.Trial, point: Point, what: str) -> None:
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state.is_finished() for t in trials) + 1
        planned = sum("point" in t.user_attrs and t.state != TrialState.FAIL for t in trials)
        best = best_by_candidate(finished(self.study))
        lead = max(best.values(), key=lambda t: t.value, default=None)  # type: ignore[arg-type, return-value]
        lead_text = f"best {lead.params['candidate']} {lead.value:.4f}" if lead is not None else "no result yet"
        spent = spent_samples(self.study)
        cap = f"/{self.budget.samples:,.0f}" if self.budget.samples else ""
        elapsed = (time.monotonic() - self.budget.started) / 60
        self.say(f"[advise] trial {done} ({planned} planned) round {point.round} · {point.candidate.name} {point.settings()}: {what}"
                 f" · {lead_text} · {spent:,.0f}{cap} samples · {elapsed:.1f} min")  # fmt: skip


# a finished trial's metrics kept on it (what the answer and the report read)
RECORDED = (
    "final_val_auc", "final_val_logloss", "final_val_base_logloss", "trained_samples", "embedding_bytes",
    "compression_ratio", "step_time_ms", "samples_per_s", "epochs_run", "test_auc", "test_logloss",
)  # fmt: skip


def spawn_workers(argv: list[str], n: int, threads: int) -> list[subprocess.Popen]:
    """``n`` more worker processes of this search on this machine (``advise.worker_only``)."""
    threads_set = any(a.startswith("trainer.num_threads=") for a in argv)
    cmd = [sys.executable, "-m", "experiments.advise", *argv, "advise.worker_only=true", "advise.workers=1",
           *([] if threads_set else [f"trainer.num_threads={threads}"])]  # fmt: skip
    return [subprocess.Popen(cmd) for _ in range(n)]
