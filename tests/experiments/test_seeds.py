"""Several seeds per job: the seed list, the interval, the group run and its resume."""

from __future__ import annotations

import json
import math

import mlflow
import pandas as pd
import pytest

from experiments.job import run_job
from experiments.report import summarise
from experiments.seeds import SeedsError, Stat, aggregate, aggregate_metrics, resolve_seeds
from tests.experiments.conftest import run_cli, smoke_overrides


def test_seeds_are_a_count_from_the_seed_or_an_explicit_list():
    assert resolve_seeds(None, 0) is None
    assert resolve_seeds(3, 0) == [0, 1, 2]
    assert resolve_seeds(2, 10) == [10, 11]
    assert resolve_seeds([5, 1, 9], 0) == [5, 1, 9]
    for bad, msg in [(0, "at least 1"), ([], "non-empty"), ([1, 1], "distinct"), ("3", "count or a list"), (True, "count")]:
        with pytest.raises(SeedsError, match=msg):
            resolve_seeds(bad, 0)


def test_the_interval_is_students_t_over_the_seeds():
    st = aggregate([1.0, 2.0, 3.0])
    assert (st.mean, st.std, st.n) == (2.0, 1.0, 3)
    assert st.ci95 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    one = aggregate([0.7, float("nan")])
    assert one.n == 1 and one.mean == 0.7 and math.isnan(one.ci95)
    assert Stat(0.70, 0.01, 0.02, 3).overlaps(Stat(0.73, 0.01, 0.015, 3))
    assert not Stat(0.70, 0.01, 0.01, 3).overlaps(Stat(0.73, 0.01, 0.015, 3))
    m = aggregate_metrics([{"test_auc": 0.7, "epochs_run": 3}, {"test_auc": 0.8, "epochs_run": 5}])
    assert m["n_seeds"] == 2 and m["test_auc"] == pytest.approx(0.75) and m["epochs_run"] == 4


def _runs(rows):
    return pd.DataFrame(
        [dict(dataset="d", model="m", method=meth, budget=b, setting="", seed=str(s), bytes=byt, ratio=1.0, auc=a,
              logloss=0.5, status="complete") for meth, b, byt, s, a in rows]  # fmt: skip
    )


def test_the_report_marks_the_best_method_at_each_budget_and_the_ones_tied_with_it():
    runs = _runs(
        [("none", "none", 1000, s, a) for s, a in enumerate([0.80, 0.81, 0.79])]
        + [("a", "10x", 100, s, a) for s, a in enumerate([0.78, 0.79, 0.77])]  # best at 10x
        + [("b", "10x", 100, s, a) for s, a in enumerate([0.77, 0.785, 0.765])]  # overlaps a
        + [("c", "10x", 100, s, a) for s, a in enumerate([0.70, 0.701, 0.699])]  # clearly worse
        + [("c", "100x", 10, s, a) for s, a in enumerate([0.69, 0.70, 0.68])]
    )
    df = summarise(runs).set_index(["method", "budget"])
    assert set(df["setting"]) == {""}
    assert df.loc[("a", "10x"), "rank"] == "best"
    assert df.loc[("b", "10x"), "rank"] == "tied"
    assert df.loc[("c", "10x"), "rank"] == ""
    assert df.loc[("c", "100x"), "rank"] == "best"  # alone at its budget
    assert df.loc[("a", "10x"), "seeds"] == 3
    assert df.loc[("a", "10x"), "auc"] == pytest.approx(0.78)
    assert df.loc[("a", "10x"), "delta_auc"] == pytest.approx(0.78 - 0.80)
    assert df.loc[("a", "10x"), "auc_ci95"] == pytest.approx(aggregate([0.78, 0.79, 0.77]).ci95)


def test_a_job_with_seeds_runs_each_under_one_group_run_and_resumes_without_redoing_them(compose_cfg, tmp_path):
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", "trainer.max_steps_per_epoch=4", "seeds=2"))
    summary = run_job(cfg, tmp_path / "out")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    groups = [r for r in runs if r.data.tags.get("embcomp.kind") == "seed_group"]
    assert len(groups) == 1 and groups[0].info.run_id == summary.run_id
    group = groups[0]
    seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id]
    assert sorted(r.data.tags["seed"] for r in seeds) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and r.data.tags["embcomp.status"] == "complete" for r in seeds)
    aucs = [r.data.metrics["test_auc"] for r in seeds]
    assert aucs[0] != aucs[1]  # the seed reaches the model's initialisation and the batch order
    assert group.data.metrics["test_auc"] == pytest.approx(sum(aucs) / 2)
    assert group.data.metrics["test_auc_ci95"] == pytest.approx(aggregate(aucs).ci95)
    assert group.data.metrics["n_seeds"] == 2 and group.data.tags["embcomp.status"] == "complete"
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(on_disk["per_seed"]) == {"0", "1"}
    # the same job again in the same directory: the same group, no seed trained twice
    again = run_job(cfg, tmp_path / "out")
    assert again.run_id == group.info.run_id
    runs2 = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert len(runs2) == len(runs)


def test_a_bad_seeds_setting_is_one_line(tmp_path):
    r = run_cli("dataset=criteo_sample", *smoke_overrides(tmp_path), "seeds=[1,1]", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "error: seeds must be distinct, got [1, 1]"


def test_settings_a_sweep_varies_beside_method_and_budget_are_kept_apart():
    from experiments.report import settings

    got = settings("compression=qr budget=10x seed=3 seeds=3 model=dcnv2 trainer=bars +trainer.embedding_l2=1e-4 "
                   "hydra.sweep.dir=x mlflow.experiment_name=y trainer.progress=off")  # fmt: skip
    assert got == {"trainer": "bars", "trainer.embedding_l2": "1e-4"}
    runs = pd.concat([
        _runs([("none", "none", 1000, s, 0.80 + s / 100) for s in range(3)]).assign(setting="trainer=default"),
        _runs([("none", "none", 1000, s, 0.70 + s / 100) for s in range(3)]).assign(setting="trainer=bars"),
    ])  # fmt: skip
    df = summarise(runs).set_index("setting")
    assert df.loc["trainer=default", "auc"] == pytest.approx(0.81)
    assert df.loc["trainer=bars", "auc"] == pytest.approx(0.71)
