"""Structured configs: every YAML file in ``conf/`` is checked against a dataclass.

Each choice of a group names its schema in its defaults list (``- schema_criteo``),
so a wrong type or an unknown key fails when Hydra composes the config, before any
data is read. Compression schemas come straight from the method registry: a new
method's config dataclass is its schema with no extra registration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import compression
from compression.budget import Budget
from recsys.data.criteo import CriteoConfig
from recsys.data.libfm import LibFMConfig
from recsys.data.movielens import MovieLensConfig
from recsys.data.synthetic import SyntheticConfig
from recsys.data.tabular import TabularConfig
from recsys.data.transform import ProcessedConfig
from recsys.models import DCNv2Config, DeepFMConfig, DLRMConfig
from recsys.training import TrainerConfig
from recsys.training.distributed import DistributedConfig

DATASET_SCHEMAS = {
    "criteo": CriteoConfig,
    "libfm": LibFMConfig,
    "movielens": MovieLensConfig,
    "synthetic": SyntheticConfig,
    "tabular": TabularConfig,
    "processed": ProcessedConfig,
}
MODEL_SCHEMAS = {"dlrm": DLRMConfig, "dcnv2": DCNv2Config, "deepfm": DeepFMConfig}


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_root() -> str:
    """The repository root (``${project_root:}`` in configs), so relative data and
    store paths mean the same thing whatever directory a job is started from."""
    return str(PROJECT_ROOT)


@dataclass
class MLflowConfig:
    """Where and how runs are recorded. The default store is SQLite at the repo root."""

    tracking_uri: str = "sqlite:///${project_root:}/mlflow.db"
    experiment_name: str = "embcomp"
    run_name: Optional[str] = None
    log_system_metrics: bool = True
    # seconds to wait for a tracking server before refusing to start
    connect_timeout_s: float = 5.0
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    """One job: a dataset, a model, a compression method, a trainer, and tracking."""

    dataset: Any = MISSING
    model: Any = MISSING
    compression: Any = MISSING
    trainer: TrainerConfig = MISSING
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    seed: int = 0
    # run the job once per seed: a count (seed, seed+1, ...) or a list; each seed its own
    # MLflow run under one group run with the mean, std and 95% interval (experiments.seeds)
    seeds: Optional[Any] = None
    # a budget for the method, overriding compression.budget: "10x" (ratio) or bytes
    # ("2MiB", "500000"); ignored by methods without one (none), so sweeps can cross it
    budget: Optional[str] = None
    budget_scope: str = "model"
    # what the job returns to a sweeper (Optuna): one metric, or several for a
    # multi-objective study (e.g. [final_val_auc, embedding_bytes]); a validation figure,
    # so that a sweep never selects on the test split
    objective: list[str] = field(default_factory=lambda: ["final_val_auc"])
    # a sweep job that is skipped (duplicate, budget out of reach): "nan" returns NaN
    # (basic sweeps go on), "fail" raises so a sweeper like Optuna marks the trial failed
    on_skip: str = "nan"
    # processed datasets are cached here (relative paths are to the working directory)
    cache_dir: str = "${project_root:}/data/cache"
    # where sweep reports are written (reports/<experiment>/)
    report_dir: str = "${project_root:}/reports"
    # None: <hydra output dir>/checkpoints; point it at an old run's directory to resume
    checkpoint_dir: Optional[str] = None
    # evaluate the final model on the test split (false: a search trial, which selects on
    # validation and must not read the test split)
    evaluate_test: bool = True
    # after training: the model as a torch.export program (model.pt2), reloaded and checked
    # against the in-memory model on a test batch, logged to the run with its size on disk
    export: bool = False
    # third-party INFO lines (MLflow's) on the console; Hydra's: hydra/hydra_logging=default
    verbose: bool = False
    # sharded training (torchrun; or mode=on in one process): recsys.training.distributed
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", project_root)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    for name, cls in DATASET_SCHEMAS.items():
        cs.store(group="dataset", name=f"schema_{name}", node=cls)
    for name, cls in MODEL_SCHEMAS.items():
        cs.store(group="model", name=f"schema_{name}", node=cls)
    variants = Path(__file__).parent / "conf" / "compression"
    for name, cls in compression.registered_methods().items():
        cs.store(group="compression", name=f"schema_{name}", node=cls)
        if not (variants / f"{name}.yaml").exists():  # compression=<name>: the dataclass's defaults
            cs.store(group="compression", name=name, node=cls)


__all__ = ["Budget", "Config", "MLflowConfig", "register_configs"]
