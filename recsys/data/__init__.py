"""Datasets: raw formats to a cached, processed Parquet dataset plus schema, and batches.

``BatchLoader`` is imported lazily: it pulls in torch, which the pure data pipeline
(preprocessing, benchmarks) does not need.
"""

from recsys.data.base import DatasetConfig
from recsys.data.schema import DataError, DatasetSchema, ProcessedDataset, SparseField

__all__ = [
    "BatchLoader",
    "DataError",
    "DatasetConfig",
    "DatasetSchema",
    "ProcessedDataset",
    "SparseField",
]


def __getattr__(name: str):
    if name == "BatchLoader":
        from recsys.data.loader import BatchLoader

        return BatchLoader
    raise AttributeError(f"module 'recsys.data' has no attribute '{name}'")
