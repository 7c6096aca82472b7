"""Where a search's Optuna study lives: its RDB storage, opened safely by many workers.

A study's storage (SQLite under the search's directory by default, or any RDB URL that
several machines share) carries each running trial's heartbeat: a trial whose worker
died is failed after ``GRACE_BEATS`` missed beats and its point queued again. Workers
opening a new SQLite file at once create its tables one at a time (the tracking store's
lock), and every SQLite transaction takes the write lock when it begins (``BEGIN
IMMEDIATE``), so two workers never pop the same waiting trial.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from experiments.advise.config import AdviseConfig
from experiments.advise.pruner import PerCandidateHalving
from experiments.tracking import store_lock

# a running trial's worker writes a heartbeat this often; a trial without one for
# GRACE_BEATS beats is taken for dead: failed, its point queued again
GRACE_BEATS = 6


def storage(url: str, heartbeat_s: int = 10) -> RDBStorage:
    """The study's RDB storage, with heartbeats: a trial whose worker died is failed after
    ``GRACE_BEATS`` missed beats and its point queued again."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # (processes opening a new SQLite file at once would each create Optuna's tables, and
    # all but the first fail with 'table ... already exists': one at a time)
    with store_lock(url), warnings.catch_warnings():  # (Optuna marks the heartbeat API experimental)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        out = RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=GRACE_BEATS * heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )  # fmt: skip
    if url.startswith("sqlite"):
        _immediate_transactions(out.engine)
    return out


def _immediate_transactions(engine: sqlalchemy.engine.Engine) -> None:
    """Every transaction on this SQLite engine takes the write lock when it begins.

    Optuna hands a waiting trial to a worker by reading it WAITING and writing it RUNNING;
    SQLite's default (deferred) transactions let two processes both read WAITING before
    either writes, and both run the trial (seen here: four workers popping one queue told
    the same trials twice). ``BEGIN IMMEDIATE`` makes the read and the write one step; the
    others wait (the connection's busy timeout)."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None  # (the driver's own BEGIN off: the one below instead)

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # (connections made before the listeners: closed, so every one has them)


def open_study(url: str, name: str, advise: AdviseConfig) -> optuna.Study:
    pruner = optuna.pruners.NopPruner() if advise.grid else PerCandidateHalving(advise.min_epochs, advise.reduction_factor)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage(url, advise.heartbeat_s), direction="maximize",
                               pruner=pruner, load_if_exists=True)  # fmt: skip
