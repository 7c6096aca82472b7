"""ROBE: Random Offset Block Embedding (Desai, Chou and Shrivastava, "Random Offset Block
Embedding (ROBE) for compressed embedding tables in deep learning recommendation
systems", MLSys 2022).

One circular array A of S values holds every table. ROBE-Z (the paper's Sec. 3,
its location function with blocks of Z) reads value i of the embedding of id x of
table t as

    e_t(x)[i] = A[(h(t, x, floor(i / Z)) + i mod Z) mod S],

so each chunk of Z dims is Z consecutive values of A starting at a hashed offset,
wrapping round the array's end; chunks of different ids overlap wherever their
windows do. Here h(t, x, j) is function (t, j) of the seeded universal family of
``compression.hashing`` (one coefficient set per table and chunk; never Python's
``hash()``), and offsets are multiples of ``align`` values: A is a TorchRec table of
S / align rows of ``align`` values, a chunk is Z / align consecutive rows, and
``align: 1`` is the paper's any offset. The default ``align: 4`` keeps the array's
rows 16 bytes wide, which FBGEMM's fused kernels (and so row-wise sharding) need; the
windows still overlap, at a grid of 4 values instead of 1.

Inside: the (feature, chunk, row-in-chunk) lookups are virtual features whose bags are
the feature's bags; all of them read the one array, so they are stacked into one key of
``V·B`` bags (V lookups per sample) and pooled in one TorchRec lookup (one gradient);
sum pooling commutes with the concatenation, and MEAN tables are divided by their bag
sizes afterwards.

- Size: the budget sets S (``compression.sizing``, the array as one unit of all the
  tables); the bytes do not depend on Z beyond 32 bytes of hash coefficients per chunk.
  Z (``chunk``) defaults to each table's dim: one hash and one contiguous read per id,
  the cheapest form; smaller Z spreads an embedding over several windows. The smallest
  array is one chunk (Z values). A budget at or above the tables' own size gives an
  array as large as the tables (reported ``exact``), still hashed.
- Init: the sources' ``init_fn`` when the first table has one (the trainer's
  N(0, std)), else TorchRec's default for the largest source table, uniform in
  ±sqrt(1/N).
- Sharding: the array row-wise (``sharding_constraints``); with ``align`` not a
  multiple of 4 it is replicated (data-parallel), FBGEMM's fused kernels cannot hold it.
- Quantization composes: the array is a TorchRec table, so ``quantize`` makes it
  fbgemm rows of ``align`` values with their fp16 scale and bias (int8 at align 4:
  8 bytes per 4 values); the budget counts that form by default.

Ids: any int64 is hashed (negative, or beyond the declared vocabulary).

Example::

    ebc = compress(tables, RobeConfig(budget=Budget(ratio=1000)))
    ebc.describe()["array.rows"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import pooled_lookup
from compression.base import _tracing
from compression.config_checks import bounded
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import IdMappedCollection
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

UNIT = "array"  # the one sizing unit: every table lives in the array
KEY = "robe"  # the stacked key the array's TorchRec table reads


@dataclass
class RobeConfig(BudgetedConfig):
    """ROBE-Z. ``budget`` sizes the shared array; or give its ``rows`` (budget: null)."""

    method: ClassVar[str] = "robe"
    takes_raw_ids: ClassVar[bool] = True  # every id goes through the hash (exact tables: in-range ids only)
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # rows of the array (``align`` values each), instead of a budget
    rows: Optional[int] = bounded(None, ge=1)
    # Z, the values of one chunk (a divisor of every table's dim); null: each table's dim
    chunk: Optional[int] = bounded(None, ge=1)
    # offsets are multiples of this many values (1: any offset, as the paper)
    align: int = bounded(4, ge=1)

    def check(self) -> None:
        if self.chunk is not None and self.chunk % self.align:
            raise MethodConfigError(f"robe.chunk and robe.align: chunk Z={self.chunk} must be a multiple of "
                                    f"align={self.align}")  # fmt: skip

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}

    @classmethod
    def contract_examples(cls) -> list[RobeConfig]:
        return [cls(chunk=4)]


def _chunk(config: RobeConfig, t: EmbeddingBagConfig) -> int:
    return config.chunk if config.chunk is not None else t.embedding_dim


def _check(config: RobeConfig, tables: list[EmbeddingBagConfig]) -> None:
    for t in tables:
        z = _chunk(config, t)
        if z < 1 or t.embedding_dim % z or z % config.align:
            raise MethodConfigError(
                f"robe: chunk Z={z} must divide table '{t.name}''s dim {t.embedding_dim} and be a "
                f"multiple of align={config.align}"
            )


def _chunks(config: RobeConfig, tables: list[EmbeddingBagConfig]) -> int:
    """Hash functions held: one per (table, chunk)."""
    return sum(t.embedding_dim // _chunk(config, t) for t in tables)


def _array(config: RobeConfig, tables: list[EmbeddingBagConfig], rows: int) -> EmbeddingBagConfig:
    bound = math.sqrt(1 / max(t.num_embeddings for t in tables))
    return EmbeddingBagConfig(
        name="robe_array", embedding_dim=config.align, num_embeddings=rows, feature_names=[KEY],
        pooling=PoolingType.SUM, init_fn=tables[0].init_fn, weight_init_max=bound, weight_init_min=-bound,
    )  # fmt: skip


def _full_rows(config: RobeConfig, tables: list[EmbeddingBagConfig]) -> int:
    """Rows of an array holding as many values as the tables."""
    return -(-sum(t.num_embeddings * t.embedding_dim for t in tables) // config.align)


class RobeEmbeddingBagCollection(IdMappedCollection):
    """One TorchRec table (the circular array) read by every feature's hashed chunks."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, config: RobeConfig, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="rows", config=ctx.config)
        size = plan.sizes[UNIT]
        self.num_rows = size if size is not None else _full_rows(config, tables)
        self.align = config.align
        self.ebc = EmbeddingBagCollection(tables=[_array(config, tables, self.num_rows)], device=ctx.table_device)
        table_of = {f: t for t in tables for f in t.feature_names}
        base, fns = 0, {}
        for t in tables:  # function (t, j) for chunk j of table t: features of one table share them
            n = t.embedding_dim // _chunk(config, t)
            fns[t.name] = list(range(base, base + n))
            base += n
        self.hasher = UniversalHash(base, seed=ctx.seed, device=ctx.device)
        # per feature: its chunks' hash functions, and the rows one chunk spans
        self._fns = [fns[table_of[f].name] for f in self.feature_names]
        self._span = [_chunk(config, table_of[f]) // config.align for f in self.feature_names]
        self._lookups = [len(fn) * s for fn, s in zip(self._fns, self._span)]  # V_f: rows per id
        self._mean = [table_of[f].pooling == PoolingType.MEAN for f in self.feature_names]
        self._cache: dict[tuple, torch.Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {**self.plan.describe("rows", {UNIT: self.feature_names}), "chunks": _fmt(self._fns, self._span, self.align)}

    def _const(self, key: tuple, make: Any) -> torch.Tensor:
        if _tracing():  # a traced graph holds its own constants
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _in_order(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        if keys == self.feature_names:
            return features
        at = {k: i for i, k in enumerate(keys)}
        missing = [f for f in self.feature_names if f not in at]
        if missing:
            raise KeyError(f"robe: features {missing} are missing from the input (keys: {keys})")
        return features.permute([at[f] for f in self.feature_names])

    def rows(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Array rows of every lookup, feature by feature, each ``[V_f, n_f]`` flattened:
        row (j·span + k) of feature f is chunk j's k-th row for each of its ids."""
        kv = self._in_order(features)
        device = kv.values().device
        out = []
        for i, ids in enumerate(kv.values().split(kv.length_per_key())):
            fn, span = self._fns[i], self._span[i]
            fns = self._const(("fns", i, device), lambda: torch.tensor(fn, device=device))  # noqa: B023  (called at once)
            steps = self._const(("steps", i, device), lambda: torch.arange(span, device=device))  # noqa: B023
            start = self.hasher(ids.unsqueeze(-1), self.num_rows, which=fns)  # [n, chunks]
            rows = torch.remainder(start.unsqueeze(-1) + steps, self.num_rows)  # [n, chunks, span]
            out.append(rows.reshape(ids.numel(), self._lookups[i]).t().reshape(-1))
        return torch.cat(out)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kv = self._in_order(features)
        b = kv.stride()
        per_key = kv.lengths().view(len(self.feature_names), b)
        lengths = torch.cat([per_key[i].repeat(v) for i, v in enumerate(self._lookups)])
        lpk = kv.length_per_key()
        stacked = KeyedJaggedTensor(
            keys=[KEY], values=self.rows(kv), lengths=lengths, stride=b * sum(self._lookups),
            length_per_key=[sum(n * v for n, v in zip(lpk, self._lookups))],
        )  # fmt: skip
        out = pooled_lookup(self.ebc, stacked).values()  # [V·B, align]: bag (v, s) is lookup v of sample s
        out = out.view(sum(self._lookups), b, self.align).transpose(0, 1).reshape(b, -1)
        if any(self._mean):
            n = torch.cat([per_key[i].clamp(min=1).unsqueeze(1).expand(b, d) if self._mean[i]
                           else per_key.new_ones(b, d) for i, d in enumerate(self._dims)], dim=1)  # fmt: skip
            out = out / n.to(out.dtype)
        return self.keyed(out)

    def sharding_constraints(self) -> dict[str, Any]:
        """The array row-wise: every feature reads it, so its rows and lookups spread over
        all ranks (align not a multiple of 4: replicated, by ``table_constraints``)."""
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import ShardingType

        if self.align % 4:
            return {}
        return {"robe_array": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])}


def _fmt(fns: list[list[int]], spans: list[int], align: int) -> str:
    """Z per feature's chunks, e.g. '2x8,2x8' (chunks x values)."""
    return ",".join(f"{len(f)}x{s * align}" for f, s in zip(fns, spans))


@register(RobeConfig)
def build(tables: list[EmbeddingBagConfig], config: RobeConfig, ctx: BuildContext) -> RobeEmbeddingBagCollection:
    full_rows = _full_rows(config, tables)

    def costs(fmt: TableFormat) -> list[FieldCost]:
        lo = max(_chunk(config, t) // config.align for t in tables)  # one chunk's rows
        at = lambda r: fmt.table(r, config.align)  # noqa: E731
        return [FieldCost(UNIT, at(full_rows), lo, full_rows - 1, at)]

    return build_sized(
        tables, config, ctx,
        check=lambda: _check(config, tables),
        costs=costs,
        fixed=lambda fmt: UniversalHash.nbytes(_chunks(config, tables)) + fmt.collection([_array(config, tables, 1)]),
        sizes=lambda: {UNIT: int(config.rows or 0)},
        units={UNIT: [t.name for t in tables]},
        construct=lambda plan: RobeEmbeddingBagCollection(tables, plan, config, ctx),
    )  # fmt: skip
