"""One training run of one seed: resolved, built, trained, and recorded.

``run_one`` is a job without ``seeds`` (or one of its seeds): ``job_resolve.resolve``,
``job_build.build``, then on rank 0 ``train_and_record``: the job's MLflow run opened
(or resumed from its record), the schedule trained, summary.json written first, then
the metrics, the artifacts (summary, exported model, figures) and the status recorded.
The other ranks of a sharded job train and evaluate, and record nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from compression import BudgetError, memory_report
from compression.base import CompressedEmbeddingBagCollection
from experiments.interrupts import interrupted
from experiments.job_build import Built, build
from experiments.job_resolve import JobUnreachable, Resolved, resolve, write_json_atomic
from experiments.job_summary import JobSummary
from experiments.record import RunRecord
from experiments.resources import peak_rss_bytes
from experiments.tracking import RecordCallback, job_metrics, job_params
from recsys.data.loader import BatchLoader
from recsys.training.callbacks import Callback, TrainingStopped

if TYPE_CHECKING:
    from experiments.job_seeds import Group

log = logging.getLogger("experiments.job")  # (the name its messages have always had)


def run_one(
    cfg: DictConfig, output_dir: Path, parent_run_id: str | None = None, group: Group | None = None,
    callbacks: Sequence[Callback] = (),
) -> JobSummary | None:  # fmt: skip
    """One training run of one seed (``run_job`` without ``seeds``, or one of them):
    resolve the job, skip it if its sweep already has it, build, then train and record."""
    job = resolve(cfg, output_dir, parent_run_id, group)
    built = build(job)
    if not job.main:  # the other ranks of a sharded job train and evaluate; rank 0 records
        built.trainer.run(built.model, built.module, built.loaders["train"], built.loaders["val"], built.test(cfg))
        return None
    return train_and_record(job, built, output_dir, callbacks)


def train_and_record(r: Resolved, b: Built, output_dir: Path, callbacks: Sequence[Callback] = ()) -> JobSummary:
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
        sharding_metrics = r.job.log(record, output_dir)  # (one process: none)
        try:
            result = b.trainer.run(b.model, b.module, b.loaders["train"], b.loaders["val"], b.test(cfg))
        except TrainingStopped as e:  # a search's pruner: recorded as stopped, not failed
            callback.close("FINISHED")
            record.tags("job", {"embcomp.status": "pruned", "embcomp.reason": str(e)})
            record.end("job")
            raise
        except BaseException as e:
            status = "KILLED" if interrupted(e) else "FAILED"
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
    summary.run_id = record.run_id("job")
    return summary


def _record_result(r: Resolved, b: Built, result: Any, sharding_metrics: dict[str, float],
                   output_dir: Path) -> JobSummary:  # fmt: skip
    """The finished job's metrics (``tracking.job_metrics``), summary.json, artifacts."""
    record, cfg = r.record, r.cfg
    assert record is not None
    # bytes after every stage: a post-training quantize stage changes them
    module = result.module if result.module is not None else b.module  # gathered on rank 0
    # sharded and not gathered: the whole module as built (each rank holds a part; one process: none)
    whole = r.job.whole if result.module is None else None
    memory = whole if whole is not None else memory_report(module)
    extra = {**sharding_metrics, "peak_rss_bytes": float(peak_rss_bytes()),
             "vocabulary_bytes": float(b.ds.schema.vocabulary_bytes())}  # fmt: skip
    metrics = job_metrics(result, memory, b.model, module, extra)
    exported = _export(b.model, b.test(cfg) or b.loaders["val"], output_dir) if cfg.export else None
    if exported is not None:
        metrics["export_bytes"] = float(exported.result.bytes_on_disk)
        metrics["export_max_abs_diff"] = exported.max_abs_diff
    summary = JobSummary(
        run_id=record.run_id("job"), run_name=r.run_name, experiment=cfg.mlflow.experiment_name,
        parent_run_id=r.parent_run_id, tags=r.tags, metrics=metrics,
        details={"memory_by_tensor": memory.by_tensor, "chosen": b.chosen, "stages": result.stages,
                 "history": result.fit.history if result.fit else [],
                 "config": OmegaConf.to_container(cfg, resolve=True),
                 "dataset": {"root": str(b.ds.root), "schema": asdict(b.ds.schema)}},
    )  # fmt: skip
    # the summary and the record land on disk first: a tracking failure below loses nothing
    write_json_atomic(summary.to_json(), output_dir / "summary.json")
    record.metrics("job", metrics)
    record.artifact("job", output_dir / "summary.json")
    if exported is not None:
        record.artifact("job", exported.result.path, "model")
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


@dataclass
class Exported:
    """A job's model exported (``compression.export``), and how far the reloaded export's
    logits are from the model's on the first test batch (the largest absolute difference)."""

    result: Any
    max_abs_diff: float


def _export(model: torch.nn.Module, test: BatchLoader, output_dir: Path) -> Exported:
    """Export ``model`` to ``output_dir/model.pt2``, reload it, and compare logits on the
    first test batch."""
    from compression.export import export_model, inputs, load_exported

    batch = next(iter(test.epoch(0)))
    device = next(model.parameters()).device
    batch = batch.to(device)
    result = export_model(model, batch, output_dir / "model.pt2")
    with torch.no_grad():
        model.eval()
        want = model(batch.dense_features, batch.sparse_features).reshape(-1)
        got = load_exported(result.path)(*inputs(batch)).reshape(-1)
    return Exported(result, float((want - got).abs().max()))
