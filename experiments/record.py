"""A job's MLflow record, kept on disk first: a failing tracking store costs no training.

Every write a job makes to MLflow (a run started, params, tags, metrics with their step
and time, the dataset input, artifacts, the end status) is an operation appended to
``record.jsonl`` beside the job's checkpoints, and then applied to the store through
``MlflowClient``. Runs are named by *slot* (``job``, ``stage:retrain``, ...), so a
resumed job finds its runs, and its stages' nested runs, instead of making new ones.

When the store fails (deleted, read-only, a server gone), the record says so in one
warning line and stops sending; the job trains on and its record grows. The next
time the job's directory is opened with the store answering (a rerun with the same
``hydra.run.dir``), the record is brought up to date: the operations the store missed
are applied, and if the store no longer knows the job's runs (a deleted store), they
are made again and every operation is applied to them, metrics with their original
steps and times, so the run has no gap.

Example::

    rec = RunRecord.open(ckdir / "record.jsonl", uri, experiment_id)
    rec.start("job", run_name="qr-10x-dcnv2-ml", tags={"method": "qr"})
    rec.metrics("job", {"val_auc": 0.79}, step=100)
    rec.end("job")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from recsys.data.schema import ProcessedDataset

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"
BATCH = 900  # MLflow takes at most 1000 metrics per log_batch
MAX_PARAM = 6000  # MLflow's longest param value


class RunRecord:
    """The local-first record of one job's MLflow runs (see the module docstring)."""

    def __init__(self, path: Path, tracking_uri: str, experiment_id: str) -> None:
        self.path = Path(path)
        self.uri, self.experiment_id = tracking_uri, experiment_id
        self.client = MlflowClient(tracking_uri)
        self.ops: list[dict[str, Any]] = []
        self.run_ids: dict[str, str] = {}
        self.applied = 0  # ops the store has
        self.online = True
        self.on_offline: list[Callable[[], Any]] = []  # called once when the store fails
        self._pending: list[dict[str, Any]] = []  # ops not yet on disk

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, tracking_uri: str, experiment_id: str) -> RunRecord:
        """The record at ``path`` (new if there is none), brought up to date with the store."""
        rec = cls(path, tracking_uri, experiment_id)
        if rec.path.is_file():
            for line in rec.path.read_text().splitlines():
                if line.strip():
                    try:
                        rec.ops.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill: everything before it holds
                        break
            state = rec._state_path()
            if state.is_file():
                saved = json.loads(state.read_text())
                if saved.get("uri") == tracking_uri:
                    rec.run_ids, rec.applied = dict(saved["run_ids"]), int(saved["applied"])
            rec.sync()
        return rec

    def _state_path(self) -> Path:
        return self.path.with_name(self.path.name + ".state")

    def run_id(self, slot: str) -> str | None:
        return self.run_ids.get(slot)

    def started(self, slot: str) -> bool:
        return any(op["op"] in ("start", "adopt") and op["slot"] == slot for op in self.ops)

    # -- writing ---------------------------------------------------------------------
    def adopt(self, slot: str, run_id: str) -> None:
        """Make an existing run of the store this record's ``slot`` (a sweep's group run
        found again): later ``start`` reopens it instead of making a new one."""
        self._add({"op": "adopt", "slot": slot, "run_id": run_id})

    def start(self, slot: str, run_name: str, tags: Mapping[str, str], parent: str | None = None) -> None:
        """Start (or, when this record started it before, reopen) the run of ``slot``.

        ``parent``: a slot of this record, or the id of a run outside it (a sweep's).
        """
        if self.started(slot):
            self._add({"op": "reopen", "slot": slot})
        else:
            self._add({"op": "start", "slot": slot, "name": run_name, "tags": dict(tags), "parent": parent})
        self.flush()

    def params(self, slot: str, params: Mapping[str, Any]) -> None:
        self._add({"op": "params", "slot": slot, "params": {k: str(v)[:MAX_PARAM] for k, v in params.items()}})

    def tags(self, slot: str, tags: Mapping[str, str]) -> None:
        self._add({"op": "tags", "slot": slot, "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def metrics(self, slot: str, metrics: Mapping[str, float], step: int = 0) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v == v and abs(float(v)) != float("inf")}
        if finite:
            self._add({"op": "metrics", "slot": slot, "metrics": finite, "step": int(step),
                       "ts": int(time.time() * 1000)})  # fmt: skip

    def dataset(self, slot: str, root: str, context: str = "training") -> None:
        self._add({"op": "dataset", "slot": slot, "root": root, "context": context})

    def artifact(self, slot: str, local_path: Path, artifact_path: str | None = None) -> None:
        self._add({"op": "artifact", "slot": slot, "path": str(Path(local_path).resolve()), "dir": artifact_path})

    def end(self, slot: str, status: str = "FINISHED") -> None:
        self._add({"op": "end", "slot": slot, "status": status})
        self.flush()

    def _add(self, op: dict[str, Any]) -> None:
        op["seq"] = len(self.ops)
        self.ops.append(op)
        self._pending.append(op)

    def flush(self) -> None:
        """The pending operations onto disk (first), then to the store."""
        if self._pending:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.writelines(json.dumps(op, default=str) + "\n" for op in self._pending)
                f.flush()
                os.fsync(f.fileno())
            self._pending = []
        if self.online:
            self.sync()

    # -- the store -------------------------------------------------------------------
    def sync(self) -> bool:
        """Apply what the store is missing; False (and offline, said once) when it fails."""
        try:
            if self.run_ids and not all(self._known(r) for r in self.run_ids.values()):
                log.info("the tracking store lost this job's runs: recording them again from %s", self.path)
                self.run_ids, self.applied = {}, 0
            if self.applied < len(self.ops):
                self._apply(self.ops[self.applied:])
        except (MlflowException, OSError, Exception) as e:  # noqa: BLE001  (any store failure)
            if self.online:
                for hook in self.on_offline:  # a monitor that fails to stop: nothing to lose
                    with contextlib.suppress(Exception):
                        hook()
                print(
                    f"warning: the MLflow store {self.uri} failed ({_one_line(e)}); training goes on, its record "
                    f"is kept in {self.path} and is sent when the job is rerun in this directory with the store answering",
                    file=sys.stderr,
                )
            self.online = False
            return False
        self.online = True
        return True

    def _known(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def _apply(self, ops: list[dict[str, Any]]) -> None:
        metrics: dict[str, list[Metric]] = {}
        for op in ops:
            slot = op["slot"]
            if op["op"] != "metrics":
                self._send_metrics(metrics)
            kind = op["op"]
            if kind == "start":
                tags = dict(op["tags"])
                parent = op.get("parent")
                if parent is not None:
                    tags[PARENT_TAG] = self.run_ids.get(parent, parent)
                run = self.client.create_run(self.experiment_id, run_name=op["name"], tags=tags)
                self.run_ids[slot] = run.info.run_id
            elif kind == "adopt":
                self.run_ids[slot] = op["run_id"]
            elif kind == "reopen":
                self.client.update_run(self.run_ids[slot], status="RUNNING")
            elif kind == "params":
                items = [Param(k, v) for k, v in op["params"].items()]
                for i in range(0, len(items), 100):
                    self.client.log_batch(self.run_ids[slot], params=items[i : i + 100])
            elif kind == "tags":
                self.client.log_batch(self.run_ids[slot], tags=[RunTag(k, v) for k, v in op["tags"].items()])
            elif kind == "metrics":
                metrics.setdefault(slot, []).extend(Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items())
            elif kind == "dataset":
                self._log_dataset(slot, op)
            elif kind == "artifact":
                if Path(op["path"]).is_file():
                    self.client.log_artifact(self.run_ids[slot], op["path"], op.get("dir"))
            elif kind == "end":
                self.client.set_terminated(self.run_ids[slot], op["status"])
            if kind != "metrics":
                self._saved(op["seq"] + 1)
        self._send_metrics(metrics)
        self._saved(len(self.ops) if not ops else ops[-1]["seq"] + 1)

    def _send_metrics(self, metrics: dict[str, list[Metric]]) -> None:
        for slot, items in metrics.items():
            for i in range(0, len(items), BATCH):
                self.client.log_batch(self.run_ids[slot], metrics=items[i : i + BATCH])
        metrics.clear()

    def _log_dataset(self, slot: str, op: dict[str, Any]) -> None:
        try:
            ds = ProcessedDataset.open(op["root"])
        except Exception:  # noqa: BLE001  (a cache deleted since: the input is only provenance)
            return
        entity = dataset_input(ds)._to_mlflow_entity()
        self.client.log_inputs(self.run_ids[slot], [DatasetInput(entity, [InputTag("mlflow.data.context", op["context"])])])

    def _saved(self, applied: int) -> None:
        self.applied = applied
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps({"uri": self.uri, "run_ids": self.run_ids, "applied": applied}))
        tmp.replace(self._state_path())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


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
