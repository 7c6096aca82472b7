"""Bad Criteo input is refused with one line naming the place; the cache never trusts a failed build."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from recsys.data import criteo
from recsys.data.criteo import CriteoConfig
from recsys.data.schema import DataError
from tests.conftest import CRITEO_SAMPLE
from tests.data.conftest import leftovers

LINES = CRITEO_SAMPLE.read_text().splitlines()[:50]


def _file(tmp_path: Path, lines: list[str], name: str = "bad.tsv") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _with_field(line_no: int, column: int, value: str, lines: list[str] = LINES) -> list[str]:
    """A copy of ``lines`` with 0-based ``column`` of 1-based line ``line_no`` set to ``value``."""
    out = list(lines)
    fields = out[line_no - 1].split("\t")
    fields[column] = value
    out[line_no - 1] = "\t".join(fields)
    return out


def _refused(tmp_path: Path, lines: list[str] | None, match: str) -> None:
    path = _file(tmp_path, lines) if lines is not None else tmp_path / "missing.tsv"
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=match):
        CriteoConfig(path=str(path)).prepare(cache)
    assert leftovers(cache) == []  # no final directory and no *.tmp-* directory


def test_missing_file(tmp_path):
    _refused(tmp_path, None, r"missing\.tsv: no such file")


def test_empty_file(tmp_path):
    _refused(tmp_path, [], r"bad\.tsv: empty file")


def test_wrong_column_count(tmp_path):
    short = list(LINES)
    short[2] = short[2].rsplit("\t", 1)[0]
    _refused(tmp_path, short, r"bad\.tsv:3: expected 40 tab-separated columns, found 39$")
    long = list(LINES)
    long[6] += "\textra\tmore"
    _refused(tmp_path, long, r"bad\.tsv:7: expected 40 tab-separated columns, found 42$")


def test_blank_line(tmp_path):
    _refused(tmp_path, [*LINES[:4], "", *LINES[4:]], r"bad\.tsv:5: expected 40 tab-separated columns, found 1$")


def test_non_hex_categorical(tmp_path):
    _refused(tmp_path, _with_field(2, 18, "xyz12"), r"bad\.tsv:2: column C5: 'xyz12' is not a hexadecimal id")
    _refused(tmp_path, _with_field(3, 39, "-1f"), r"bad\.tsv:3: column C26: '-1f' is not a hexadecimal id")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5", "1e3", "NaN"])
def test_non_integer_dense(tmp_path, value):
    _refused(tmp_path, _with_field(4, 3, value), rf"bad\.tsv:4: column I3: '{value}' is not an integer")


@pytest.mark.parametrize("value", ["2", "-1", "", "yes"])
def test_bad_label(tmp_path, value):
    _refused(tmp_path, _with_field(5, 0, value), rf"bad\.tsv:5: column label: '{value}' is not 0 or 1")


@pytest.mark.parametrize("spilled", [False, True], ids=["in-memory", "spilled"])
def test_first_bad_line_is_reported(tmp_path, monkeypatch, spilled):
    """Whether the parse stays in memory or goes through intermediate files (a file over
    ``IN_MEMORY_MAX_BYTES``), the first bad line is the one named and nothing is left."""
    if spilled:
        monkeypatch.setattr(criteo, "IN_MEMORY_MAX_BYTES", 0)
    lines = _with_field(40, 1, "nan", _with_field(17, 20, "zz"))
    _refused(tmp_path, lines, r"bad\.tsv:17: column C7: 'zz'")


def test_bad_line_deep_in_the_real_sample(tmp_path):
    lines = CRITEO_SAMPLE.read_text().splitlines()
    lines[9_876] = lines[9_876].replace("\t", "\t\t", 1)
    _refused(tmp_path, lines, r"bad\.tsv:9877: expected 40 tab-separated columns, found 41$")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    raw = [line.encode() for line in LINES]
    raw[7] = raw[7].replace(b"68fd1e64", b"68fd\xff1e64", 1) if b"68fd1e64" in raw[7] else raw[7] + b"\xff"
    path.write_bytes(b"".join(r + b"\n" for r in raw))
    with pytest.raises(DataError, match=r"bad\.tsv:8: "):
        CriteoConfig(path=str(path)).prepare(tmp_path / "cache")


# --- the cache -------------------------------------------------------------------------


def test_second_prepare_reuses(tmp_path, monkeypatch):
    path = _file(tmp_path, LINES, "ok.tsv")
    first = CriteoConfig(path=str(path)).prepare(tmp_path / "cache")
    stamp = (first.root / "schema.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached dataset")

    monkeypatch.setattr(criteo, "preprocess_criteo", fail)
    again = CriteoConfig(path=str(path)).prepare(tmp_path / "cache")
    assert again.root == first.root and (again.root / "schema.json").stat().st_mtime_ns == stamp


def test_changed_param_or_file_gives_new_directory(tmp_path):
    path = _file(tmp_path, LINES, "ok.tsv")
    cache = tmp_path / "cache"
    base = CriteoConfig(path=str(path)).prepare(cache).root
    assert CriteoConfig(path=str(path), min_count=2).prepare(cache).root != base
    assert CriteoConfig(path=str(path), seed=3).prepare(cache).root != base
    assert CriteoConfig(path=str(path), split=[0.5, 0.25, 0.25]).prepare(cache).root != base
    path.write_text("".join(line + "\n" for line in LINES[:40]))
    os.utime(path, ns=(1, 1))  # a changed file: size and mtime are in the key
    assert CriteoConfig(path=str(path)).prepare(cache).root != base


def test_interrupted_build_is_not_trusted(tmp_path, monkeypatch):
    path = _file(tmp_path, LINES, "ok.tsv")
    cache = tmp_path / "cache"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the split files, before counts

    monkeypatch.setattr(criteo, "write_counts", crash)
    with pytest.raises(KeyboardInterrupt):
        CriteoConfig(path=str(path)).prepare(cache)
    assert leftovers(cache) == []
    monkeypatch.undo()
    # a crash that could not clean up (kill -9) leaves a *.tmp-* directory: it is ignored
    (cache / "criteo-0000.tmp-1-deadbeef").mkdir(parents=True)
    (cache / "criteo-0000.tmp-1-deadbeef" / "train.parquet").write_bytes(b"partial")
    ds = CriteoConfig(path=str(path)).prepare(cache)
    assert sum(ds.schema.rows.values()) == 50
    assert pl.read_parquet(ds.split_path("train")).height == ds.schema.rows["train"]
