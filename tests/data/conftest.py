"""Fixtures of the data tests: the real Criteo sample, processed once, and MovieLens raw files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from recsys.data.criteo import CriteoConfig
from recsys.data.schema import ProcessedDataset
from tests.conftest import CRITEO_SAMPLE, REPO


def read_sample_rows(path: Path = CRITEO_SAMPLE) -> list[list[str]]:
    """The sample's rows as lists of 40 strings, read with plain Python (independent of polars)."""
    with path.open(newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def leftovers(cache_root: Path) -> list[str]:
    """Whatever a failed build left in a cache root (should be nothing)."""
    return sorted(p.name for p in cache_root.iterdir()) if cache_root.exists() else []


@pytest.fixture(scope="session")
def sample_rows() -> list[list[str]]:
    return read_sample_rows()


@pytest.fixture(scope="session")
def criteo_sample(tmp_path_factory) -> ProcessedDataset:
    """The Criteo sample processed with the defaults (seed 0, 80/10/10, min_count 1)."""
    return CriteoConfig(path=str(CRITEO_SAMPLE)).prepare(tmp_path_factory.mktemp("criteo-cache"))


@pytest.fixture(scope="session")
def movielens_raw(tmp_path_factory) -> Path:
    """A raw dir for MovieLens: the repository's data/raw if it already holds the RecBole
    files or wheel, else a session temp dir (the first prepare then runs pip download)."""
    repo_raw = REPO / "data" / "raw"
    if (repo_raw / "ml-100k-recbole").is_dir() or any(repo_raw.glob("recbole-*.whl")):
        return repo_raw
    return tmp_path_factory.mktemp("raw")
