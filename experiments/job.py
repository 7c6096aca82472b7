"""One experiment job: data -> tables -> compress -> model -> train -> MLflow.

``run_job`` is what ``python -m experiments.run`` calls for each Hydra job; tests
call it through Hydra's compose API with the same config.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from compression import BudgetError, CompressionConfig, compress, memory_report
from compression.base import CompressedEmbeddingBagCollection
from compression.errors import EmbcompError
from compression.preflight import available_bytes, check_fits, training_bytes
from experiments.identity import describe_job, job_key, resolve_compression
from experiments.record import RunRecord
from experiments.resources import peak_rss_bytes, reset_peak_rss
from experiments.seeds import aggregate_metrics, resolve_seeds
from experiments.sharding import ShardedJob, rank
from experiments.tracking import (
    RecordCallback,
    check_tracking,
    job_metrics,
    job_params,
    use_experiment,
)
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.training import Trainer
from recsys.training.callbacks import Callback, TrainingStopped
from recsys.training.distributed import DistributedError

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run_id"
RECORD_FILE = "record.jsonl"  # a job's MLflow record, beside its checkpoints (experiments.record)
GROUP_RECORD = "group_record.jsonl"  # a multi-seed job's group run
JOB_KEY_FILE = "job_key"
PARENT_TAG = "mlflow.parentRunId"


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _sweep_parent() -> str | None:
    """The MLflow parent run of the multirun this job belongs to (see callbacks.py)."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # composed outside a Hydra app (tests, library use)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    path = Path(hc.sweep.dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


class JobSkipped(Exception):
    """A sweep job that does not need to run (duplicate, or a budget out of reach)."""


class JobUnreachable(JobSkipped):
    """A sweep job whose budget (or memory) the method cannot meet; recorded as such."""


@dataclass
class _Group:
    """Where a seed run of a multi-seed job goes: its group run, the sweep, if any."""

    run_id: str | None
    sweep_id: str | None


def run_job(
    cfg: DictConfig, output_dir: Path, parent_run_id: str | None = None, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Run one configured job and return its summary (also written to summary.json).

    In a sweep (``parent_run_id`` set), a job whose effective config already ran under
    the same parent is skipped, and a budget the method cannot reach is recorded as an
    ``unreachable`` child run instead of stopping the sweep. With ``seeds`` set, the
    job runs once per seed (``experiments.seeds``), each seed a run nested under one
    group run that holds the aggregate; the summary's metrics are then the means.
    ``callbacks`` join the trainer's (a search's pruner); one that raises
    ``TrainingStopped`` ends the run recorded as ``pruned``, and the exception goes on.
    """
    seeds = resolve_seeds(cfg.get("seeds"), int(cfg.seed))
    if seeds is None:
        return _run_one(cfg, output_dir, parent_run_id, callbacks=callbacks)
    return _run_seeds(cfg, output_dir, seeds, parent_run_id, callbacks)


def _seed_cfg(cfg: DictConfig, seed: int) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    out.seed = seed
    out.seeds = None
    if out.checkpoint_dir:
        out.checkpoint_dir = str(Path(out.checkpoint_dir) / f"seed-{seed}")
    return out


def _run_seeds(
    cfg: DictConfig, output_dir: Path, seeds: list[int], parent_run_id: str | None, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Every seed of one job, nested under its group run; the group gets the aggregate."""
    if rank() != 0:  # a sharded job's other ranks: train every seed, record nothing
        for s in seeds:
            try:
                _run_one(_seed_cfg(cfg, s), output_dir / f"seed-{s}")
            except JobUnreachable:
                return {}
            except JobSkipped:
                continue
        return {}
    check_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.connect_timeout_s)
    exp_id = use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)
    sweep_id = parent_run_id or _sweep_parent()
    comp = resolve_compression(cfg)
    tags = {**describe_job(cfg, comp), **cfg.mlflow.tags}
    gkey = job_key(_seed_cfg(cfg, 0), comp, with_seed=False)
    run_name = cfg.mlflow.run_name or _run_name(tags)
    record = RunRecord.open(output_dir / GROUP_RECORD, cfg.mlflow.tracking_uri, exp_id)
    group_tags = {**tags, "embcomp.kind": "seed_group", "embcomp.group_key": gkey,
                  "embcomp.seeds": ",".join(map(str, seeds))}  # fmt: skip
    if sweep_id:
        group_tags["embcomp.sweep"] = sweep_id
    if not record.started("job") and sweep_id and (same := _same_group(sweep_id, gkey)) is not None:
        record.adopt("job", same)  # a rerun sweep, or a duplicate job: that group, not a new one
    record.start("job", run_name=run_name, tags=group_tags, parent=sweep_id)
    per_seed: dict[int, dict[str, float]] = {}
    unreachable = None
    try:
        for s in seeds:
            group = _Group(record.run_id("job"), sweep_id)
            try:
                per_seed[s] = _run_one(_seed_cfg(cfg, s), output_dir / f"seed-{s}", group=group,
                                       callbacks=callbacks)["metrics"]
            except JobUnreachable as e:  # every seed would be: same sizes
                unreachable = str(e)
                break
            except JobSkipped:  # this seed already ran in this group: its figures from the store
                if (done := _finished_seed(record.run_id("job"), s)) is not None:
                    per_seed[s] = done
    except BaseException as e:
        record.end("job", "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if unreachable is not None:
        record.tags("job", {"embcomp.status": "unreachable", "embcomp.reason": unreachable})
        record.end("job")
        raise JobUnreachable(unreachable)
    metrics = aggregate_metrics([per_seed[s] for s in sorted(per_seed)])
    summary = {
        "run_id": record.run_id("job"), "run_name": run_name, "experiment": cfg.mlflow.experiment_name,
        "parent_run_id": sweep_id, "tags": tags, "seeds": seeds, "metrics": metrics,
        "per_seed": {str(s): m for s, m in sorted(per_seed.items())},
    }  # fmt: skip
    _write_json_atomic(summary, output_dir / "summary.json")
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


def _run_name(tags: dict[str, str]) -> str:
    return "-".join(
        [tags["label"]] + ([tags["budget"]] if tags["budget"] != "none" else []) + [tags["model"], tags["dataset"]]
    )


@dataclass
class _Resolved:
    """A job resolved, before any data is read: its configs, where it records and resumes."""

    cfg: DictConfig
    dataset: Any
    model: Any
    comp: CompressionConfig
    trainer: Any
    job: ShardedJob | None  # sharded: every rank trains, rank 0 alone records
    tags: dict[str, str]
    key: str
    ckdir: Path
    run_name: str
    parent_run_id: str | None
    in_sweep: bool
    record: RunRecord | None

    @property
    def main(self) -> bool:
        return self.job is None or self.job.main


@dataclass
class _Built:
    """A job's data, module, model and loaders, and the trainer that will run them."""

    ds: Any
    module: CompressedEmbeddingBagCollection
    model: torch.nn.Module
    loaders: dict[str, BatchLoader]
    trainer: Trainer
    chosen: dict[str, Any]


def _run_one(
    cfg: DictConfig, output_dir: Path, parent_run_id: str | None = None, group: _Group | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:  # fmt: skip
    """One training run of one seed (``run_job`` without ``seeds``, or one of them):
    resolve the job, skip it if its sweep already has it, build, then train and record."""
    job = _resolve(cfg, output_dir, parent_run_id, group)
    built = _build(job)
    if not job.main:  # the other ranks of a sharded job train and evaluate; rank 0 records
        built.trainer.run(built.model, built.module, built.loaders["train"], built.loaders["val"], _test(built, cfg))
        return {}
    return _train_and_record(job, built, output_dir, callbacks)


def _test(b: _Built, cfg: DictConfig) -> BatchLoader | None:
    """The test split's loader, or None where the job must not read it (a search trial)."""
    return b.loaders["test"] if cfg.get("evaluate_test", True) else None


def _resolve(cfg: DictConfig, output_dir: Path, parent_run_id: str | None, group: _Group | None) -> _Resolved:
    """Configs, the tracking store (checked), tags, run name, the checkpoint dir; raises
    ``JobSkipped`` if the sweep already holds this job complete."""
    comp_cfg = resolve_compression(cfg)
    trainer_cfg: Any = OmegaConf.to_object(cfg.trainer)
    job = ShardedJob.start(cfg, trainer_cfg)
    main = job is None or job.main
    exp_id = None
    if main:
        check_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.connect_timeout_s)
        exp_id = use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)
    if group is not None:  # a seed of a multi-seed job: nested under its group run
        parent_run_id, sweep_id = (group.run_id, group.sweep_id) if main else (None, None)
        in_sweep = bool(sweep_id)
    else:
        parent_run_id = (parent_run_id or _sweep_parent()) if main else None
        sweep_id, in_sweep = parent_run_id, bool(parent_run_id)
    tags = {**describe_job(cfg, comp_cfg), **cfg.mlflow.tags, "seed": str(cfg.seed)}
    key = job_key(cfg, comp_cfg)
    tags["embcomp.job_key"] = key
    if sweep_id:
        tags["embcomp.sweep"] = sweep_id
    ckdir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else output_dir / "checkpoints"
    _check_resumable(ckdir, key)
    run_name = cfg.mlflow.run_name or _run_name(tags)
    if group is not None:
        run_name = f"{run_name}-s{cfg.seed}"
    skip = _already_ran(parent_run_id, key, run_name) if parent_run_id else None
    if job is not None:  # every rank skips, or none
        skip, in_sweep = job.broadcast((skip, in_sweep))
    if skip:
        raise JobSkipped(skip)
    record = RunRecord.open(ckdir / RECORD_FILE, cfg.mlflow.tracking_uri, exp_id) if exp_id is not None else None
    return _Resolved(cfg, OmegaConf.to_object(cfg.dataset), OmegaConf.to_object(cfg.model), comp_cfg, trainer_cfg,
                     job, tags, key, ckdir, run_name, parent_run_id, in_sweep, record)  # fmt: skip


def _already_ran(parent_run_id: str, key: str, run_name: str) -> str | None:
    done = mlflow.search_runs(
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`embcomp.job_key` = '{key}'",
        output_format="list",
    )
    if any(r.info.status == "FINISHED" and r.data.tags.get("embcomp.status") == "complete" for r in done):
        return f"{run_name}: same effective config already ran in this sweep"
    return None


def _build(r: _Resolved) -> _Built:
    """Data (prepared or opened), the memory pre-flight, the compressed module, the model,
    the loaders; sharded: the model wrapped by DMP under the method's constraints."""
    cfg, job = r.cfg, r.job
    torch.manual_seed(cfg.seed)
    reset_peak_rss()  # this job's peak, not the sweep's so far
    if job is None:
        ds = r.dataset.prepare(Path(cfg.cache_dir))
    else:  # rank 0 builds the cache, the others open it
        ds = job.prepared(lambda: r.dataset.prepare(Path(cfg.cache_dir)))
    schema = ds.schema
    trainer = Trainer(r.trainer, checkpoint_dir=r.ckdir if job is None else None)
    tables = embedding_tables(schema, r.model.table_dim(), r.model.embedding_init_std)
    label = f"{r.tags['label']}" + (f" {r.tags['budget']}" if r.tags["budget"] != "none" else "")
    try:
        if job is None:  # before any table exists (sharded: against the plan, in job.wrap)
            need = training_bytes(tables, r.comp, cfg.seed, LazyCounts(ds), optimizer=r.trainer.sparse_optimizer)
            check_fits(need, available_bytes(trainer.device), label)
        module: CompressedEmbeddingBagCollection = compress(
            tables, r.comp, counts=LazyCounts(ds), device=trainer.device, seed=cfg.seed,
            table_device="meta" if job is not None else None,
        )  # fmt: skip
    except BudgetError as e:
        _out_of_reach(e, r.in_sweep, r.record, r.run_name, r.tags, r.parent_run_id)
    chosen = module.describe()
    model = r.model.build(module, len(schema.dense))
    loaders = {
        split: BatchLoader(
            ds,
            split,
            r.trainer.batch_size if split == "train" else r.trainer.eval_batch_size,
            shuffle=split == "train",
            seed=cfg.seed,
            max_batches=r.trainer.max_steps_per_epoch if split == "train" else None,
            shard=job.shard if job is not None else None,
            in_memory=r.trainer.in_memory,
        )
        for split in ("train", "val", "test")
    }
    r.ckdir.mkdir(parents=True, exist_ok=True)
    (r.ckdir / JOB_KEY_FILE).write_text(r.key)
    if job is not None:
        job.refuse_unsupported(module, type(r.comp).method)
        if cfg.export:
            raise DistributedError("export=true needs the model unsharded: run the job in one process")

        def rebuild() -> torch.nn.Module:  # the model unsharded, for post-training stages on rank 0
            whole = compress(tables, r.comp, counts=LazyCounts(ds), device=trainer.device, seed=cfg.seed)
            return r.model.build(whole, len(schema.dense))

        try:  # the memory pre-flight against the plan's per-rank estimate
            model = job.wrap(model, module, trainer, rebuild, label)
        except BudgetError as e:
            _out_of_reach(e, r.in_sweep, r.record, r.run_name, r.tags, r.parent_run_id)
        trainer = Trainer(r.trainer, backend=job.backend)  # sharded runs do not resume
    return _Built(ds, module, model, loaders, trainer, chosen)


def _train_and_record(r: _Resolved, b: _Built, output_dir: Path, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Rank 0: the job's run opened (or resumed) in its record, the schedule trained, the
    summary written to disk first, then the metrics, artifacts and status recorded."""
    record, cfg = r.record, r.cfg
    assert record is not None
    resumed = record.started("job")
    record.start("job", run_name=r.run_name, tags=r.tags, parent=r.parent_run_id)
    if resumed:
        log.info("resuming the MLflow run of %s from %s", r.run_name, r.ckdir)
    else:
        record.params("job", job_params(cfg, r.comp, b.chosen, b.ds.schema, str(b.ds.root), str(b.trainer.device)))
        record.dataset("job", str(b.ds.root))
    monitor = _system_metrics(record) if cfg.mlflow.log_system_metrics else None
    callback = RecordCallback(record)
    b.trainer.callbacks = [callback, *callbacks]
    try:
        sharding_metrics = r.job.log(record, output_dir) if r.job is not None else {}
        try:
            result = b.trainer.run(b.model, b.module, b.loaders["train"], b.loaders["val"], _test(b, cfg))
        except TrainingStopped as e:  # a search's pruner: recorded as stopped, not failed
            callback.close("FINISHED")
            record.tags("job", {"embcomp.status": "pruned", "embcomp.reason": str(e)})
            record.end("job")
            raise
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            callback.close(status)  # a stage's nested run left open ends with the job's status
            if not isinstance(e, BudgetError) or not r.in_sweep:
                record.end("job", status)
                raise
            # a budget found out of reach in a later stage (OptEmbed's search)
            record.tags("job", {"embcomp.status": "unreachable", "embcomp.reason": str(e)})
            record.end("job")
            raise JobUnreachable(str(e)) from None
        summary = _record_result(r, b, result, sharding_metrics, output_dir)
    finally:
        if monitor is not None:
            monitor.finish()
    summary["run_id"] = record.run_id("job")
    return summary


def _record_result(r: _Resolved, b: _Built, result: Any, sharding_metrics: dict[str, float],
                   output_dir: Path) -> dict[str, Any]:  # fmt: skip
    """The finished job's metrics (``tracking.job_metrics``), summary.json, artifacts."""
    record, cfg, job = r.record, r.cfg, r.job
    assert record is not None
    # bytes after every stage: a post-training quantize stage changes them
    module = result.module if result.module is not None else b.module  # gathered on rank 0
    # sharded and not gathered: the whole module as built (each rank holds a part)
    memory = memory_report(module) if job is None or result.module is not None or job.whole is None else job.whole
    extra = {**sharding_metrics, "peak_rss_bytes": float(peak_rss_bytes())}
    metrics = job_metrics(result, memory, b.model, module, extra)
    exported = _export(b.model, _test(b, cfg) or b.loaders["val"], output_dir) if cfg.export else None
    if exported is not None:
        metrics["export_bytes"] = float(exported[0].bytes_on_disk)
        metrics["export_max_abs_diff"] = exported[1]
    summary = {
        "run_id": record.run_id("job"),
        "run_name": r.run_name,
        "experiment": cfg.mlflow.experiment_name,
        "parent_run_id": r.parent_run_id,
        "tags": r.tags,
        "metrics": metrics,
        "memory_by_tensor": memory.by_tensor,
        "chosen": b.chosen,
        "stages": result.stages,
        "history": result.fit.history if result.fit else [],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "dataset": {"root": str(b.ds.root), "schema": asdict(b.ds.schema)},
    }
    # the summary and the record land on disk first: a tracking failure below loses nothing
    _write_json_atomic(summary, output_dir / "summary.json")
    record.metrics("job", metrics)
    record.artifact("job", output_dir / "summary.json")
    if exported is not None:
        record.artifact("job", exported[0].path, "model")
    _save_figures(module, output_dir, record)
    record.tags("job", {"embcomp.status": "complete"})
    record.end("job")
    return summary


def _save_figures(module: CompressedEmbeddingBagCollection, output_dir: Path, record: RunRecord) -> None:
    import matplotlib.pyplot as plt

    for name, fig in module.figures().items():
        path = output_dir / "figures" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)  # a sweep would keep every job's figures open
        record.artifact("job", path, "figures")


def _system_metrics(record: RunRecord) -> Any:
    """MLflow's system metrics monitor on the job's run (none while the store is away)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    run_id = record.run_id("job")
    if not record.online or run_id is None:
        return None
    monitor = SystemMetricsMonitor(run_id, tracking_uri=record.uri)
    monitor.start()
    record.on_offline.append(monitor.finish)
    return monitor


class CheckpointMismatch(EmbcompError, ValueError):
    """A checkpoint directory written by a job with a different effective config."""


def _check_resumable(ckdir: Path, key: str) -> None:
    """Refuse to resume from checkpoints of another job (its data, model or method differ)."""
    path = ckdir / JOB_KEY_FILE
    if path.is_file() and (old := path.read_text().strip()) != key:
        raise CheckpointMismatch(
            f"{ckdir}: holds checkpoints of a different job (config digest {old}, this job's {key}); "
            "resume with the same config, or use a new hydra.run.dir / checkpoint_dir"
        )


def _out_of_reach(
    e: BudgetError, in_sweep: bool, record: RunRecord | None, run_name: str, tags: dict[str, str],
    parent_run_id: str | None,
) -> NoReturn:  # fmt: skip
    """A budget (or memory) the job cannot meet: raised alone; in a sweep, recorded as an
    ``unreachable`` run with the reason (rank 0) and skipped, so the sweep goes on."""
    if not in_sweep:
        raise e
    if record is not None:
        record.start("job", run_name=run_name, tags={**tags, "embcomp.status": "unreachable"}, parent=parent_run_id)
        record.tags("job", {"embcomp.reason": str(e)})
        record.end("job")
    raise JobUnreachable(str(e)) from None


def _export(model: torch.nn.Module, test: BatchLoader, output_dir: Path) -> tuple[Any, float]:
    """Export ``model`` to ``output_dir/model.pt2``, reload it, and compare logits on the
    first test batch: (the export's result, the largest absolute logit difference)."""
    from compression.export import export_model, inputs, load_exported

    batch = next(iter(test.epoch(0)))
    device = next(model.parameters()).device
    batch = batch.to(device)
    result = export_model(model, batch, output_dir / "model.pt2")
    with torch.no_grad():
        model.eval()
        want = model(batch.dense_features, batch.sparse_features).reshape(-1)
        got = load_exported(result.path)(*inputs(batch)).reshape(-1)
    return result, float((want - got).abs().max())


class LazyCounts(dict):
    """Per-feature id counts, read from the dataset only when a method asks."""

    def __init__(self, ds) -> None:
        super().__init__()
        self._ds = ds

    def __missing__(self, key: str):
        value = self._ds.counts(key)
        self[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._ds.schema.sparse_names
