"""A job resolved before any data is read: its configs, its identity, where it records.

``resolve`` turns a job's Hydra config into a ``Resolved``: the dataset, model,
compression and trainer configs; whether it shards (a ``ShardedJob``, or a ``LocalJob``
for one ordinary process); its MLflow tags, run name and parent run; its job key and
checkpoint directory (refused if another job's checkpoints are there); and its run
record. A job its sweep already holds complete raises ``JobSkipped`` here, before any
data is read. The file names and tags a job records under are defined here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from compression import CompressionConfig
from compression.config_checks import ConfigError
from compression.errors import EmbcompError
from compression.memory import MemoryReport
from experiments.identity import describe_job, job_key, resolve_compression
from experiments.record import RunRecord
from experiments.sharding import ShardedJob
from experiments.tracking import check_tracking, use_experiment

if TYPE_CHECKING:
    from experiments.job_seeds import Group

PARENT_RUN_FILE = "mlflow_parent_run_id"
RECORD_FILE = "record.jsonl"  # a job's MLflow record, beside its checkpoints (experiments.record)
GROUP_RECORD = "group_record.jsonl"  # a multi-seed job's group run
JOB_KEY_FILE = "job_key"
PARENT_TAG = "mlflow.parentRunId"


class JobSkipped(Exception):
    """A sweep job that does not need to run (duplicate, or a budget out of reach)."""


class JobUnreachable(JobSkipped):
    """A sweep job whose budget (or memory) the method cannot meet; recorded as such."""


class CheckpointMismatch(EmbcompError, ValueError):
    """A checkpoint directory written by a job with a different effective config."""


class LocalJob:
    """A job in one ordinary process: what a ``ShardedJob`` does across its ranks, for
    the one rank there is (it records, it broadcasts to nobody, it reads whole batches)."""

    main = True
    shard: tuple[int, int] | None = None  # (BatchLoader(shard=...): every batch whole)
    whole: MemoryReport | None = None  # (a sharded job's module as built; here: none)

    def broadcast(self, value: Any) -> Any:
        return value

    def prepared(self, prepare: Callable[[], Any]) -> Any:
        return prepare()

    def log(self, record: RunRecord, output_dir: Path) -> dict[str, float]:
        return {}


@dataclass
class Resolved:
    """A job resolved, before any data is read: its configs, where it records and resumes."""

    cfg: DictConfig
    dataset: Any
    model: Any
    comp: CompressionConfig
    trainer: Any
    job: ShardedJob | LocalJob  # sharded: every rank trains, rank 0 alone records
    tags: dict[str, str]
    key: str
    ckdir: Path
    run_name: str
    parent_run_id: str | None
    in_sweep: bool
    record: RunRecord | None

    @property
    def main(self) -> bool:
        return self.job.main

    @property
    def sharded(self) -> ShardedJob | None:
        """The job's sharding, None when it runs as one ordinary process."""
        return self.job if isinstance(self.job, ShardedJob) else None


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def sweep_parent() -> str | None:
    """The MLflow parent run of the multirun this job belongs to (see callbacks.py)."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # composed outside a Hydra app (tests, library use)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    path = Path(hc.sweep.dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def run_name(tags: dict[str, str]) -> str:
    return "-".join(
        [tags["label"]] + ([tags["budget"]] if tags["budget"] != "none" else []) + [tags["model"], tags["dataset"]]
    )


def resolve(cfg: DictConfig, output_dir: Path, parent_run_id: str | None, group: Group | None) -> Resolved:
    """Configs, the tracking store (checked), tags, run name, the checkpoint dir; raises
    ``JobSkipped`` if the sweep already holds this job complete."""
    comp_cfg = resolve_compression(cfg)
    dataset = OmegaConf.to_object(cfg.dataset)
    if getattr(dataset, "ids", "vocab") == "raw" and (why := comp_cfg.raw_id_refusal()) is not None:
        raise ConfigError(f"dataset.ids=raw: {why}")
    trainer_cfg: Any = OmegaConf.to_object(cfg.trainer)
    job = ShardedJob.start(cfg, trainer_cfg) or LocalJob()
    exp_id = None
    if job.main:
        check_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.connect_timeout_s)
        exp_id = use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)
    if group is not None:  # a seed of a multi-seed job: nested under its group run
        parent_run_id, sweep_id = (group.run_id, group.sweep_id) if job.main else (None, None)
        in_sweep = bool(sweep_id)
    else:
        parent_run_id = (parent_run_id or sweep_parent()) if job.main else None
        sweep_id, in_sweep = parent_run_id, bool(parent_run_id)
    tags = {**describe_job(cfg, comp_cfg), **cfg.mlflow.tags, "seed": str(cfg.seed)}
    key = job_key(cfg, comp_cfg)
    tags["embcomp.job_key"] = key
    if sweep_id:
        tags["embcomp.sweep"] = sweep_id
    ckdir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else output_dir / "checkpoints"
    check_resumable(ckdir, key)
    name = cfg.mlflow.run_name or run_name(tags)
    if group is not None:
        name = f"{name}-s{cfg.seed}"
    skip = already_ran(parent_run_id, key, name) if parent_run_id else None
    skip, in_sweep = job.broadcast((skip, in_sweep))  # every rank skips, or none
    if skip:
        raise JobSkipped(skip)
    record = RunRecord.open(ckdir / RECORD_FILE, cfg.mlflow.tracking_uri, exp_id) if exp_id is not None else None
    return Resolved(cfg, dataset, OmegaConf.to_object(cfg.model), comp_cfg, trainer_cfg,
                    job, tags, key, ckdir, name, parent_run_id, in_sweep, record)  # fmt: skip


def already_ran(parent_run_id: str, key: str, run_name: str) -> str | None:
    done = mlflow.search_runs(
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`embcomp.job_key` = '{key}'",
        output_format="list",
    )
    if any(r.info.status == "FINISHED" and r.data.tags.get("embcomp.status") == "complete" for r in done):
        return f"{run_name}: same effective config already ran in this sweep"
    return None


def check_resumable(ckdir: Path, key: str) -> None:
    """Refuse to resume from checkpoints of another job (its data, model or method differ)."""
    path = ckdir / JOB_KEY_FILE
    if path.is_file() and (old := path.read_text().strip()) != key:
        raise CheckpointMismatch(
            f"{ckdir}: holds checkpoints of a different job (config digest {old}, this job's {key}); "
            "resume with the same config, or use a new hydra.run.dir / checkpoint_dir"
        )
