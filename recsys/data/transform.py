"""Derived forms of a processed dataset: multi-hot fields as one id, counts as buckets,
the splits as CSV.

They exist so that another library can be measured on exactly the data embcomp trains
on. A CSV file has one value per cell, so a multi-hot field (MovieLens's genres) is
turned into one categorical field whose value is the row's set of ids (``joint``):
``joint_multi_hot`` writes that as a processed dataset of its own (same rows, same
splits; the joint field's vocabulary from train, 1.. by descending count, 0 for an
empty set or a set never seen in train). ``dense_as_categorical`` turns Criteo's
integer features into categorical fields as the BARS benchmark's Criteo protocol does
(a count ``x`` becomes ``floor(ln(x)^2)`` when ``x > 2``, else ``x`` itself), since
raw counts fed as numeric fields make the initial logits huge. ``write_csv`` writes
any processed dataset's splits as ``train.csv``, ``valid.csv``, ``test.csv`` (a
header; ``label`` as 0/1, dense features as floats, each sparse field as its id).

Example::

    flat = joint_multi_hot(ds, Path("data/cache"))        # a ProcessedDataset
    write_csv(flat, Path("out/csv"))                      # out/csv/{train,valid,test}.csv
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from recsys.data.base import DatasetConfig
from recsys.data.common import build_vocab, cached_dataset, write_counts
from recsys.data.schema import (
    COUNTS_FILE,
    SPLITS,
    DataError,
    DatasetSchema,
    ProcessedDataset,
    SparseField,
)

CODE_VERSION = 1
CSV_NAMES = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}


def joint_multi_hot(ds: ProcessedDataset, cache_root: Path) -> ProcessedDataset:
    """``ds`` with every multi-hot field replaced by one id per row (its set of ids);
    ``ds`` itself when it has no multi-hot field."""
    multi = [f.name for f in ds.schema.sparse if f.multi_hot]
    if not multi:
        return ds
    key = {"source": ds.root.name, "code_version": CODE_VERSION, "fields": multi}

    def build(out: Path) -> DatasetSchema:
        frames = {s: pl.read_parquet(ds.split_path(s)) for s in SPLITS}
        # the set as text: sorted unique ids joined by '|' (None for an empty set)
        tokens = {
            s: df.with_columns(
                pl.col(f).list.unique().list.sort().cast(pl.List(pl.String)).list.join("|").replace("", None).alias(f)
                for f in multi
            )
            for s, df in frames.items()
        }
        vocabs = {f: build_vocab(tokens["train"][f], 1) for f in multi}
        rows, counts = {}, {}
        for s, df in tokens.items():
            mapped = df.with_columns(
                pl.col(f).replace_strict(vocabs[f]["value"], vocabs[f]["id"], default=0, return_dtype=pl.Int64)
                for f in multi
            )
            mapped.write_parquet(out / f"{s}.parquet")
            rows[s] = mapped.height
            if s == "train":
                counts = {
                    f.name: mapped[f.name].value_counts(name="count").rename({f.name: "id"}).sort("id")
                    for f in ds.schema.sparse
                }
        write_counts(out / COUNTS_FILE, counts)
        sparse = [
            SparseField(f.name, vocabs[f.name].height + 1) if f.multi_hot else f for f in ds.schema.sparse
        ]
        params = {**ds.schema.params, "joint_multi_hot": multi}
        return replace(ds.schema, name=f"{ds.schema.name}-joint", sparse=sparse, rows=rows, params=params)

    return cached_dataset(Path(cache_root), f"{ds.schema.name}-joint", key, build)


def bars_bucket(x: pl.Expr) -> pl.Expr:
    """BARS's Criteo rule for an integer count: ``floor(ln(x)^2)`` above 2, else ``x``."""
    return pl.when(x > 2).then(x.cast(pl.Float64).log().pow(2).floor()).otherwise(x).cast(pl.Int64)


def dense_as_categorical(ds: ProcessedDataset, cache_root: Path) -> ProcessedDataset:
    """``ds`` with every dense feature (``log1p`` of a count, as Criteo's loader writes
    it) turned into a categorical field by ``bars_bucket``; ``ds`` when it has none."""
    if not ds.schema.dense:
        return ds
    transform = str(ds.schema.params.get("dense_transform", ""))
    if not transform.startswith("log1p"):
        raise DataError(
            f"{ds.root}: dense features are '{transform or 'not log1p counts'}'; BARS's buckets are for counts"
        )
    dense = list(ds.schema.dense)
    key = {"source": ds.root.name, "code_version": CODE_VERSION, "dense_as_categorical": dense}

    def build(out: Path) -> DatasetSchema:
        # the counts back from log1p (float32 round trip: rint), then the bucket as a value
        raw = {
            s: pl.read_parquet(ds.split_path(s)).with_columns(
                bars_bucket(pl.col(c).cast(pl.Float64).exp().sub(1).round(0)).alias(c) for c in dense
            )
            for s in SPLITS
        }
        vocabs = {c: build_vocab(raw["train"][c], 1) for c in dense}
        rows, counts = {}, {}
        for s, df in raw.items():
            mapped = df.with_columns(
                pl.col(c).replace_strict(vocabs[c]["value"], vocabs[c]["id"], default=0, return_dtype=pl.Int64)
                for c in dense
            ).select(ds.schema.label, *dense, *ds.schema.sparse_names)
            mapped.write_parquet(out / f"{s}.parquet")
            rows[s] = mapped.height
            if s == "train":
                counts = {
                    c: mapped[c].value_counts(name="count").rename({c: "id"}).sort("id")
                    for c in [*dense, *(f.name for f in ds.schema.sparse if not f.multi_hot)]
                }
                for f in ds.schema.sparse:
                    if f.multi_hot:
                        ids = mapped[f.name].explode().drop_nulls()
                        counts[f.name] = ids.value_counts(name="count").rename({f.name: "id"}).sort("id")
        write_counts(out / COUNTS_FILE, counts)
        sparse = [SparseField(c, vocabs[c].height + 1) for c in dense] + list(ds.schema.sparse)
        params = {**ds.schema.params, "dense_as_categorical": "floor(ln(x)^2) if x > 2 else x (BARS Criteo)"}
        return replace(ds.schema, name=f"{ds.schema.name}-bucketed", dense=[], sparse=sparse, rows=rows, params=params)

    return cached_dataset(Path(cache_root), f"{ds.schema.name}-bucketed", key, build)


def write_csv(ds: ProcessedDataset, out_dir: Path) -> dict[str, Path]:
    """Write the splits of ``ds`` (no multi-hot field) as CSV files with a header."""
    multi = [f.name for f in ds.schema.sparse if f.multi_hot]
    if multi:
        raise DataError(
            f"{ds.root}: multi-hot field(s) {', '.join(multi)} have no single CSV value; "
            "write joint_multi_hot(ds) instead"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    label = ds.schema.label
    paths = {}
    for split, name in CSV_NAMES.items():
        df = pl.read_parquet(ds.split_path(split)).with_columns(pl.col(label).cast(pl.Int8))
        path = out_dir / name
        tmp = path.with_name(path.name + ".tmp")
        df.select(label, *ds.schema.dense, *ds.schema.sparse_names).write_csv(tmp)
        tmp.replace(path)
        paths[split] = path
    return paths


@dataclass
class ProcessedConfig(DatasetConfig):
    """A processed dataset that already exists on disk (``root``: its directory).

    Example::

        ProcessedConfig(root="data/cache/movielens-100k-joint-ab12").prepare(Path("data/cache"))
    """

    name: str = "processed"
    root: str = ""

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        root = Path(self.root)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory (dataset.root must be a processed dataset's directory)")
        return ProcessedDataset.open(root)
