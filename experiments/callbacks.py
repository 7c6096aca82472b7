"""Hydra callback: one MLflow parent run per multirun, the report at its end.

Configured in ``conf/config.yaml`` (``hydra.callbacks``). Jobs find the parent's id
in ``<sweep dir>/mlflow_parent_run_id`` and nest their runs under it; rerunning a
sweep into the same directory reuses its parent. At the end, every job's training
step is timed against ``none`` in one separate process, interleaved
(``experiments.overhead``; ``overhead_rounds=0`` skips it), and the report is built.
"""

from __future__ import annotations

import atexit
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig

from experiments.dashboard import sweep_links
from experiments.job import PARENT_RUN_FILE
from experiments.sharding import rank
from experiments.tracking import TrackingError, check_tracking, use_experiment

log = logging.getLogger(__name__)


class MLflowSweepCallback(Callback):
    """Opens the parent run before the first job and closes it after the last."""

    def __init__(self, report: bool = True, overhead_rounds: int = 20) -> None:
        self.report = report
        self.overhead_rounds = overhead_rounds
        self._parent: str | None = None
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank() != 0:  # a sharded sweep (torchrun): rank 0 alone records
            return
        uri, name = config.mlflow.tracking_uri, config.mlflow.experiment_name
        try:
            check_tracking(uri, config.mlflow.connect_timeout_s)
        except TrackingError as e:
            # Hydra turns a callback's exception into a warning and goes on: stop here
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        exp_id = use_experiment(uri, name)
        self._sweep_dir = Path(config.hydra.sweep.dir)
        self._sweep_dir.mkdir(parents=True, exist_ok=True)
        path = self._sweep_dir / PARENT_RUN_FILE
        client = mlflow.MlflowClient()
        if path.is_file():
            self._parent = path.read_text().strip()
            client.update_run(self._parent, status="RUNNING")
            return
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(
            exp_id,
            run_name=f"{name}-sweep-{self._sweep_dir.name}",
            tags={"embcomp.kind": "sweep", "embcomp.overrides": overrides[:5000]},
        )
        self._parent = run.info.run_id
        path.write_text(self._parent)
        # a sweep that dies (a job's uncaught error ends the process) never reaches
        # on_multirun_end: its parent run must not stay RUNNING for ever
        atexit.register(self._abandoned, self._parent)

    def _abandoned(self, parent: str) -> None:
        if self._parent == parent:  # not closed by on_multirun_end
            mlflow.MlflowClient().set_terminated(parent, RunStatus.to_string(RunStatus.FAILED))

    def _overhead(self, client: mlflow.MlflowClient) -> Any:
        """Time every job's step against none (its own process: the sweep's jobs have left
        their models, threads and caches in this one) and log the CSV to the parent."""
        import pandas as pd

        assert self._sweep_dir is not None and self._parent is not None
        path = self._sweep_dir / "overhead.csv"
        cmd = [sys.executable, "-m", "experiments.overhead", "--sweep-dir", str(self._sweep_dir),
               "--rounds", str(self.overhead_rounds), "--out", str(path)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.is_file():
            log.warning("step-time overhead not measured: %s", (r.stderr.strip().splitlines() or ["?"])[-1])
            return None
        client.log_artifact(self._parent, str(path), artifact_path="report")
        return pd.read_csv(path, dtype={"budget": str, "setting": str})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent is None:
            return
        client = mlflow.MlflowClient()
        try:
            if self.report:
                from experiments.report import build_report

                overhead = self._overhead(client) if self.overhead_rounds > 0 else None
                out = build_report(
                    config.mlflow.experiment_name, parent_run_id=self._parent, out_root=Path(config.report_dir),
                    overhead=overhead,
                )
                if out is not None:
                    for _, row in out.table.iterrows():  # the step-time column of the UI's view
                        if row["step_vs_base"] == row["step_vs_base"]:
                            client.log_metric(row["run_id"], "step_vs_none", float(row["step_vs_base"]))
                    print(out.markdown)
                    print(f"report: {out.directory}/table.md, {out.directory}/table.csv, {out.directory}/pareto.png, "
                          f"{out.directory}/pareto.html")
            for s in sweep_links(config.mlflow.tracking_uri, parent_run_id=self._parent):
                print(f"MLflow (make ui): the sweep's jobs by method: {s.table}\n  test AUC against bytes: {s.chart}")
        finally:
            client.set_terminated(self._parent, RunStatus.to_string(RunStatus.FINISHED))
            self._parent = None
