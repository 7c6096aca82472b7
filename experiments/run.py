"""Hydra entry point: ``python -m experiments.run dataset=criteo_sample model=dcnv2``.

One MLflow run per job; ``--multirun`` sweeps. A config that cannot be right is
refused before any data is read (``experiments.validate``); bad input (data, ids,
budgets, tracking store) ends the job with one line on stderr and a non-zero exit.
SIGTERM (a scheduler's cancel) ends the job's runs as KILLED rather than RUNNING.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from compression.errors import EmbcompError
from experiments.config import register_configs
from experiments.console import quiet_libraries
from experiments.interrupts import terminated
from experiments.job import JobSkipped, run_job
from experiments.validate import check_job

# what a user's input, config or environment causes: one line and a non-zero exit (every
# error of the package derives from EmbcompError; a missing file is the OS's)
USER_ERRORS = (EmbcompError, FileNotFoundError)
log = logging.getLogger("experiments.run")


class _NotFxTracingNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is_fx_tracing will return true" not in record.getMessage()


def _quiet_libraries() -> None:
    """Per process that runs a job (a launcher's worker does not run this module's top)."""
    # torch.fx warns once per process that is_fx_tracing() covers torch.export too, when
    # the first KeyedJaggedTensor is built (its metaclass asks); nothing here traces with
    # fx. A filter, not a level: torch's logging setup resets its loggers' levels.
    fx = logging.getLogger("torch.fx._symbolic_trace")
    if not any(isinstance(f, _NotFxTracingNote) for f in fx.filters):
        fx.addFilter(_NotFxTracingNote())
    # MLflow's SQL store logs the whole SQLAlchemy traceback of a failed write before it
    # raises; the job's record catches that error and says it in one warning line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)



register_configs()
_quiet_libraries()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """Run one job; returns ``cfg.objective`` (test AUC by default), what a sweeper optimises."""
    _quiet_libraries()
    quiet_libraries(bool(cfg.verbose))
    if threading.current_thread() is threading.main_thread():  # (signals go to the main thread only)
        signal.signal(signal.SIGTERM, terminated)
    try:
        check_job(cfg)
        summary = run_job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except JobSkipped as e:
        print(f"skipped: {e}", file=sys.stderr)
        if cfg.on_skip == "fail":
            raise
        return _objective(cfg, None)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if summary is None:  # a rank other than 0 of a sharded job: rank 0 records and reports
        return _objective(cfg, None)
    m = summary.metrics
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep's line: experiments.console
        return _objective(cfg, m)
    split = "test" if "test_auc" in m else "final_val"  # (evaluate_test=false: validation only)
    log.info(
        "%s: %s AUC %.4f, logloss %.4f, %d embedding bytes (%.1fx), %.0f samples/s",
        summary.run_name, split.replace("final_val", "validation"), m[f"{split}_auc"], m[f"{split}_logloss"],
        m["embedding_bytes"], m["compression_ratio"], m.get("samples_per_s", float("nan")),
    )
    return _objective(cfg, m)


def _objective(cfg: DictConfig, metrics: dict | None) -> float | list[float]:
    values = [float(metrics[k]) if metrics and k in metrics else float("nan") for k in cfg.objective]
    return values[0] if len(values) == 1 else values


if __name__ == "__main__":
    main()
