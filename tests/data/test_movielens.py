"""MovieLens-100K: the real RecBole files (fetched with pip once per session), the GroupLens
parser on small files in that format, checksums and the offline message."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import movielens
from recsys.data.movielens import GENRES, MovieLensConfig, read_grouplens, read_recbole
from recsys.data.schema import SPLITS, DataError
from tests.data.conftest import leftovers


@pytest.fixture(scope="session")
def movielens_ds(movielens_raw, tmp_path_factory):
    return MovieLensConfig(raw_dir=str(movielens_raw)).prepare(tmp_path_factory.mktemp("ml-cache"))


def _all(ds) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(ds.split_path(s)) for s in SPLITS])


def test_real_data(movielens_ds):
    schema = movielens_ds.schema
    assert sum(schema.rows.values()) == 100_000
    assert 0.77 < schema.rows["train"] / 100_000 < 0.83
    df = _all(movielens_ds)
    assert int(df["label"].sum()) == 34_174 + 21_201  # ratings 4 and 5
    assert schema.sparse_names == movielens.FIELDS and schema.dense == []
    sparse = {f.name: f for f in schema.sparse}
    assert sparse["genre"].multi_hot and not any(f.multi_hot for n, f in sparse.items() if n != "genre")
    assert sparse["user_id"].cardinality == 944 and sparse["gender"].cardinality == 3
    assert sparse["genre"].cardinality <= len(GENRES) + 1
    assert df["genre"].dtype == pl.List(pl.Int64) and df["genre"].list.len().max() > 1
    assert df["genre"].list.len().min() >= 1
    assert (movielens_ds.counts("genre")[1:] > 0).all()
    assert schema.source["sha256"] == movielens.RECBOLE_FILES


def test_missing_release_year_is_empty(movielens_raw):
    """RecBole has 'unkonwn' for item 267 and 'V' for item 1412: not years, so null (id 0)."""
    items = read_recbole(movielens.fetch_recbole(movielens_raw))[2]
    assert items.filter(pl.col("release_year").is_null())["item_id"].to_list() == ["267", "1412"]


def test_tampered_file_is_refused(movielens_raw, tmp_path):
    good = movielens.fetch_recbole(movielens_raw)
    raw = tmp_path / "raw"
    shutil.copytree(good["ml-100k.inter"].parent, raw / "ml-100k-recbole")
    item = raw / "ml-100k-recbole" / "ml-100k.item"
    item.write_bytes(item.read_bytes().replace(b"Toy Story", b"Toy Storm", 1))
    expected = movielens.RECBOLE_FILES["ml-100k.item"]
    with pytest.raises(DataError, match=rf"ml-100k\.item: sha256 mismatch: expected {expected}, found [0-9a-f]{{64}}"):
        MovieLensConfig(raw_dir=str(raw)).prepare(tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []


def test_tampered_wheel_is_refused(movielens_raw, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / movielens.RECBOLE_WHEEL).write_bytes(b"not a wheel")
    monkeypatch.setattr(movielens, "_pip_download", lambda dest: pytest.fail("downloaded despite a wheel"))
    with pytest.raises(DataError, match=rf"{movielens.RECBOLE_WHEEL}: sha256 mismatch: expected {movielens.RECBOLE_WHEEL_SHA256}"):
        movielens.fetch_recbole(raw)
    assert sorted(p.name for p in raw.iterdir()) == [movielens.RECBOLE_WHEEL]


def test_offline_message(tmp_path, monkeypatch):
    def no_network(dest):
        raise subprocess.CalledProcessError(1, "pip", stderr="ERROR: Could not find a version that satisfies\n")

    monkeypatch.setattr(movielens, "_pip_download", no_network)
    with pytest.raises(DataError, match=r"run `python -m pip download --no-deps recbole==1\.2\.1 -d .*raw` where there is network"):
        MovieLensConfig(raw_dir=str(tmp_path / "raw")).prepare(tmp_path / "cache")
    assert leftovers(tmp_path / "raw") == [] and leftovers(tmp_path / "cache") == []


# --- the GroupLens format ----------------------------------------------------------------


def _write_grouplens(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("1\t10\t5\t881250949\n2\t10\t3\t891717742\n1\t11\t4\t878887116\n2\t12\t1\t880000000\n")
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = {10: ["Animation", "Children's", "Comedy"], 11: ["Drama"], 12: []}
    dates = {10: "01-Jan-1995", 11: "22-Dec-1994", 12: ""}
    lines = []
    for item, genres in flags.items():
        bits = "|".join("1" if g in genres else "0" for g in GENRES)
        lines.append(f"{item}|Caf\xe9 {item} (1995)|{dates[item]}||http://x|{bits}\n")
    (root / "u.item").write_bytes("".join(lines).encode("latin-1"))


def test_grouplens_parser(tmp_path):
    _write_grouplens(tmp_path / "ml-100k")
    ratings, users, items = read_grouplens({n: tmp_path / "ml-100k" / n for n in movielens.GROUPLENS_FILES})
    assert ratings["rating"].to_list() == [5.0, 3.0, 4.0, 1.0] and ratings["user_id"].to_list() == ["1", "2", "1", "2"]
    assert users.row(1) == ("2", "53", "F", "other", "94043")
    assert items["release_year"].to_list() == ["1995", "1994", None]
    assert items["genre"].to_list() == [["Animation", "Children's", "Comedy"], ["Drama"], []]


def test_grouplens_source_end_to_end(tmp_path):
    _write_grouplens(tmp_path / "raw" / "ml-100k")
    ds = MovieLensConfig(source="grouplens", raw_dir=str(tmp_path / "raw"), split=[1.0, 0.0, 0.0]).prepare(tmp_path / "c")
    df = pl.read_parquet(ds.split_path("train"))
    assert df["label"].to_list() == [1.0, 0.0, 1.0, 0.0]
    assert df["item_id"].to_list() == [1, 1, 2, 3] and df["release_year"].to_list() == [1, 1, 2, 0]
    assert df["genre"].to_list() == [[1, 2, 3], [1, 2, 3], [4], []]  # ties by name


def test_grouplens_zip_is_extracted(tmp_path):
    _write_grouplens(tmp_path / "src" / "ml-100k")
    raw = tmp_path / "raw"
    raw.mkdir()
    with zipfile.ZipFile(raw / "ml-100k.zip", "w") as zf:
        for name in movielens.GROUPLENS_FILES:
            zf.write(tmp_path / "src" / "ml-100k" / name, f"ml-100k/{name}")
    files = movielens.fetch_grouplens(raw)
    assert all(p.read_bytes() == (tmp_path / "src" / "ml-100k" / n).read_bytes() for n, p in files.items())
    assert sorted(p.name for p in raw.iterdir()) == ["ml-100k", "ml-100k.zip"]


def test_grouplens_offline_message(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(movielens.urllib.request, "urlopen", refuse)
    with pytest.raises(DataError, match=r"could not be fetched .*put ml-100k\.zip into"):
        MovieLensConfig(source="grouplens", raw_dir=str(tmp_path / "raw")).prepare(tmp_path / "c")
    assert leftovers(tmp_path / "raw") == []


def test_a_split_in_time_trains_on_the_past_and_tests_on_the_future(movielens_raw, movielens_ds, tmp_path):
    """``split_by: order`` splits MovieLens-100K by its ratings' timestamps: 80/10/10 of the
    rows in time, every training rating before every validation one and those before every
    test one; the vocabularies still come from the training part, so the later parts hold
    ids it never saw (id 0), far more of them than the hashed split's."""
    ds = MovieLensConfig(raw_dir=str(movielens_raw), split_by="order").prepare(tmp_path / "c")
    assert ds.schema.rows == {"train": 80_000, "val": 10_000, "test": 10_000}
    assert ds.schema.params["split_by"] == "order" and "split_by" not in movielens_ds.schema.params
    inter = pl.read_csv(movielens_raw / "ml-100k-recbole" / "ml-100k.inter", separator="\t")
    order = inter["timestamp:float"].rank(method="ordinal").to_numpy() - 1  # ties in the file's order
    for s, (lo, hi) in zip(SPLITS, ((0, 80_000), (80_000, 90_000), (90_000, 100_000))):
        part = inter.filter(pl.Series((order >= lo) & (order < hi)))  # each part its span of time
        got = pl.read_parquet(ds.split_path(s))
        assert got["label"].to_list() == (part["rating:float"] >= 4).cast(pl.Float32).to_list(), s
    stamps = {s: inter.filter(pl.Series((order >= lo) & (order < hi)))["timestamp:float"]
              for s, (lo, hi) in zip(SPLITS, ((0, 80_000), (80_000, 90_000), (90_000, 100_000)))}  # fmt: skip
    assert stamps["train"].max() <= stamps["val"].min() and stamps["val"].max() <= stamps["test"].min()
    test = pl.read_parquet(ds.split_path("test"))
    hashed = pl.read_parquet(movielens_ds.split_path("test"))
    unseen = float((test["user_id"] == 0).mean())
    assert unseen > 0.2 > 10 * float((hashed["user_id"] == 0).mean())  # users who joined later


def test_the_order_split_is_refused_where_a_loader_knows_no_order():
    from compression.config_checks import ConfigError
    from recsys.data.libfm import LibFMConfig

    with pytest.raises(ConfigError, match=r"^dataset.split_by: order needs data with an order, and the LibFMConfig"):
        LibFMConfig(split_by="order")
    with pytest.raises(ConfigError, match=r"^dataset.split_by: must be one of hash, order, got 'time'$"):
        from compression.config_checks import check_fields

        check_fields(MovieLensConfig(split_by="time"), "dataset")


def test_raw_ids_give_users_who_joined_later_their_own_ids(movielens_raw, tmp_path):
    """``ids: raw`` on MovieLens split in time: every user, item and genre is ``raw_text_id``
    of its value, so the test split's new users keep ids of their own instead of sharing 0;
    the counts stay the train vocabulary's (indexed by vocabulary id), the full table its size."""
    from recsys.data.ids import raw_text_id

    vocab = MovieLensConfig(raw_dir=str(movielens_raw), split_by="order").prepare(tmp_path / "c")
    raw = MovieLensConfig(raw_dir=str(movielens_raw), split_by="order", ids="raw").prepare(tmp_path / "c")
    assert raw.schema.raw_ids and raw.schema.sparse == vocab.schema.sparse and raw.root != vocab.root
    inter = pl.read_csv(movielens_raw / "ml-100k-recbole" / "ml-100k.inter", separator="\t")
    order = inter["timestamp:float"].rank(method="ordinal").to_numpy() - 1
    part = inter.filter(pl.Series(order >= 90_000))
    test_raw, test_vocab = pl.read_parquet(raw.split_path("test")), pl.read_parquet(vocab.split_path("test"))
    assert test_raw["user_id"].to_list() == [raw_text_id(str(u)) for u in part["user_id:token"]]
    new_users = test_vocab["user_id"] == 0
    assert new_users.mean() > 0.2 and test_raw["user_id"].filter(new_users).n_unique() > 50
    for f in ("user_id", "genre"):
        np.testing.assert_array_equal(raw.counts(f), vocab.counts(f))
