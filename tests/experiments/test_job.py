"""A real Hydra job end to end, read back from a real MLflow SQLite store."""

from __future__ import annotations

import json

import mlflow
import pytest
from hydra.errors import ConfigCompositionException

from compression.config_checks import ConfigError
from compression.errors import MethodConfigError
from experiments.identity import resolve_compression
from experiments.job import run_job
from experiments.tracking import TrackingError
from recsys.data.schema import DataError
from tests.experiments.conftest import run_cli, smoke_overrides


def test_job_is_recorded_in_mlflow(compose_cfg, tmp_path):
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dcnv2"))
    summary = run_job(cfg, tmp_path / "out")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == summary.run_id
    # the UI opens it on its training-runs view, not the GenAI overview
    assert mlflow.get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"
    assert mlflow.get_experiment("0").lifecycle_stage == "deleted"  # the empty Default is not listed first
    m = run.data.metrics
    assert 0.5 < m["test_auc"] <= 1.0
    assert m["test_logloss"] > 0
    assert m["compression_ratio"] == 1.0
    assert m["embedding_bytes"] == m["embedding_uncompressed_bytes"]
    assert m["samples_per_s"] > 0 and m["parameters"] > m["dense_parameters"] > 0
    assert m["embedding_optimizer_bytes"] > 0
    cards = [f["cardinality"] for f in summary.details["dataset"]["schema"]["sparse"]]
    assert m["vocabulary_bytes"] == 16 * (sum(cards) - len(cards))  # beside the tables, not in them
    tags = run.data.tags
    assert (tags["method"], tags["budget"], tags["model"], tags["dataset"]) == ("none", "none", "dcnv2", "criteo_sample")
    assert tags["embcomp.status"] == "complete"
    p = run.data.params
    assert p["trainer.epochs"] == "1" and p["model.cross_layers"] == "3"
    assert p["dataset.rows.train"] == str(summary.details["dataset"]["schema"]["rows"]["train"])
    assert run.inputs.dataset_inputs[0].dataset.name == "criteo_sample"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 2
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert "summary.json" in [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["metrics"]["test_auc"] == pytest.approx(m["test_auc"])


def test_cli_runs_one_configured_job(tmp_path):
    r = run_cli("dataset=criteo_sample", "model=deepfm", *smoke_overrides(tmp_path), f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tags"]["model"] == "deepfm"
    # DeepFM's first-order weights are column 0 of each table: FM dim 15, tables 16 wide, all counted
    cards = [f["cardinality"] for f in summary["dataset"]["schema"]["sparse"]]
    assert summary["config"]["model"]["embedding_dim"] == 15
    assert summary["metrics"]["embedding_uncompressed_bytes"] == sum(cards) * 16 * 4
    assert summary["metrics"]["embedding_bytes"] == summary["metrics"]["embedding_uncompressed_bytes"]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.epochs=three", "trainer.epochs"),
        ("trainer.no_such_key=1", "no_such_key"),
        ("compression=no_such_method", "no_such_method"),
        ("model.deep_layers=7", "deep_layers"),
        ("dataset.min_count=1.5", "min_count"),
    ],
)
def test_bad_config_fails_at_composition(compose_cfg, tmp_path, override, expected):
    with pytest.raises(ConfigCompositionException, match=expected):  # Hydra's, naming the key
        compose_cfg(smoke_overrides(tmp_path, override))


def test_bad_config_on_the_command_line_exits_nonzero_before_any_work(tmp_path):
    r = run_cli(*smoke_overrides(tmp_path), "trainer.no_such_key=1", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode != 0
    assert "no_such_key" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "override,error,expected",
    [
        ("dataset.path=no/such/file.txt", DataError, "no/such/file.txt"),
        ("mlflow.tracking_uri=http://127.0.0.1:9", TrackingError, "MLflow tracking server http://127.0.0.1:9 does not answer"),
        ("mlflow.tracking_uri=file:./mlruns", TrackingError, "file stores"),
    ],
)
def test_bad_input_is_refused_before_training(compose_cfg, tmp_path, override, error, expected):
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", override))
    with pytest.raises(error, match=expected):
        run_job(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_bad_input_on_the_command_line_is_one_line_and_exit_1(tmp_path):
    r = run_cli("dataset=criteo_sample", *smoke_overrides(tmp_path), "dataset.path=no/such/file.txt",
                f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no/such/file.txt" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow  # torch.export traces the whole model: ~1 min; the export itself is in tests/compression
def test_export_writes_a_reloadable_program_logged_with_its_size(compose_cfg, tmp_path):
    """export=true: QR at 10x then int4 tables, exported by torch.export, reloaded, same logits."""
    cfg = compose_cfg(smoke_overrides(
        tmp_path, "dataset=criteo_sample", "model=dlrm", "compression=qr", "budget=10x",
        "+compression.quantization.precision=int4", "export=true",
    ))  # fmt: skip
    summary = run_job(cfg, tmp_path / "out")
    m = summary.metrics
    path = tmp_path / "out" / "model.pt2"
    assert m["export_bytes"] == path.stat().st_size > 0
    assert m["export_max_abs_diff"] < 1e-5
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(summary.run_id, "model")] == ["model/model.pt2"]


@pytest.mark.parametrize("method", ["frequency_hybrid", "mixed_dim"])
def test_methods_sized_from_id_counts_run_as_jobs(compose_cfg, tmp_path, method):
    """They read the dataset's counts in the memory pre-flight and in the build alike."""
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dcnv2", f"compression={method}",
                                      "budget=10x", "trainer.max_steps_per_epoch=3"))  # fmt: skip
    summary = run_job(cfg, tmp_path / "out")
    assert summary.metrics["compression_ratio"] == pytest.approx(10, rel=0.05)


def test_a_default_experiment_with_runs_is_left_alone(tmp_path):
    from experiments.tracking import use_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id="0"):
        mlflow.log_metric("x", 1.0)
    use_experiment(uri, "mine")
    assert mlflow.get_experiment("0").lifecycle_stage == "active"


def test_raw_ids_feed_a_hashing_method_with_no_vocabulary(compose_cfg, tmp_path):
    """``dataset.ids=raw`` (each value's stable 64-bit hash) on Criteo split in its line
    order: a hashing method trains on it and holds no vocabulary (``vocabulary_bytes`` 0,
    its table bytes as with vocabulary ids); a method whose rows are the vocabulary's ids is
    refused in one line before any data is read."""
    over = ["dataset=criteo_sample", "dataset.ids=raw", "dataset.split_by=order", "budget=10x", "seed=1"]
    summary = run_job(compose_cfg(smoke_overrides(tmp_path, *over, "compression=hashing")), tmp_path / "raw")
    vocab = run_job(compose_cfg(smoke_overrides(tmp_path, *over[:1], *over[2:], "compression=hashing")), tmp_path / "vocab")
    m, v = summary.metrics, vocab.metrics
    assert 0.5 < m["test_auc"] <= 1 and m["vocabulary_bytes"] == 0 < v["vocabulary_bytes"]
    assert m["embedding_bytes"] == v["embedding_bytes"] and m["test_auc"] != v["test_auc"]
    assert summary.details["dataset"]["schema"]["params"]["ids"] == "raw"
    with pytest.raises(ConfigError, match=r"^dataset.ids=raw: mixed_dim needs vocabulary ids .* the methods that hash raw ids are cafe, dhe"):
        run_job(compose_cfg(smoke_overrides(tmp_path, *over, "compression=mixed_dim")), tmp_path / "refused")
    assert not (tmp_path / "refused" / "summary.json").exists()


def test_matryoshka_deploys_further_budgets_from_one_training_each_tested(compose_cfg, tmp_path):
    """``deploy_ratios``: one training, the budget's deployment and two more, each with its
    validation AUC and bytes from the deploy stage and its test AUC from the job's one read
    of the test split; the job's own model is back in its budget's form after them."""
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dlrm", "compression=matryoshka",
                                      "budget=4x", "compression.deploy_ratios=[8,16]"))  # fmt: skip
    m = run_job(cfg, tmp_path / "out").metrics
    full = m["embedding_uncompressed_bytes"]
    for r in (8, 16):
        assert 0.95 * full / r <= m[f"deploy.ratio_{r}x.bytes"] <= full / r
        assert 0.5 < m[f"deploy.ratio_{r}x.test_auc"] <= 1 and m[f"deploy.ratio_{r}x.test_logloss"] > 0
        assert 0 < m[f"deploy.ratio_{r}x.val_auc"] <= 1
    assert m["embedding_bytes"] == m["deploy.embedding_bytes"] <= full / 4  # restored after the others' tests
    assert m["deploy.ratio_8x.test_auc"] != m["deploy.ratio_16x.test_auc"]
    quantized = compose_cfg(smoke_overrides(tmp_path, "compression=matryoshka", "compression.deploy_ratios=[8]",
                                            "+compression.quantization.precision=int8"))  # fmt: skip
    with pytest.raises(MethodConfigError, match=r"^matryoshka.deploy_ratios and matryoshka.quantization: .* in int8;"):
        resolve_compression(quantized)


def test_a_job_trains_with_fused_tables(compose_cfg, tmp_path):
    """``trainer.fused_tables`` through Hydra: the run trains with fbgemm's fused optimizer and
    records the setting; the tables it reports are the plain ones it trained."""
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", "model=dlrm", "compression=hashing", "budget=10x",
                                      "trainer.fused_tables=true", "trainer.embedding_l2=0"))  # fmt: skip
    summary = run_job(cfg, tmp_path / "out")
    m = summary.metrics
    assert 0 < m["test_auc"] <= 1 and m["compression_ratio"] == pytest.approx(10, rel=0.05)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow.get_run(summary.run_id).data.params["trainer.fused_tables"] == "True"
    with pytest.raises(ConfigError, match=r"^trainer.fused_tables: fbgemm's fused kernels do not apply the embedding L2"):
        run_job(compose_cfg(smoke_overrides(tmp_path, "trainer.fused_tables=true", "trainer.embedding_l2=1e-4")),
                tmp_path / "refused")  # fmt: skip
