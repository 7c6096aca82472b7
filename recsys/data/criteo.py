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

The pipeline is polars lazy and streaming (bounded memory for a 200M-row day):

1. scan lines -> validate and parse -> one intermediate Parquet per split,
2. per-field streaming ``group_by`` on the train intermediate -> vocabularies,
3. map values to ids per split -> ``{train,val,test}.parquet``.

Memory is bounded by the vocabularies (hash tables of the distinct train values),
not by the number of rows. A file of at most ``IN_MEMORY_MAX_BYTES`` keeps step 1's
output in memory instead (about 0.6x the file's size as columns), and step 3 maps
each split's columns on polars' threads at once: the same output, written without the
intermediate's round trip through the disk. There, where every line is clean (as the
real data's lines are), step 1's split and parse of the lines is ``criteo_cpu.cpp``'s
(``_clean_typed``: a plain C library, no torch; about 1.2x the file's size as int64
columns while it parses); any other file, or a machine without a compiler, takes polars'
parse, which alone finds and names a bad line.

Example::

    ds = CriteoConfig(path="data/criteo-sample/train.txt").prepare(Path("data/cache"))
    ds.schema.rows        # {'train': ..., 'val': ..., 'test': ...}
"""

from __future__ import annotations

import ctypes
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
    vocab_from_counts,
    write_counts,
)
from recsys.data.files import require_file, text_read_error
from recsys.data.ids import IdLookup, RawIds, frame_ids
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
# Sources up to this size are parsed into memory, not into intermediate files (the module's
# docstring): at most about 0.6 GiB of columns beside the vocabularies.
IN_MEMORY_MAX_BYTES = 1 << 30


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
    """Lines -> typed columns, split code (``total`` rows: in file order, else by row hash)
    and a per-row ``_bad`` flag (still lazy)."""
    bad = pl.any_horizontal([e for _, e in _checks()])
    return _output(_typed(lines), pl.col("label") == "1", bad, seed, split, total)


def _output(
    typed: pl.LazyFrame, label_one: pl.Expr, bad: pl.Expr, seed: int, split: list[float], total: int | None
) -> pl.LazyFrame:
    """A typed frame (``row``, ``_I*`` and ``_C*`` integers, null where empty) -> the
    output's columns, the split code and ``_bad``."""
    dense = [
        pl.col(f"_{c}").fill_null(0).clip(lower_bound=0).cast(pl.Float64).log1p().cast(pl.Float32).alias(c)
        for c in DENSE
    ]
    return typed.select(
        pl.col("row").cast(pl.Int64),
        split_code_expr("row", seed, split, total),
        label_one.cast(pl.Float32).alias("label"),
        *dense,
        *(pl.col(f"_{c}").alias(c) for c in SPARSE),
        bad.alias("_bad"),
    )


def tsv_parser() -> ctypes.CDLL | None:
    """``criteo_cpu.cpp``, its functions' C types set (None where it is not built)."""
    lib = native.load_library(Path(__file__).with_name("criteo_cpu.cpp"), "Criteo TSV lines are parsed by polars alone")
    if lib is not None:
        lib.criteo_lines.restype = ctypes.c_int64
        lib.criteo_lines.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
        lib.criteo_parse.restype = ctypes.c_int
        lib.criteo_parse.argtypes = [ctypes.c_char_p, ctypes.c_int64, *[ctypes.c_void_p] * 3, ctypes.c_int]
    return lib


def _clean_typed(path: Path, max_rows: int | None) -> pl.LazyFrame | None:
    """The file's first ``max_rows`` lines as ``_typed`` would type them, parsed on the CPU's
    threads by ``criteo_cpu.cpp`` where every line is clean: 40 fields, the label 0 or 1,
    each integer an optional ``-`` and at most 18 digits, each id at most 15 hexadecimal
    digits, ``\\n`` line ends. None for any other file (polars' pass then finds and names a
    bad line, and reads what is unusual but right: ``+5``, ``\\r\\n``, longer numbers) or
    where the kernel is not built."""
    lib = tsv_parser()
    if lib is None:
        return None
    name, threads = str(path).encode(), pl.thread_pool_size()
    n = lib.criteo_lines(name, max_rows or 0, threads)
    if n < 0:
        return None
    label = np.empty(n, dtype=np.uint8)
    dense = np.empty((len(DENSE), n), dtype=np.int64)
    sparse = np.empty((len(SPARSE), n), dtype=np.int64)
    if not lib.criteo_parse(name, n, label.ctypes.data, dense.ctypes.data, sparse.ctypes.data, threads):
        return None
    columns = {"row": pl.Series("row", np.arange(len(label), dtype=np.uint32)), "_label1": label == 1}
    columns.update({f"_{c}": dense[j] for j, c in enumerate(DENSE)})
    columns.update({f"_{c}": sparse[j] for j, c in enumerate(SPARSE)})
    empty = [pl.when(pl.col(f"_{c}") >= 0).then(pl.col(f"_{c}")).alias(f"_{c}") for c in SPARSE]  # -1: empty
    return pl.DataFrame(columns).lazy().with_columns(empty)


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
    lines = scan_lines(path, n_rows=max_rows)
    in_memory = path.stat().st_size <= IN_MEMORY_MAX_BYTES
    tmp = {s: out_dir / f"_parsed-{s}.parquet" for s in SPLITS}

    # Pass 1: parse and validate every line once, into one frame per split: in memory, or as
    # one intermediate file each (lz4: written and read once, so cheap compression beats
    # small files). split_by order: the first split[0] of the lines train, the next
    # validate, the rest test
    clean = _clean_typed(path, max_rows) if in_memory else None
    if clean is not None:
        total = clean.select(pl.len()).collect().item() if split_by == "order" else None
        parsed = _output(clean, pl.col("_label1"), pl.lit(False), seed, split, total)
    else:
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
        raise DataError(f"{path}: empty file, no rows")

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
