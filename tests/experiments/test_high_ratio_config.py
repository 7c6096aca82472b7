"""The high-ratio study (make experiment-high_ratio) composes and lists every registered method."""

import yaml

import compression
from tests.experiments.conftest import REPO

CONF = REPO / "experiments" / "conf"


def test_the_study_lists_every_registered_method_on_three_datasets(compose_cfg):
    study = yaml.safe_load((CONF / "experiment" / "high_ratio.yaml").read_text())
    params = study["hydra"]["sweeper"]["params"]
    choices = params["compression"].split(",")

    def method(choice: str) -> str:  # by its schema, or the config it extends (optembed_fast: optembed)
        first = yaml.safe_load((CONF / "compression" / f"{choice}.yaml").read_text()).get("defaults", ["none"])[0]
        return first.removeprefix("schema_") if first.startswith("schema_") else method(first)

    methods = {"none" if c == "none" else method(c) for c in choices}
    assert set(compression.registered_methods()) <= methods, set(compression.registered_methods()) - methods
    assert params["budget"].split(",") == ["100x", "1000x"] and study["seeds"] == 3
    datasets = params["dataset"].split(",")
    assert datasets == ["movielens_100k", "criteo_sample", "synthetic_high_ratio"]
    for dataset in datasets:
        cfg = compose_cfg(["experiment=high_ratio", f"dataset={dataset}", "compression=dpq", "budget=1000x"])
        assert cfg.dataset.name == dataset and cfg.budget == "1000x" and "subspaces" in cfg.compression
        assert cfg.trainer.epochs == 4 and cfg.mlflow.experiment_name == "high_ratio"
    synthetic = compose_cfg(["experiment=high_ratio", "dataset=synthetic_high_ratio"]).dataset
    assert sum(synthetic.cardinalities) >= 1_000_000  # 1000x leaves tens of KiB to spend
