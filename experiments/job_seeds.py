"""A multi-seed job: every seed a run of its own, nested under one group run.

``run_seeds`` runs the job once per seed (``experiments.seeds`` resolves the list),
each seed's run (``job_train.run_one``) nested under the job's group run, which holds
the seeds' aggregate metrics. A rerun sweep (or a duplicate job) adopts the group run
its sweep already has, and a seed that group already holds complete is not trained
again: its figures come from the store.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from experiments.identity import describe_job, job_key, resolve_compression
from experiments.interrupts import interrupted
from experiments.job_resolve import (
    GROUP_RECORD,
    PARENT_TAG,
    JobSkipped,
    JobUnreachable,
    run_name,
    sweep_parent,
    write_json_atomic,
)
from experiments.job_summary import JobSummary
from experiments.job_train import run_one
from experiments.record import RunRecord
from experiments.seeds import aggregate_metrics
from experiments.sharding import rank
from experiments.tracking import check_tracking, use_experiment
from recsys.training.callbacks import Callback


@dataclass
class Group:
    """Where a seed run of a multi-seed job goes: its group run, the sweep, if any."""

    run_id: str | None
    sweep_id: str | None


def seed_cfg(cfg: DictConfig, seed: int) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    out.seed = seed
    out.seeds = None
    if out.checkpoint_dir:
        out.checkpoint_dir = str(Path(out.checkpoint_dir) / f"seed-{seed}")
    return out


def run_seeds(
    cfg: DictConfig, output_dir: Path, seeds: list[int], parent_run_id: str | None, callbacks: Sequence[Callback] = ()
) -> JobSummary | None:
    """Every seed of one job, nested under its group run; the group gets the aggregate."""
    if rank() != 0:  # a sharded job's other ranks: train every seed, record nothing
        for s in seeds:
            try:
                run_one(seed_cfg(cfg, s), output_dir / f"seed-{s}")
            except JobUnreachable:
                return None
            except JobSkipped:
                continue
        return None
    check_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.connect_timeout_s)
    exp_id = use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)
    sweep_id = parent_run_id or sweep_parent()
    comp = resolve_compression(cfg)
    tags = {**describe_job(cfg, comp), **cfg.mlflow.tags}
    gkey = job_key(seed_cfg(cfg, 0), comp, with_seed=False)
    name = cfg.mlflow.run_name or run_name(tags)
    record = RunRecord.open(output_dir / GROUP_RECORD, cfg.mlflow.tracking_uri, exp_id)
    group_tags = {**tags, "embcomp.kind": "seed_group", "embcomp.group_key": gkey,
                  "embcomp.seeds": ",".join(map(str, seeds))}  # fmt: skip
    if sweep_id:
        group_tags["embcomp.sweep"] = sweep_id
    if not record.started("job") and sweep_id and (same := _same_group(sweep_id, gkey)) is not None:
        record.adopt("job", same)  # a rerun sweep, or a duplicate job: that group, not a new one
    record.start("job", run_name=name, tags=group_tags, parent=sweep_id)
    per_seed: dict[int, dict[str, float]] = {}
    unreachable = None
    try:
        for s in seeds:
            group = Group(record.run_id("job"), sweep_id)
            try:
                one = run_one(seed_cfg(cfg, s), output_dir / f"seed-{s}", group=group, callbacks=callbacks)
                assert one is not None  # (rank 0)
                per_seed[s] = one.metrics
            except JobUnreachable as e:  # every seed would be: same sizes
                unreachable = str(e)
                break
            except JobSkipped:  # this seed already ran in this group: its figures from the store
                if (done := _finished_seed(record.run_id("job"), s)) is not None:
                    per_seed[s] = done
    except BaseException as e:
        record.end("job", "KILLED" if interrupted(e) else "FAILED")
        raise
    if unreachable is not None:
        record.tags("job", {"embcomp.status": "unreachable", "embcomp.reason": unreachable})
        record.end("job")
        raise JobUnreachable(unreachable)
    metrics = aggregate_metrics([per_seed[s] for s in sorted(per_seed)])
    summary = JobSummary(
        run_id=record.run_id("job"), run_name=name, experiment=cfg.mlflow.experiment_name, parent_run_id=sweep_id,
        tags=tags, metrics=metrics, seeds=seeds, per_seed={str(s): m for s, m in sorted(per_seed.items())},
    )  # fmt: skip
    write_json_atomic(summary.to_json(), output_dir / "summary.json")
    record.metrics("job", metrics)
    record.tags("job", {"embcomp.status": "complete" if per_seed else "failed"})
    record.end("job")
    return summary


def _same_group(sweep_id: str, gkey: str) -> str | None:
    same = mlflow.search_runs(
        filter_string=f"tags.`{PARENT_TAG}` = '{sweep_id}' and tags.`embcomp.group_key` = '{gkey}'",
        output_format="list",
    )
    return same[0].info.run_id if same else None


def _finished_seed(group_id: str | None, seed: int) -> dict[str, float] | None:
    if group_id is None:
        return None
    runs = mlflow.search_runs(
        filter_string=f"tags.`{PARENT_TAG}` = '{group_id}' and tags.`seed` = '{seed}' "
        "and tags.`embcomp.status` = 'complete'",
        output_format="list",
    )
    return dict(runs[0].data.metrics) if runs else None
