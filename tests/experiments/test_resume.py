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


def _kill_once_written(args: list[str], run_dir, path) -> None:
    """Run the job in ``run_dir`` and SIGKILL it as soon as ``path`` exists (or it ends)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    deadline = time.time() + 240
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_job_resumes_to_the_same_result(tmp_path):
    common = [*ARGS, *smoke_overrides(tmp_path)]
    ref = run_cli(*common, f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "train" / "last.pt"
    _kill_once_written(common, run_dir, ckpt)
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


STAGED = ("dataset=criteo_sample", "compression=optembed_fast", "compression.supernet_epochs=1",
          "compression.retrain_epochs=2", "compression.generations=2", "model.deep_layers=[16]",
          "model.cross_layers=1", "trainer.batch_size=128", "trainer.max_steps_per_epoch=30",
          "trainer.checkpoint_every_steps=5", "trainer.patience=5")  # fmt: skip


def test_a_multi_stage_job_killed_in_a_later_stage_reuses_its_stage_runs(tmp_path):
    """OptEmbed killed during retrain: the rerun ends with the uninterrupted job's metrics,
    under the same job run with the same nested stage runs (none added, none left RUNNING)."""
    common = [*STAGED, *smoke_overrides(tmp_path)]
    ref = run_cli(*common, "mlflow.experiment_name=ref", f"hydra.run.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "retrain" / "last.pt"
    _kill_once_written(common, run_dir, ckpt)
    assert ckpt.exists() and not (run_dir / "summary.json").exists(), "not killed during retrain"
    resumed = run_cli(*common, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    timing = ("samples_per_s", "step_time_ms")

    def figures(summary: dict) -> dict:
        return {st: {k: v for k, v in m.items() if k not in timing} for st, m in summary["stages"].items()}

    assert a["metrics"]["test_auc"] == b["metrics"]["test_auc"] and figures(a) == figures(b)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def children(experiment: str) -> list[tuple[str, str]]:
        eid = client.get_experiment_by_name(experiment).experiment_id
        job = next(r for r in client.search_runs([eid]) if "mlflow.parentRunId" not in r.data.tags)
        kids = client.search_runs([eid], f"tags.mlflow.parentRunId = '{job.info.run_id}'")
        assert job.info.status == "FINISHED"
        return sorted((k.data.tags["stage"], k.info.status) for k in kids)

    expected = children("ref")
    assert len(expected) >= 3 and all(s == "FINISHED" for _, s in expected)
    assert children("test") == expected  # each stage once, its interrupted run ended
