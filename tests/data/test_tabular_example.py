"""The shipped example CSV and the Frappe-shaped generator: reproducible, read as declared."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.tabular import TabularConfig
from recsys.data.tabular_synth import FRAPPE_FIELDS, FRAPPE_FILES, frappe_tables, write_example_csv
from tests.conftest import REPO

EXAMPLE = REPO / "data" / "tabular-example" / "clicks.csv"


def test_shipped_example_is_what_the_generator_writes(tmp_path):
    assert write_example_csv(tmp_path / "clicks.csv").read_bytes() == EXAMPLE.read_bytes()
    assert EXAMPLE.stat().st_size < 1 << 20


def test_frappe_shaped_splits_read_with_the_published_vocabularies(tmp_path):
    paths = {}
    for split, table in frappe_tables(seed=1, rows={"train": 6000, "val": 700, "test": 500}).items():
        path = tmp_path / FRAPPE_FILES[split]
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        df.write_csv(path)
        paths[f"{split}_path"] = str(path)
    header = Path(paths["train_path"]).read_text().splitlines()[0]
    assert header == "label," + ",".join(FRAPPE_FIELDS)
    ds = TabularConfig(**paths, categorical=list(FRAPPE_FIELDS)).prepare(tmp_path / "cache")
    assert ds.schema.rows == {"train": 6000, "val": 700, "test": 500}
    assert {f.name: f.cardinality - 1 for f in ds.schema.sparse} == FRAPPE_FIELDS
    labels = pl.read_parquet(ds.split_path("train"))["label"]
    assert 0.1 < labels.mean() < 0.6  # type: ignore[operator]


def test_sparse_signal_splits_hold_their_signal_in_user_and_item_only():
    """The data a row-pruning method must not fail on: a click is a user-item affinity,
    user and item are heavy-tailed, and the other fields say nothing of the label."""
    from recsys.data.tabular_synth import sparse_signal_tables

    train = pl.from_arrow(sparse_signal_tables(seed=1)["train"])
    assert isinstance(train, pl.DataFrame)
    assert train.columns == ["label", *FRAPPE_FIELDS] and train.height == 202_027
    assert {c: train[c].n_unique() for c in FRAPPE_FIELDS} == FRAPPE_FIELDS
    counts = train["user"].value_counts()["count"].sort(descending=True)
    assert counts[0] > 100 * counts[len(counts) // 2]  # a head user has 100x a median one's rows

    def spread(col: str) -> float:  # how far the click rate moves across a field's values
        rates = train.group_by(col).agg(pl.col("label").mean().alias("r"), pl.len().alias("n")).filter(pl.col("n") >= 2000)
        return float(rates["r"].max() - rates["r"].min())  # type: ignore[operator]

    assert spread("user") > 0.2 and spread("item") > 0.2
    assert all(spread(c) < 0.05 for c in ("daytime", "weekday", "isweekend", "homework", "cost", "weather"))
