"""Datasets: raw formats to a cached, processed Parquet dataset plus schema, and batches."""

from recsys.data.base import DatasetConfig
from recsys.data.loader import BatchLoader
from recsys.data.schema import DataError, DatasetSchema, ProcessedDataset, SparseField

__all__ = [
    "BatchLoader",
    "DataError",
    "DatasetConfig",
    "DatasetSchema",
    "ProcessedDataset",
    "SparseField",
]
