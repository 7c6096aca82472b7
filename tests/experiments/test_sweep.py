"""A real Hydra multirun: one MLflow parent run, nested jobs, the report at the end;
and the MLflow UI served by `make ui` answering over REST."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import optuna
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.experiments.conftest import CONF, REPO, run_cli, smoke_overrides


def test_multirun_has_a_parent_run_nested_jobs_and_a_report(tmp_path):
    r = run_cli(
        "--multirun", "dataset=criteo_sample", "compression=none,qr", "budget=10x,1000x", "seeds=2",
        "trainer.max_steps_per_epoch=8", "hydra.callbacks.mlflow_sweep.overhead_rounds=3",
        *smoke_overrides(tmp_path), "mlflow.experiment_name=sweep-test", f"hydra.sweep.dir={tmp_path}/multi",
        f"report_dir={tmp_path}/reports", "mlflow.log_system_metrics=true",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the console: a line per job with a bar over the sweep and the time left, no library INFO
    lines = [x for x in r.stdout.splitlines() if x.startswith("[#") or x.startswith("[-")]
    assert [x.split("]")[1].split()[0] for x in lines] == ["1/4", "2/4", "3/4", "4/4"], r.stdout[-3000:]
    qr10 = next(x for x in lines if " qr 10x " in x)
    assert "seeds 0-1  test AUC 0." in qr10 and " bytes (" in qr10 and "x)" in qr10 and "left, ~" in qr10
    assert any("qr 1000x: skipped  " in x for x in lines)  # (out of reach: stderr says why)
    assert lines[-1].startswith("[" + "#" * 20 + "] 4/4") and "left" not in lines[-1]
    out = r.stdout + r.stderr
    assert " INFO " not in out and "[HYDRA]" not in out and "is_fx_tracing" not in out, out[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["sweep-test"], output_format="list")
    parents = [x for x in runs if x.data.tags.get("embcomp.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    groups = {(g.data.tags["method"], g.data.tags["budget"]): g for g in runs
              if g.data.tags.get("mlflow.parentRunId") == parent}  # fmt: skip
    assert all(g.data.tags["embcomp.kind"] == "seed_group" for g in groups.values())
    # the baseline ignores the budget: its group ran once, its duplicates trained nothing
    assert [k for k in groups if k[0] == "none"] == [("none", "none")]
    seeds = [x for x in runs if x.data.tags.get("embcomp.sweep") == parent and "seed" in x.data.tags]
    assert all(x.data.tags.get("embcomp.kind") != "seed_group" for x in seeds)
    by = {}
    for x in seeds:
        by.setdefault((x.data.tags["method"], x.data.tags["budget"]), []).append(x)
    assert sorted(x.data.tags["seed"] for x in by[("qr", "10x")]) == ["0", "1"]
    assert len(by[("none", "none")]) == 2
    assert all(x.data.metrics["compression_ratio"] >= 9.5 for x in by[("qr", "10x")])
    unreachable = groups[("qr", "1000x")]
    assert unreachable.data.tags["embcomp.status"] == "unreachable"
    assert "cannot reach 1000x" in unreachable.data.tags["embcomp.reason"]
    # the report: files on disk, artifacts on the parent, values from the seed runs
    report = tmp_path / "reports" / "sweep-test"
    table = pd.read_csv(report / "table.csv")
    qr = table[(table.method == "qr") & (table.budget == "10x")].iloc[0]
    qr_aucs = [x.data.metrics["test_auc"] for x in by[("qr", "10x")]]
    assert qr.seeds == 2 and abs(qr.auc - sum(qr_aucs) / 2) < 1e-12
    assert qr.auc == groups[("qr", "10x")].data.metrics["test_auc"]
    base_auc = sum(x.data.metrics["test_auc"] for x in by[("none", "none")]) / 2
    assert abs(qr.delta_auc - (qr.auc - base_auc)) < 1e-12
    assert qr.auc_ci95 > 0 and qr["rank"] == "best"
    # the step time against none, measured interleaved in one process at the end
    base = table[table.method == "none"].iloc[0]
    assert base.step_vs_base == 1.0 and qr.step_vs_base > 0
    assert (report / "pareto.png").stat().st_size > 10_000
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "report")}
    assert arts == {"report/table.md", "report/table.csv", "report/pareto.png", "report/pareto.html",
                    "report/overhead.csv"}  # fmt: skip
    # the Pareto page: a point per finished method and budget, its figures on hover, its run on click
    page = _points((report / "pareto.html").read_text())
    qr_group = groups[("qr", "10x")].info
    assert set(page) == {"none", "qr"}
    href, title = page["qr"]
    assert href == f"http://127.0.0.1:5000/#/experiments/{qr_group.experiment_id}/runs/{qr_group.run_id}"
    assert "qr at 10x" in title and f"{int(qr.bytes):,} bytes ({qr.ratio:.1f}x)" in title
    assert f"test AUC {qr.auc:.4f} ± {qr.auc_ci95:.4f} over 2 seed(s)" in title and "best at 10x" in title
    served = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report/pareto.html", dst_path=str(tmp_path))
    assert _points(Path(served).read_text()) == page
    assert "| qr | 10x |" in r.stdout


def _points(page: str) -> dict[str, tuple[str, str]]:
    """method -> (link, hover text) of the Pareto page's points."""
    class Points(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found, self.current, self.text = {}, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "a" and "data-method" in a:
                self.current = (a["data-method"], a["href"])
            elif tag == "title" and self.current:
                self.text = ""

        def handle_data(self, data):
            if self.text is not None:
                self.text += data

        def handle_endtag(self, tag):
            if tag == "title" and self.current and self.text is not None:
                self.found[self.current[0]] = (self.current[1], self.text)
                self.current, self.text = None, None

    p = Points()
    p.feed(page)
    return p.found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_serves_the_store_over_rest(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("ui-test", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp, run_name="hashing-10x-dcnv2-x", tags={"method": "hashing"}):
        mlflow.log_metric("test_auc", 0.75)
    port = _free_port()
    proc = subprocess.Popen(
        ["make", "-s", "ui", f"PORT={port}", f"TRACKING_URI={uri}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, answer = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(
                    f"{base}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [exp]}).encode(),
                    headers={"Content-Type": "application/json"}, method="POST",
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    answer = json.load(resp)
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, "the MLflow UI never answered"
        assert [x["info"]["run_name"] for x in answer["runs"]] == ["hashing-10x-dcnv2-x"]
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # stop it by its PID (the whole process group)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    assert f"MLflow UI: http://127.0.0.1:{port}" in out


def test_optuna_sweeper_searches_method_and_budget(tmp_path):
    r = run_cli(
        "--multirun", "hparams_search=budget_optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps_per_epoch=5",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        *smoke_overrides(tmp_path), f"hydra.sweep.dir={tmp_path}/multi", f"report_dir={tmp_path}/reports",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = (tmp_path / "multi" / "optimization_results.yaml").read_text()
    assert "name: optuna" in results and "solutions:" in results
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    trials = [x for x in runs if x.data.tags.get("embcomp.kind") != "sweep"]
    assert len(trials) == 2  # each trial is an MLflow run (finished or recorded unreachable)
    # the study is in SQLite (it resumes), and its trials were scored on validation, not test
    study = optuna.load_study(study_name="budget_search", storage=f"sqlite:///{tmp_path}/optuna.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done  # (seeded sampler: the first trials reach their budgets)
    finished = {x.data.tags["embcomp.job_key"]: x for x in trials if "final_val_auc" in x.data.metrics}
    for t in done:
        assert any(abs(x.data.metrics["final_val_auc"] - t.values[0]) < 1e-9 for x in finished.values())


def test_a_budget_found_out_of_reach_in_a_later_stage_is_recorded_on_the_job_run(tmp_path):
    """OptEmbed learns which rows it keeps before its search sizes the tables: a budget below
    the architectures its rows allow is found there: 440 bytes (430 once shared out over the
    tables) is above the 428 of one field of one row at dim 1 beside the 16 bytes a field
    it always holds, so the build takes it, and below the 432 of its smallest field (4 ids)
    at dim 1 with every row kept (``target_kept=1``). The job's run (not the stage's nested
    run) says so."""
    r = run_cli("--multirun", *smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dcnv2"),
                "compression=optembed_fast", "budget=440", "compression.target_kept=1.0", "compression.supernet_epochs=1",
                "compression.retrain_epochs=1", "compression.generations=1",
                "trainer.max_steps_per_epoch=3", f"hydra.sweep.dir={tmp_path}/sweep")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    job = next(x for x in runs if x.data.tags.get("label") == "optembed_fast")
    assert job.info.status == "FINISHED"
    assert job.data.tags["embcomp.status"] == "unreachable"
    assert "cannot reach the budget of 430 bytes with any field kept" in job.data.tags["embcomp.reason"]
    stages = {x.info.run_name: x.info.status for x in runs if x.data.tags.get("mlflow.parentRunId") == job.info.run_id}
    assert stages == {"supernet": "FINISHED", "search": "FAILED"}


def test_a_sweep_that_dies_leaves_its_parent_run_failed_not_running(tmp_path):
    r = run_cli("--multirun", *smoke_overrides(tmp_path, "dataset=criteo_sample"), "trainer.batch_size=0",
                f"hydra.sweep.dir={tmp_path}/sweep")  # fmt: skip
    assert r.returncode != 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    parents = mlflow.search_runs(experiment_names=["test"], filter_string="tags.`embcomp.kind` = 'sweep'", output_format="list")
    assert [p.info.status for p in parents] == ["FAILED"]


def test_the_sweep_counts_its_jobs_as_hydra_expands_them(compose_cfg):
    """The bar's total: Hydra's own expansion of the sweep (config params and command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from experiments.console import count_jobs

    for composed, task in ((["experiment=comparison"], ["seeds=3"]), ([], ["compression=none,qr,hashing", "budget=10x,100x"])):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=composed, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = task  # (what the command line sweeps)
        params = cfg.hydra.sweeper.get("params") or {}
        expanded = [f"{k}={v}" for k, v in params.items()] + list(cfg.hydra.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(expanded), None)
        assert count_jobs(cfg) == sum(len(b) for b in batches) > 1
    GlobalHydra.instance().clear()
