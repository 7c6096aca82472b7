"""The Criteo pipeline on the real 10,000-row sample, checked against plain-Python recomputation."""

from __future__ import annotations

import math
import shutil
from collections import Counter

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from recsys.data import criteo
from recsys.data.bench import outputs_equal
from recsys.data.common import assign_splits
from recsys.data.criteo import DENSE, SPARSE, CriteoConfig
from recsys.data.ids import frame_ids, raw_ids
from recsys.data.schema import SPLITS
from tests.conftest import CRITEO_SAMPLE

SAMPLE_SHA256 = "f665bb8823fd742ea1b8602d70918f235ccc08eba3224f1621c11022721c21a3"


def _split_rows(rows: list[list[str]], seed: int = 0) -> dict[str, list[list[str]]]:
    codes = assign_splits(np.arange(len(rows)), seed, (0.8, 0.1, 0.1))
    return {s: [r for r, c in zip(rows, codes) if c == k] for k, s in enumerate(SPLITS)}


def _expected_vocab(train: list[list[str]], col: int, min_count: int = 1) -> dict[str, int]:
    """value -> id the way the schema defines it: descending train count, ties by integer value."""
    counts = Counter(r[col] for r in train if r[col] != "")
    kept = sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], int(v, 16)))
    return {v: i + 1 for i, v in enumerate(kept)}


def test_rows_and_splits(criteo_sample, sample_rows):
    rows = criteo_sample.schema.rows
    assert sum(rows.values()) == 10_000 == len(sample_rows)
    assert 7_700 <= rows["train"] <= 8_300 and 800 <= rows["val"] <= 1_200 and 800 <= rows["test"] <= 1_200
    expected = _split_rows(sample_rows)
    for s in SPLITS:
        labels = pl.read_parquet(criteo_sample.split_path(s))["label"].to_numpy()
        np.testing.assert_array_equal(labels, [float(r[0]) for r in expected[s]])
    total_pos = sum(pl.read_parquet(criteo_sample.split_path(s))["label"].sum() for s in SPLITS)
    assert total_pos == 2_182  # README of the sample


def test_splits_deterministic_by_seed(tmp_path, criteo_sample):
    again = CriteoConfig(path=str(CRITEO_SAMPLE), seed=0).prepare(tmp_path / "a")
    other = CriteoConfig(path=str(CRITEO_SAMPLE), seed=1).prepare(tmp_path / "b")
    for s in SPLITS:
        assert pl.read_parquet(again.split_path(s)).equals(pl.read_parquet(criteo_sample.split_path(s)))
    assert again.root.name == criteo_sample.root.name  # same key, same directory name
    assert other.schema.rows != criteo_sample.schema.rows


def test_dense_values(criteo_sample, sample_rows):
    expected = _split_rows(sample_rows)
    for s in SPLITS:
        df = pl.read_parquet(criteo_sample.split_path(s))
        for j, name in enumerate(DENSE, start=1):
            want = [math.log1p(max(int(r[j]), 0)) if r[j] != "" else 0.0 for r in expected[s]]
            np.testing.assert_allclose(df[name].to_numpy(), np.array(want, dtype=np.float32), rtol=1e-6)
            assert df[name].dtype == pl.Float32


def _locate(line: int, n: int, seed: int = 0) -> tuple[str, int]:
    """(split, position in it) of 0-based line ``line`` of an n-line file."""
    codes = assign_splits(np.arange(n), seed, (0.8, 0.1, 0.1))
    return SPLITS[codes[line]], int((codes[:line] == codes[line]).sum())


def test_known_rows(criteo_sample, sample_rows):
    """By hand: line 1 has I1=1, I3=5, I12 empty; some line has a negative I2 (clipped to 0)."""
    split, pos = _locate(0, len(sample_rows))
    first = pl.read_parquet(criteo_sample.split_path(split)).row(pos, named=True)
    assert sample_rows[0][1:4] == ["1", "1", "5"] and sample_rows[0][12] == ""
    assert first["I1"] == pytest.approx(math.log1p(1)) and first["I3"] == pytest.approx(math.log1p(5))
    assert first["I12"] == 0.0
    negative = next(i for i, r in enumerate(sample_rows) if r[2].startswith("-"))
    split, pos = _locate(negative, len(sample_rows))
    assert pl.read_parquet(criteo_sample.split_path(split))["I2"][pos] == 0.0


@pytest.mark.parametrize("min_count", [1, 3])
def test_categorical_ids_match_independent_vocab(tmp_path, criteo_sample, sample_rows, min_count):
    ds = criteo_sample if min_count == 1 else CriteoConfig(path=str(CRITEO_SAMPLE), min_count=min_count).prepare(tmp_path)
    splits = _split_rows(sample_rows)
    for k, name in enumerate(SPARSE):
        col = 14 + k
        vocab = _expected_vocab(splits["train"], col, min_count)
        assert ds.schema.cardinality(name) == len(vocab) + 1
        for s in SPLITS:
            got = pl.read_parquet(ds.split_path(s), columns=[name])[name].to_list()
            assert got == [vocab.get(r[col], 0) for r in splits[s]], (name, s)


def test_empty_and_unseen_map_to_zero(criteo_sample, sample_rows):
    splits = _split_rows(sample_rows)
    train_values = {k: {r[14 + k] for r in splits["train"]} for k in range(26)}
    empties = unseen = 0
    for s in SPLITS:
        df = pl.read_parquet(criteo_sample.split_path(s))
        for k, name in enumerate(SPARSE):
            ids = df[name].to_numpy()
            raw = [r[14 + k] for r in splits[s]]
            is_empty = np.array([v == "" for v in raw])
            is_unseen = np.array([v != "" and v not in train_values[k] for v in raw])
            assert (ids[is_empty] == 0).all() and (ids[is_unseen] == 0).all()
            assert (ids[~is_empty & ~is_unseen] > 0).all()
            empties += int(is_empty.sum())
            unseen += int(is_unseen.sum())
    assert empties > 0 and unseen > 0  # both cases occur in the sample


def test_counts_match(criteo_sample, sample_rows):
    train = _split_rows(sample_rows)["train"]
    for k, name in enumerate(SPARSE):
        counts = criteo_sample.counts(name)
        raw = Counter(r[14 + k] for r in train)
        vocab = _expected_vocab(train, 14 + k)
        assert counts[0] == raw.get("", 0)  # min_count 1: only empties map to 0 in train
        for value, i in vocab.items():
            assert counts[i] == raw[value]
        assert counts.sum() == len(train)
        assert (np.diff(counts[1:]) <= 0).all()  # ids by descending frequency


def test_schema_provenance(criteo_sample):
    schema = criteo_sample.schema
    assert schema.dense == DENSE and schema.sparse_names == SPARSE
    assert schema.source["sha256"] == SAMPLE_SHA256 and schema.source["format"] == "criteo-tsv"
    assert schema.params["min_count"] == 1 and schema.params["code_version"] == criteo.CODE_VERSION
    assert not any(p.name.startswith("_parsed") for p in criteo_sample.root.iterdir())


def test_crlf_and_max_rows(tmp_path, criteo_sample):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(CRITEO_SAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    ds = CriteoConfig(path=str(crlf)).prepare(tmp_path / "cache")
    for s in SPLITS:
        assert pl.read_parquet(ds.split_path(s)).equals(pl.read_parquet(criteo_sample.split_path(s)))
    head = CriteoConfig(path=str(CRITEO_SAMPLE), max_rows=1000).prepare(tmp_path / "cache")
    assert sum(head.schema.rows.values()) == 1000


def test_copy_is_a_new_cache_entry_with_same_data(tmp_path):
    """The key holds the file's path, size and mtime: a copy is processed anew, to the same data."""
    copy = tmp_path / "train.txt"
    shutil.copy(CRITEO_SAMPLE, copy)
    a = CriteoConfig(path=str(copy)).prepare(tmp_path / "c")
    b = CriteoConfig(path=str(CRITEO_SAMPLE)).prepare(tmp_path / "c")
    assert a.root != b.root
    assert pl.read_parquet(a.split_path("val")).equals(pl.read_parquet(b.split_path("val")))


def test_split_by_order_trains_on_the_first_lines_and_tests_on_the_last(tmp_path, criteo_sample, sample_rows):
    """``split_by: order`` (Criteo's days are in line order): the first 80% of the lines
    train, the next 10% validate, the last 10% test; the vocabulary comes from those first
    lines, so a value first seen late is id 0 in the test split; cached apart from the hash split."""
    ds = CriteoConfig(path=str(CRITEO_SAMPLE), split_by="order", split=[0.7, 0.2, 0.1]).prepare(tmp_path / "c")
    assert ds.schema.rows == {"train": 7_000, "val": 2_000, "test": 1_000}
    assert ds.schema.params["split_by"] == "order" and "split_by" not in criteo_sample.schema.params
    assert ds.root.name != criteo_sample.root.name
    parts = {"train": sample_rows[:7_000], "val": sample_rows[7_000:9_000], "test": sample_rows[9_000:]}
    col = 1 + len(DENSE) + SPARSE.index("C3")
    vocab = _expected_vocab(parts["train"], col)
    for s, rows in parts.items():
        df = pl.read_parquet(ds.split_path(s))
        np.testing.assert_array_equal(df["label"].to_numpy(), [float(r[0]) for r in rows])
        assert df["C3"].to_list() == [vocab.get(r[col], 0) for r in rows]
    assert (pl.read_parquet(ds.split_path("test"))["C3"] == 0).sum() > 0  # values first seen after training


def test_raw_ids_are_each_values_stable_hash(tmp_path, criteo_sample, sample_rows):
    """``ids: raw``: every value becomes ``raw_ids`` of its integer (empty: 0) in every split,
    with no vocabulary, so a value first seen in the test split keeps an id of its own; the
    schema keeps the train split's distinct values + 1 as the full table's rows (what the
    budget's ratio is of). Loaders that write vocabulary ids only refuse ``raw`` in one line."""
    ds = CriteoConfig(path=str(CRITEO_SAMPLE), ids="raw").prepare(tmp_path / "c")
    assert ds.schema.raw_ids and ds.schema.vocabulary_bytes() == 0 < criteo_sample.schema.vocabulary_bytes()
    assert ds.schema.sparse == criteo_sample.schema.sparse and ds.root.name != criteo_sample.root.name
    expected = _split_rows(sample_rows)
    col = 1 + len(DENSE) + SPARSE.index("C4")
    for s in SPLITS:
        got = pl.read_parquet(ds.split_path(s))["C4"].to_numpy()
        values = [r[col] for r in expected[s]]
        want = raw_ids(np.array([int(v, 16) if v else 0 for v in values], dtype=np.int64))
        np.testing.assert_array_equal(got, np.where([v == "" for v in values], 0, want))
        assert ((got >= 0) & (got <= 2**62)).all()
    vocab_test = pl.read_parquet(criteo_sample.split_path("test"))["C4"].to_numpy()
    raw_test = pl.read_parquet(ds.split_path("test"))["C4"].to_numpy()
    unseen = (vocab_test == 0) & (raw_test != 0)  # id 0 with a vocabulary, an id of its own raw
    assert unseen.sum() > 10 and len(set(raw_test[unseen])) > 10
    from compression.config_checks import ConfigError
    from recsys.data.libfm import LibFMConfig

    with pytest.raises(ConfigError, match=r"^dataset.ids: raw is written by the criteo, movielens and tabular loaders, and the LibFMConfig"):
        LibFMConfig(ids="raw")


def _cpu_taken(monkeypatch) -> list[bool]:
    """Whether ``criteo_cpu.cpp``'s pipeline took each file ``preprocess_criteo`` was given."""
    taken: list[bool] = []
    cpu = criteo._cpu_pipeline
    monkeypatch.setattr(criteo, "_cpu_pipeline", lambda *a, **k: taken.append((r := cpu(*a, **k)) is not None) or r)
    return taken


@pytest.mark.parametrize(("ids", "split_by"), [("vocab", "hash"), ("raw", "order")])
def test_a_file_parsed_in_memory_and_one_spilled_to_intermediates_give_the_same_files(tmp_path, monkeypatch, ids, split_by):
    """Polars' pipeline (any file the C++ one does not take): a file of at most
    ``IN_MEMORY_MAX_BYTES`` keeps the parse in memory and maps its ids with ``frame_ids``; a
    larger one (here: a limit of 0) goes through intermediate files and streamed look-ups.
    Same splits, ids and counts either way."""
    monkeypatch.setattr(criteo, "_cpu_pipeline", lambda *a, **k: None)
    calls = []
    monkeypatch.setattr(criteo, "frame_ids", lambda frame, maps: calls.append(frame.height) or frame_ids(frame, maps))
    out = {}
    for limit in (criteo.IN_MEMORY_MAX_BYTES, 0):
        monkeypatch.setattr(criteo, "IN_MEMORY_MAX_BYTES", limit)
        out[limit] = tmp_path / str(limit)
        out[limit].mkdir()
        criteo.preprocess_criteo(CRITEO_SAMPLE, out[limit], ids=ids, split_by=split_by, min_count=2)
        assert not list(out[limit].glob("_parsed-*"))
        assert len(calls) == 3  # three splits in memory; the spilled run adds none
    assert sum(calls) == 10_000
    assert outputs_equal(*out.values())


def _edge_lines(n: int, seed: int = 0) -> list[str]:
    """Clean lines with what the C++ parse must read as polars does: negative and empty
    integers, 18-digit ones, ids of either case with leading zeros, 15 hex digits, empty."""
    rng = np.random.default_rng(seed)
    pool_i = ["", "0", "-0", "-3", "7", "0012", "999999999999999999", "-999999999999999999", "123456"]
    pool_c = ["", "68fd1e64", "68FD1E64", "0000000a", "fffffffffffffff", "1", "b2cb9c98", "deadBEEF"]
    return [
        "\t".join([str(rng.integers(2)), *(pool_i[rng.integers(len(pool_i))] for _ in DENSE),
                   *(pool_c[rng.integers(len(pool_c))] for _ in SPARSE)])  # fmt: skip
        for _ in range(n)
    ]


@pytest.mark.parametrize(("ids", "split_by", "max_rows", "end", "piece"), [
    ("vocab", "hash", None, "\n", None), ("raw", "order", 700, "", None), ("vocab", "order", None, "", None),
    ("vocab", "hash", None, "", 100_000), ("raw", "order", 5_300, "\n", 100_000), ("vocab", "order", 400, "\n", 300),
])  # fmt: skip
def test_the_cpu_pipeline_of_a_clean_file_gives_polars_files(tmp_path, monkeypatch, ids, split_by, max_rows, end, piece):
    """A clean file (every line as the real data's) goes through ``criteo_cpu.cpp``'s pipeline,
    in memory or (``piece`` bytes) as a file over ``IN_MEMORY_MAX_BYTES``, parsed a piece at a
    time, twice; polars' pipeline gives the same splits, ids and counts: the sample with edge
    values appended, the last line with its newline or without, ``max_rows`` within a piece,
    pieces of one or two lines and of about 400, row groups of 1,000 rows written as polars writes them."""
    path = tmp_path / "edge.txt"
    path.write_text(CRITEO_SAMPLE.read_text() + "\n".join(_edge_lines(1500)) + end)
    taken = _cpu_taken(monkeypatch)
    monkeypatch.setattr(criteo, "ROW_GROUP_ROWS", 1_000)
    if piece is not None:
        monkeypatch.setattr(criteo, "IN_MEMORY_MAX_BYTES", 0)
        monkeypatch.setattr(criteo, "PIECE_BYTES", piece)
    out = {k: tmp_path / k for k in ("cpu", "polars")}
    for k, d in out.items():
        if k == "polars":
            monkeypatch.setattr(criteo, "_cpu_pipeline", lambda *a, **k: None)
        d.mkdir()
        criteo.preprocess_criteo(path, d, ids=ids, split_by=split_by, max_rows=max_rows, min_count=1)
    assert taken == [True], "the C++ pipeline did not take a clean file"
    assert outputs_equal(out["cpu"], out["polars"])
    for s in SPLITS:
        groups = [pq.ParquetFile(d / f"{s}.parquet").metadata for d in out.values()]
        assert [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in groups] == [
            [1_000] * (groups[1].num_rows // 1_000) + [groups[1].num_rows % 1_000]
        ] * 2


@pytest.mark.parametrize("line_end, field", [("\r\n", None), ("\n", "+5"), ("\n", "1234567890123456789"), ("\n", " 5")])
def test_a_file_the_cpu_pipeline_does_not_take_goes_to_polars(tmp_path, monkeypatch, line_end, field):
    """Windows line ends, a plus sign, 19 digits, a space, on the 31st of 50 lines read in
    pieces of about 10: not the kernel's (polars reads the first three, and names the line of
    the last), and nothing written by the kernel's pipeline is left."""
    lines = _edge_lines(50)
    if field is not None:
        parts = lines[30].split("\t")
        parts[3] = field
        lines[30] = "\t".join(parts)
    path = tmp_path / "odd.txt"
    path.write_text(line_end.join(lines) + line_end)
    taken = _cpu_taken(monkeypatch)
    monkeypatch.setattr(criteo, "PIECE_BYTES", 1_000)
    out = tmp_path / "out"
    out.mkdir()
    if field == " 5":
        with pytest.raises(criteo.DataError, match=r"odd.txt:31: column I3: ' 5' is not an integer"):
            criteo.preprocess_criteo(path, out)
        assert not list(out.glob("*.parquet"))
    else:
        criteo.preprocess_criteo(path, out)
        assert pl.read_parquet(out / "train.parquet").height > 30
    assert taken == [False]


def test_a_file_changed_between_the_cpu_pipelines_two_reads_is_refused(tmp_path, monkeypatch):
    """A file over ``IN_MEMORY_MAX_BYTES`` is parsed twice; a line made bad after the first read
    (the same size) is found by the second: one error naming the file."""
    lines = _edge_lines(300)
    path = tmp_path / "moving.txt"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(criteo, "IN_MEMORY_MAX_BYTES", 0)
    monkeypatch.setattr(criteo, "PIECE_BYTES", 10_000)
    use_vocab = criteo._CleanTsv.use_vocab
    at = len("\n".join(lines[:200])) + 1  # line 201's label

    def change_then_use(self, field, vocab):  # between the two reads: after every piece was counted
        if field == 0:
            with path.open("r+b") as f:
                f.seek(at)
                f.write(b"7")
        use_vocab(self, field, vocab)

    monkeypatch.setattr(criteo._CleanTsv, "use_vocab", change_then_use)
    with pytest.raises(criteo.DataError, match=r"moving\.txt: the file changed while it was read"):
        criteo.preprocess_criteo(path, tmp_path)


def test_without_a_compiler_polars_parses_alone(tmp_path, monkeypatch):
    """A machine with no C++ compiler: one warning naming why, and the same files from
    polars' parse (a real build attempt, in a process of its own)."""
    import os
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from recsys.data import criteo\n"
        "logging.basicConfig()\n"
        "assert criteo.tsv_parser() is None\n"
        "out = Path(sys.argv[1]); out.mkdir()\n"
        "criteo.preprocess_criteo(Path(sys.argv[2]), out)\n"
        "print('torch' in sys.modules)\n"
    )
    taken = _cpu_taken(monkeypatch)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": str(tmp_path / "no-such-c++")}
    got = subprocess.run([sys.executable, "-c", code, str(tmp_path / "polars"), str(CRITEO_SAMPLE)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == "False"  # the data pipeline loads no torch
    warned = [ln for ln in got.stderr.splitlines() if "criteo_cpu.cpp did not build" in ln]
    assert len(warned) == 1 and "no-such-c++" in warned[0], got.stderr[-2000:]
    (tmp_path / "cpu").mkdir()
    criteo.preprocess_criteo(CRITEO_SAMPLE, tmp_path / "cpu")
    assert taken == [True]
    assert outputs_equal(tmp_path / "cpu", tmp_path / "polars")
