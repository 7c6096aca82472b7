"""What a sweep prints: one line per job and the sweep's progress, and nothing else.

``SweepProgress`` (a Hydra callback, ``conf/config.yaml``) counts the sweep's jobs when it
starts (the product of the sweep overrides' values, or an Optuna sweeper's ``n_trials``)
and, after each job, prints one line on stdout::

    [#####---------------]  7/27  hashing 10x  seeds 0-2  test AUC 0.7712 ± 0.0031  22,861 bytes (10.0x)  41 s  · 20 left, ~14 min

from the job's ``summary.json`` (a job that wrote none was skipped, a budget out of its
method's reach, say: the line says so, and stderr why, in one line). The estimate is the mean time of the
jobs so far times the jobs left.

Quiet by default: MLflow's INFO lines (its system-metrics monitor says four a run) and
Hydra's launch lines (``hydra/hydra_logging: quiet``) are not shown; ``verbose=true``
brings MLflow's back and ``hydra/hydra_logging=default`` Hydra's (``make ... V=1`` sets
both). Warnings and errors always show.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

BAR = 20


def quiet_libraries(verbose: bool) -> None:
    """Third-party INFO lines off unless ``verbose`` (per process that runs a job)."""
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)


def count_jobs(config: DictConfig) -> Optional[int]:
    """The sweep's jobs: an Optuna sweeper's trials, or the product of the sizes of the
    sweep overrides (the command line's and ``hydra.sweeper.params``); None if unknown."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return None
    params = sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    assert isinstance(params, dict)
    overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    n = 1
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            n *= len(list(o.sweep_iterator()))
    return n


def duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min" if s >= 600 else f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def job_line(summary: dict[str, Any]) -> str:
    """Method, budget, seeds, AUC (± its interval over seeds), bytes and ratio of one job."""
    tags, m = summary.get("tags", {}), summary["metrics"]
    split = "test" if "test_auc" in m else "final_val"
    auc = f"{'test' if split == 'test' else 'validation'} AUC {m[f'{split}_auc']:.4f}"
    if f"{split}_auc_ci95" in m and not math.isnan(m[f"{split}_auc_ci95"]):
        auc += f" ± {m[f'{split}_auc_ci95']:.4f}"
    seeds = summary.get("seeds") or [tags.get("seed", "?")]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    method, budget = tags.get("method", summary.get("run_name", "?")), tags.get("budget", "none")
    return (f"{method} {budget}  {seed_text}  {auc}  {m['embedding_bytes']:,.0f} bytes "
            f"({m['compression_ratio']:.1f}x)")  # fmt: skip


class SweepProgress(Callback):
    """One line per finished job, with a bar over the sweep and an estimate of the time left."""

    def __init__(self) -> None:
        self.total: Optional[int] = None
        self.done = 0
        self.started = time.monotonic()
        self._job_start = self.started

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total, self.done, self.started = count_jobs(config), 0, time.monotonic()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._job_start = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return
        self.done += 1
        took = time.time() - self._job_start
        path = Path(hc.runtime.output_dir) / "summary.json"
        job = f"{hc.runtime.choices.get('compression', '?')} {config.get('budget') or 'none'}"
        if job_return.status == JobStatus.FAILED:  # (what failed is said on stderr)
            what = f"{job}: failed"
        elif path.is_file() and path.stat().st_mtime >= self._job_start:
            what = job_line(json.loads(path.read_text()))
        else:
            what = f"{job}: skipped"
        print(f"{self._progress()}  {what}  {duration(took)}{self._left()}", flush=True)

    def _progress(self) -> str:
        if self.total is None:
            return f"[job {self.done}]"
        filled = round(BAR * min(self.done, self.total) / max(self.total, 1))
        width = len(str(self.total))
        return f"[{'#' * filled}{'-' * (BAR - filled)}] {self.done:>{width}}/{self.total}"

    def _left(self) -> str:
        if self.total is None or self.done >= self.total:
            return ""
        left = self.total - self.done
        per_job = (time.monotonic() - self.started) / self.done
        return f"  · {left} left, ~{duration(per_job * left)}"
