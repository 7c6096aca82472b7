"""The high-ratio study (make experiment-high_ratio) composes and lists every registered method."""

import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

import compression
from tests.experiments.conftest import REPO

CONF = REPO / "experiments" / "conf"


def sweep_choices(compose_cfg, override: str) -> list[str]:
    """What Hydra's sweeper expands a sweep override to (a glob over the group included)."""
    compose_cfg([])  # the config search path, the ConfigStore entries
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        return list(parser.parse_overrides([override])[0].sweep_string_iterator())


def test_the_study_lists_every_registered_method_on_three_datasets(compose_cfg):
    study = yaml.safe_load((CONF / "experiment" / "high_ratio.yaml").read_text())
    params = study["hydra"]["sweeper"]["params"]
    choices = sweep_choices(compose_cfg, f"compression={params['compression']}")
    assert "optembed_fast" in choices and not {"optembed", "qr_int4", "ptq_int8", "schema_qr"} & set(choices)

    def method(choice: str) -> str:  # by its schema, or the config it extends (optembed_fast: optembed)
        path = CONF / "compression" / f"{choice}.yaml"
        if not path.exists():  # no YAML: the method's dataclass, in the ConfigStore under its name
            return choice
        first = yaml.safe_load(path.read_text()).get("defaults", ["none"])[0]
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


def test_a_method_without_a_yaml_composes_from_its_dataclass(compose_cfg):
    """Adding a method needs no YAML: compression=<name> is its config's defaults (signed_hashing has none)."""
    assert not (CONF / "compression" / "signed_hashing.yaml").exists()
    cfg = compose_cfg(["compression=signed_hashing", "budget=5x"])
    assert cfg.compression.rows is None and cfg.compression.budget.ratio == 10 and cfg.budget == "5x"
