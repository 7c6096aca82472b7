"""Criteo display-ads TSV (Kaggle 2014 file, each day of the 1TB logs) to a processed dataset.

Input: no header, 40 tab-separated columns per line: ``label`` (0/1), ``I1..I13``
(integers, may be empty or negative), ``C1..C26`` (hexadecimal ids, may be empty: 1 to
16 hex digits of either case, no sign or ``0x``, below 2^63; the real data has 8).

Output (see ``schema.py``): ``I*`` as float32 ``log1p(max(x, 0))`` with empty -> 0;
``C*`` as int64 ids, 1.. by descending train frequency, 0 for empty, rare
(count < ``min_count``) and values never seen in the train split.

Bad input is refused, never cleaned: the first bad line is reported as one
``DataError`` naming file, 1-based line, column and value. Silently turning "nan"
or "1.5" into 0 would hide a broken export behind a plausible-looking dataset.
Checks run inside the single parsing pass, so on a big file the error comes at the
end of that pass (a few minutes for a 200M-row day), not at the bad line.

A clean file (every line as the real data's: 40 fields, the label 0 or 1, integers of an
optional ``-`` and at most 18 digits, ids of at most 15 hexadecimal digits, ``\n`` line ends)
takes ``criteo_cpu.cpp``'s pipeline (``_cpu_pipeline``; a plain C library, no torch), a piece
of ``PIECE_BYTES`` at a time, so memory is bounded by a piece and the vocabularies:

1. parse each piece on the CPU's threads, count its train rows' ids in one hash table a field,
2. vocabularies from the tables,
3. parse each piece again (a file of at most ``IN_MEMORY_MAX_BYTES`` keeps step 1's columns),
   map its ids in place, append its rows to the split files.

Any other file, or a machine without a compiler, takes polars' pipeline, whose parse alone
finds and names a bad line (lazy and streaming: bounded memory too):

1. scan lines -> validate and parse -> one intermediate Parquet per split,
2. per-field streaming ``group_by`` on the train intermediate -> vocabularies,
3. map values to ids per split -> ``{train,val,test}.parquet``.

There a file of at most ``IN_MEMORY_MAX_BYTES`` keeps step 1's output in memory instead
(about 0.6x the file's size as columns), and step 3 maps each split's columns on polars'
threads at once. Both pipelines write the same files, in row groups of ``ROW_GROUP_ROWS``.

Example::

    ds = CriteoConfig(path="data/criteo-sample/train.txt").prepare(Path("data/cache"))
    ds.schema.rows        # {'train': ..., 'val': ..., 'test': ...}
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import polars as pl

from compression import native
from compression.config_checks import bounded
from recsys.data.base import DatasetConfig
from recsys.data.common import (
    ROW_GROUP_ROWS,
    SPLIT_COMPRESSION,
    cached_dataset,
    file_fingerprint,
    scan_lines,
    sha256_file,
    split_code_expr,
    split_codes,
    vocab_from_counts,
    write_counts,
)
from recsys.data.files import require_file, text_read_error
from recsys.data.ids import IdLookup, RawIds, frame_ids, raw_ids
from recsys.data.schema import (
    COUNTS_FILE,
    SPLITS,
    DataError,
    DatasetSchema,
    ProcessedDataset,
    SparseField,
)

# Part of the cache key: bump whenever the processed output of the same input changes.
CODE_VERSION = 1
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *DENSE, *SPARSE]
TAB = "\t"
# Sources up to this size also get a sha256 in schema.source (hashing 11 GB is slow).
SHA256_MAX_BYTES = 256 << 20
# Sources up to this size are parsed once and kept in memory (the module's docstring): at
# most about 1.2 GiB of int64 columns (C++ pipeline) or 0.6 GiB (polars'), beside the
# vocabularies. A larger one is parsed twice (C++) or through intermediate files (polars).
IN_MEMORY_MAX_BYTES = 1 << 30
# A clean file is parsed a piece of about this many bytes at a time (``_cpu_pipeline``):
# about 1.2x of it as int64 columns, about as much again while its rows are written, beside
# less than a row group held for each split's file (about 0.2 GiB each at most).
PIECE_BYTES = 64 << 20


@dataclass
class CriteoConfig(DatasetConfig):
    """A Criteo-format TSV file and how to process it.

    ``min_count`` defaults to 1: every value seen in the train split keeps its own id,
    so the processed data is a lossless re-indexing and frequency pruning stays a
    compression method to measure, not a preprocessing choice baked into the baseline
    (published Kaggle pipelines often use 10; set it here to reproduce them).
    ``max_rows`` reads only the first rows of the file (quick runs on a full day).

    Example::

        cfg = CriteoConfig(path="data/criteo-sample/train.txt", seed=0, min_count=1)
        ds = cfg.prepare(Path("data/cache"))
    """

    # Criteo's Kaggle and Terabyte files hold their days in order
    ordered_by: ClassVar[Optional[str]] = "the file's line order (Criteo's days are in time order)"
    raw_ids: ClassVar[bool] = True

    name: str = "criteo"
    path: str = "data/criteo-sample/train.txt"
    min_count: int = bounded(1, ge=1)
    max_rows: Optional[int] = bounded(None, ge=1)

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        path = require_file(Path(self.path), "a Criteo TSV file")
        key = {
            "format": "criteo-tsv",
            "code_version": CODE_VERSION,
            "file": file_fingerprint(path),
            "seed": self.seed,
            "split": list(self.split),
            "min_count": self.min_count,
            "max_rows": self.max_rows,
            **self.split_key(),
        }
        return cached_dataset(
            Path(cache_root),
            self.name,
            key,
            lambda out: preprocess_criteo(
                path,
                out,
                name=self.name,
                seed=self.seed,
                split=list(self.split),
                min_count=self.min_count,
                max_rows=self.max_rows,
                split_by=self.split_by,
                ids=self.ids,
            ),
        )


def _typed(lines: pl.LazyFrame) -> pl.LazyFrame:
    """Lines -> raw string columns plus ``_I*``/``_C*`` parsed integers (null if unparsable).

    Splitting into one field more than expected makes a wrong column count visible
    without counting tabs: too many -> ``_extra`` is set, too few -> ``C26`` is null.
    """
    parts = pl.col("line").str.split_exact(TAB, len(COLUMNS)).struct.rename_fields([*COLUMNS, "_extra"])
    return (
        lines.select("row", parts.alias("_parts"))
        .unnest("_parts")
        .with_columns(
            *(pl.col(c).str.to_integer(strict=False).alias(f"_{c}") for c in DENSE),
            *(pl.col(c).str.to_integer(base=16, strict=False).alias(f"_{c}") for c in SPARSE),
        )
    )


def _checks() -> list[tuple[str, pl.Expr]]:
    """(column, is-bad expression) for every check, in the order errors are reported.

    Applied to ``_typed`` frames; shared by the vectorised pass that finds the first
    bad line and by the diagnosis of that one line, so both always agree.
    """
    checks: list[tuple[str, pl.Expr]] = [
        ("#columns", pl.col("_extra").is_not_null() | pl.col(COLUMNS[-1]).is_null()),
        ("label", ~pl.col("label").is_in(["0", "1"])),
    ]
    for c in DENSE:
        checks.append((c, (pl.col(c) != "") & pl.col(f"_{c}").is_null()))
    for c in SPARSE:
        s = pl.col(c)
        # to_integer accepts a leading sign; a hashed id has none
        signed = s.str.starts_with("+") | s.str.starts_with("-")
        checks.append((c, (s != "") & (pl.col(f"_{c}").is_null() | signed)))
    return checks


def _parsed(lines: pl.LazyFrame, seed: int, split: list[float], total: int | None) -> pl.LazyFrame:
    """Lines -> the output's columns, split code (``total`` rows: in file order, else by row
    hash) and a per-row ``_bad`` flag (still lazy)."""
    bad = pl.any_horizontal([e for _, e in _checks()])
    dense = [
        pl.col(f"_{c}").fill_null(0).clip(lower_bound=0).cast(pl.Float64).log1p().cast(pl.Float32).alias(c)
        for c in DENSE
    ]
    return _typed(lines).select(
        pl.col("row").cast(pl.Int64),
        split_code_expr("row", seed, split, total),
        (pl.col("label") == "1").cast(pl.Float32).alias("label"),
        *dense,
        *(pl.col(f"_{c}").alias(c) for c in SPARSE),
        bad.alias("_bad"),
    )


def tsv_parser() -> ctypes.CDLL | None:
    """``criteo_cpu.cpp``, its functions' C types set (None where it is not built)."""
    lib = native.load_library(Path(__file__).with_name("criteo_cpu.cpp"), "Criteo TSV lines are parsed by polars alone")
    if lib is not None and lib.criteo_open.restype is not ctypes.c_void_p:
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        for fn, res, args in [
            ("criteo_open", ptr, [ctypes.c_char_p]),
            ("criteo_close", None, [ptr]),
            ("criteo_size", i64, [ptr]),
            ("criteo_line_start", i64, [ptr, i64]),
            ("criteo_lines", i64, [ptr, i64, i64, c_int]),
            ("criteo_parse", c_int, [ptr, i64, i64, i64, ptr, ptr, ptr, c_int]),
            ("criteo_tables", ptr, [c_int]),
            ("criteo_tables_free", None, [ptr]),
            ("criteo_count", None, [ptr, ptr, i64, ptr, c_int]),
            ("criteo_table_size", i64, [ptr, c_int]),
            ("criteo_table_items", None, [ptr, c_int, ptr, ptr]),
            ("criteo_table_set", None, [ptr, c_int, ptr, ptr, i64]),
            ("criteo_map", None, [ptr, ptr, i64, c_int]),
        ]:
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


@dataclass
class _Piece:
    """A byte range of whole lines of the file, its first row and how many rows it holds."""

    start: int
    end: int
    first: int
    rows: int


@dataclass
class _Parsed:
    """A piece's rows as ``criteo_cpu.cpp`` types them: label 0/1, integers (empty 0) and
    ids (empty -1) by column, and each row's split code."""

    label: np.ndarray  # (rows,) uint8
    dense: np.ndarray  # (13, rows) int64
    sparse: np.ndarray  # (26, rows) int64
    code: np.ndarray  # (rows,) int8


class _CleanTsv:
    """A Criteo TSV file read a piece at a time by ``criteo_cpu.cpp`` (open while in a
    ``with`` block), and one hash table per sparse field."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.lib, self.path, self.threads = lib, path, pl.thread_pool_size()
        self.file = self.tables = None

    def __enter__(self) -> _CleanTsv:
        self.file = self.lib.criteo_open(str(self.path).encode())
        self.tables = self.lib.criteo_tables(len(SPARSE))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file:
            self.lib.criteo_close(self.file)
        self.lib.criteo_tables_free(self.tables)

    def pieces(self, max_rows: int | None) -> Iterator[_Piece]:
        """The file (its first ``max_rows`` lines) in pieces of about ``PIECE_BYTES``, each
        counted as it is reached (its text then read again from the page cache)."""
        size, start, first = self.lib.criteo_size(self.file), 0, 0
        while start < size and (max_rows is None or first < max_rows):
            end = self.lib.criteo_line_start(self.file, start + PIECE_BYTES)
            rows = self.lib.criteo_lines(self.file, start, end, self.threads)
            rows = rows if max_rows is None else min(rows, max_rows - first)
            yield _Piece(start, end, first, rows)
            start, first = end, first + rows

    def parse(self, piece: _Piece, seed: int, split: list[float], total: int | None) -> _Parsed | None:
        """The piece's rows and split codes, None where a line is not clean."""
        n = piece.rows
        label, dense, sparse = (np.empty(n, np.uint8), np.empty((len(DENSE), n), np.int64),
                                np.empty((len(SPARSE), n), np.int64))  # fmt: skip
        if not self.lib.criteo_parse(self.file, piece.start, piece.end, n, label.ctypes.data, dense.ctypes.data,
                                     sparse.ctypes.data, self.threads):  # fmt: skip
            return None
        code = split_codes(np.arange(piece.first, piece.first + n, dtype=np.int64), seed, split, total)
        return _Parsed(label, dense, sparse, np.ascontiguousarray(code, dtype=np.int8))

    def count(self, parsed: _Parsed) -> None:
        """Counts the train rows' ids in the field's tables."""
        self.lib.criteo_count(self.tables, parsed.sparse.ctypes.data, len(parsed.code), parsed.code.ctypes.data,
                              self.threads)  # fmt: skip

    def counts(self, field: int) -> pl.DataFrame:
        """The field's table as columns ``value``, ``count``."""
        n = self.lib.criteo_table_size(self.tables, field)
        values, counts = np.empty(n, np.int64), np.empty(n, np.int64)
        self.lib.criteo_table_items(self.tables, field, values.ctypes.data, counts.ctypes.data)
        return pl.DataFrame({"value": values, "count": counts})

    def use_vocab(self, field: int, vocab: pl.DataFrame) -> None:
        """The field's table made its vocabulary: value -> id."""
        values = np.ascontiguousarray(vocab["value"].to_numpy(), dtype=np.int64)
        ids = np.ascontiguousarray(vocab["id"].to_numpy(), dtype=np.int64)
        self.lib.criteo_table_set(self.tables, field, values.ctypes.data, ids.ctypes.data, len(values))

    def map_ids(self, parsed: _Parsed) -> None:
        """Each id of the piece replaced by its vocabulary id (0: empty or not in it), in place."""
        self.lib.criteo_map(self.tables, parsed.sparse.ctypes.data, len(parsed.code), self.threads)


class _RowGroupWriter:
    """A split's Parquet file written a piece's rows at a time, in row groups of
    ``ROW_GROUP_ROWS`` rows (the last one the rest) as polars' ``write_parquet`` writes them:
    the loader shuffles a large split a row group at a time. Holds fewer than a row group's
    rows between writes."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.concat, self.rows, self.pending = pa.concat_tables, 0, 0
        self.held: list[Any] = []  # pyarrow Tables
        schema = pa.schema([("label", pa.float32()), *((c, pa.float32()) for c in DENSE),
                            *((c, pa.int64()) for c in SPARSE)])  # fmt: skip
        self.writer = pq.ParquetWriter(path, schema, compression=SPLIT_COMPRESSION)

    def __enter__(self) -> _RowGroupWriter:
        return self

    def write(self, frame: pl.DataFrame) -> None:
        """Appends the frame's rows; writes every whole row group held."""
        self.held.append(frame.to_arrow())
        self.rows, self.pending = self.rows + frame.height, self.pending + frame.height
        if self.pending >= ROW_GROUP_ROWS:
            self._flush(self.pending // ROW_GROUP_ROWS * ROW_GROUP_ROWS)

    def _flush(self, n: int) -> None:
        held = self.concat(self.held)
        self.writer.write_table(held.slice(0, n), row_group_size=ROW_GROUP_ROWS)
        self.held, self.pending = [held.slice(n)], self.pending - n

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self.pending:  # the rest: a last, smaller row group
            self._flush(self.pending)
        self.writer.close()


def _split_frames(parsed: _Parsed) -> list[pl.DataFrame]:
    """A piece whose ids are mapped -> its output rows, one frame per split."""
    dense = [pl.col(c).clip(lower_bound=0).cast(pl.Float64).log1p().cast(pl.Float32) for c in DENSE]
    frame = pl.DataFrame(
        {"label": parsed.label.astype(np.float32), **dict(zip(DENSE, parsed.dense)),
         **dict(zip(SPARSE, parsed.sparse)), "_split": parsed.code}  # fmt: skip
    ).with_columns(dense)
    return [frame.filter(pl.col("_split") == k).drop("_split") for k in range(len(SPLITS))]


def _cpu_pipeline(
    path: Path, out_dir: Path, *, seed: int, split: list[float], min_count: int, max_rows: int | None,
    split_by: str, ids: str,
) -> tuple[dict[str, pl.DataFrame], int, dict[str, int]] | None:
    """``preprocess_criteo``'s passes on a clean file, with ``criteo_cpu.cpp``: (vocabularies,
    train rows, rows per split), the split files written; None where a line is not clean or
    the kernel is not built (nothing written then).

    Pass 1 parses each piece and counts its train ids; pass 2 parses it again (a file of at
    most ``IN_MEMORY_MAX_BYTES`` keeps pass 1's columns instead), maps its ids and appends its
    rows to the split files."""
    lib = tsv_parser()
    if lib is None:
        return None
    with _CleanTsv(lib, path) as tsv:
        if not tsv.file:
            return None
        # split_by order needs the number of lines first: one more read of the file
        planned = list(tsv.pieces(max_rows)) if split_by == "order" else None
        total = sum(p.rows for p in planned) if planned is not None else None
        keep = path.stat().st_size <= IN_MEMORY_MAX_BYTES
        pieces: list[_Piece] = []
        kept: list[_Parsed] = []
        n_train = 0
        for piece in planned if planned is not None else tsv.pieces(max_rows):
            pieces.append(piece)
            parsed = tsv.parse(piece, seed, split, total)
            if parsed is None:
                return None
            tsv.count(parsed)
            n_train += int(np.count_nonzero(parsed.code == 0))
            if keep:
                kept.append(parsed)
        vocabs = {c: vocab_from_counts(tsv.counts(j), min_count) for j, c in enumerate(SPARSE)}
        if ids != "raw":
            for j, c in enumerate(SPARSE):
                tsv.use_vocab(j, vocabs[c])
        with contextlib.ExitStack() as stack:
            writers = {s: stack.enter_context(_RowGroupWriter(out_dir / f"{s}.parquet")) for s in SPLITS}
            for piece in pieces:
                parsed = kept.pop(0) if keep else tsv.parse(piece, seed, split, total)
                if parsed is None:
                    raise DataError(f"{path}: the file changed while it was read")
                if ids == "raw":
                    empty = parsed.sparse < 0
                    parsed.sparse[:] = raw_ids(parsed.sparse)
                    parsed.sparse[empty] = 0
                else:
                    tsv.map_ids(parsed)
                for s, frame in zip(SPLITS, _split_frames(parsed)):
                    writers[s].write(frame)
    return vocabs, n_train, {s: w.rows for s, w in writers.items()}


def _diagnose(path: Path, lines: pl.LazyFrame, row: int) -> DataError:
    """The error message for one line known to be bad."""
    one = lines.filter(pl.col("row") == row).collect(engine="streaming")
    df = _typed(one.lazy()).collect()
    line = one["line"][0]
    flags = df.select(e.alias(name) for name, e in _checks()).row(0, named=True)
    where = f"{path}:{row + 1}"
    for name, is_bad in flags.items():
        if not is_bad:
            continue
        if name == "#columns":
            return DataError(
                f"{where}: expected {len(COLUMNS)} tab-separated columns, found {line.count(TAB) + 1}"
            )
        value = df[name][0]
        if name == "label":
            return DataError(f"{where}: column label: {value!r} is not 0 or 1")
        if name in DENSE:
            return DataError(
                f"{where}: column {name}: {value!r} is not an integer (NaN, inf and decimals are refused)"
            )
        return DataError(f"{where}: column {name}: {value!r} is not a hexadecimal id")
    raise AssertionError(f"{where}: flagged bad but no check fails")  # pragma: no cover


def _polars_pipeline(
    path: Path, out_dir: Path, *, seed: int, split: list[float], min_count: int, max_rows: int | None,
    split_by: str, ids: str,
) -> tuple[dict[str, pl.DataFrame], int, dict[str, int]]:
    """``preprocess_criteo``'s passes with polars' parse, for any file: (vocabularies, train
    rows, rows per split), the split files written; the first bad line raised."""
    lines = scan_lines(path, n_rows=max_rows)
    in_memory = path.stat().st_size <= IN_MEMORY_MAX_BYTES
    tmp = {s: out_dir / f"_parsed-{s}.parquet" for s in SPLITS}

    # Pass 1: parse and validate every line once, into one frame per split: in memory, or as
    # one intermediate file each (lz4: written and read once, so cheap compression beats
    # small files). split_by order: the first split[0] of the lines train, the next
    # validate, the rest test
    total = lines.select(pl.len()).collect(engine="streaming").item() if split_by == "order" else None
    parsed = _parsed(lines, seed, split, total)
    per_split = [parsed.filter(pl.col("_split") == code).drop("_split") for code in range(len(SPLITS))]
    try:
        if in_memory:
            kept = dict(zip(SPLITS, pl.collect_all(per_split, engine="streaming")))
            frames = {s: kept[s].lazy() for s in SPLITS}
        else:
            pl.collect_all(
                [q.sink_parquet(tmp[s], compression="lz4", lazy=True) for s, q in zip(SPLITS, per_split)],
                engine="streaming",
            )
            frames = {s: pl.scan_parquet(tmp[s]) for s in SPLITS}
    except pl.exceptions.PolarsError as e:  # a NUL byte splits a line: polars' text has no line
        raise text_read_error(path, e, "Criteo TSV text") from None
    first_bad, n_rows = pl.concat(list(frames.values())).select(
        pl.col("row").filter(pl.col("_bad")).min(), pl.len()
    ).collect().row(0)
    if first_bad is not None:
        raise _diagnose(path, lines, first_bad)
    if n_rows == 0:
        return {}, 0, {}

    # Pass 2: vocabularies from the train split, counted by streaming group_by.
    train = frames["train"]
    n_train = train.select(pl.len()).collect().item()
    raw_counts = pl.collect_all(
        [train.group_by(pl.col(c).alias("value")).agg(pl.len().alias("count")) for c in SPARSE],
        engine="streaming",
    )
    vocabs = {c: vocab_from_counts(df, min_count) for c, df in zip(SPARSE, raw_counts)}

    # Pass 3: values -> ids (vocabulary ids, or with ids: raw each value's stable hash; the
    # vocabulary then only sizes the full table and the counts), one output file per split.
    maps = {c: RawIds() if ids == "raw" else IdLookup(vocabs[c]) for c in SPARSE}
    rows: dict[str, int] = {}
    for s in SPLITS:
        target = out_dir / f"{s}.parquet"
        if in_memory:
            frame_ids(kept.pop(s).select("label", *DENSE, *SPARSE), maps).write_parquet(
                target, row_group_size=ROW_GROUP_ROWS, compression=SPLIT_COMPRESSION
            )
        else:
            frames[s].select(
                "label",
                *DENSE,
                *(pl.col(c).map_batches(maps[c], return_dtype=pl.Int64, is_elementwise=True) for c in SPARSE),
            ).sink_parquet(target, row_group_size=ROW_GROUP_ROWS, compression=SPLIT_COMPRESSION, engine="streaming")
            tmp[s].unlink()
        rows[s] = pl.scan_parquet(target).select(pl.len()).collect().item()

    return vocabs, n_train, rows


def preprocess_criteo(
    path: Path,
    out_dir: Path,
    *,
    name: str = "criteo",
    seed: int = 0,
    split: list[float] | None = None,
    min_count: int = 1,
    max_rows: int | None = None,
    split_by: str = "hash",
    ids: str = "vocab",
) -> DatasetSchema:
    """Write the processed dataset for ``path`` into the existing directory ``out_dir``.

    Writes the split Parquet files and counts and returns the schema (the caller writes
    ``schema.json``; ``CriteoConfig.prepare`` does this atomically through the cache).

    Example::

        schema = preprocess_criteo(Path("train.txt"), Path("/tmp/out"), seed=0)
    """
    path = Path(path)
    split = list(split) if split is not None else [0.8, 0.1, 0.1]
    require_file(path, "a Criteo TSV file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, no rows")
    args: dict[str, Any] = dict(seed=seed, split=split, min_count=min_count, max_rows=max_rows, split_by=split_by,
                                ids=ids)  # fmt: skip
    done = _cpu_pipeline(path, out_dir, **args)
    vocabs, n_train, rows = done if done is not None else _polars_pipeline(path, out_dir, **args)
    if sum(rows.values()) == 0:
        raise DataError(f"{path}: empty file, no rows")

    counts = {}
    for c in SPARSE:
        v = vocabs[c]
        oov = n_train - int(v["count"].sum())  # empty, rare: everything that maps to 0
        counts[c] = pl.concat(
            [pl.DataFrame({"id": [0], "count": [oov]}), v.select("id", "count")],
            how="vertical_relaxed",
        )
    write_counts(out_dir / COUNTS_FILE, counts)

    source: dict[str, Any] = {"format": "criteo-tsv", **file_fingerprint(path)}
    if path.stat().st_size <= SHA256_MAX_BYTES:
        source["sha256"] = sha256_file(path)
    return DatasetSchema(
        name=name,
        dense=list(DENSE),
        sparse=[SparseField(c, vocabs[c].height + 1) for c in SPARSE],
        rows=rows,
        source=source,
        params={
            "seed": seed,
            "split": split,
            "min_count": min_count,
            "max_rows": max_rows,
            **({"split_by": split_by} if split_by != "hash" else {}),
            **({"ids": ids} if ids != "vocab" else {}),
            "code_version": CODE_VERSION,
            "dense_transform": "log1p(max(x, 0)), empty -> 0",
        },
    )
