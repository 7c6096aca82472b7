"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020).

For a table of N ids and c collisions, id x has quotient q = x // c and remainder
r = x % c (int64 floor division, never float: ``/`` loses ids above 2^24). The
quotient table has ceil(N/c) rows, the remainder table c rows, and since
x = q·c + r, distinct ids in [0, N) give distinct (q, r) pairs. The two rows combine:

- ``mult`` (default): e(x) = Q[q] ⊙ R[r]. For multi-hot bags this is per id, then
  pooled: sum_x Q[q(x)] ⊙ R[r(x)] (the product of the pooled bags would not be);
  single-hot batches take one pooled lookup, where both agree.
- ``add``: e(x) = Q[q] + R[r]; ``concat``: e(x) = [Q[q] | R[r]], each half the dim
  (the dim must be even). Pooling commutes with both, so they pool first.

Both tables use TorchRec's default init, uniform in ±sqrt(1/rows) (dlrm's reference
passed the bound as the lower end, making every weight positive; not reproduced).

The budget picks c per table (c >= sqrt(N), where bytes grow with c); tables that fit
their share, or that QR cannot shrink, stay exact. Ids outside [0, N), negative
included, are first hashed into [0, N) (``compression.hashing``), so they share the
rows of a real id but never index out of range.

Example::

    ebc = compress(tables, QRConfig(budget=Budget(ratio=100)))
    ebc.describe()["t_user.collisions"]
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
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import (
    IdMappedCollection,
    KeyParams,
    column_order,
    feature_order,
    fold,
    in_order,
    inner_table,
    take_columns,
    with_values,
)
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

COMBINES = ("mult", "add", "concat")


@dataclass
class QRConfig(BudgetedConfig):
    """Quotient-remainder tables; ``budget`` picks c per table, or give ``collisions``."""

    method: ClassVar[str] = "qr"
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"combine": ("mult", "add", "concat")}
    # c, the remainder table's rows, for every table (budget: null)
    collisions: Optional[int] = bounded(None, ge=1)
    combine: str = one_of("mult", *COMBINES)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"collisions": self.collisions}

    @classmethod
    def contract_examples(cls) -> list[QRConfig]:
        return [cls(), cls(combine="add"), cls(combine="concat", budget=Budget(ratio=4)), cls(budget=None, collisions=30)]


def _dims(t: EmbeddingBagConfig, combine: str) -> tuple[int, int]:
    """(quotient dim, remainder dim)."""
    return (t.embedding_dim // 2,) * 2 if combine == "concat" else (t.embedding_dim, t.embedding_dim)


def _cost(t: EmbeddingBagConfig, combine: str, lo: int, fmt: TableFormat) -> FieldCost:
    (dq, dr), n, f = _dims(t, combine), t.num_embeddings, len(t.feature_names)
    return FieldCost(t.name, fmt.table(n, t.embedding_dim, f), lo, n,
                     lambda c: fmt.table(-(-n // c), dq, f) + fmt.table(c, dr, f))  # fmt: skip


class QREmbeddingBagCollection(IdMappedCollection):
    """Quotient and remainder TorchRec tables per source table, combined per id."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, combine: str, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="collisions", config=ctx.config)
        self.combine = combine
        quot: list[EmbeddingBagConfig] = []
        rem: list[EmbeddingBagConfig] = []
        exact: list[EmbeddingBagConfig] = []
        for t in tables:
            c, (dq, dr) = plan.sizes[t.name], _dims(t, combine)
            qf, rf = [f"{f}__q" for f in t.feature_names], [f"{f}__r" for f in t.feature_names]
            if c is None:
                exact.append(inner_table(t, features=qf))
            else:
                quot.append(inner_table(t, f"{t.name}__q", -(-t.num_embeddings // c), dq, qf))
                rem.append(inner_table(t, f"{t.name}__r", c, dr, rf))
        self._perm: list[int] | None = None
        self._runs: list[tuple[int, int, int]] | None = None
        if combine == "concat":  # each table's quotient then remainder half, table by table
            by_name = {x.name: x for x in quot + rem + exact}
            inner = [
                x
                for t in tables
                for x in ([by_name[t.name]] if t.name in by_name else [by_name[f"{t.name}__q"], by_name[f"{t.name}__r"]])
            ]
            produced = [(f, x.embedding_dim) for x in inner for f in x.feature_names]
            width = {f: w for f, w in produced}
            wanted = [
                (f"{f}__{part}", width[f"{f}__{part}"])
                for t in tables
                for f in t.feature_names
                for part in (("q",) if plan.sizes[t.name] is None else ("q", "r"))
            ]
            self._perm = column_order(produced, wanted)
        else:
            # quotient blocks of the compressed tables, then their remainder blocks (so the
            # combine is one elementwise op), then the exact tables
            inner = quot + rem + exact
            self._runs = _runs(tables, plan)
        self.ebc = EmbeddingBagCollection(tables=inner, device=ctx.table_device)
        self._inner_keys = feature_order(self.ebc)
        self.hasher = UniversalHash(1, seed=ctx.seed, device=ctx.device)
        pairs = [(t, f) for t in tables for f in t.feature_names]
        self.params = KeyParams(
            self.feature_names,
            {
                "rows": [t.num_embeddings for t, _ in pairs],
                "c": [plan.sizes[t.name] or t.num_embeddings for t, _ in pairs],
                "exact": [int(plan.sizes[t.name] is None) for t, _ in pairs],
            },
            device=ctx.device,
        )
        self._compressed_width = sum(t.embedding_dim for t, _ in pairs if plan.sizes[t.name] is not None)
        # per output column (source order): the index of its feature; columns of MEAN tables
        self._col_feature = [i for i, (t, _) in enumerate(pairs) for _ in range(t.embedding_dim)]
        self._mean_cols = [c for c, i in enumerate(self._col_feature) if pairs[i][0].pooling == PoolingType.MEAN]
        self._cache: dict[tuple, torch.Tensor] = {}

    def _const(self, name: str, values: list[int], device: torch.device) -> torch.Tensor:
        key = (name, device)
        if _tracing():  # a traced graph holds its own constants; leave the cache alone
            return torch.tensor(values, dtype=torch.int64, device=device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(values, dtype=torch.int64, device=device)
        return self._cache[key]

    def indices(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quotient row, remainder row) of every id; an exact table's row is the id."""
        p = self.params.expand(features)
        ids = fold(features.values(), p["rows"], self.hasher)
        q, r = quotient_remainder(ids, p["c"])
        return torch.where(p["exact"] != 0, ids, q), r

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        q, r = self.indices(features)
        names = features.keys()
        keys = [f"{k}__q" for k in names] + [f"{k}__r" for k in names]
        values = torch.cat([q, r])
        if self.combine != "mult" or _single_hot(features):
            out = in_order(pooled_lookup(self.ebc, with_values(features, values, keys, repeat=2)), self._inner_keys)
            return self.keyed(self._combine(out))
        return self.keyed(self._per_id(features, keys, values))

    def _combine(self, out: torch.Tensor) -> torch.Tensor:
        """Inner output to one block per feature, in source order."""
        if self.combine == "concat":
            return take_columns(out, self._perm)
        compressed = self._compressed_width
        a, b, e = out.split([compressed, compressed, out.shape[1] - 2 * compressed], dim=1)
        combined = a * b if self.combine == "mult" else a + b
        if not e.shape[1]:
            return combined
        if not compressed:
            return e
        blocks = (combined, e)
        assert self._runs is not None
        return torch.cat([blocks[src][:, lo:hi] for src, lo, hi in self._runs], dim=1)

    def _per_id(self, features: KeyedJaggedTensor, keys: list[str], values: torch.Tensor) -> torch.Tensor:
        """mult on multi-hot bags: every id its own bag of the inner lookup, then pooled."""
        lengths, lpk, batch = features.lengths(), features.length_per_key(), features.stride()
        n_keys, longest = len(lpk), max(lpk)
        lpk_t = torch.tensor(lpk, device=values.device)
        slot = torch.arange(longest, device=values.device) < lpk_t.unsqueeze(-1)  # [keys, longest]
        ones = slot.reshape(-1).to(lengths.dtype)
        inner = KeyedJaggedTensor(
            keys=keys, values=values, lengths=torch.cat([ones, ones]), stride=longest, length_per_key=lpk + lpk
        )
        per_id = self._combine(in_order(pooled_lookup(self.ebc, inner), self._inner_keys))  # [longest, D]: row j = j-th id of each key
        sample = torch.arange(batch, device=values.device).repeat(n_keys)
        bag = torch.full((n_keys, longest), batch, dtype=torch.int64, device=values.device)
        bag[slot] = torch.repeat_interleave(sample, lengths.long(), output_size=values.numel() // 2)
        col_key = self._col_keys(features.keys(), values.device)
        index = bag.index_select(0, col_key).t()  # [longest, D]: the bag each id's row pools into
        pooled = per_id.new_zeros(batch + 1, per_id.shape[1]).scatter_add_(0, index, per_id)[:batch]
        if self._mean_cols:
            cols = self._const("mean_cols", self._mean_cols, values.device)
            n = lengths.view(n_keys, -1).t().index_select(1, col_key).clamp(min=1).to(pooled.dtype)
            pooled = pooled.index_copy(1, cols, pooled.index_select(1, cols) / n.index_select(1, cols))
        return pooled

    def sharding_constraints(self) -> dict[str, Any]:
        """Quotient and remainder tables table-wise: each is small (about sqrt(N) rows)
        and read once per id, and the multi-hot ``mult`` path looks them up with one
        bag per id (a batch whose size differs per rank), which row-wise sharding's
        gradient all-gather cannot take; table-wise's all-to-all can."""
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import ShardingType

        tw = [ShardingType.TABLE_WISE.value]
        return {c.name: ParameterConstraints(sharding_types=tw)
                for c in self.ebc.embedding_bag_configs() if c.name.endswith(("__q", "__r"))}  # fmt: skip

    def _col_keys(self, keys: list[str], device: torch.device) -> torch.Tensor:
        """For each output column, the position of its feature among the KJT's keys."""
        cache = ("col_keys", tuple(keys), device)
        if cache not in self._cache:
            pos = {k: i for i, k in enumerate(keys)}
            cols = torch.tensor([pos[self.feature_names[i]] for i in self._col_feature], dtype=torch.int64, device=device)
            if _tracing():
                return cols
            self._cache[cache] = cols
        return self._cache[cache]


def _runs(tables: list[EmbeddingBagConfig], plan: Plan) -> list[tuple[int, int, int]]:
    """Output columns in source order as runs (0: combined block, 1: exact block, lo, hi)."""
    runs: list[list[int]] = []
    at = [0, 0]
    for t in tables:
        src = int(plan.sizes[t.name] is None)
        for _ in t.feature_names:
            lo, hi = at[src], at[src] + t.embedding_dim
            at[src] = hi
            if runs and runs[-1][0] == src and runs[-1][2] == lo:
                runs[-1][2] = hi
            else:
                runs.append([src, lo, hi])
    return [(a, b, c) for a, b, c in runs]


def quotient_remainder(ids: torch.Tensor, c: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = ids // c and r = ids - q·c in int64 (exact for every id, unlike float division)."""
    q = torch.div(ids, c, rounding_mode="floor")
    return q, ids - q * c


def _single_hot(features: KeyedJaggedTensor) -> bool:
    if _tracing():  # a traced graph serves every batch: the per-id path, right for both
        return False
    lengths = features.lengths()
    return lengths.numel() == 0 or int(lengths.max()) <= 1


def _check(config: QRConfig, tables: list[EmbeddingBagConfig]) -> None:
    if config.combine == "concat":
        for t in tables:
            if t.embedding_dim % 2:
                raise MethodConfigError(
                    f"qr with combine='concat' gives each of the two tables half the dim: "
                    f"dim {t.embedding_dim} of table '{t.name}' is odd"
                )


@register(QRConfig)
def build(tables: list[EmbeddingBagConfig], config: QRConfig, ctx: BuildContext) -> QREmbeddingBagCollection:
    n_features = sum(len(t.feature_names) for t in tables)

    def lo(t: EmbeddingBagConfig) -> int:
        # with a budget, c >= sqrt(N): there bytes grow with c (c + ceil(N/c) is smallest at sqrt(N))
        return 1 if config.budget is None else math.isqrt(t.num_embeddings - 1) + 1

    return build_sized(
        tables, config, ctx,
        check=lambda: _check(config, tables),
        costs=lambda fmt: [_cost(t, config.combine, lo(t), fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(1) + KeyParams.nbytes(3, n_features) + fmt.collection(tables),
        construct=lambda plan: QREmbeddingBagCollection(tables, plan, config.combine, ctx),
    )  # fmt: skip
