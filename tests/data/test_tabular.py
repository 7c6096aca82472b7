"""The tabular loader: ids, labels, transforms and splits, checked against plain Python."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import BatchLoader
from recsys.data.common import assign_splits
from recsys.data.schema import DataError, ProcessedDataset
from recsys.data.tabular import MultiHotColumn, NumericColumn, TabularConfig

TRAIN = """clicked,user,city,tags,price,age,note
1,7,paris,a|b,10,20,x
0,7,rome,b,,30,y
1,3,paris,,2.5,40,z
0,9,,c|a|a,0,50,w
1,3,paris,a,-4,60,v
"""
VAL = """clicked,user,city,tags,price,age,note
0,3,oslo,b|zz,1,35,q
1,5,rome,,3,45,r
"""
TEST = """clicked,user,city,tags,price,age,note
1,7,paris,a,7,25,s
"""
DECL = dict(
    label="clicked",
    categorical=["user", "city"],
    multi_hot=[MultiHotColumn("tags", "|")],
    numeric=[NumericColumn("price", "log1p"), NumericColumn("age", "standardise")],
)


def _write(tmp_path: Path, texts: dict[str, str], suffix: str = ".csv") -> dict[str, str]:
    paths = {}
    for split, text in texts.items():
        paths[f"{split}_path"] = str(tmp_path / f"{split}{suffix}")
        Path(paths[f"{split}_path"]).write_text(text)
    return paths


def _presplit(tmp_path: Path, **kw) -> ProcessedDataset:
    paths = _write(tmp_path, {"train": TRAIN, "val": VAL, "test": TEST})
    return TabularConfig(**paths, **{**DECL, **kw}).prepare(tmp_path / "cache")


def _split(ds: ProcessedDataset, split: str) -> pl.DataFrame:
    return pl.read_parquet(ds.split_path(split))


def test_presplit_csv_ids_labels_counts(tmp_path):
    ds = _presplit(tmp_path)
    train, val, test = (_split(ds, s) for s in ("train", "val", "test"))
    assert ds.schema.rows == {"train": 5, "val": 2, "test": 1}
    assert train.columns == ["label", "price", "age", "user", "city", "tags"]  # note is ignored
    assert train.schema == pl.Schema(
        {"label": pl.Float32, "price": pl.Float32, "age": pl.Float32, "user": pl.Int64, "city": pl.Int64, "tags": pl.List(pl.Int64)}
    )
    assert train["label"].to_list() == [1, 0, 1, 0, 1] and val["label"].to_list() == [0, 1]
    # user (text): "3" x2 and "7" x2 tie -> by value ("3" < "7"), then "9"
    assert train["user"].to_list() == [2, 2, 1, 3, 1]
    assert val["user"].to_list() == [1, 0] and test["user"].to_list() == [2]  # 5: unseen
    # city: paris x3, rome; empty -> 0, oslo unseen -> 0
    assert train["city"].to_list() == [1, 2, 1, 0, 1] and val["city"].to_list() == [0, 2]
    # tags: a x4 (incl. the repeat), b x2, c x1; empty pieces dropped, zz unseen -> 0
    assert train["tags"].to_list() == [[1, 2], [2], [], [3, 1, 1], [1]]
    assert val["tags"].to_list() == [[2, 0], []]
    sparse = {f.name: (f.cardinality, f.multi_hot) for f in ds.schema.sparse}
    assert sparse == {"user": (4, False), "city": (3, False), "tags": (4, True)}
    assert ds.counts("user").tolist() == [0, 2, 2, 1]
    assert ds.counts("city").tolist() == [1, 3, 1]  # id 0: the empty city
    assert ds.counts("tags").tolist() == [0, 4, 2, 1]


def test_presplit_numeric_transforms_use_train_statistics(tmp_path):
    ds = _presplit(tmp_path)
    train, val = _split(ds, "train"), _split(ds, "val")
    # log1p of max(x, 0); empty -> 0
    expected = [math.log1p(10), 0.0, math.log1p(2.5), 0.0, 0.0]
    assert train["price"].to_list() == pytest.approx(expected, rel=1e-6)
    ages = np.array([20, 30, 40, 50, 60], dtype=np.float64)
    mean, std = float(np.float32(ages.mean())), float(np.float32(ages.std()))
    assert ds.schema.params["numeric"]["age"] == {"transform": "standardise", "mean": mean, "std": std}
    assert val["age"].to_list() == pytest.approx([(35 - mean) / std, (45 - mean) / std], rel=1e-6)
    assert ds.schema.dense == ["price", "age"]


def test_min_count_global_and_per_column(tmp_path):
    ds = _presplit(tmp_path, min_count=2, min_counts={"city": 1})
    train = _split(ds, "train")
    assert train["user"].to_list() == [2, 2, 1, 0, 1]  # "9" seen once: rare -> 0
    assert train["city"].to_list() == [1, 2, 1, 0, 1]  # min_count 1 for city
    assert train["tags"].to_list() == [[1, 2], [2], [], [0, 1, 1], [1]]
    assert ds.counts("user").tolist() == [1, 2, 2]
    assert ds.counts("tags").tolist() == [1, 4, 2]  # id 0: the rare "c"


def test_label_threshold(tmp_path):
    text = "rating,item\n4,a\n3.5,b\n5,a\n1,c\n"
    paths = _write(tmp_path, {"train": text, "val": text, "test": text})
    ds = TabularConfig(**paths, label="rating", label_threshold=4, categorical=["item"]).prepare(tmp_path / "c")
    assert _split(ds, "val")["label"].to_list() == [1.0, 0.0, 1.0, 0.0]


def _frame(rows: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "y": rng.integers(0, 2, rows),
            "user": rng.integers(-5, 40, rows),
            "shop": [f"s{i}" for i in rng.integers(0, 30, rows)],
            "tags": [[f"t{j}" for j in rng.integers(0, 9, k)] for k in rng.integers(0, 4, rows)],
            "score": rng.normal(3, 2, rows),
        }
    )


def test_single_parquet_file_split_by_row_hash(tmp_path):
    df = _frame(600)
    df.write_parquet(tmp_path / "all.parquet", row_group_size=100)
    cfg = TabularConfig(path=str(tmp_path / "all.parquet"), label="y", categorical=["user", "shop"],
                        multi_hot=[MultiHotColumn("tags")], numeric=[NumericColumn("score")], seed=3)
    ds = cfg.prepare(tmp_path / "cache")
    codes = assign_splits(np.arange(600), 3, (0.8, 0.1, 0.1))
    train_df = df.filter(pl.Series(codes == 0))
    # vocabulary of user from the train rows, in plain Python: count desc, value asc
    freq: dict[int, int] = {}
    for u in train_df["user"]:
        freq[u] = freq.get(u, 0) + 1
    order = sorted(freq, key=lambda v: (-freq[v], v))
    ids = {v: i + 1 for i, v in enumerate(order)}
    for code, s in enumerate(("train", "val", "test")):
        part, out = df.filter(pl.Series(codes == code)), _split(ds, s)
        assert out["user"].to_list() == [ids.get(u, 0) for u in part["user"]]
        assert out["label"].to_list() == part["y"].cast(pl.Float32).to_list()
        assert out["score"].to_list() == part["score"].cast(pl.Float32).to_list()  # transform none
        assert out["tags"].list.len().to_list() == part["tags"].list.len().to_list()
    assert ds.schema.sparse[0].cardinality == len(ids) + 1
    assert ds.counts("user")[1:].tolist() == [freq[v] for v in order]


def test_csv_and_parquet_of_one_table_give_the_same_dataset(tmp_path):
    df = _frame(300, seed=1).with_columns(pl.col("user").cast(pl.String))
    df.write_parquet(tmp_path / "t.parquet")
    df.with_columns(pl.col("tags").list.join(";")).write_csv(tmp_path / "t.csv")
    decl = dict(label="y", categorical=["user", "shop"], multi_hot=[MultiHotColumn("tags", ";")],
                numeric=[NumericColumn("score", "standardise")])
    a = TabularConfig(path=str(tmp_path / "t.parquet"), **decl).prepare(tmp_path / "cache")
    b = TabularConfig(path=str(tmp_path / "t.csv"), **decl).prepare(tmp_path / "cache")
    assert a.root != b.root
    for name in ("train.parquet", "val.parquet", "test.parquet", "counts.parquet"):
        assert pl.read_parquet(a.root / name).equals(pl.read_parquet(b.root / name)), name


def test_headerless_tsv_with_column_names(tmp_path):
    rows = ["1\tx\t3", "0\ty\t1", "1\tx\t0"]
    paths = _write(tmp_path, {s: "\n".join(rows) + "\n" for s in ("train", "val", "test")}, ".tsv")
    ds = TabularConfig(**paths, column_names=["click", "cat", "n"], label="click", categorical=["cat"],
                       numeric=[NumericColumn("n", "log1p")]).prepare(tmp_path / "c")
    train = _split(ds, "train")
    assert train["cat"].to_list() == [1, 2, 1] and ds.schema.rows["train"] == 3
    assert train["n"].to_list() == pytest.approx([math.log1p(3), math.log1p(1), 0.0])


def test_cache_reused_and_keyed_by_declaration(tmp_path):
    paths = _write(tmp_path, {"train": TRAIN, "val": VAL, "test": TEST})

    def prepare(**kw) -> ProcessedDataset:
        return TabularConfig(**paths, **{**DECL, **kw}).prepare(tmp_path / "cache")

    first = prepare()
    stamp = (first.root / "schema.json").stat().st_mtime_ns
    again = prepare()
    assert again.root == first.root and (again.root / "schema.json").stat().st_mtime_ns == stamp
    assert prepare(min_count=2).root != first.root
    assert prepare(numeric=[NumericColumn("price")]).root != first.root
    Path(paths["val_path"]).write_text(VAL + "1,3,oslo,b,1,35,q\n")  # a changed file: a new key
    assert prepare().root != first.root


def test_batches_from_tabular_output(tmp_path):
    ds = _presplit(tmp_path)
    batch = next(iter(BatchLoader(ds, "train", batch_size=5).epoch(0)))
    assert batch.dense_features.shape == (5, 2)
    kjt = batch.sparse_features
    assert kjt.keys() == ["user", "city", "tags"]
    assert kjt["tags"].lengths().tolist() == [2, 1, 0, 3, 1]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_matches_the_pandas_reference(tmp_path, fmt):
    from recsys.data.tabular_pandas import preprocess_tabular_pandas

    df = _frame(2000, seed=2).with_columns(pl.col("score").abs().alias("amount"))
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        df.write_parquet(path)
    else:
        df.with_columns(pl.col("tags").list.join("|")).write_csv(path)
    cfg = TabularConfig(path=str(path), label="y", categorical=["user", "shop"],
                        multi_hot=[MultiHotColumn("tags", "|")], min_count=2,
                        numeric=[NumericColumn("score", "standardise"), NumericColumn("amount", "log1p")])
    ds = cfg.prepare(tmp_path / "cache")
    rows = preprocess_tabular_pandas(cfg, tmp_path / "ref")
    assert rows == ds.schema.rows
    for name in ("train", "val", "test", "counts"):
        assert pl.read_parquet(ds.root / f"{name}.parquet").equals(pl.read_parquet(tmp_path / "ref" / f"{name}.parquet")), name


def test_csv_reader_is_independent_of_polars(tmp_path):
    """The ids of a generated CSV file, recomputed with Python's csv module."""
    df = _frame(500, seed=4).with_columns(pl.col("tags").list.join("|"))
    df.write_csv(tmp_path / "t.csv")
    ds = TabularConfig(path=str(tmp_path / "t.csv"), label="y", categorical=["shop"], split=[0.6, 0.2, 0.2]).prepare(tmp_path / "c")
    with (tmp_path / "t.csv").open(newline="") as fh:
        shops = [r["shop"] for r in csv.DictReader(fh)]
    codes = assign_splits(np.arange(len(shops)), 0, (0.6, 0.2, 0.2))
    freq: dict[str, int] = {}
    for s, c in zip(shops, codes):
        if c == 0:
            freq[s] = freq.get(s, 0) + 1
    ids = {v: i + 1 for i, v in enumerate(sorted(freq, key=lambda v: (-freq[v], v)))}
    assert _split(ds, "test")["shop"].to_list() == [ids.get(s, 0) for s, c in zip(shops, codes) if c == 2]


def test_one_file_split_by_order_keeps_its_row_order(tmp_path):
    """``split_by: order`` on one file: its first rows train, the next validate, the last
    test, in the file's order (CSV here; the vocabulary from the first rows only). Three
    files are already split: refused in one line naming the dataset."""
    df = _frame(500, seed=2)
    df.drop("tags").write_csv(tmp_path / "all.csv")
    cfg = TabularConfig(path=str(tmp_path / "all.csv"), label="y", categorical=["user", "shop"], split_by="order")
    ds = cfg.prepare(tmp_path / "cache")
    assert ds.schema.rows == {"train": 400, "val": 50, "test": 50}
    assert ds.schema.params["split_by"] == "order"
    first = df[:400]
    freq = first.group_by("shop").len()
    ids = {v: i + 1 for i, v in enumerate(freq.sort(["len", "shop"], descending=[True, False])["shop"])}
    for s, part in {"train": df[:400], "val": df[400:450], "test": df[450:]}.items():
        out = _split(ds, s)
        assert out["label"].to_list() == part["y"].cast(pl.Float32).to_list()
        assert out["shop"].to_list() == [ids.get(v, 0) for v in part["shop"]]
    hashed = TabularConfig(path=str(tmp_path / "all.csv"), label="y", categorical=["user", "shop"]).prepare(tmp_path / "cache")
    assert hashed.root != ds.root and "split_by" not in hashed.schema.params
    paths = {k: str(tmp_path / "all.csv") for k in ("train_path", "val_path", "test_path")}
    with pytest.raises(DataError, match=r"^dataset 'tabular': split_by: order splits one file in its row order \(path\); three files"):
        TabularConfig(**paths, label="y", categorical=["shop"], split_by="order").prepare(tmp_path / "cache")


def test_raw_ids_hash_each_values_text(tmp_path):
    """``ids: raw`` on a user's table: every categorical and multi-hot value becomes
    ``raw_text_id`` of its text, in every split (a value seen only in the test file keeps an
    id of its own, not 0); empty is 0; the vocabulary still sizes the full table. A CSV and a
    Parquet file of one table give the same ids (an integer hashes as its digits)."""
    from recsys.data.ids import raw_text_id

    df = _frame(300, seed=4)
    text = df.with_columns(pl.col("tags").list.join("|"))
    parts = {"train": text[:200], "val": text[200:250], "test": text[250:].with_columns(pl.lit("brand-new").alias("shop"))}
    paths = {}
    for s, part in parts.items():
        part.write_csv(tmp_path / f"{s}.csv")
        paths[f"{s}_path"] = str(tmp_path / f"{s}.csv")
    declared = dict(label="y", categorical=["user", "shop"], multi_hot=[MultiHotColumn("tags", "|")])
    raw = TabularConfig(**paths, **declared, ids="raw").prepare(tmp_path / "c")
    vocab = TabularConfig(**paths, **declared).prepare(tmp_path / "c")
    assert raw.schema.raw_ids and raw.schema.vocabulary_bytes() == 0 and raw.root != vocab.root
    assert raw.schema.sparse == vocab.schema.sparse  # the full table: the train vocabulary's size
    for s, part in parts.items():
        out = _split(raw, s)
        assert out["user"].to_list() == [raw_text_id(str(u)) for u in part["user"]]
        assert out["shop"].to_list() == [raw_text_id(v) for v in part["shop"]]
        want_tags = [[raw_text_id(t) for t in row.split("|") if t] if row else [] for row in part["tags"]]
        assert out["tags"].to_list() == want_tags
    assert set(_split(raw, "test")["shop"]) == {raw_text_id("brand-new")}
    assert set(_split(vocab, "test")["shop"]) == {0}  # unseen in train: id 0 with a vocabulary
    df.slice(0, 200).write_parquet(tmp_path / "train.parquet")
    for s in ("val", "test"):
        parts[s].with_columns(pl.col("tags").str.split("|")).write_parquet(tmp_path / f"{s}.parquet")
    as_parquet = TabularConfig(**{f"{s}_path": str(tmp_path / f"{s}.parquet") for s in parts},
                               label="y", categorical=["user", "shop"], multi_hot=[MultiHotColumn("tags")], ids="raw")  # fmt: skip
    pq = as_parquet.prepare(tmp_path / "c2")
    for s in parts:
        assert _split(pq, s)["user"].to_list() == _split(raw, s)["user"].to_list()
