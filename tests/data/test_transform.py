"""Derived datasets for a peer library: multi-hot sets as one id, counts as BARS buckets, CSV."""

from __future__ import annotations

import math

import polars as pl
import pytest

from recsys.data.schema import DataError
from recsys.data.transform import (
    ProcessedConfig,
    bars_bucket,
    dense_as_categorical,
    joint_multi_hot,
    write_csv,
)


def test_a_multi_hot_set_becomes_one_id_with_the_same_rows(tiny_dataset, tmp_path):
    flat = joint_multi_hot(tiny_dataset, tmp_path / "cache")
    assert flat.schema.rows == tiny_dataset.schema.rows
    assert not any(f.multi_hot for f in flat.schema.sparse)
    for split in ("train", "test"):
        a = pl.read_parquet(tiny_dataset.split_path(split))
        b = pl.read_parquet(flat.split_path(split))
        assert a["u"].to_list() == b["u"].to_list() and a["label"].to_list() == b["label"].to_list()
        # two rows get one id exactly when their sets are equal (order and repeats aside)
        sets = [frozenset(x) for x in a["g"].to_list()]
        ids = b["g"].to_list()
        if split == "train":
            by_set = {}
            for s, i in zip(sets, ids):
                assert by_set.setdefault(s, i) == i
            assert len(set(by_set.values())) == len(by_set)
            assert all((i == 0) == (not s) for s, i in zip(sets, ids))  # empty set: id 0
    card = {f.name: f.cardinality for f in flat.schema.sparse}["g"]
    assert card == pl.read_parquet(flat.split_path("train"))["g"].max() + 1
    counts = flat.counts("g")
    assert counts.sum() == flat.schema.rows["train"]
    assert joint_multi_hot(flat, tmp_path / "cache") is flat  # nothing multi-hot: itself


def test_bars_buckets_criteo_counts():
    x = pl.DataFrame({"x": [0, 1, 2, 3, 10, 100, 5000]})
    got = x.select(bars_bucket(pl.col("x")))["x"].to_list()
    assert got == [0, 1, 2, math.floor(math.log(3) ** 2), math.floor(math.log(10) ** 2), 21, 72]


def test_criteo_counts_become_categorical_fields(criteo_sample, tmp_path):
    b = dense_as_categorical(criteo_sample, tmp_path / "cache")
    assert b.schema.dense == [] and b.schema.rows == criteo_sample.schema.rows
    names = b.schema.sparse_names
    assert names[:13] == [f"I{i}" for i in range(1, 14)] and names[13:] == criteo_sample.schema.sparse_names
    raw = pl.read_parquet(criteo_sample.split_path("train"))
    out = pl.read_parquet(b.split_path("train"))
    # one id per bucket of the count behind log1p
    buckets = raw.select(bars_bucket(pl.col("I5").cast(pl.Float64).exp().sub(1).round(0)))["I5"].to_list()
    pairs = set(zip(buckets, out["I5"].to_list()))
    assert len({p[0] for p in pairs}) == len(pairs) == len({p[1] for p in pairs})
    assert out["C3"].to_list() == raw["C3"].to_list()


def test_only_log1p_counts_are_bucketed(tiny_dataset, tmp_path):
    with pytest.raises(DataError, match="BARS's buckets are for counts"):
        dense_as_categorical(tiny_dataset, tmp_path / "cache")


def test_csv_splits_hold_the_processed_ids(tiny_dataset, tmp_path):
    with pytest.raises(DataError, match="multi-hot field"):
        write_csv(tiny_dataset, tmp_path / "csv")
    flat = joint_multi_hot(tiny_dataset, tmp_path / "cache")
    paths = write_csv(flat, tmp_path / "csv")
    assert {p.name for p in paths.values()} == {"train.csv", "valid.csv", "test.csv"}
    back = pl.read_csv(paths["val"])
    assert back.columns == ["label", "d0", "d1", "u", "i", "g"]
    src = pl.read_parquet(flat.split_path("val"))
    assert back["label"].to_list() == [int(v) for v in src["label"].to_list()]
    assert back["i"].to_list() == src["i"].to_list()


def test_a_processed_dataset_is_opened_from_its_directory(tiny_dataset, tmp_path):
    ds = ProcessedConfig(root=str(tiny_dataset.root)).prepare(tmp_path)
    assert ds.schema == tiny_dataset.schema
    with pytest.raises(DataError, match="not a directory"):
        ProcessedConfig(root=str(tmp_path / "nope")).prepare(tmp_path)
