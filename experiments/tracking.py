"""MLflow: one run per job, checked before training, flattened params, nested stages.

The store defaults to SQLite at the repo root (``sqlite:///mlflow.db``); a tracking
server that does not answer is reported in one line before any work starts.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from compression.base import Stage
from recsys.data.schema import ProcessedDataset
from recsys.training.callbacks import Callback

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
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
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow tracking URI '{uri}': MLflow 3 no longer supports file stores; "
            "use sqlite:///mlflow.db or an http(s) server"
        )


EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def use_experiment(uri: str, name: str) -> str:
    """Point MLflow at ``uri`` and experiment ``name`` (created if missing); its id.

    With a SQLite store, artifacts go to ``mlartifacts/`` beside the database file
    rather than to the working directory, so a store and its artifacts stay together.
    """
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        location = (db.parent / "mlartifacts").as_uri()
    # the MLflow UI opens a "custom model development" experiment on its training-runs view
    # (charts, compare) rather than the GenAI traces overview
    exp_id = mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


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


def dataset_input(ds: ProcessedDataset) -> MetaDataset:
    """The processed dataset as an MLflow dataset input (source, digest, schema)."""
    s = ds.schema
    cols: list[ColSpec | TensorSpec] = [ColSpec("float", s.label)]
    cols += [ColSpec("float", n) for n in s.dense]
    cols += [ColSpec("long", f.name) for f in s.sparse]
    with warnings.catch_warnings():  # two registered local sources match a path: same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(ds.root.resolve()))
    return MetaDataset(  # type: ignore[abstract]
        source=source,
        name=s.name,
        digest=ds.root.name.rsplit("-", 1)[-1][:16],
        schema=Schema(cols),
    )


class MLflowCallback(Callback):
    """Logs the trainer's metrics to the active run; each stage of a multi-stage
    schedule becomes a nested run."""

    def __init__(self) -> None:
        self._nested = False

    def on_stage_start(self, stage: Stage, n_stages: int) -> None:
        if n_stages > 1:
            mlflow.start_run(run_name=stage.name, nested=True, tags={"stage": stage.name})
            if stage.params:
                mlflow.log_params(flatten(stage.params))
            self._nested = True

    def on_stage_end(self, stage: Stage, metrics: dict[str, float], n_stages: int) -> None:
        if self._nested:
            mlflow.log_metrics(_finite(metrics))
            mlflow.end_run()
            self._nested = False
        mlflow.log_metrics(_finite({f"{stage.name}.{k}": v for k, v in metrics.items()}) if n_stages > 1 else {})

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        # asynchronous: a SQLite commit per step would cost more than the step itself
        mlflow.log_metrics(_finite(metrics), step=step, synchronous=False)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(_finite(metrics), step=step)


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v == v and abs(float(v)) != float("inf")}
