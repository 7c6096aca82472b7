"""libFM text files (``label idx:val idx:val ...``) to a processed dataset.

Frappe and MovieLens-tag are published in this format. Labels -1/0/1 become 0/0/1.
The config gives each field as a half-open index range ``[start, end)``; a feature's
raw id within its field is ``idx - start``, and ids are assigned as for Criteo
(train vocabulary, 1.. by descending count, 0 for rare/unseen/empty).

A field is multi-hot (``list<int64>`` column) when some row holds two or more of its
indices; then a row without any gets an empty list. In a single-valued field a row
without an index gets id 0, like an empty Criteo value. There are no dense features.

Refused with a ``DataError`` naming file and line: a label other than -1/0/1, a token
that is not ``int:number``, an index in no field's range, and any value other than 1
(weighted features are not supported: the loader has no per-value weights).

The files are small (Frappe: 288k rows), so parsing is eager but vectorised.

Example::

    cfg = LibFMConfig(path="frappe.libfm", fields=[LibFMField("user", 0, 957),
                                                   LibFMField("item", 957, 5382)])
    ds = cfg.prepare(Path("data/cache"))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import polars as pl

from compression.config_checks import bounded
from recsys.data.base import DatasetConfig
from recsys.data.common import (
    assign_splits,
    build_vocab,
    cached_dataset,
    file_fingerprint,
    scan_lines,
    write_counts,
)
from recsys.data.files import require_file, text_read_error
from recsys.data.schema import (
    COUNTS_FILE,
    SPLITS,
    DataError,
    DatasetSchema,
    ProcessedDataset,
    SparseField,
)

CODE_VERSION = 1


@dataclass
class LibFMField:
    """One field of a libFM file: the indices ``start <= idx < end``."""

    name: str = ""
    start: int = 0
    end: int = 0


@dataclass
class LibFMConfig(DatasetConfig):
    """One libFM file split by seed (``path``) or three pre-split files (``*_path``).

    ``fields`` may hold ``LibFMField`` or plain dicts with ``name``, ``start``, ``end``.

    Example::

        LibFMConfig(train_path="f.train.libfm", val_path="f.validation.libfm",
                    test_path="f.test.libfm", fields=[{"name": "user", "start": 0, "end": 957}])
    """

    name: str = "libfm"
    path: Optional[str] = None
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    fields: list[LibFMField] = field(default_factory=list)
    min_count: int = bounded(1, ge=1)

    def field_list(self) -> list[LibFMField]:
        """The fields as ``LibFMField``, checked: named, non-empty, non-overlapping."""
        out = [f if isinstance(f, LibFMField) else LibFMField(**dict(f)) for f in self.fields]
        if not out:
            raise ValueError("libFM config needs at least one field {name, start, end}")
        names = [f.name for f in out]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"libFM field names must be unique and non-empty, got {names}")
        ordered = sorted(out, key=lambda f: f.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.end:
                raise ValueError(f"libFM fields '{a.name}' and '{b.name}' overlap")
        for f in out:
            if not 0 <= f.start < f.end:
                raise ValueError(f"libFM field '{f.name}': need 0 <= start < end, got [{f.start}, {f.end})")
        return out

    def files(self) -> dict[str, Path]:
        """``{"all": path}`` or ``{"train": ..., "val": ..., "test": ...}``."""
        split_paths = {"train": self.train_path, "val": self.val_path, "test": self.test_path}
        given = [s for s, p in split_paths.items() if p]
        if self.path and not given:
            files = {"all": Path(self.path)}
        elif not self.path and len(given) == 3:
            files = {s: Path(p) for s, p in split_paths.items() if p}
        else:
            raise ValueError("libFM config: give either path, or all of train_path, val_path, test_path")
        for p in files.values():
            require_file(p, "a libFM file")
        return files

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        files, fields = self.files(), self.field_list()
        key = {
            "format": "libfm",
            "code_version": CODE_VERSION,
            "files": {s: file_fingerprint(p) for s, p in files.items()},
            "fields": [asdict(f) for f in fields],
            "min_count": self.min_count,
            "seed": self.seed,
            "split": list(self.split) if "all" in files else None,
        }
        return cached_dataset(
            Path(cache_root),
            self.name,
            key,
            lambda out: preprocess_libfm(
                files, fields, out, name=self.name, seed=self.seed, split=list(self.split), min_count=self.min_count
            ),
        )


def _first_error(path: Path, checks: list[tuple[pl.DataFrame, str]]) -> DataError | None:
    """The earliest of several kinds of bad tokens; each frame has ``row``, ``pos``, ``token``."""
    found = [df.with_columns(pl.lit(i).alias("kind")) for i, (df, _) in enumerate(checks) if df.height]
    if not found:
        return None
    merged = pl.concat([df.select("row", "pos", "token", "kind") for df in found])
    first = merged.sort("row", "pos", "kind").row(0, named=True)
    return DataError(f"{path}:{first['row'] + 1}: " + checks[first["kind"]][1].format(**first))


def _read_file(path: Path, fields: list[LibFMField]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Parse one file: rows (``row``, ``label``) and tokens (``row``, ``pos``, ``field``, ``raw``)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, no rows")
    try:
        lines = scan_lines(path).collect()
    except pl.exceptions.PolarsError as e:  # a NUL byte: polars' text has no line number
        raise text_read_error(path, e, "libFM text") from None
    words = lines.select(
        pl.col("row").cast(pl.Int64),
        pl.col("line").str.replace_all(r"\s+", " ").str.strip_chars(" ").str.split(" ").alias("w"),
    )
    label_text = words.select("row", pl.col("w").list.first().alias("token"), pl.lit(0, dtype=pl.Int64).alias("pos"))
    label = label_text["token"].cast(pl.Float64, strict=False)
    label_ok = label.is_in([-1.0, 0.0, 1.0]).fill_null(False)  # unparsable -> null -> bad
    bad_label = label_text.filter(~label_ok)
    tokens = (
        words.select("row", pl.col("w").list.slice(1).alias("token"))
        .with_columns(pl.int_ranges(1, pl.col("token").list.len() + 1, dtype=pl.Int64).alias("pos"))
        .explode(["token", "pos"])
        .drop_nulls("token")
    )
    parts = pl.col("token").str.split(":")
    tokens = tokens.with_columns(
        parts.list.first().str.to_integer(strict=False).alias("idx"),
        pl.when(parts.list.len() == 2).then(parts.list.last()).cast(pl.Float64, strict=False).alias("val"),
    )
    malformed = tokens.filter(pl.col("idx").is_null() | pl.col("val").is_null())
    tokens = tokens.filter(pl.col("idx").is_not_null() & pl.col("val").is_not_null())
    weighted = tokens.filter(pl.col("val") != 1.0)
    ordered = sorted(range(len(fields)), key=lambda i: fields[i].start)
    starts = np.array([fields[i].start for i in ordered], dtype=np.int64)
    ends = np.array([fields[i].end for i in ordered], dtype=np.int64)
    idx = tokens["idx"].to_numpy()
    slot = np.clip(np.searchsorted(starts, idx, side="right") - 1, 0, len(starts) - 1)
    inside = (idx >= starts[slot]) & (idx < ends[slot])
    outside = tokens.filter(pl.Series(~inside))
    error = _first_error(
        path,
        [
            (bad_label, "label {token!r} is not -1, 0 or 1"),
            (malformed, "token {token!r} is not index:value"),
            (outside.with_columns(pl.col("idx").cast(pl.String).alias("token")), "index {token} is in no field's range"),
            (weighted, "token {token!r}: value is not 1 (weighted features are not supported)"),
        ],
    )
    if error is not None:
        raise error
    field_of = np.array(ordered, dtype=np.int32)[slot]
    tokens = tokens.select(
        "row",
        "pos",
        pl.Series("field", field_of, dtype=pl.Int32),
        (pl.col("idx") - pl.Series(starts[slot])).alias("raw"),
    )
    rows = label_text.select("row", (label == 1.0).cast(pl.Float32).alias("label"))
    return rows, tokens


def preprocess_libfm(
    files: dict[str, Path],
    fields: list[LibFMField],
    out_dir: Path,
    *,
    name: str = "libfm",
    seed: int = 0,
    split: list[float] | None = None,
    min_count: int = 1,
) -> DatasetSchema:
    """Write the processed dataset of ``files`` (``{"all": p}`` or per split) into ``out_dir``.

    Example::

        preprocess_libfm({"all": Path("x.libfm")}, [LibFMField("a", 0, 10)], Path("/tmp/out"))
    """
    split = list(split) if split is not None else [0.8, 0.1, 0.1]
    row_frames, token_frames = [], []
    for offset, (which, path) in enumerate(files.items()):
        rows, tokens = _read_file(path, fields)
        codes = (
            assign_splits(rows["row"].to_numpy(), seed, split)
            if which == "all"
            else np.full(rows.height, SPLITS.index(which), dtype=np.int8)
        )
        # a global row key: (file, line) keeps rows of different files apart
        key = pl.col("row") + offset * (1 << 40)
        row_frames.append(rows.with_columns(key.alias("row"), pl.Series("split", codes)))
        token_frames.append(tokens.with_columns(key.alias("row")))
    rows, tokens = pl.concat(row_frames), pl.concat(token_frames)
    train_rows = rows.filter(pl.col("split") == 0)["row"]

    columns, sparse, counts = [], [], {}
    for i, f in enumerate(fields):
        tf = tokens.filter(pl.col("field") == i)
        vocab = build_vocab(tf.filter(pl.col("row").is_in(train_rows.implode()))["raw"], min_count)
        tf = tf.join(vocab.select(pl.col("value").alias("raw"), "id"), on="raw", how="left", maintain_order="left")
        tf = tf.with_columns(pl.col("id").fill_null(0))
        multi = tf.height > 0 and tf["row"].n_unique() < tf.height
        if multi:
            per_row = tf.group_by("row", maintain_order=True).agg(pl.col("id").alias(f.name))
            fill = pl.lit([], dtype=pl.List(pl.Int64))  # no index of this field in the row
        else:
            per_row = tf.select("row", pl.col("id").alias(f.name))
            fill = pl.lit(0, dtype=pl.Int64)
        joined = rows.select("row").join(per_row, on="row", how="left", maintain_order="left")
        col = joined.select(pl.col(f.name).fill_null(fill))[f.name]
        columns.append(col)
        sparse.append(SparseField(f.name, vocab.height + 1, multi_hot=multi))
        train_ids = col.filter(rows["split"] == 0)
        if multi:
            train_ids = train_ids.explode().drop_nulls()
        counts[f.name] = train_ids.value_counts(name="count").rename({f.name: "id"}).sort("id")

    data = pl.DataFrame([rows["label"], *columns])
    sizes = {}
    for code, s in enumerate(SPLITS):
        part = data.filter(rows["split"] == code)
        part.write_parquet(out_dir / f"{s}.parquet")
        sizes[s] = part.height
    write_counts(out_dir / COUNTS_FILE, counts)
    return DatasetSchema(
        name=name,
        dense=[],
        sparse=sparse,
        rows=sizes,
        source={"format": "libfm", "files": {s: file_fingerprint(p) for s, p in files.items()}},
        params={
            "seed": seed,
            "split": split if "all" in files else None,
            "min_count": min_count,
            "fields": [asdict(f) for f in fields],
            "code_version": CODE_VERSION,
        },
    )
