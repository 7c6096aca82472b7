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


def test_a_model_that_has_not_learned_is_marked_failed_never_best_nor_on_the_frontier(tmp_path):
    """A constant predictor (test AUC 0.5000 +- 0.0000 at 1000x) once came out 'best' and on
    the frontier; within noise of 0.5 on the split it is judged on, it is failed instead."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    parent = _sweep(client, exp, {("none", "none"): [0.80, 0.81], ("optembed", "1000x"): [0.5003, 0.4999],
                                  ("hashing", "1000x"): [0.55, 0.56]})  # fmt: skip
    runs = mlflow.search_runs(experiment_ids=[exp], output_format="list")
    for r in runs:  # the split's size and click rate, as jobs log them
        if r.data.tags.get("embcomp.kind") != "sweep":
            for k, v in {"test_rows": 10000.0, "test_positives": 3000.0, "test_base_logloss": 0.6109}.items():
                client.log_metric(r.info.run_id, k, v)
    table = summarise(collect("study", parent)).set_index("method")
    assert table.loc["optembed", "status"] == "failed: has not learned (AUC 0.5001 is within noise of 0.5, ±0.0189 on 10,000 rows)"
    assert table.loc["optembed", "rank"] == "" and not table.loc["optembed", "pareto"]
    assert table.loc["hashing", "rank"] == "best"


def test_a_make_advise_study_or_an_unknown_run_is_refused_in_one_line(tmp_path, capsys):
    from experiments.report import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("advise")
    with mlflow.start_run(experiment_id=exp, tags={"embcomp.kind": "advise"}) as run:
        pass
    assert main(["--experiment", "advise", "--parent", run.info.run_id, "--tracking-uri", uri]) == 1
    assert "is a make advise study" in capsys.readouterr().out
    assert main(["--experiment", "advise", "--parent", "nope", "--tracking-uri", uri]) == 1
    assert capsys.readouterr().out.strip().splitlines() == [f"error: no run nope in {uri}"]
