"""Element-pruned tables stored sparse, index overhead counted, as the VLDB'24 embedding
compression benchmark stores its pruning methods' tables (PEP, DeepLight).

A table of ``rows`` x ``dim`` with ``nnz`` kept elements is held in whichever of three
forms is smallest (ties in this order):

- ``dense``:  ``rows·dim`` values;
- ``csr``:    int32 row pointers (``rows + 1``), a column index and a value per kept
  element: ``4·(rows + 1) + nnz·(c + v)`` bytes;
- ``coo``:    an int32 row index, a column index and a value per kept element, sorted by
  (row, column): ``nnz·(4 + c + v)`` bytes.

``v`` is a value's bytes (fp32 4, fp16 2, int8 1, the int8 table then holding one fp32
scale, 4 bytes); ``c`` is the smallest integer type that holds ``0..dim-1``: uint8 up to
dim 256 (1 byte: every CTR dim), int16 up to 32768, else int32. A uint8 tensor indexes as
a boolean mask in PyTorch, so columns are widened to int64 before use. CSR wins when a
table keeps more than about one element per row; at high ratios (fewer kept elements
than rows) COO does, and COO has no floor: its smallest form is one element.

The lookup is index ops only (traceable by ``torch.export``, no ``torch.sparse``): per id
the range [start, end) of its row's entries (CSR: its row pointers; COO: ``searchsorted``
of the row index), ``repeat_interleave`` to one entry per (id, kept element),
``index_add`` of the values into ``[n_ids, dim]`` (every other element 0), then each bag
pooled (sum or mean) exactly as the masked dense model pools.

Example::

    layout = choose(rows=5000, dim=8, nnz=400, precision="fp32")  # 'coo': 400·9 bytes
    stored_bytes(layout, 5000, 8, 400, "fp32")                   # 3600
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.bags import pool

VALUE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
ROW_INDEX_BYTES = 4  # CSR row pointers and COO row indices are int32
SCALE_BYTES = 4  # an int8 table's one fp32 scale
LAYOUTS = ("dense", "csr", "coo")
MAX_INDEX = 2**31 - 1  # int32 row pointers: a table's kept elements must fit


def column_dtype(dim: int) -> torch.dtype:
    """The smallest integer type holding every column ``0..dim-1``."""
    return torch.uint8 if dim <= 256 else torch.int16 if dim <= 32768 else torch.int32


def column_bytes(dim: int) -> int:
    return torch.empty(0, dtype=column_dtype(dim)).element_size()


def stored_bytes(layout: str, rows: int, dim: int, nnz: int, precision: str = "fp32") -> int:
    """Bytes of a table of ``rows`` x ``dim`` keeping ``nnz`` elements held as ``layout``
    (the per-table int8 scale not included)."""
    v, c = VALUE_BYTES[precision], column_bytes(dim)
    if layout == "dense":
        return rows * dim * v
    if layout == "csr":
        return ROW_INDEX_BYTES * (rows + 1) + nnz * (c + v)
    return nnz * (ROW_INDEX_BYTES + c + v)


def sparse_bytes(rows: int, dim: int, nnz: int, precision: str = "fp32") -> int:
    """The smaller of CSR and COO (non-decreasing in ``nnz``: what a budget sizes)."""
    return min(stored_bytes("csr", rows, dim, nnz, precision), stored_bytes("coo", rows, dim, nnz, precision))


def choose(rows: int, dim: int, nnz: int, precision: str = "fp32", dense: bool = True) -> str:
    """The smallest layout of a table keeping ``nnz`` elements (dense, then CSR, on ties);
    ``dense=False``: the smaller sparse one (a budget's pruned table: CSR or COO whatever
    the values' precision, since their comparison does not depend on it)."""
    layouts = LAYOUTS if dense else LAYOUTS[1:]
    return min(layouts, key=lambda layout: stored_bytes(layout, rows, dim, nnz, precision))


class SparseTable(nn.Module):
    """One table in its layout: buffers ``values`` (+ ``rowptr`` or ``rows``, ``cols``;
    ``scale`` when int8), the only tensors it holds."""

    values: torch.Tensor
    rowptr: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    scale: torch.Tensor

    def __init__(self, rows: int, dim: int, nnz: int, layout: str, precision: str, device: torch.device) -> None:
        super().__init__()
        if layout != "dense" and nnz > MAX_INDEX:
            raise ValueError(f"a sparse table keeps at most {MAX_INDEX} elements (int32 indices), got {nnz}")
        self.num_rows, self.dim, self.layout, self.precision = rows, dim, layout, precision
        shape = (rows, dim) if layout == "dense" else (nnz,)
        self.register_buffer("values", torch.zeros(shape, dtype=VALUE_DTYPES[precision], device=device))
        if layout == "csr":
            self.register_buffer("rowptr", torch.zeros(rows + 1, dtype=torch.int32, device=device))
        if layout == "coo":
            self.register_buffer("rows", torch.zeros(nnz, dtype=torch.int32, device=device))
        if layout != "dense":
            self.register_buffer("cols", torch.zeros(nnz, dtype=column_dtype(dim), device=device))
        if precision == "int8":
            self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, layout: str) -> SparseTable:
        """The fp32 table of ``weight`` where ``mask`` is set (the mask's count is stored,
        zeros among the kept values included, so the bytes are those planned)."""
        rows, dim = weight.shape
        nnz = int(mask.sum())
        table = cls(rows, dim, nnz, layout, "fp32", weight.device)
        if layout == "dense":
            table.values.copy_(weight * mask)
            return table
        r, c = torch.nonzero(mask, as_tuple=True)  # row-major: sorted by (row, column)
        table.values.copy_(weight[r, c])
        table.cols.copy_(c.to(table.cols.dtype))
        if layout == "csr":
            counts = torch.bincount(r, minlength=rows)
            table.rowptr.copy_(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32))
        else:
            table.rows.copy_(r.to(torch.int32))
        return table

    @torch.no_grad()
    def quantize_(self, precision: str) -> None:
        """fp32 values to ``precision``: fp16, or int8 codes round(v / s), s = max|v| / 127
        (symmetric, one scale for the table, so a pruned 0 stays exactly 0)."""
        if self.precision != "fp32":
            raise ValueError(f"table already held as {self.precision}")
        v = self.values
        if precision == "int8":
            amax = float(v.abs().max()) if v.numel() else 0.0
            scale = amax / 127 if amax > 0 else 1.0
            self.values = torch.round(v / scale).clamp(-127, 127).to(torch.int8)
            self.register_buffer("scale", torch.full((1,), scale, dtype=torch.float32, device=v.device))
        else:
            self.values = v.to(VALUE_DTYPES[precision])
        self.precision = precision

    def _values(self, pos: torch.Tensor | None) -> torch.Tensor:
        v = self.values if pos is None else self.values[pos]
        return v.float() * self.scale if self.precision == "int8" else v.float()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids``, [len(ids), dim] (pruned elements 0)."""
        if self.layout == "dense":
            return self._values(None)[ids]
        if self.layout == "csr":
            start = self.rowptr[ids].to(torch.int64)
            count = self.rowptr[ids + 1].to(torch.int64) - start
        else:
            key = ids.to(torch.int32)
            start = torch.searchsorted(self.rows, key)
            count = torch.searchsorted(self.rows, key, right=True) - start
        n = ids.numel()
        owner = torch.repeat_interleave(torch.arange(n, device=ids.device), count)
        first = torch.cumsum(count, 0) - count
        pos = start[owner] + torch.arange(owner.numel(), device=ids.device) - first[owner]
        flat = owner * self.dim + self.cols[pos].to(torch.int64)
        out = torch.zeros(n * self.dim, device=ids.device).index_add(0, flat, self._values(pos))
        return out.view(n, self.dim)


class SparseTables(nn.Module):
    """Every table in its own layout; KJT in, pooled ``KeyedTensor`` out (the deployed form
    of the element-pruning methods)."""

    def __init__(self, tables: list[EmbeddingBagConfig], parts: list[SparseTable], feature_order: list[str]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({t.name: p for t, p in zip(tables, parts)})
        self.feature_order = feature_order
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        self._pooling = {t.name: t.pooling for t in tables}

    def quantize_(self, precision: str) -> None:
        for name in self.tables:
            self.table(name).quantize_(precision)

    def table(self, name: str) -> SparseTable:
        part = self.tables[name]
        assert isinstance(part, SparseTable)
        return part

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        d = features.to_dict()
        batch = features.stride()
        out = []
        for f in self.feature_order:
            name = self._table_of[f]
            rows = self.table(name).lookup(d[f].values())
            out.append(pool(rows, d[f].lengths(), batch, self._pooling[name]))
        return KeyedTensor(keys=self.feature_order, length_per_key=[o.shape[1] for o in out], values=torch.cat(out, dim=1))
