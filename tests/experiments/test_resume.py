"""A job killed with SIGKILL resumes from its checkpoint and ends with the same
metrics as an uninterrupted job (same seed, CPU), in the same MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow

from tests.experiments.conftest import REPO, run_cli, smoke_overrides

ARGS = ("dataset=criteo_sample", "model=dcnv2", "model.deep_layers=[32]", "model.cross_layers=1",
        "trainer.epochs=2", "trainer.batch_size=128", "trainer.checkpoint_every_steps=10", "trainer.patience=5")


def test_killed_job_resumes_to_the_same_result(tmp_path):
    common = [*ARGS, *smoke_overrides(tmp_path)]
    ref = run_cli(*common, f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "train" / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *common, f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the job never wrote a checkpoint"
    assert not (run_dir / "summary.json").exists(), "killed too late: the job had finished"
    run_id = json.loads((run_dir / "checkpoints" / "record.jsonl.state").read_text())["run_ids"]["job"]

    resumed = run_cli(*common, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    for key in ("test_auc", "test_logloss", "val_auc", "epochs_run", "best_epoch"):
        assert a["metrics"][key] == b["metrics"][key], key
    assert a["history"] == b["history"]
    assert b["run_id"] == run_id  # the same MLflow run continued
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow.get_run(run_id).info.status == "FINISHED"
