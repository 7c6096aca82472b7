"""Pieces every format loader shares: seeded splits, vocabularies, the atomic cache.

Splits and hashes here use our own splitmix64 on uint64 (numpy wraps on overflow),
so they are the same on every machine, process and library version; never
Python's ``hash()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.schema import COUNTS_FILE, SCHEMA_FILE, DataError, DatasetSchema, ProcessedDataset

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Seeded 64-bit integer mix (splitmix64 finaliser) of an integer array, as uint64."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def assign_splits(
    row_index: np.ndarray, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> np.ndarray:
    """Split code per row (0 train, 1 val, 2 test), a pure function of (row, seed)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    u = (splitmix64(row_index, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    cuts = np.cumsum(fractions)[:2]
    return np.searchsorted(cuts, u, side="right").astype(np.int8)


def build_vocab(values: pl.Series, min_count: int) -> pl.DataFrame:
    """Vocabulary of one field from its train values (nulls are skipped).

    Returns columns ``value``, ``id`` (1.. by descending count, ties by value) and
    ``count``; values seen fewer than ``min_count`` times get no id (they map to 0).
    """
    counts = (
        values.drop_nulls()
        .value_counts(name="count")
        .rename({values.name: "value"})
        .filter(pl.col("count") >= min_count)
        .sort(["count", "value"], descending=[True, False])
    )
    return counts.with_columns(pl.int_range(1, counts.height + 1, dtype=pl.Int64).alias("id"))


def dataset_key(parts: dict[str, Any]) -> str:
    """Short stable digest of everything that determines a processed dataset."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a source file for cache keys: path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling directory that becomes ``final`` only on success.

    An interrupted or failing build leaves no ``final`` behind, so a later run never
    trusts a half-written cache; leftovers are named ``*.tmp-*`` and ignored.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # another process finished the same build first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_dataset(
    cache_root: Path, name: str, key_parts: dict[str, Any], build: Callable[[Path], DatasetSchema]
) -> ProcessedDataset:
    """Open ``cache_root/name-<key>`` or build it atomically with ``build(tmp_dir)``.

    ``build`` writes the split parquet files and counts into the directory it gets
    and returns the schema; the schema file is written last.
    """
    final = Path(cache_root) / f"{name}-{dataset_key(key_parts)}"
    if (final / SCHEMA_FILE).is_file():
        return ProcessedDataset.open(final)
    with atomic_directory(final) as tmp:
        schema = build(tmp)
        for split in ("train", "val", "test"):
            if not (tmp / f"{split}.parquet").is_file():
                raise RuntimeError(f"dataset builder for '{name}' did not write {split}.parquet")
        if not (tmp / COUNTS_FILE).is_file():
            raise RuntimeError(f"dataset builder for '{name}' did not write {COUNTS_FILE}")
        if sum(schema.rows.values()) == 0:
            raise DataError(f"dataset '{name}' is empty: no rows to train on")
        (tmp / SCHEMA_FILE).write_text(schema.to_json())
    return ProcessedDataset.open(final)


def write_counts(path: Path, counts: dict[str, pl.DataFrame]) -> None:
    """Write ``counts.parquet`` from per-field frames with columns ``id`` and ``count``."""
    frames = [
        df.select(pl.lit(name).alias("field"), pl.col("id").cast(pl.Int64), pl.col("count").cast(pl.Int64))
        for name, df in counts.items()
    ]
    pl.concat(frames).write_parquet(path)


def scan_lines(path: Path, *, n_rows: int | None = None, row_index: str = "row") -> pl.LazyFrame:
    """Lazily read a text file as one string column ``line`` with a 0-based ``row_index``.

    Used to validate line-oriented formats vectorised: no quoting, no header, blank
    lines kept (so ``row + 1`` is the line number), a trailing ``\\r`` dropped, and
    invalid UTF-8 replaced by U+FFFD so that it fails the format's own checks with a
    line number instead of aborting the scan.
    """
    return pl.scan_csv(
        path,
        has_header=False,
        separator="\x00",  # never a field separator in text formats: one column per line
        quote_char=None,
        schema={"line": pl.String},
        row_index_name=row_index,
        empty_string_is_null=False,
        encoding="utf8-lossy",
        n_rows=n_rows,
    )


def vocab_from_counts(counts: pl.DataFrame, min_count: int) -> pl.DataFrame:
    """``build_vocab`` for values already counted: columns ``value``, ``count`` in.

    Same contract as ``build_vocab`` (nulls dropped, ids 1.. by descending count, ties
    by value, counts below ``min_count`` get no id); for pipelines that count with a
    streaming ``group_by`` instead of holding the whole column.
    """
    kept = (
        counts.drop_nulls("value")
        .filter(pl.col("count") >= min_count)
        .sort(["count", "value"], descending=[True, False])
    )
    return kept.with_columns(pl.int_range(1, kept.height + 1, dtype=pl.Int64).alias("id"))
