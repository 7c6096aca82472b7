"""DPQ's and MGQE's stored form: a table's shape, its bytes, the packed codes, the deployed module.

After the ``pack`` stage (``compression.methods.dpq``) a compressed table of N ids at dim
d is (Chen et al., ICML 2020, §2, eq. 1; Kang et al., WWW 2020, §3.2 for the tiers):

- its ``Shape``: D subspaces of d/D dims, K centroids (a power of two, at most 256, so a
  code is log2 K <= 8 bits), and for MGQE the cold ids' K / cold_divisor centroids and
  the number of hot ids allowed all K;
- the codebook: D·K rows of d/D dims, a TorchRec ``EmbeddingBagCollection`` table
  ``<t>__codebook`` read through one feature ``<f>__s<j>`` per subspace;
- every id's D codes, low log2(K / cold_divisor) bits each, packed LSB-first back to
  back into one uint8 array (``pack_codes``; ``unpack_codes`` reads code i from the at
  most two bytes it spans);
- MGQE: the sorted int32 hot ids and their codes' remaining high bits, packed the same
  way: code = low + high · (K / cold_divisor).

``shape_bytes`` counts exactly those tensors (what ``memory_report`` finds in
``PackedCodes``), and ``shapes_for`` lists the shapes a table can take, for the budget.

Example::

    packed = pack_codes(torch.tensor([3, 0, 2]), bits=2)   # one byte: 0b00_10_00_11
    unpack_codes(packed, torch.tensor([2]), bits=2)        # tensor([2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.bags import pooled_lookup
from compression.deployed import TableFormat
from compression.idmap import in_order, inner_table

ID_BYTES = 4  # hot ids are stored as int32
MAX_CENTROIDS = 256  # codes of at most 8 bits


class Shape(NamedTuple):
    """One table's quantization: D subspaces, K centroids, cold ids' K, hot ids kept."""

    subspaces: int
    centroids: int
    cold_centroids: int
    hot: int

    @property
    def bits(self) -> int:
        return self.centroids.bit_length() - 1

    @property
    def cold_bits(self) -> int:
        return self.cold_centroids.bit_length() - 1


# -- packed codes -------------------------------------------------------------------------
def packed_bytes(values: int, bits: int) -> int:
    """Bytes of ``values`` codes of ``bits`` bits packed back to back."""
    return -(-values * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (< 2^bits) as one uint8 array, code i at bits [i·bits, (i+1)·bits), LSB first."""
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 0 or flat.numel() == 0:
        return torch.zeros(packed_bytes(flat.numel(), bits), dtype=torch.uint8, device=codes.device)
    stream = ((flat.unsqueeze(1) >> torch.arange(bits, device=flat.device)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, index: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes number ``index`` (int64) of ``packed``: a code spans at most two bytes."""
    if bits == 0 or packed.numel() == 0:
        return torch.zeros_like(index)
    pos = index * bits
    byte = pos >> 3
    lo = packed[byte].to(torch.int64)
    hi = packed[(byte + 1).clamp(max=packed.numel() - 1)].to(torch.int64)
    return ((lo | (hi << 8)) >> (pos & 7)) & ((1 << bits) - 1)


# -- sizing --------------------------------------------------------------------------------
def shapes_for(t: EmbeddingBagConfig, hot_fraction: float, cold_divisor: int, per_byte: int) -> list[Shape]:
    """Every (D, K) a table can take: D dividing d (sub-dims that pack ``per_byte``), K a
    power of two from 2 to min(256, N)."""
    n, d = t.num_embeddings, t.embedding_dim
    out = []
    for D in range(1, d + 1):
        if d % D or (d // D) % per_byte:
            continue
        K = 2
        while min(MAX_CENTROIDS, max(2, n)) >= K:
            cold = max(2, K // cold_divisor) if hot_fraction > 0 else K
            hot = min(n, int(hot_fraction * n)) if cold < K else 0
            out.append(Shape(D, K, cold, hot))
            K *= 2
    return out


def shape_bytes(t: EmbeddingBagConfig, s: Shape, fmt: TableFormat) -> int:
    """Deployed bytes of a table as ``s``: codebook table, packed codes, hot ids and their high bits."""
    D, n = s.subspaces, t.num_embeddings
    codebook = fmt.table(D * s.centroids, t.embedding_dim // D, D * len(t.feature_names))
    return codebook + packed_bytes(n * D, s.cold_bits) + ID_BYTES * s.hot + packed_bytes(s.hot * D, s.bits - s.cold_bits)


# -- the deployed form ---------------------------------------------------------------------
def _inner(tables: list[EmbeddingBagConfig], shapes: Mapping[str, Optional[Shape]]) -> list[EmbeddingBagConfig]:
    """The deployed collection's tables: each compressed table's codebook, each exact table whole."""
    out = []
    for t in tables:
        s = shapes[t.name]
        if s is None:
            out.append(inner_table(t))
        else:
            features = [f"{f}__s{j}" for f in t.feature_names for j in range(s.subspaces)]
            out.append(inner_table(t, f"{t.name}__codebook", s.subspaces * s.centroids, t.embedding_dim // s.subspaces, features))
    return out


class PackedCodes(nn.Module):
    """Packed codes, hot ids and the codebook collection: what a DPQ module deploys."""

    def __init__(self, tables: list[EmbeddingBagConfig], shapes: Mapping[str, Optional[Shape]], device: torch.device,
                 table_device: torch.device) -> None:  # fmt: skip
        super().__init__()
        self.shapes = dict(shapes)
        self.table_of = {f: t for t in tables for f in t.feature_names}
        self.features = [f for t in tables for f in t.feature_names]
        self.dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self.ebc = EmbeddingBagCollection(tables=_inner(tables, shapes), device=table_device)
        self._inner_keys = [f for c in self.ebc.embedding_bag_configs() for f in c.feature_names]
        for t in tables:
            s = shapes[t.name]
            if s is None:
                continue
            n, D = t.num_embeddings, s.subspaces
            self.register_buffer(f"codes_{t.name}", torch.zeros(packed_bytes(n * D, s.cold_bits), dtype=torch.uint8, device=device))
            self.register_buffer(f"hot_{t.name}", torch.zeros(s.hot, dtype=torch.int32, device=device))
            self.register_buffer(f"high_{t.name}", torch.zeros(packed_bytes(s.hot * D, s.bits - s.cold_bits),
                                                               dtype=torch.uint8, device=device))  # fmt: skip

    def codes(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The [n, D] codes of ``ids`` in ``table``."""
        s = self.shapes[table]
        assert s is not None
        D = s.subspaces
        pos = (ids.unsqueeze(1) * D + torch.arange(D, device=ids.device)).reshape(-1)
        codes = unpack_codes(getattr(self, f"codes_{table}"), pos, s.cold_bits).view(-1, D)
        hot: torch.Tensor = getattr(self, f"hot_{table}")
        if hot.numel() and s.bits > s.cold_bits:
            at = torch.searchsorted(hot, ids.to(torch.int32)).clamp(max=hot.numel() - 1)
            hit = hot[at] == ids
            hpos = (at.unsqueeze(1) * D + torch.arange(D, device=ids.device)).reshape(-1)
            high = unpack_codes(getattr(self, f"high_{table}"), hpos, s.bits - s.cold_bits).view(-1, D)
            codes = codes + torch.where(hit.unsqueeze(1), high * s.cold_centroids, 0)
        return codes

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        d = features.to_dict()
        keys: list[str] = []
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        for f in self.features:
            jt, t = d[f], self.table_of[f]
            s = self.shapes[t.name]
            if s is None:
                keys.append(f)
                values.append(jt.values())
                lengths.append(jt.lengths())
                continue
            rows = self.codes(t.name, jt.values()) + torch.arange(s.subspaces, device=jt.values().device) * s.centroids
            for j in range(s.subspaces):
                keys.append(f"{f}__s{j}")
                values.append(rows[:, j])
                lengths.append(jt.lengths())
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=features.stride())
        out = in_order(pooled_lookup(self.ebc, kjt), self._inner_keys)
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=out)


