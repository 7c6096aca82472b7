"""Tables of row segments at their own dims: the deployed form of AutoDim and AutoSrh.

A source table's ids are put in an order (their rank: the id itself, or its place in a
frequency order held as an int32 remap, 4 bytes an id) and cut into segments of
consecutive ranks [start, stop). Each segment is one TorchRec table of its rows that
holds some of the source table's output columns (``dims``, positions in ``[0, width)``);
its pooled output is scattered back to those columns and the rest are zero. So a
frequent segment may keep more dims than a rare one (AutoSrh's groups), or the first r
ids one dim more than the rest (how AutoDim spends the last bytes of a budget).

``route`` is the id transform: each feature ``f`` becomes keys ``f__s<i>``, one per
segment, each id going to the key of its segment (as its row in the segment, or as
itself when the segments share one table, AutoSrh's search). Sizes stay static (ids are
reordered, none dropped), so ``torch.export`` traces it; a segment of no dims keeps its
key, which no table reads (TorchRec's collections ignore unknown keys).

Example::

    segs = {"t": [Segment(0, 10, (0, 1, 2, 3)), Segment(10, 100, (0,))]}
    st = SegmentTables(tables, segs, {"t": 4}, {"t": None}, device)
    st(kjt)["f"]      # [B, 4]: ids 0..9 hold 4 dims, ids 10..99 only the first
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.bags import pooled_lookup
from compression.deployed import TableFormat
from compression.formats import BITS

RANK_BYTES = 4  # the frequency-order remap is int32
INDEX_BYTES = 8  # segment starts and output columns are int64


@dataclass(frozen=True)
class Segment:
    """Ranks [start, stop) of a source table, holding output columns ``dims``."""

    start: int
    stop: int
    dims: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.stop - self.start


def pack_unit(fmt: TableFormat) -> int:
    """Values a byte packs in ``fmt`` (int4: 2, int2: 4): a table's dim must be a multiple of it."""
    bits = BITS[fmt.precision]
    return 8 // bits if bits < 8 else 1


def segment_key(feature: str, i: int) -> str:
    return f"{feature}__s{i}"


def route(
    features: KeyedJaggedTensor,
    order: Sequence[tuple[str, torch.Tensor | None, torch.Tensor]],
    local: bool,
) -> KeyedJaggedTensor:
    """``features`` keyed per segment: for each (feature, rank remap or None, segment
    starts) of ``order``, keys ``f__s<i>`` holding the ids of segment i, as their row in
    the segment (``local``) or as they are."""
    d = features.to_dict()
    batch = features.stride()
    keys, values, lengths = [], [], []
    for f, rank, starts in order:
        jt = d[f]
        ids, lens = jt.values(), jt.lengths()
        r = ids if rank is None else rank[ids].to(torch.int64)
        seg = torch.bucketize(r, starts[1:], right=True)
        sample = torch.repeat_interleave(
            torch.arange(batch, device=ids.device), lens.to(torch.int64), output_size=ids.numel()
        )
        key = seg * batch + sample
        perm = torch.argsort(key, stable=True)
        values.append((r - starts[seg])[perm] if local else ids[perm])
        n = starts.numel()
        lengths.append(torch.zeros(n * batch, dtype=lens.dtype, device=ids.device).index_add_(0, key, torch.ones_like(key, dtype=lens.dtype)))
        keys += [segment_key(f, i) for i in range(n)]
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=batch)


def segment_configs(tables: Sequence[EmbeddingBagConfig], segments: Mapping[str, Sequence[Segment]]) -> list[EmbeddingBagConfig]:
    """One SUM-pooled table per segment that holds any dims."""
    return [
        EmbeddingBagConfig(name=f"{t.name}__s{i}", embedding_dim=len(s.dims), num_embeddings=s.rows,
                           feature_names=[segment_key(f, i) for f in t.feature_names], pooling=PoolingType.SUM,
                           init_fn=t.init_fn)
        for t in tables for i, s in enumerate(segments[t.name]) if s.dims
    ]  # fmt: skip


def segment_bytes(
    tables: Sequence[EmbeddingBagConfig], segments: Mapping[str, Sequence[Segment]], remapped: set[str], fmt: TableFormat
) -> int:
    """Bytes ``SegmentTables`` holds, its tables in ``fmt``: the segment tables, the int32
    remap of each table in ``remapped``, each table's segment starts and output columns."""
    configs = segment_configs(tables, segments)
    total = sum(fmt.table(c.num_embeddings, c.embedding_dim, len(c.feature_names)) for c in configs)
    total += fmt.collection(configs) if configs else 0
    for t in tables:
        segs = segments[t.name]
        total += RANK_BYTES * t.num_embeddings if t.name in remapped else 0
        total += INDEX_BYTES * (len(segs) + sum(len(s.dims) for s in segs))
    return total


class SegmentTables(nn.Module):
    """Per source table, TorchRec tables of its segments; ``forward`` gives each feature's
    pooled ``[B, width]`` (SUM), every segment's columns at its ``dims``, zero elsewhere."""

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        segments: Mapping[str, Sequence[Segment]],
        widths: Mapping[str, int],
        ranks: Mapping[str, torch.Tensor | None],
        device: torch.device,
        table_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.segments = {t.name: list(segments[t.name]) for t in tables}
        self.widths = dict(widths)
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        self.features = [f for t in tables for f in t.feature_names]
        configs = segment_configs(tables, self.segments)
        if not configs:
            raise ValueError("segment tables need at least one segment holding a dim")
        self.ebc = EmbeddingBagCollection(tables=configs, device=table_device or device)
        self.remapped = {t.name for t in tables if ranks.get(t.name) is not None}
        for t in tables:
            segs = self.segments[t.name]
            rank = ranks.get(t.name)
            if rank is not None:
                self.register_buffer(f"rank__{t.name}", rank.to(torch.int32).to(device), persistent=False)
            self.register_buffer(f"starts__{t.name}", torch.tensor([s.start for s in segs], dtype=torch.int64, device=device),
                                 persistent=False)  # fmt: skip
            cols = [c for s in segs for c in s.dims]
            self.register_buffer(f"cols__{t.name}", torch.tensor(cols, dtype=torch.int64, device=device), persistent=False)

    def rank(self, table: str) -> torch.Tensor | None:
        return getattr(self, f"rank__{table}") if table in self.remapped else None

    def table(self, name: str, i: int) -> torch.Tensor:
        """The weight of segment ``i`` of source table ``name``."""
        return self.ebc.embedding_bags[f"{name}__s{i}"].weight

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        order = [(f, self.rank(self._table_of[f]), getattr(self, f"starts__{self._table_of[f]}")) for f in self.features]
        pooled = pooled_lookup(self.ebc, route(features, order, local=True)).to_dict()
        batch = features.stride()
        out = {}
        for f in self.features:
            t = self._table_of[f]
            parts = [pooled[segment_key(f, i)] for i, s in enumerate(self.segments[t]) if s.dims]
            x = torch.cat(parts, dim=1)
            zero = torch.zeros(batch, self.widths[t], dtype=x.dtype, device=x.device)
            out[f] = zero.index_add(1, getattr(self, f"cols__{t}"), x)
        return out
