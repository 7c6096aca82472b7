"""The processed-dataset contract every loader writes and every consumer reads.

A processed dataset is a directory::

    schema.json                  fields, cardinalities, row counts, provenance
    train.parquet val.parquet test.parquet
    counts.parquet               per-(field, id) frequency in the train split

Parquet columns: ``label`` (float32, 0/1), one float32 column per dense field,
one int64 column per single-valued sparse field, one ``list<int64>`` column per
multi-hot (jagged) sparse field. Ids of field ``f`` lie in ``[0, cardinality_f)``;
id 0 (``oov_id``) stands for rare, unseen and empty values. Ids 1.. are ordered by
descending train frequency, so "the top-k ids" of a field are ids 1..k.

Example::

    ds = ProcessedDataset.open(path)
    ds.schema.sparse[0].cardinality
    ds.counts("C1")[:10]          # train frequency of ids 0..9
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from compression.errors import EmbcompError

SPLITS = ("train", "val", "test")
SCHEMA_FILE = "schema.json"
COUNTS_FILE = "counts.parquet"
FORMAT_VERSION = 1


class DataError(EmbcompError, ValueError):
    """Bad input data: the message names the file, line, field or id."""


@dataclass(frozen=True)
class SparseField:
    """One categorical feature: its name, id-space size and whether a row holds a list."""

    name: str
    cardinality: int
    multi_hot: bool = False


@dataclass
class DatasetSchema:
    """Fields and sizes of a processed dataset (what ``schema.json`` holds)."""

    name: str
    dense: list[str]
    sparse: list[SparseField]
    rows: dict[str, int]
    label: str = "label"
    oov_id: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def cardinality(self, name: str) -> int:
        for f in self.sparse:
            if f.name == name:
                return f.cardinality
        raise KeyError(f"dataset '{self.name}' has no sparse field '{name}'")

    @property
    def raw_ids(self) -> bool:
        """True when the sparse columns hold raw 64-bit value hashes (``ids: raw``), not
        vocabulary ids; ``cardinality`` then counts the train split's distinct values + 1."""
        return self.params.get("ids", "vocab") == "raw"

    def vocabulary_bytes(self) -> int:
        """What mapping raw values to these ids costs a serving system: 16 bytes per
        vocabulary entry (a 64-bit value and a 64-bit id, a hash map's lower bound), none
        when the ids are raw hashes. Reported beside a model's bytes, never in them."""
        return 0 if self.raw_ids else 16 * sum(f.cardinality - 1 for f in self.sparse)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, origin: str = "schema.json") -> DatasetSchema:
        try:
            raw = json.loads(text)
            raw["sparse"] = [SparseField(**f) for f in raw["sparse"]]
            schema = cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{origin}: not a valid dataset schema ({e})") from None
        if schema.format_version != FORMAT_VERSION:
            raise DataError(
                f"{origin}: schema format {schema.format_version}, expected {FORMAT_VERSION}; "
                "delete the cache directory to rebuild it"
            )
        return schema


@dataclass
class ProcessedDataset:
    """A processed dataset on disk: its directory and schema, counts loaded on demand."""

    root: Path
    schema: DatasetSchema

    @classmethod
    def open(cls, root: str | Path) -> ProcessedDataset:
        root = Path(root)
        path = root / SCHEMA_FILE
        if not path.is_file():
            raise DataError(f"{path}: missing; {root} is not a processed dataset")
        return cls(root=root, schema=DatasetSchema.from_json(path.read_text(), str(path)))

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise KeyError(f"unknown split '{split}'; expected one of {SPLITS}")
        return self.root / f"{split}.parquet"

    @cached_property
    def _counts(self) -> dict[str, np.ndarray]:
        import polars as pl

        df = pl.read_parquet(self.root / COUNTS_FILE)
        out: dict[str, np.ndarray] = {}
        for f in self.schema.sparse:
            sub = df.filter(pl.col("field") == f.name)
            counts = np.zeros(f.cardinality, dtype=np.int64)
            counts[sub["id"].to_numpy()] = sub["count"].to_numpy()
            out[f.name] = counts
        return out

    def counts(self, field_name: str) -> np.ndarray:
        """Train-split frequency of every id of ``field_name`` (length = cardinality)."""
        if field_name not in self._counts:
            raise KeyError(f"dataset '{self.schema.name}' has no sparse field '{field_name}'")
        return self._counts[field_name]

    def all_counts(self) -> dict[str, np.ndarray]:
        return dict(self._counts)


def embedding_tables(schema: DatasetSchema, embedding_dim: int, init_std: float | None = None) -> list:
    """One TorchRec ``EmbeddingBagConfig`` per sparse field: table ``t_<field>``.

    Multi-hot fields pool their ids with a sum (TorchRec's default pooling).
    ``init_std``: rows start as N(0, init_std^2) (FuxiCTR's default is 1e-4); None
    keeps TorchRec's default, uniform in ``±sqrt(1/rows)``.
    """
    from functools import partial

    from torch import nn
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    init_fn = partial(nn.init.normal_, mean=0.0, std=init_std) if init_std is not None else None
    return [
        EmbeddingBagConfig(
            name=f"t_{f.name}",
            embedding_dim=embedding_dim,
            num_embeddings=f.cardinality,
            feature_names=[f.name],
            init_fn=init_fn,
        )
        for f in schema.sparse
    ]
