"""Synthetic data: determinism, Zipf shape, chunked writing, planted signal, raw TSV twin."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from recsys.data.criteo import CriteoConfig
from recsys.data.loader import BatchLoader
from recsys.data.schema import SPLITS
from recsys.data.synthetic import SyntheticConfig, zipf_ranks
from recsys.data.synthetic_tsv import write_criteo_tsv

CARDS = [10, 1_000, 50_000, 10**8]


def _zipf_mass(r: int, n: int, s: float) -> float:
    """Exact P(rank = r) of the bounded continuous power law, from its CDF."""
    cdf = lambda x: ((x + 1.0) ** (1 - s) - 1) / ((n + 1.0) ** (1 - s) - 1)  # noqa: E731
    return cdf(r + 1) - cdf(r)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    cfg = SyntheticConfig(rows=300_000, cardinalities=CARDS, chunk_rows=50_000, seed=7)
    return cfg.prepare(tmp_path_factory.mktemp("synth"))


def test_chunks_are_row_groups_and_rows_add_up(synth):
    assert sum(synth.schema.rows.values()) == 300_000
    assert pq.ParquetFile(synth.split_path("train")).metadata.num_row_groups == 6
    assert [f.cardinality for f in synth.schema.sparse] == [n + 1 for n in CARDS]
    assert synth.schema.dense == [f"I{j}" for j in range(1, 14)]


def test_signal_and_calibration(synth):
    p = synth.schema.params
    assert 0.74 < p["oracle_auc"] < 0.82
    assert 0.22 < p["ctr"] < 0.28
    assert 0.3 < p["oracle_logloss"] < 0.6


def test_ids_and_counts(synth):
    for f in synth.schema.sparse:
        counts = synth.counts(f.name)
        train = pl.read_parquet(synth.split_path("train"), columns=[f.name])[f.name].to_numpy()
        assert train.min() >= 0 and train.max() < f.cardinality
        assert counts.sum() == len(train)
        np.testing.assert_array_equal(np.flatnonzero(counts), np.unique(train))
        assert 0 < counts[0] < 0.03 * len(train)  # empty_rate 2 %


def test_zipf_shape(synth):
    s = 1.1
    u = np.random.default_rng(0).random(2_000_000)
    ranks = zipf_ranks(u, 10**6, s)
    freq = np.bincount(ranks, minlength=10)
    ratio = freq[0] / freq[9]
    assert ratio == pytest.approx(_zipf_mass(0, 10**6, s) / _zipf_mass(9, 10**6, s), rel=0.05)
    # and in the written data: id = rank + 1, top ids dominate the 10^8 field
    counts = synth.counts("C4")
    expected = _zipf_mass(0, 10**8, s) / _zipf_mass(9, 10**8, s)
    assert counts[1] / counts[10] == pytest.approx(expected, rel=0.15)
    assert counts[1:11].sum() > 0.2 * counts.sum()
    assert zipf_ranks(np.array([0.0, 1 - 1e-16]), 10**8, s).tolist()[0] == 0
    assert zipf_ranks(np.array([0.5]), 1, s).tolist() == [0]


def test_deterministic_and_chunk_invariant(tmp_path, synth):
    small = dict(rows=20_000, cardinalities=CARDS, seed=7)
    a = SyntheticConfig(chunk_rows=20_000, **small).prepare(tmp_path / "a")
    b = SyntheticConfig(chunk_rows=3_000, **small).prepare(tmp_path / "b")
    c = SyntheticConfig(chunk_rows=20_000, **{**small, "seed": 8}).prepare(tmp_path / "c")
    assert a.root.name == b.root.name  # chunk_rows is not part of the key
    for s in SPLITS:
        da, db = pl.read_parquet(a.split_path(s)), pl.read_parquet(b.split_path(s))
        assert da.equals(db)
        # 20k rows are a prefix of the 300k rows of the same seed
        big = pl.read_parquet(synth.split_path(s)).head(da.height)
        assert da.equals(big)
    assert not pl.read_parquet(c.split_path("train")).head(100).equals(
        pl.read_parquet(a.split_path("train")).head(100)
    )


def test_batch_loader_in_memory_and_streaming(synth):
    for in_memory in (True, False):
        loader = BatchLoader(synth, "val", batch_size=4096, in_memory=in_memory)
        n = 0
        for batch in loader:
            assert batch.dense_features.shape[1] == 13
            assert batch.sparse_features.keys() == [f"C{i}" for i in range(1, 5)]
            n += len(batch.labels)
        assert n == synth.schema.rows["val"]
    streaming = BatchLoader(synth, "train", batch_size=10_000, in_memory=False, shuffle=True)
    assert sum(len(b.labels) for b in streaming.epoch(0)) == synth.schema.rows["train"]


def test_criteo_tsv_twin(tmp_path):
    """The raw TSV holds the same rows: the Criteo pipeline recovers labels and dense values
    exactly and the categorical values up to renaming ids (same seed, same splits)."""
    cards = [3, 50, 1_000, 10**8, *([20] * 22)]
    path = write_criteo_tsv(tmp_path / "synth.tsv", rows=5_000, seed=3, cardinalities=cards, chunk_rows=1_500)
    lines = path.read_text().splitlines()
    assert len(lines) == 5_000 and {line.count("\t") for line in lines} == {39}
    hexes = [f for line in lines for f in line.split("\t")[14:]]
    assert "" in hexes and all(len(h) == 8 for h in hexes if h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth.tsv"]
    raw = CriteoConfig(path=str(path), seed=3).prepare(tmp_path / "cache")
    gen = SyntheticConfig(rows=5_000, seed=3, cardinalities=cards).prepare(tmp_path / "cache")
    for s in SPLITS:
        a, b = pl.read_parquet(raw.split_path(s)), pl.read_parquet(gen.split_path(s))
        assert a.select("label", *[f"I{j}" for j in range(1, 14)]).equals(
            b.select("label", *[f"I{j}" for j in range(1, 14)])
        )
        for c in ("C1", "C2", "C4"):
            pairs = pl.DataFrame({"a": a[c], "b": b[c]}).unique()
            if s != "train":  # values unseen in train are 0 in the Criteo pipeline
                pairs = pairs.filter(pl.col("a") > 0)
            assert pairs["a"].n_unique() == pairs["b"].n_unique() == pairs.height  # a bijection


def test_memory_is_flat_in_rows(tmp_path, monkeypatch):
    """Peak traced allocations depend on chunk_rows, not rows (the pilot is shrunk to a chunk)."""
    import tracemalloc

    from recsys.data import synthetic

    monkeypatch.setattr(synthetic, "PILOT_ROWS", 5_000)
    peaks = []
    for rows in (20_000, 160_000):
        out = tmp_path / str(rows)
        out.mkdir()
        tracemalloc.start()
        synthetic.write_processed(SyntheticConfig(rows=rows, cardinalities=CARDS, chunk_rows=5_000), out)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0]


def test_drifting_ids_split_in_time(tmp_path):
    """``drift``: each field's popular ids move along the rows, and ``split_by: order`` trains
    on the first 80% of the rows and tests on the last 10%, so the ids most used in the test
    split are ids the training split barely saw; without drift the same ids lead both."""
    def top_ids(drift: float) -> tuple[list[int], list[int], dict[str, int]]:
        cfg = SyntheticConfig(rows=20_000, cardinalities=[500], n_dense=0, drift=drift, split_by="order", seed=3)
        ds = cfg.prepare(tmp_path / f"d{drift}")
        tops = []
        for s in ("train", "test"):
            ids = pl.read_parquet(ds.split_path(s))["C1"]
            tops.append(ids.filter(ids > 0).value_counts(sort=True)["C1"].head(5).to_list())
        return tops[0], tops[1], ds.schema.rows

    train, test, rows = top_ids(0.0)
    assert rows == {"train": 16_000, "val": 2_000, "test": 2_000}
    assert train[0] == test[0] == 1  # rank 0 leads both
    train, test, _ = top_ids(0.5)
    assert not set(train) & set(test)
    counts = SyntheticConfig(rows=20_000, cardinalities=[500], n_dense=0, drift=0.5, split_by="order", seed=3) \
        .prepare(tmp_path / "d0.5").counts("C1")
    assert all(counts[i] < counts[train[-1]] / 2 for i in test)  # the test's popular ids: rarer in training
