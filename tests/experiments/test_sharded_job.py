"""Sharded jobs as users start them: ``torchrun`` with 2 gloo processes, and the memory
pre-flight that refuses a config before any table is allocated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression import Budget, NoCompression
from compression.methods.hashing import HashingConfig
from compression.preflight import (
    MemoryPreflightError,
    TrainingBytes,
    check_fits,
    fitting_ratio,
    training_bytes,
)
from tests.experiments.conftest import REPO, run_cli, smoke_overrides

# Criteo-1TB-shaped tables (the dataset config's cardinalities) and a tiny file
ONE_TB = [
    "dataset=criteo_1tb_synthetic", "dataset.rows=2000", "dataset.chunk_rows=1000",
    "model=dlrm", "model.embedding_dim=128",
]  # fmt: skip


def test_torchrun_two_processes_shard_and_log_per_rank_bytes(tmp_path):
    overrides = smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dcnv2_bars", "model.embedding_dim=16", "compression=qr", "budget=10x")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "experiments.run", *overrides, f"hydra.run.dir={tmp_path}/out"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert len(runs) == 1, "rank 0 alone records the job"
    run = runs[0]
    params, metrics = run.data.params, run.data.metrics
    assert params["sharding.world_size"] == "2" and params["sharding.process_group_backend"] == "gloo"
    plan = {k.removeprefix("sharding.table."): v for k, v in params.items() if k.startswith("sharding.table.")}
    # QR's quotient and remainder tables are constrained table-wise by the method
    qr_tables = {t: s for t, s in plan.items() if t.endswith(("__q", "__r"))}
    assert qr_tables and set(qr_tables.values()) == {"table_wise"}, plan
    held = [metrics[f"rank{r}.table_bytes"] for r in range(2)]
    assert all(b > 0 for b in held), "table-wise over 2 ranks: each rank holds some tables"
    # a sharded table's rows are on one rank each, a replicated (data-parallel) table on every
    # rank: the ranks' table bytes add up to the module's tables, the replicated ones twice
    tensors = json.loads((tmp_path / "out" / "summary.json").read_text())["memory_by_tensor"]
    per_table = {k.split(".embedding_bags.")[1].removesuffix(".weight"): v
                 for k, v in tensors.items() if ".embedding_bags." in k and k.endswith(".weight")}  # fmt: skip
    assert set(per_table) == set(plan)
    assert sum(held) == sum(v * (2 if plan[t] == "data_parallel" else 1) for t, v in per_table.items())
    for r in range(2):
        assert metrics[f"rank{r}.planner_estimate_bytes"] >= metrics[f"rank{r}.table_bytes"]
    assert metrics["test_auc"] > 0.5 and metrics["peak_rss_bytes"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "sharding")}
    assert artifacts == {"sharding/plan.txt", "sharding/ranks.md", "sharding/ranks.csv"}


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_uncompressed_criteo_1tb_config_is_refused_in_one_line(tmp_path, mode):
    r = run_cli(*smoke_overrides(tmp_path, *ONE_TB, "compression=none", f"distributed.mode={mode}"),
                f"hydra.run.dir={tmp_path}/out")  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none: needs 105.4 GB for tables + optimizer state, "), last
    assert "available" in last and "a budget of" in last and last.endswith("or more would fit")
    assert not list((tmp_path / "out").glob("summary.json")), "nothing recorded as a result"


def test_training_bytes_counts_without_allocating():
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=128, num_embeddings=40_000_000, feature_names=[f"f{i}"])
              for i in range(3)]  # fmt: skip
    full = training_bytes(tables, NoCompression())
    rows = 3 * 40_000_000
    assert full.tables == rows * 128 * 4 and full.optimizer == rows * 4 and full.uncompressed == full.total
    small = training_bytes(tables, HashingConfig(budget=Budget(ratio=1000)))
    assert 0.95 * full.tables / 1000 <= small.tables <= full.tables / 1000


def test_check_fits_names_need_available_and_a_budget_that_fits():
    need = TrainingBytes(tables=100 * 10**9, optimizer=10**9, uncompressed=101 * 10**9)
    check_fits(TrainingBytes(10, 0, 10), 100, "tiny")  # fits: no error
    with pytest.raises(MemoryPreflightError) as e:
        check_fits(need, 20 * 10**9, "none")
    assert str(e.value) == (
        "none: needs 101.0 GB for tables + optimizer state, 20.0 GB available; a budget of 10x or more would fit"
    )
    ratio = fitting_ratio(need, 20 * 10**9)
    assert need.uncompressed / ratio <= 0.9 * 20 * 10**9 < need.uncompressed / (ratio / 2)


def test_in_a_sweep_the_refused_config_is_recorded_and_the_sweep_goes_on(tmp_path):
    # (no step-time rounds at the end: they rebuild the 1000x tables of a Criteo-1TB-shaped
    # model in a fresh process, minutes on a loaded machine, and this test is about the refusal)
    r = run_cli("--multirun", *smoke_overrides(tmp_path, *ONE_TB, "distributed.mode=on"),
                "compression=none,hashing", "budget=1000x", "hydra.callbacks.mlflow_sweep.overhead_rounds=0",
                f"hydra.sweep.dir={tmp_path}/sweep")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {x.data.tags.get("label"): x for x in mlflow.search_runs(experiment_names=["test"], output_format="list")}
    refused = runs["none"].data.tags
    assert refused["embcomp.status"] == "unreachable"
    assert refused["embcomp.reason"].startswith("none: needs 105.4 GB for tables + optimizer state")
    assert runs["hashing"].data.tags["embcomp.status"] == "complete"
    assert runs["hashing"].data.metrics["compression_ratio"] == pytest.approx(1000, rel=0.05)


def test_post_training_int4_after_sharded_training_gathers_the_tables(tmp_path):
    """distributed.mode=on (one process, fused tables): the quantize stage runs on the
    model gathered unsharded, and the run ends with int4 tables and their bytes."""
    r = run_cli(*smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dlrm", "compression=hashing_int4",
                                 "budget=10x", "distributed.mode=on"), f"hydra.run.dir={tmp_path}/out")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    m = summary["metrics"]
    # the gathered model is the trained one: int4 rows change its validation AUC by little
    # (a model gathered wrongly, or untrained rows, would score about 0.5)
    assert m["train.val_auc"] > 0.6 and abs(m["quantize.val_auc"] - m["train.val_auc"]) < 0.01, m
    assert m["quantize.embedding_bytes_before"] > 4 * m["embedding_bytes"]  # fp32 -> int4 (+ scale/bias)
    # 10x means the deployed module's bytes (budget_precision: deployed): 10x once in int4
    assert 10 <= m["compression_ratio"] <= 10 / 0.95
