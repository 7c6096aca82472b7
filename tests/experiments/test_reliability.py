"""The tracking store failing around a job, and jobs started together on one store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.experiments.conftest import REPO, run_cli, smoke_overrides

SLOW_JOB = ("dataset=criteo_sample", "model.deep_layers=[32]", "model.cross_layers=1", "trainer.epochs=4",
            "trainer.batch_size=64", "trainer.patience=10", "trainer.log_every_steps=10")  # fmt: skip


def _read_store(uri: str, code: str) -> object:
    """Query the store in a fresh process (this one's MLflow may hold a deleted file)."""
    out = subprocess.run([sys.executable, "-c", f"import json, mlflow; c = mlflow.MlflowClient({uri!r}); {code}"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def test_a_store_deleted_mid_run_costs_no_training_and_the_rerun_records_it_all(tmp_path):
    db = tmp_path / "mlflow.db"
    run_dir = tmp_path / "run"
    args = [*SLOW_JOB, *smoke_overrides(tmp_path), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    record = run_dir / "checkpoints" / "record.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # the first epoch's metrics recorded
        if record.is_file() and '"val_auc"' in record.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before its store could be deleted"
    db.unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]  # training went on
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "training goes on" in warnings[0], err[-2000:]
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["history"]) == 4  # every epoch trained
    # the rerun in the same directory: the store answers again (a new, empty one)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    # the runs, and the first run's metric steps, in one reading process (each costs MLflow's import)
    runs, history, loss = _read_store(f"sqlite:///{db}", (
        "rs = c.search_runs([e.experiment_id for e in c.search_experiments()]); "
        "steps = lambda k: [m.step for m in c.get_metric_history(rs[0].info.run_id, k)] if rs else []; "
        "print(json.dumps([[[r.info.status, r.data.tags.get('embcomp.status')] for r in rs], "
        "steps('val_auc'), steps('train_loss')]))"
    ))  # type: ignore[misc]  # fmt: skip
    assert runs == [["FINISHED", "complete"]]
    assert len(history) >= 4  # every epoch recorded after recovery, no gap
    assert sorted(set(history)) == sorted({h for h in history})
    assert min(loss) == 10 and max(loss) >= 4 * 125 - 10


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_a_read_only_store_is_refused_in_one_line_before_any_data_is_read(tmp_path):
    first = run_cli("dataset=criteo_sample", *smoke_overrides(tmp_path), "trainer.max_steps_per_epoch=2",
                    f"hydra.run.dir={tmp_path}/a")  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    db = tmp_path / "mlflow.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        cache = tmp_path / "cache2"
        r = run_cli("dataset=criteo_sample", *smoke_overrides(tmp_path), f"cache_dir={cache}", f"hydra.run.dir={tmp_path}/b")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: MLflow store sqlite:///{db}: cannot write to {db}"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not cache.exists()  # no data read


@pytest.mark.parametrize("n", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_jobs_started_together_on_a_new_store_all_complete(tmp_path, n):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # the dataset's cache first: the race under test is the store's, not the cache's
    prep = run_cli("dataset=criteo_sample", *smoke_overrides(tmp_path / "prep"), f"cache_dir={tmp_path}/cache",
                   "trainer.max_steps_per_epoch=1", f"hydra.run.dir={tmp_path}/prep/run")  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-2000:]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "experiments.run", "dataset=criteo_sample", *smoke_overrides(tmp_path),
             f"cache_dir={tmp_path}/cache", "trainer.max_steps_per_epoch=2", f"seed={i}",
             "trainer.num_threads=1", f"hydra.run.dir={tmp_path}/job{i}"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(n)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(e[-800:] for e in errors)
    runs = _read_store(f"sqlite:///{tmp_path}/mlflow.db", "print(json.dumps([[r.info.status, r.data.tags.get('embcomp.status')] "
                       "for r in c.search_runs([c.get_experiment_by_name('test').experiment_id])]))")  # fmt: skip
    assert runs == [["FINISHED", "complete"]] * n
    assert all((tmp_path / f"job{i}" / "summary.json").is_file() for i in range(n))


def test_a_sweep_runs_in_parallel_through_the_joblib_and_submitit_local_launchers(tmp_path):
    """Hydra's launchers as a user picks them: every job a complete run under the one
    parent, each method's figures the same whichever launcher ran it (seeded jobs)."""
    launchers = (("joblib", "hydra.launcher.n_jobs=2"), ("submitit_local", "hydra.launcher.timeout_min=10"))
    for launcher, extra in launchers:
        name = f"launch-{launcher}"
        r = run_cli("--multirun", f"hydra/launcher={launcher}", extra, "dataset=criteo_sample", "compression=none,hashing",
                    "budget=10x", "trainer.max_steps_per_epoch=2", "trainer.num_threads=1",
                    "hydra.callbacks.mlflow_sweep.overhead_rounds=0", *smoke_overrides(tmp_path),
                    f"mlflow.experiment_name={name}", f"hydra.sweep.dir={tmp_path}/{launcher}",
                    f"report_dir={tmp_path}/reports", cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert "is_fx_tracing" not in r.stderr  # quiet in the launcher's worker processes too
        assert (tmp_path / "reports" / name / "table.md").is_file()
    # both sweeps' runs in one reading process (each costs MLflow's import)
    names = [f"launch-{launcher}" for launcher, _ in launchers]
    by_name = _read_store(f"sqlite:///{tmp_path}/mlflow.db", (
        f"print(json.dumps({{n: [[r.data.tags.get('embcomp.kind'), r.data.tags.get('method'), r.info.status, "
        f"r.data.metrics.get('test_auc')] for r in c.search_runs([c.get_experiment_by_name(n).experiment_id])] "
        f"for n in {names!r}}}))"))  # fmt: skip
    aucs = {}
    for launcher, _ in launchers:
        runs = by_name[f"launch-{launcher}"]  # type: ignore[index]
        jobs = sorted(x for x in runs if x[0] != "sweep")
        assert [(m, s) for _, m, s, _ in jobs] == [("hashing", "FINISHED"), ("none", "FINISHED")], runs
        assert [x[2] for x in runs if x[0] == "sweep"] == ["FINISHED"]
        aucs[launcher] = [a for *_, a in jobs]
    assert aucs["joblib"] == aucs["submitit_local"]
