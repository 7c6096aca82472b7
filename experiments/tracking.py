"""MLflow: one run per job, checked before training, flattened params, nested stages.

The store defaults to SQLite at the repo root (``sqlite:///mlflow.db``); a tracking
server that does not answer is reported in one line before any work starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from compression.errors import EmbcompError
from compression.stages import Stage
from experiments.record import RunRecord
from recsys.training.callbacks import Callback

log = logging.getLogger(__name__)


class TrackingError(EmbcompError, RuntimeError):
    """The tracking store cannot be used; the message says which and why."""


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the tracking store at ``uri`` cannot be reached."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({reason}); start it or set "
                "mlflow.tracking_uri=sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot create {db.parent} ({e.strerror})") from None
        _check_writable(uri, db)
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow tracking URI '{uri}': MLflow 3 no longer supports file stores; "
            "use sqlite:///mlflow.db or an http(s) server"
        )


def tracking_refusal(uri: str) -> str | None:
    """``check_tracking``'s refusal as the one line a command prints (None: usable)."""
    try:
        check_tracking(uri)
    except TrackingError as e:
        return f"error: {e}"
    return None


def _check_writable(uri: str, db: Path) -> None:
    """A store that cannot take a write is refused now, not after the data is prepared."""
    if db.is_dir():
        raise TrackingError(f"MLflow store {uri}: {db} is a directory, not a SQLite file")
    try:
        if db.exists():
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=30)) as con:
                # a real write, rolled back: SQLite opens a file it may not write read-only
                # without a word, and a read-only connection still takes the write lock
                con.execute("BEGIN IMMEDIATE")
                con.execute("CREATE TABLE embcomp_write_probe (x INTEGER)")
                con.rollback()
        else:
            probe = db.with_name(f".{db.name}.probe-{os.getpid()}")
            probe.touch()
            probe.unlink()
    except (sqlite3.Error, OSError) as e:
        raise TrackingError(
            f"MLflow store {uri}: cannot write to {db if db.exists() else db.parent} ({e}); "
            "make it writable or point mlflow.tracking_uri elsewhere"
        ) from None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Between processes: one at a time creates a SQLite store and what is in it (MLflow
    and Optuna each create their tables in a new file on first use, and two processes
    doing so at once fail with 'table ... already exists')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DEFAULT_EXPERIMENT_ID = "0"


def use_experiment(uri: str, name: str) -> str:
    """Point MLflow at ``uri`` and experiment ``name`` (created if missing); its id.

    With a SQLite store, artifacts go to ``mlartifacts/`` beside the database file
    rather than to the working directory, so a store and its artifacts stay together.
    """
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # a new store is created and migrated by one process at a time
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            mlflow.set_experiment(experiment_id=exp.experiment_id)
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):]).resolve()
            location = (db.parent / "mlartifacts").as_uri()
        # the MLflow UI opens a "custom model development" experiment on its training-runs
        # view (charts, compare) rather than the GenAI traces overview
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException as e:  # a server's store: another job created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or (found := mlflow.get_experiment_by_name(name)) is None:
                raise
            exp_id = found.experiment_id
        _hide_empty_default()
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _hide_empty_default() -> None:
    """The store's ``Default`` experiment, created with it and never used by embcomp, is
    deleted (MLflow's soft delete: restorable) while it holds no run, so that the UI's
    experiment list opens on embcomp's experiments, not on an empty one."""
    client = mlflow.MlflowClient()
    try:
        default = client.get_experiment(DEFAULT_EXPERIMENT_ID)
    except MlflowException:  # (a store without one)
        return
    if default.lifecycle_stage == "active" and not client.search_runs([DEFAULT_EXPERIMENT_ID], max_results=1,
                                                                      run_view_type=ViewType.ALL):  # fmt: skip
        client.delete_experiment(DEFAULT_EXPERIMENT_ID)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to ``{"a.b.c": value}`` for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class RecordCallback(Callback):
    """Sends the trainer's reports to the job's ``RunRecord``: per-step loss and per-epoch
    metrics to the job's run, or, in a multi-stage schedule, to the stage's nested run
    (slot ``stage:<name>``, the same run again when a resumed job reaches the stage)."""

    def __init__(self, record: RunRecord, flush_every: int = 200) -> None:
        self.record = record
        self.flush_every = flush_every
        self._slot = "job"
        self._steps = 0

    def on_stage_start(self, stage: Stage, n_stages: int) -> None:
        if n_stages > 1:
            self._slot = f"stage:{stage.name}"
            first = not self.record.started(self._slot)
            self.record.start(self._slot, run_name=stage.name, tags={"stage": stage.name}, parent="job")
            if first and stage.params:
                self.record.params(self._slot, flatten(stage.params))

    def on_stage_end(self, stage: Stage, metrics: dict[str, float], n_stages: int) -> None:
        if self._slot != "job":
            self.record.metrics(self._slot, metrics)
            self.record.end(self._slot)
            self._slot = "job"
            self.record.metrics("job", {f"{stage.name}.{k}": v for k, v in metrics.items()})
        self.record.flush()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.record.metrics(self._slot, metrics, step=step)
        self._steps += 1
        if self._steps % self.flush_every == 0:
            self.record.flush()

    def on_params(self, params: dict[str, object]) -> None:
        self.record.params(self._slot, flatten(params))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], step: int) -> None:
        # the trainer saved the epoch's checkpoint before this: the record follows it to disk
        self.record.metrics(self._slot, metrics, step=step)
        self.record.flush()

    def close(self, status: str) -> None:
        """End a stage's run left open by an interruption, so nothing stays RUNNING."""
        if self._slot != "job":
            self.record.end(self._slot, status)
            self._slot = "job"


def job_params(cfg: Any, comp: Any, chosen: Mapping[str, Any], schema: Any, ds_root: str, device: str) -> dict[str, Any]:
    """A job's MLflow params: the flattened config, the method's config and chosen sizes,
    the dataset's row counts and where its cache is."""
    import dataclasses

    from omegaconf import OmegaConf

    params = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    params["compression.method"] = type(comp).method
    params.update({f"compression.{k}": v for k, v in flatten(dataclasses.asdict(comp)).items()})
    params.update({f"compression.chosen.{k}": v for k, v in chosen.items()})
    params.update({"dataset.rows." + k: v for k, v in schema.rows.items()})
    params.update({"dataset.cache_dir": ds_root, "device": device})
    return params


def job_metrics(result: Any, memory: Any, model: Any, module: Any, extra: Mapping[str, float]) -> dict[str, float]:
    """A finished job's metrics: test metrics, exact bytes, each stage's figures, the
    training speed and epochs of its (last) training stage, parameter counts."""
    metrics: dict[str, float] = {f"test_{k}": v for k, v in result.test.items()}
    # other forms of the same trained module (matryoshka's deploy_ratios): beside their stage's figures
    metrics.update({f"{name}.test_{k}": v for name, m in result.alternatives.items() for k, v in m.items()})
    # the final model's validation figures (what a search selects on), and the run's cost
    metrics.update({f"final_val_{k}": v for k, v in result.val.items()})
    metrics["trained_samples"] = float(result.trained_samples)
    metrics.update(memory.as_metrics())
    metrics.update(extra)
    metrics["parameters"] = float(sum(p.numel() for p in model.parameters()))
    # counted after the stages: a quantize stage turns the table parameters into buffers
    metrics["dense_parameters"] = float(
        sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in module.parameters())
    )
    for name, stage_metrics in result.stages.items():
        prefix = "" if len(result.stages) == 1 else f"{name}."
        metrics.update({f"{prefix}{k}": v for k, v in stage_metrics.items()})
    if result.fit is None:  # a multi-stage method: its last training stage's speed
        timed = [m for m in result.stages.values() if "step_time_ms" in m]
        if timed:
            metrics["samples_per_s"] = timed[-1]["samples_per_s"]
            metrics["step_time_ms"] = timed[-1]["step_time_ms"]
    else:
        fit = result.fit
        metrics.update(
            epochs_run=float(fit.epochs_run), best_epoch=float(fit.best_epoch), samples_per_s=fit.samples_per_s,
            step_time_ms=fit.step_time_ms, fit_s=fit.fit_s, fit_samples_per_s=fit.fit_samples_per_s,
        )  # fmt: skip
        if fit.optimizer_bytes is not None:
            metrics["embedding_optimizer_bytes"] = float(fit.optimizer_bytes)
    return metrics


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v == v and abs(float(v)) != float("inf")}
