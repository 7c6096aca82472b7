"""The links into the MLflow UI: the saved view each sweep gets, and, in a real browser,
the view a printed link opens (marked ``browser``: skipped, saying why, where Chromium or
Playwright is missing)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import mlflow
import pytest

from experiments.dashboard import VIEW_TAG, sweep_links, view_key
from tests.experiments.conftest import REPO, run_cli, smoke_overrides

CHROMIUM = os.environ.get("EMBCOMP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One real sweep (none and hashing at 10x, 2 seeds each) for the module's tests."""
    tmp_path = tmp_path_factory.mktemp("dash")
    r = run_cli("--multirun", "dataset=criteo_sample", "compression=none,hashing", "budget=10x", "seeds=2",
                "trainer.max_steps_per_epoch=8", "hydra.callbacks.mlflow_sweep.overhead_rounds=2",
                *smoke_overrides(tmp_path), "mlflow.experiment_name=dash", f"hydra.sweep.dir={tmp_path}/multi",
                f"report_dir={tmp_path}/reports", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path, r


def test_each_sweep_gets_a_saved_view_and_links_to_it(swept):
    """The view: the sweep's jobs, grouped by method, the figures as columns, sorted by
    test AUC, and a chart of test AUC against bytes; the sweep prints its links."""
    tmp_path, r = swept
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [s] = sweep_links(uri, ui="http://127.0.0.1:5001/")
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("dash")
    parent = mlflow.search_runs([exp.experiment_id], "tags.`embcomp.kind` = 'sweep'", output_format="list")[0]
    key = view_key(parent.info.run_id)
    assert s.table == (f"http://127.0.0.1:5001/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={key}"
                       "&workflowType=machine_learning")  # fmt: skip
    assert s.chart == s.table + "&compareRunsMode=CHART" and s.jobs == 2
    envelope = json.loads(exp.tags[VIEW_TAG + key])
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    jobs = mlflow.search_runs([exp.experiment_id], state["searchFilter"], output_format="list")
    assert {j.data.tags["label"] for j in jobs} == {"none", "hashing"}  # one row per job, grouped by its label
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "label"}]
    assert state["orderByKey"] == "metrics.`test_auc`" and state["orderByAsc"] is False
    for column in ("test_auc", "test_auc_ci95", "embedding_bytes", "compression_ratio", "step_vs_none"):
        assert f"metrics.`{column}`" in state["selectedColumns"]
        assert all(column in j.data.metrics for j in jobs), column  # every column has its figure
    assert [(c["xaxis"]["key"], c["yaxis"]["key"]) for c in state["compareRunCharts"]] == [("embedding_bytes", "test_auc")]
    assert f"the sweep's jobs by method: http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?" in r.stdout


@pytest.mark.browser
def test_the_printed_link_opens_the_comparison_in_a_browser(swept, tmp_path):
    """``make ui`` prints the links; Chromium opens them onto the jobs grouped by method with
    the AUC and bytes columns, and onto the chart of AUC against bytes."""
    if CHROMIUM is None:
        pytest.skip("no Chromium (apt-get install chromium, or set EMBCOMP_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright (pip install playwright)")
    uri = f"sqlite:///{swept[0]}/mlflow.db"
    port = _free_port()
    proc = subprocess.Popen(["make", "-s", "ui", f"PORT={port}", f"TRACKING_URI={uri}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        lines, deadline = [], time.time() + 120
        while time.time() < deadline and not any("chart: " in x for x in lines):
            lines.append(proc.stdout.readline())
        table = next(x.split("table: ")[1].strip() for x in lines if "table: " in x)
        chart = next(x.split("chart: ")[1].strip() for x in lines if "chart: " in x)
        _wait_for(f"http://127.0.0.1:{port}/health")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(table)
            page.get_by_text("Group: hashing").wait_for(timeout=60_000)
            text = page.inner_text("body")
            assert "Group: none" in text and "Group: hashing" in text
            for column in ("test_auc", "embedding_bytes", "compression_ratio"):
                assert column in text, column
            assert re.search(r"\b2 matching runs\b", text), text[-500:]
            page.screenshot(path=str(tmp_path / "table.png"))
            page.goto(chart)
            page.get_by_text("test AUC against bytes").wait_for(timeout=60_000)
            assert "embedding_bytes" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "chart.png"))
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} never answered")
