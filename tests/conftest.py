"""Shared fixtures: a tiny processed dataset with a planted signal, written directly."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs one worker per core: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the processes tests start, too
    import torch

    torch.set_num_threads(1)

import numpy as np
import polars as pl
import pytest

from recsys.data.common import write_counts
from recsys.data.schema import DatasetSchema, ProcessedDataset, SparseField


@pytest.fixture(autouse=True)
def _global_seeds() -> None:
    """Every test starts from the same global RNG state, whichever tests its worker ran
    before it (``-n``'s scheduling varies): a test that draws from torch's, numpy's or
    Python's global generator sees the same numbers in every run."""
    random.seed(0)
    np.random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)


REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO / "data" / "criteo-sample" / "train.txt"


def write_tiny_dataset(root: Path, rows: int = 3000, seed: int = 0) -> ProcessedDataset:
    """Two single-valued fields, one multi-hot field, two dense features; labels from
    a logistic model over per-id effects, so a model can learn something."""
    rng = np.random.default_rng(seed)
    card = {"u": 50, "i": 80, "g": 12}
    effects = {k: rng.normal(0, 1.0, v) for k, v in card.items()}
    u = rng.integers(0, card["u"], rows)
    i = rng.integers(0, card["i"], rows)
    glen = rng.integers(0, 4, rows)
    g = [rng.integers(0, card["g"], n).tolist() for n in glen]
    dense = rng.normal(0, 1, (rows, 2)).astype(np.float32)
    logit = effects["u"][u] + effects["i"][i] + np.array([effects["g"][x].sum() for x in g]) + dense[:, 0]
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    df = pl.DataFrame(
        {"label": label, "d0": dense[:, 0], "d1": dense[:, 1], "u": u, "i": i, "g": g},
        schema={"label": pl.Float32, "d0": pl.Float32, "d1": pl.Float32, "u": pl.Int64, "i": pl.Int64, "g": pl.List(pl.Int64)},
    )
    root.mkdir(parents=True, exist_ok=True)
    n_train, n_val = int(rows * 0.8), int(rows * 0.1)
    parts = {"train": df[:n_train], "val": df[n_train : n_train + n_val], "test": df[n_train + n_val :]}
    for split, part in parts.items():
        part.write_parquet(root / f"{split}.parquet", row_group_size=500)
    train = parts["train"]
    counts = {
        "u": train.group_by(pl.col("u").alias("id")).len("count"),
        "i": train.group_by(pl.col("i").alias("id")).len("count"),
        "g": train.select(pl.col("g").explode().alias("id")).drop_nulls().group_by("id").len("count"),
    }
    write_counts(root / "counts.parquet", counts)
    schema = DatasetSchema(
        name="tiny",
        dense=["d0", "d1"],
        sparse=[SparseField("u", card["u"]), SparseField("i", card["i"]), SparseField("g", card["g"], multi_hot=True)],
        rows={k: v.height for k, v in parts.items()},
    )
    (root / "schema.json").write_text(schema.to_json())
    return ProcessedDataset.open(root)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> ProcessedDataset:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")
