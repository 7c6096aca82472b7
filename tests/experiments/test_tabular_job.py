"""dataset=tabular through the real Hydra config: the example trains, bad input is one line."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from experiments.job import run_job
from recsys.data.tabular import TabularConfig
from recsys.data.tabular_synth import FRAPPE_FIELDS, FRAPPE_FILES
from tests.data.conftest import leftovers
from tests.experiments.conftest import run_cli, smoke_overrides


def test_example_config_is_every_role(compose_cfg, tmp_path):
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=tabular_example"))
    dataset = OmegaConf.to_object(cfg.dataset)
    assert isinstance(dataset, TabularConfig)
    ds = dataset.prepare(tmp_path / "cache")
    assert sum(ds.schema.rows.values()) == 4000
    assert ds.schema.dense == ["price", "age"]
    assert [(f.name, f.multi_hot) for f in ds.schema.sparse] == [
        ("user_id", False), ("item", False), ("country", False), ("tags", True)
    ]
    assert ds.schema.params["min_counts"]["user_id"] == 2


def test_example_trains_with_every_model_unchanged(compose_cfg, tmp_path):
    for model in ("deepfm", "dlrm", "dcnv2"):
        cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=tabular_example", f"model={model}"))
        summary = run_job(cfg, tmp_path / model)
        assert 0.6 < summary.metrics["test_auc"] <= 1.0, model


def test_template_from_the_command_line_bad_row_is_one_error_line(tmp_path):
    """Refused inside the build (after the cache's temporary directory exists): exit 1, one line."""
    data = tmp_path / "clicks.csv"
    data.write_text("label,user\n1,a\n0,b\n2,c\n")
    r = run_cli("dataset=tabular", f"dataset.path={data}", "dataset.categorical=[user]", *smoke_overrides(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {data}:4: column 'label': '2' is not 0 or 1"
    assert "Traceback" not in r.stderr
    assert leftovers(tmp_path / "cache") == []


def test_frappe_shaped_config_matches_its_generator(compose_cfg, tmp_path):
    """What bench_tabular --frappe reads in code is what dataset=frappe_shaped declares."""
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=frappe_shaped"))
    dataset = OmegaConf.to_object(cfg.dataset)
    assert isinstance(dataset, TabularConfig)
    assert dataset.categorical == list(FRAPPE_FIELDS) and dataset.label == "label"
    files = {s: Path(p) for s, p in dataset.files().items()}
    assert {s: p.name for s, p in files.items()} == FRAPPE_FILES
    assert len({p.parent for p in files.values()}) == 1
