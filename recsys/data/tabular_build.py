"""The streaming pipeline of the tabular loader (configuration and roles: ``tabular.py``).

Three polars passes, each lazy and streaming, so memory is bounded by the vocabularies
(the distinct train values of each sparse column), not by the number of rows:

1. every source: parse and check each row once -> one intermediate Parquet per split
   (a single file is split by ``assign_splits`` on its row index); then the first bad row,
   if any, is diagnosed and refused;
2. the train intermediate: streaming ``group_by`` per sparse column -> vocabularies and
   counts, and the mean and standard deviation of each numeric column;
3. every split: values -> ids (``IdLookup`` for integers, an ``Enum`` cast for strings),
   numeric transforms -> ``{train,val,test}.parquet``.

Example::

    schema = preprocess_tabular(sources, cols, Path("/tmp/out"), name="clicks", seed=0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.common import (
    ROW_GROUP_ROWS,
    SPLIT_COMPRESSION,
    file_fingerprint,
    split_code_expr,
    vocab_from_counts,
    write_counts,
)
from recsys.data.ids import IdLookup, RawTextIds, string_ids
from recsys.data.schema import COUNTS_FILE, SPLITS, DataError, DatasetSchema, SparseField
from recsys.data.tabular_columns import CODE_VERSION, Columns
from recsys.data.tabular_parse import bad_flag, diagnose, parsed
from recsys.data.tabular_source import ROW, Source


def _first_pass(src: Source, cols: Columns, tmp: dict[str, Path], seed: int, split: list[float], split_by: str) -> list[Path]:
    """Parse and check ``src`` into the intermediates of its split(s); returns them."""
    lf = src.scan().select(pl.col(ROW).cast(pl.Int64), *parsed(src, cols), bad_flag(src, cols))
    if src.split == "all":
        # split_by order: the file's first split[0] of rows train, the next validate, the rest test
        total = src.scan().select(pl.len()).collect(engine="streaming").item() if split_by == "order" else None
        lf = lf.with_columns(split_code_expr(ROW, seed, split, total))
        targets = list(SPLITS)
        sinks = [
            lf.filter(pl.col("_split") == code).drop("_split").sink_parquet(tmp[s], compression="lz4", lazy=True)
            for code, s in enumerate(SPLITS)
        ]
    else:
        targets = [src.split]
        sinks = [lf.sink_parquet(tmp[src.split], compression="lz4", lazy=True)]
    try:
        pl.collect_all(sinks, engine="streaming")
    except pl.exceptions.PolarsError as e:  # ragged lines, a corrupt page: polars' text
        raise src.read_error(e) from None
    return [tmp[s] for s in targets]


def _check_rows(sources: dict[str, Source], cols: Columns, written: dict[str, list[Path]], split: list[float]) -> dict[str, int]:
    """Refuse the first bad row of the first bad file, then an empty split; rows per split."""
    rows: dict[str, int] = {}
    for which, src in sources.items():
        first_bad, n = pl.scan_parquet(written[which]).select(
            pl.col(ROW).filter(pl.col("_bad")).min(), pl.len()
        ).collect().row(0)
        if first_bad is not None:
            raise diagnose(src, cols, first_bad)
        if n == 0:
            raise DataError(f"{src.path}: no rows" + ("" if which == "all" else f" (it is the {which} split)"))
        for path, s in zip(written[which], SPLITS if which == "all" else [which]):
            rows[s] = pl.scan_parquet(path).select(pl.len()).collect().item()
    for s in SPLITS:
        if rows[s] == 0:
            src = sources["all"]
            raise DataError(
                f"{src.path}: the {s} split is empty ({sum(rows.values())} rows split {split}); "
                "give more rows or a larger fraction"
            )
    return rows


def _vocabularies(train: pl.LazyFrame, cols: Columns, where: str) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """Vocabulary and number of non-empty train values (elements, if multi-hot) per sparse column."""
    queries = [train.group_by(pl.col(c).alias("value")).agg(pl.len().alias("count")) for c in cols.categorical]
    queries += [
        train.select(pl.col(c).explode().alias("value")).group_by("value").agg(pl.len().alias("count"))
        for c in cols.multi_hot
    ]
    vocabs, present = {}, {}
    for c, counts in zip(cols.sparse, pl.collect_all(queries, engine="streaming")):
        present[c] = int(counts.filter(pl.col("value").is_not_null())["count"].sum())
        if present[c] == 0:
            raise DataError(f"{where}: column '{c}' is empty in every row")
        vocabs[c] = vocab_from_counts(counts, cols.min_counts[c])
    return vocabs, present


def _numeric_stats(train: pl.LazyFrame, cols: Columns, where: str) -> dict[str, dict[str, Any]]:
    """Per numeric column: its transform and, for ``standardise``, train mean and std.

    The statistics are rounded to float32 (the precision of the output), so that the
    same input gives the same output whatever order a library sums in.
    """
    names = list(cols.numeric)
    if not names:
        return {}
    stats = train.select(
        *(pl.col(n).count().alias(f"{n}/n") for n in names),
        *(pl.col(n).mean().alias(f"{n}/mean") for n in names),
        *(pl.col(n).std(ddof=0).alias(f"{n}/std") for n in names),
    ).collect(engine="streaming").row(0, named=True)
    out: dict[str, dict[str, Any]] = {}
    for n, transform in cols.numeric.items():
        if stats[f"{n}/n"] == 0:
            raise DataError(f"{where}: column '{n}' is empty in every row")
        entry: dict[str, Any] = {"transform": transform}
        if transform == "standardise":
            std = float(np.float32(stats[f"{n}/std"]))
            entry |= {"mean": float(np.float32(stats[f"{n}/mean"])), "std": std if std > 0 else 1.0}
        out[n] = entry
    return out


def dense_expr(name: str, stat: dict[str, Any]) -> pl.Expr:
    """A numeric column's output: float32, empty -> 0 after the transform."""
    x = pl.col(name)
    if stat["transform"] == "log1p":
        x = x.clip(lower_bound=0).log1p()
    elif stat["transform"] == "standardise":
        x = (x - stat["mean"]) / stat["std"]
    return x.fill_null(0).cast(pl.Float32).alias(name)


def _id_expr(name: str, vocab: pl.DataFrame, multi: bool, raw: bool = False) -> pl.Expr:
    dtype = pl.List(pl.Int64) if multi else pl.Int64
    if raw:  # ids: raw, each value's hash (the vocabulary only sizes the full table)
        return pl.col(name).map_batches(RawTextIds(), return_dtype=dtype, is_elementwise=True).alias(name)
    if vocab["value"].dtype == pl.String:
        expr = pl.col(name).list.eval(string_ids(pl.element(), vocab)) if multi else string_ids(pl.col(name), vocab)
        return expr.alias(name)
    return pl.col(name).map_batches(IdLookup(vocab), return_dtype=dtype, is_elementwise=True).alias(name)


def preprocess_tabular(
    sources: dict[str, Source],
    cols: Columns,
    out_dir: Path,
    *,
    name: str = "tabular",
    seed: int = 0,
    split: list[float] | None = None,
    split_by: str = "hash",
    ids: str = "vocab",
) -> DatasetSchema:
    """Write the processed dataset of ``sources`` (from ``open_sources``) into ``out_dir``.

    Writes the split Parquet files and counts and returns the schema (the caller writes
    ``schema.json``; ``TabularConfig.prepare`` does this atomically through the cache).

    Example::

        cols = cfg.columns()
        preprocess_tabular(open_sources(cfg.files(), cols), cols, Path("/tmp/out"))
    """
    split = list(split) if split is not None else [0.8, 0.1, 0.1]
    tmp = {s: out_dir / f"_parsed-{s}.parquet" for s in SPLITS}
    written = {which: _first_pass(src, cols, tmp, seed, split, split_by) for which, src in sources.items()}
    rows = _check_rows(sources, cols, written, split)

    train_src = sources.get("train", sources.get("all"))
    assert train_src is not None
    where = f"{train_src.path}" + (" (train split)" if train_src.split == "all" else "")
    train = pl.scan_parquet(tmp["train"])
    vocabs, present = _vocabularies(train, cols, where)
    stats = _numeric_stats(train, cols, where)

    for s in SPLITS:
        pl.scan_parquet(tmp[s]).select(
            "label",
            *(dense_expr(n, stats[n]) for n in cols.numeric),
            *(_id_expr(c, vocabs[c], c in cols.multi_hot, raw=ids == "raw") for c in cols.sparse),
        ).sink_parquet(
            out_dir / f"{s}.parquet", row_group_size=ROW_GROUP_ROWS, compression=SPLIT_COMPRESSION, engine="streaming"
        )
    for path in tmp.values():
        path.unlink()

    counts = {}
    for c in cols.sparse:
        v = vocabs[c]
        oov = present[c] - int(v["count"].sum())  # rare values (and empty rows, single-valued)
        if c not in cols.multi_hot:
            oov += rows["train"] - present[c]
        counts[c] = pl.concat([pl.DataFrame({"id": [0], "count": [oov]}), v.select("id", "count")], how="vertical_relaxed")
    write_counts(out_dir / COUNTS_FILE, counts)
    return DatasetSchema(
        name=name,
        dense=list(cols.numeric),
        sparse=[SparseField(c, vocabs[c].height + 1, multi_hot=c in cols.multi_hot) for c in cols.sparse],
        rows=rows,
        source={
            "format": "tabular",
            "files": {w: {"format": src.format, **file_fingerprint(src.path)} for w, src in sources.items()},
        },
        params={
            "seed": seed,
            "split": split if "all" in sources else None,
            **({"split_by": split_by} if split_by != "hash" and "all" in sources else {}),
            **({"ids": ids} if ids != "vocab" else {}),
            "label": cols.label,
            "label_threshold": cols.threshold,
            "min_counts": cols.min_counts,
            "numeric": stats,
            "multi_hot_separators": cols.multi_hot,
            "code_version": CODE_VERSION,
        },
    )
