"""Batches straight from processed Parquet to TorchRec's ``Batch`` (dense, KJT, labels).

No per-row Python: a split (or, streaming, one Parquet row group at a time) is held as
column arrays, and a batch is a numpy gather turned into one ``KeyedJaggedTensor``.
The order of an epoch is a pure function of ``(seed, epoch)``, so a resumed run can
skip to the batch it stopped at and see the same data as an uninterrupted one.

Example::

    loader = BatchLoader(ds, "train", batch_size=512, shuffle=True, seed=0)
    for batch in loader.epoch(0):
        logits = model(batch.dense_features, batch.sparse_features)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.schema import DatasetSchema, ProcessedDataset

# Splits whose Parquet file is larger than this stream row group by row group.
IN_MEMORY_LIMIT_BYTES = 2 << 30
# Label of the empty samples that pad a rank's part of a batch (``shard``): no sample.
PAD_LABEL = -1.0


@dataclass
class Columns:
    """One chunk of a split as arrays: what a batch is gathered from."""

    labels: np.ndarray  # float32 [N]
    dense: np.ndarray  # float32 [N, n_dense]
    single: np.ndarray  # int64 [N, n_single]
    multi: list[tuple[np.ndarray, np.ndarray]]  # per multi-hot field: (offsets [N+1], values)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_arrow(cls, table, schema: DatasetSchema) -> Columns:
        n = table.num_rows
        labels = table.column(schema.label).to_numpy().astype(np.float32, copy=False)
        dense = np.empty((n, len(schema.dense)), dtype=np.float32)
        for j, name in enumerate(schema.dense):
            dense[:, j] = table.column(name).to_numpy()
        singles = [f.name for f in schema.sparse if not f.multi_hot]
        single = np.empty((n, len(singles)), dtype=np.int64)
        for j, name in enumerate(singles):
            single[:, j] = table.column(name).to_numpy()
        multi = []
        for f in schema.sparse:
            if f.multi_hot:
                col = table.column(f.name).combine_chunks()
                offsets = col.offsets.to_numpy().astype(np.int64)
                values = col.values.to_numpy().astype(np.int64)
                multi.append((offsets - offsets[0], values[offsets[0] : offsets[-1]]))
        return cls(labels, dense, single, multi)


class BatchBuilder:
    """Turns row indices of a ``Columns`` chunk into a TorchRec ``Batch``."""

    def __init__(self, schema: DatasetSchema) -> None:
        self.keys = schema.sparse_names
        # position of each sparse field among single-valued / multi-hot columns
        self._slots: list[tuple[bool, int]] = []
        n_single = n_multi = 0
        for f in schema.sparse:
            if f.multi_hot:
                self._slots.append((True, n_multi))
                n_multi += 1
            else:
                self._slots.append((False, n_single))
                n_single += 1
        self.all_single = n_multi == 0

    def __call__(self, cols: Columns, idx: np.ndarray) -> Batch:
        b = len(idx)
        if self.all_single:
            values = np.ascontiguousarray(cols.single[idx].T).reshape(-1)
            lengths = np.ones(b * len(self.keys), dtype=np.int32)
        else:
            vals, lens = [], []
            for is_multi, j in self._slots:
                if is_multi:
                    offsets, flat = cols.multi[j]
                    starts = offsets[idx]
                    ln = offsets[idx + 1] - starts
                    total = int(ln.sum())
                    # gather variable-length rows: position = start of its row + rank inside it
                    row_base = np.repeat(starts - (np.cumsum(ln) - ln), ln)
                    vals.append(flat[row_base + np.arange(total)])
                    lens.append(ln.astype(np.int32))
                else:
                    vals.append(cols.single[idx, j])
                    lens.append(np.ones(b, dtype=np.int32))
            values = np.concatenate(vals)
            lengths = np.concatenate(lens)
        kjt = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
            lengths=torch.from_numpy(lengths),
            stride=b,
        )
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(cols.dense[idx])),
            sparse_features=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(cols.labels[idx])),
        )


class BatchLoader:
    """Deterministic batches of one split of a processed dataset.

    ``in_memory=None`` holds the split in memory when its file is under 2 GiB and
    streams row groups otherwise (shuffling row-group order and rows inside each group).

    ``shard=(rank, world_size)``: each batch of the unsharded loader (same order, same
    total size) is cut into ``world_size`` contiguous parts of equal size and this
    loader yields part ``rank``, padded at the end with empty samples (no ids, zero
    dense features, label ``PAD_LABEL``) so every rank's batch has the same size, as
    TorchRec's row-wise collectives need. Only this rank's rows are gathered.
    """

    def __init__(
        self,
        dataset: ProcessedDataset,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        in_memory: bool | None = None,
        max_batches: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shard is not None and not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.shard = shard
        self.dataset = dataset
        self.schema = dataset.schema
        self.split = split
        self.path = dataset.split_path(split)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.max_batches = max_batches
        self._file = pq.ParquetFile(self.path)
        self.num_rows = self._file.metadata.num_rows
        if in_memory is None:
            in_memory = self.path.stat().st_size <= IN_MEMORY_LIMIT_BYTES
        self.in_memory = in_memory
        self._build = BatchBuilder(self.schema)
        self._cols: Columns | None = None

    def __len__(self) -> int:
        if self.in_memory:
            n = -(-self.num_rows // self.batch_size)
        else:
            md = self._file.metadata
            n = sum(-(-md.row_group(i).num_rows // self.batch_size) for i in range(md.num_row_groups))
        return n if self.max_batches is None else min(n, self.max_batches)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, 0x5EED])

    def _chunks(self, epoch: int) -> Iterator[tuple[Columns, np.random.Generator | None]]:
        rng = self._rng(epoch) if self.shuffle else None
        if self.in_memory:
            if self._cols is None:
                self._cols = Columns.from_arrow(self._file.read(), self.schema)
            yield self._cols, rng
            return
        groups = np.arange(self._file.metadata.num_row_groups)
        if rng is not None:
            groups = rng.permutation(groups)
        for g in groups:
            yield Columns.from_arrow(self._file.read_row_group(int(g)), self.schema), rng

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of one epoch, beginning at batch ``start_batch`` (for resume)."""
        seen = 0
        limit = len(self)
        for cols, rng in self._chunks(epoch):
            n = len(cols)
            order = rng.permutation(n) if rng is not None else np.arange(n)
            for lo in range(0, n, self.batch_size):
                if seen >= limit:
                    return
                if seen >= start_batch:
                    idx = order[lo : lo + self.batch_size]
                    yield self._build(cols, idx) if self.shard is None else self._part(cols, idx)
                seen += 1

    def _part(self, cols: Columns, idx: np.ndarray) -> Batch:
        """This rank's part of the batch ``idx``, padded to ``ceil(len(idx) / world_size)``."""
        rank, world = self.shard  # type: ignore[misc]
        size = -(-len(idx) // world)
        mine = idx[rank * size : (rank + 1) * size]
        return pad_batch(self._build(cols, mine), size - len(mine))

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def pad_batch(batch: Batch, n: int) -> Batch:
    """``batch`` with ``n`` empty samples appended (no ids, zero dense, label ``PAD_LABEL``)."""
    if n == 0:
        return batch
    kjt = batch.sparse_features
    keys, b = kjt.keys(), kjt.stride()
    lengths = kjt.lengths().view(len(keys), b)
    lengths = torch.cat([lengths, lengths.new_zeros(len(keys), n)], dim=1).reshape(-1)
    dense = batch.dense_features
    return Batch(
        dense_features=torch.cat([dense, dense.new_zeros(n, dense.shape[1])]),
        sparse_features=KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=lengths, stride=b + n),
        labels=torch.cat([batch.labels, batch.labels.new_full((n,), PAD_LABEL)]),
    )
