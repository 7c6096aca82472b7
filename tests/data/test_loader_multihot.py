"""BatchLoader on multi-hot data: every KJT key's lengths and values are the Parquet rows'."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.data.libfm import LibFMConfig, LibFMField
from recsys.data.loader import BatchLoader


@pytest.fixture(scope="module")
def multi_hot(tmp_path_factory):
    """A libFM dataset with two multi-hot fields (one often empty) and one single field."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(2_000):
        user = rng.integers(0, 50)
        tags = rng.integers(50, 80, rng.integers(0, 5))
        genres = rng.integers(80, 90, rng.integers(1, 3))
        feats = [user, *tags, *genres]
        lines.append(f"{rng.choice([-1, 1])} " + " ".join(f"{i}:1" for i in feats))
    root = tmp_path_factory.mktemp("mh")
    (root / "mh.libfm").write_text("\n".join(lines) + "\n")
    fields = [LibFMField("user", 0, 50), LibFMField("tag", 50, 80), LibFMField("genre", 80, 90)]
    return LibFMConfig(path=str(root / "mh.libfm"), fields=fields).prepare(root / "cache")


def _check(batches, table: pl.DataFrame, schema) -> int:
    seen = 0
    for batch in batches:
        rows = table.slice(seen, len(batch.labels))
        np.testing.assert_array_equal(batch.labels.numpy(), rows["label"].to_numpy())
        jts = batch.sparse_features.to_dict()
        assert list(jts) == schema.sparse_names
        for f in schema.sparse:
            lengths, values = jts[f.name].lengths().numpy(), jts[f.name].values().numpy()
            if f.multi_hot:
                want = rows[f.name].to_list()
                np.testing.assert_array_equal(lengths, [len(x) for x in want])
                np.testing.assert_array_equal(values, [v for x in want for v in x])
            else:
                np.testing.assert_array_equal(lengths, np.ones(len(rows)))
                np.testing.assert_array_equal(values, rows[f.name].to_numpy())
        seen += len(rows)
    return seen


def test_multi_hot_flags(multi_hot):
    flags = {f.name: f.multi_hot for f in multi_hot.schema.sparse}
    assert flags == {"user": False, "tag": True, "genre": True}


@pytest.mark.parametrize("in_memory", [True, False])
def test_batches_match_parquet_rows(multi_hot, in_memory):
    for split in ("train", "val"):
        table = pl.read_parquet(multi_hot.split_path(split))
        loader = BatchLoader(multi_hot, split, batch_size=37, in_memory=in_memory)
        assert _check(loader.epoch(0), table, multi_hot.schema) == table.height


def test_shuffled_batches_cover_every_row_once(multi_hot):
    table = pl.read_parquet(multi_hot.split_path("train"))
    loader = BatchLoader(multi_hot, "train", batch_size=64, shuffle=True, seed=3)
    got = []
    for batch in loader.epoch(1):
        tags = batch.sparse_features["tag"]
        offsets = np.concatenate([[0], np.cumsum(tags.lengths().numpy())])
        values = tags.values().numpy()
        got += [tuple(values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    assert sorted(got) == sorted(tuple(x) for x in table["tag"].to_list())


def test_movielens_genre_batches(movielens_raw, tmp_path):
    from recsys.data.movielens import MovieLensConfig

    ds = MovieLensConfig(raw_dir=str(movielens_raw)).prepare(tmp_path / "cache")
    table = pl.read_parquet(ds.split_path("test"))
    assert _check(BatchLoader(ds, "test", batch_size=1000).epoch(0), table, ds.schema) == table.height


def test_streaming_many_row_groups(multi_hot, tmp_path):
    """Streaming reads row group by row group; small groups exercise the list offsets per group."""
    import shutil

    import pyarrow.parquet as pq

    from recsys.data.schema import ProcessedDataset

    root = tmp_path / "ds"
    shutil.copytree(multi_hot.root, root)
    table = pq.read_table(root / "train.parquet")
    pq.write_table(table, root / "train.parquet", row_group_size=100)
    ds = ProcessedDataset.open(root)
    assert pq.ParquetFile(ds.split_path("train")).metadata.num_row_groups > 10
    loader = BatchLoader(ds, "train", batch_size=30, in_memory=False)
    assert _check(loader.epoch(0), pl.read_parquet(root / "train.parquet"), ds.schema) == table.num_rows
