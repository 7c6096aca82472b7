"""One experiment job: data -> tables -> compress -> model -> train -> MLflow.

``run_job`` is what ``python -m experiments.run`` calls for each Hydra job; tests
call it through Hydra's compose API with the same config. What a job is lives in
four modules, each below the one after it:

- ``job_resolve``: its configs and identity (tags, run name, job key, checkpoint dir,
  run record), a job its sweep already holds skipped (``JobSkipped``);
- ``job_build``: its data, module, model and loaders built once, the memory pre-flight,
  a budget out of reach (``JobUnreachable``);
- ``job_train``: one seed's run trained and recorded (summary.json, metrics, artifacts);
- ``job_seeds``: a multi-seed job's seeds, each nested under the job's group run.

The names other modules import (``run_job``, the exceptions, ``LazyCounts``, the file
names and tags) are all importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from experiments.job_build import LazyCounts
from experiments.job_resolve import (
    GROUP_RECORD,
    JOB_KEY_FILE,
    PARENT_RUN_FILE,
    PARENT_TAG,
    RECORD_FILE,
    CheckpointMismatch,
    JobSkipped,
    JobUnreachable,
)
from experiments.job_seeds import run_seeds
from experiments.job_summary import JobSummary
from experiments.job_train import run_one
from experiments.seeds import resolve_seeds
from recsys.training.callbacks import Callback

__all__ = [
    "GROUP_RECORD", "JOB_KEY_FILE", "PARENT_RUN_FILE", "PARENT_TAG", "RECORD_FILE", "CheckpointMismatch",
    "JobSkipped", "JobUnreachable", "LazyCounts", "run_job",
]  # fmt: skip


def run_job(
    cfg: DictConfig, output_dir: Path, parent_run_id: str | None = None, callbacks: Sequence[Callback] = ()
) -> JobSummary | None:
    """Run one configured job and return its summary (also written to summary.json; None
    on a sharded job's ranks other than 0, which record nothing).

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
        return run_one(cfg, output_dir, parent_run_id, callbacks=callbacks)
    return run_seeds(cfg, output_dir, seeds, parent_run_id, callbacks)
