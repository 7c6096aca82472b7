"""The light layers stay light: the data pipeline and the config checks load no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["recsys.data", "recsys.data.criteo", "recsys.data.movielens", "recsys.data.tabular", "recsys.data.tabular_synth",
     "recsys.data.synthetic", "compression.errors", "compression.config_checks"],
)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"


def test_every_user_error_is_one_family():
    from compression import (
        BudgetError,
        ConfigError,
        EmbcompError,
        IdOutOfRangeError,
        MethodConfigError,
    )
    from compression.api import UnknownMethodError
    from compression.preflight import MemoryPreflightError
    from experiments.advise import AdviseError
    from experiments.job import CheckpointMismatch
    from experiments.seeds import SeedsError
    from experiments.tracking import TrackingError
    from recsys.data import DataError
    from recsys.training.distributed import DistributedError

    for cls in (BudgetError, ConfigError, IdOutOfRangeError, MethodConfigError, UnknownMethodError, MemoryPreflightError,
                AdviseError, CheckpointMismatch, SeedsError, TrackingError, DataError, DistributedError):  # fmt: skip
        assert issubclass(cls, EmbcompError), cls


def test_the_package_exports_what_it_lists():
    import compression

    for name in compression.__all__:
        assert getattr(compression, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        compression.nope  # noqa: B018
