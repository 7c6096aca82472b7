"""The local-first MLflow record: what a job tells MLflow lands on disk first and reaches a
real SQLite store, and a store deleted or read-only mid-run loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest

from experiments.record import RunRecord
from experiments.tracking import use_experiment


def _store(tmp_path, name="mlflow.db"):
    uri = f"sqlite:///{tmp_path}/{name}"
    return uri, use_experiment(uri, "rec")


def _history(uri, run_id, key):
    return [(m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)]


def _write(rec, steps, slot="job"):
    for s in steps:
        rec.metrics(slot, {"loss": float(s)}, step=s)
    rec.flush()


def test_every_write_lands_on_disk_and_in_the_store(tmp_path):
    uri, exp = _store(tmp_path)
    rec = RunRecord.open(tmp_path / "ck" / "record.jsonl", uri, exp)
    rec.start("job", run_name="j", tags={"method": "qr"})
    rec.params("job", {"a": 1, "b": "x" * 7000})
    _write(rec, range(5))
    rec.start("stage:s", run_name="s", tags={"stage": "s"}, parent="job")
    rec.metrics("stage:s", {"val_auc": 0.7}, step=4)
    rec.end("stage:s")
    rec.end("job")
    run = mlflow.MlflowClient(uri).get_run(rec.run_id("job"))
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "qr"
    assert run.data.params["a"] == "1" and len(run.data.params["b"]) == 6000
    assert _history(uri, rec.run_id("job"), "loss") == [(s, float(s)) for s in range(5)]
    stage = mlflow.MlflowClient(uri).get_run(rec.run_id("stage:s"))
    assert stage.data.tags["mlflow.parentRunId"] == rec.run_id("job")
    assert (tmp_path / "ck" / "record.jsonl").read_text().count("\n") == len(rec.ops)


def test_a_store_deleted_mid_run_gets_the_whole_run_back_when_it_answers_again(tmp_path, capfd):
    uri, exp = _store(tmp_path)
    path = tmp_path / "ck" / "record.jsonl"
    rec = RunRecord.open(path, uri, exp)
    rec.start("job", run_name="j", tags={"method": "qr"})
    rec.params("job", {"lr": 0.05})
    _write(rec, range(0, 5))
    first_id = rec.run_id("job")
    os.remove(tmp_path / "mlflow.db")  # the store is gone while the job runs
    _write(rec, range(5, 10))
    rec.end("job")
    assert not rec.online
    err = capfd.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "training goes on" in warnings[0]
    assert path.read_text().count('"op": "metrics"') == 10  # on disk all along
    # the job rerun in the same directory (a new process), with a store answering again (new, empty)
    code = ("import sys; from experiments.record import RunRecord; from experiments.tracking import use_experiment; "
            f"r = RunRecord.open({str(path)!r}, {uri!r}, use_experiment({uri!r}, 'rec')); "
            "print(r.online, r.run_id('job'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and out[1] != first_id
    # read back in a new process too: this one's MLflow engine still holds the deleted file
    rid = out[1]
    check = (f"import json, mlflow; c = mlflow.MlflowClient({uri!r}); r = c.get_run({rid!r}); "
             f"print(json.dumps([r.info.status, r.data.params, [(m.step, m.value) for m in c.get_metric_history({rid!r}, 'loss')]]))")  # fmt: skip
    status, params, history = json.loads(subprocess.run([sys.executable, "-c", check], capture_output=True,
                                                        text=True, check=True).stdout.splitlines()[-1])  # fmt: skip
    assert status == "FINISHED" and params["lr"] == "0.05"
    assert history == [[s, float(s)] for s in range(10)]  # no gap


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_a_store_made_read_only_mid_run_gets_only_what_it_missed(tmp_path):
    uri, exp = _store(tmp_path)
    path = tmp_path / "ck" / "record.jsonl"
    rec = RunRecord.open(path, uri, exp)
    rec.start("job", run_name="j", tags={})
    _write(rec, range(0, 3))
    db = tmp_path / "mlflow.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        _write(rec, range(3, 6))
        rec.end("job")
        assert not rec.online
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    again = RunRecord.open(path, uri, exp)
    assert again.run_id("job") == rec.run_id("job")  # the same run, not a copy
    assert _history(uri, again.run_id("job"), "loss") == [(s, float(s)) for s in range(6)]
    assert mlflow.MlflowClient(uri).get_run(again.run_id("job")).info.status == "FINISHED"


def test_a_reopened_slot_is_the_same_run(tmp_path):
    uri, exp = _store(tmp_path)
    path = tmp_path / "record.jsonl"
    rec = RunRecord.open(path, uri, exp)
    rec.start("job", run_name="j", tags={})
    rec.start("stage:retrain", run_name="retrain", tags={}, parent="job")  # killed here
    again = RunRecord.open(path, uri, exp)
    again.start("stage:retrain", run_name="retrain", tags={}, parent="job")
    again.end("stage:retrain")
    again.end("job")
    runs = mlflow.MlflowClient(uri).search_runs([exp])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("j", "FINISHED"), ("retrain", "FINISHED")]
