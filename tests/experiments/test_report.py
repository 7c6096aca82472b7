"""The report of a study run in parts: several sweeps' runs read back from a real MLflow
store, a job rerun in a later sweep replacing its earlier record."""

from __future__ import annotations

import time

import mlflow

from experiments.report import collect, summarise


def _sweep(client: mlflow.MlflowClient, exp: str, jobs: dict[tuple[str, str], list[float]]) -> str:
    parent = client.create_run(exp, tags={"embcomp.kind": "sweep"}).info.run_id
    for (method, budget), aucs in jobs.items():
        for seed, auc in enumerate(aucs):
            run = client.create_run(exp, tags={
                "embcomp.sweep": parent, "embcomp.status": "complete", "dataset": "movielens_100k",
                "model": "deepfm", "method": method, "label": method, "budget": budget, "seed": str(seed),
            }).info.run_id  # fmt: skip
            for k, v in {"test_auc": auc, "test_logloss": 0.5, "embedding_bytes": 100.0, "compression_ratio": 10.0}.items():
                client.log_metric(run, k, v)
            client.set_terminated(run)
            time.sleep(0.002)  # start times in order
    client.set_terminated(parent)
    return parent


def test_several_sweeps_make_one_report_and_a_rerun_replaces_its_earlier_record(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    first = _sweep(client, exp, {("none", "none"): [0.80, 0.81], ("hashing", "10x"): [0.70, 0.72],
                                             ("autodim", "10x"): [0.50, 0.52]})  # fmt: skip
    second = _sweep(client, exp, {("autodim", "10x"): [0.75, 0.77]})  # autodim rerun after a fix
    runs = collect("study", [first, second])
    assert len(runs) == 6 and sorted(runs[runs.method == "autodim"].auc) == [0.75, 0.77]
    table = summarise(runs).set_index("method")
    assert abs(table.loc["autodim", "auc"] - 0.76) < 1e-9 and table.loc["autodim", "seeds"] == 2
    assert abs(table.loc["hashing", "auc"] - 0.71) < 1e-9
    assert abs(table.loc["autodim", "delta_auc"] - (0.76 - 0.805)) < 1e-9
    assert table.loc["autodim", "rank"] == "best"
    # one sweep alone is that sweep's runs only
    assert sorted(collect("study", first).method.unique()) == ["autodim", "hashing", "none"]
    assert sorted(collect("study", first)[lambda d: d.method == "autodim"].auc) == [0.50, 0.52]
    assert list(collect("study", second).method.unique()) == ["autodim"]
