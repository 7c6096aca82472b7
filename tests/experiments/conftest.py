"""Compose the real Hydra config and shrink it (tiny data, one epoch, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from experiments.config import register_configs

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "experiments" / "conf"


def smoke_overrides(tmp: Path, *extra: str) -> list[str]:
    return [
        "trainer=smoke",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=test",
        "mlflow.log_system_metrics=false",
        f"cache_dir={tmp}/cache",
        *extra,
    ]


@pytest.fixture
def compose_cfg():
    register_configs()

    def _compose(overrides: list[str]):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    """``python -m experiments.run ARGS`` as a user would type it."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **popen,
    )
