"""Links that open the MLflow UI straight onto a sweep's comparison.

MLflow 3.17's runs page restores a whole view (filter, sort, columns, grouping, charts)
from a saved view: an experiment tag ``mlflow.sharedViewState.<key>``, opened with
``#/experiments/<id>/runs?viewStateShareKey=<key>``. Columns, grouping and charts are not
URL parameters of their own in that version (the URL carries only the filter and sort;
the rest lives in the browser's local storage), so a saved view is the one way a link can
set them. ``workflowType=machine_learning`` keeps the UI's model-training navigation
(MLflow 3.17 picks GenAI or model training from the URL or the browser, not from the
experiment's ``mlflow.experimentKind`` tag).

For each sweep (and each ``make advise`` study) the view holds: the sweep's jobs (its
direct children: one seed-group run per job, or the job's run), grouped by method, with
budget, test AUC and its interval, logloss, bytes, ratio and step time against the full
table as columns, sorted by test AUC; the chart view plots test AUC against bytes (a linear
axis: the view takes no log scale that this version applies).

``python -m experiments.dashboard`` (run by ``make ui``, and at the end of every sweep)
writes the views and prints the links. What the UI cannot do from a link: open the home
page on an experiment (``/`` is MLflow's own start page), show a view without its
"shared view" banner, or expand the groups' seed runs.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run

VIEW_TAG = "mlflow.sharedViewState."
DEFAULT_UI = "http://127.0.0.1:5000/"
PARENT_KINDS = ("sweep", "advise")
COLUMNS = ["tags.`budget`", "metrics.`test_auc`", "metrics.`test_auc_ci95`", "metrics.`test_logloss`",
           "metrics.`embedding_bytes`", "metrics.`compression_ratio`", "metrics.`step_vs_none`"]  # fmt: skip


@dataclass
class SweepLinks:
    experiment: str
    name: str
    jobs: int
    table: str
    chart: str


def ui_base(tracking_uri: str) -> str:
    """Where the UI of this store is: its server, or ``make ui``'s address for a file store."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of one run."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def view_key(parent_run_id: str) -> str:
    return f"embcomp-{parent_run_id[:8]}"


def view_state(parent_run_id: str) -> dict:
    """The runs page's state for one sweep (the fields its saved views hold)."""
    return {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'",
        "orderByKey": "metrics.`test_auc`", "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs", "datasetsFilter": [],
        "selectedColumns": COLUMNS,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "label"}]},
        "compareRunSections": [{"uuid": "embcomp", "name": "test AUC against bytes", "display": True,
                                "isReordered": False}],
        "compareRunCharts": [{"type": "SCATTER", "uuid": "embcomp-pareto", "metricSectionId": "embcomp",
                              "xaxis": {"key": "embedding_bytes", "type": "METRIC"},
                              "yaxis": {"key": "test_auc", "type": "METRIC"},
                              "runsCountToCompare": 500, "deleted": False, "isGenerated": False}],
    }  # fmt: skip


def publish(client: mlflow.MlflowClient, parent: Run) -> str:
    """Write the sweep's saved view to its experiment; its key."""
    key = view_key(parent.info.run_id)
    now = int(time.time() * 1000)
    envelope = {"name": f"{parent.info.run_name} (embcomp)", "createdAt": now, "updatedAt": now,
                "state": json.dumps(view_state(parent.info.run_id))}  # fmt: skip
    client.set_experiment_tag(parent.info.experiment_id, VIEW_TAG + key, json.dumps(envelope))
    return key


def link(ui: str, experiment_id: str, key: str, chart: bool = False) -> str:
    query = {"viewStateShareKey": key, "workflowType": "machine_learning", **({"compareRunsMode": "CHART"} if chart else {})}
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def sweep_links(tracking_uri: str, ui: str | None = None, parent_run_id: str | None = None) -> list[SweepLinks]:
    """Every sweep's (or one's) view written, and its links, oldest first."""
    mlflow.set_tracking_uri(tracking_uri)
    client, ui = mlflow.MlflowClient(), ui or ui_base(tracking_uri)
    out = []
    for exp in client.search_experiments():
        parents = sorted((p for kind in PARENT_KINDS for p in client.search_runs(
            [exp.experiment_id], f"tags.`embcomp.kind` = '{kind}'", max_results=5000)), key=lambda p: p.info.start_time)  # fmt: skip
        for p in parents:
            if parent_run_id is not None and p.info.run_id != parent_run_id:
                continue
            jobs = len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'", max_results=5000))
            key = publish(client, p)
            out.append(SweepLinks(exp.name, p.info.run_name or p.info.run_id, jobs, link(ui, exp.experiment_id, key),
                                  link(ui, exp.experiment_id, key, chart=True)))  # fmt: skip
    return out


def describe(links: list[SweepLinks]) -> str:
    return "\n".join(f"{s.experiment} / {s.name} ({s.jobs} jobs)\n  table: {s.table}\n  chart: {s.chart}" for s in links)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--ui", default=None, help=f"the UI's address (default: the server, or {DEFAULT_UI})")
    args = p.parse_args(argv)
    from experiments.tracking import tracking_refusal

    if (refusal := tracking_refusal(args.tracking_uri)) is not None:
        print(refusal)
        return 1
    links = sweep_links(args.tracking_uri, args.ui)
    print(describe(links) if links else "no sweeps yet: make experiment, make sweep or make advise first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
