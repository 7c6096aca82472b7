"""Double / multi-hashing ("hash embeddings", Svenstrup et al. 2017, without weights).

Each id x is looked up through k independent hashes h_1..h_k (``compression.hashing``)
and the k rows are combined:

- ``combine="sum"``: e(x) = sum_j E_j[h_j(x) mod M]. Done as one pooled lookup: each
  id's bag entry becomes its k hashed rows, so sum pooling adds them (under MEAN
  pooling the k rows are averaged with the bag, i.e. the sum divided by k).
- ``combine="concat"``: e(x) = [E_1[h_1(x)] | ... | E_k[h_k(x)]], each part dim/k wide,
  so the output keeps the feature's dim; the dim must be divisible by k.

``tables="shared"``: the k hashes index one table of M rows per source table.
``tables="separate"``: k tables of M rows (for ``sum`` stored as k disjoint row blocks
of one TorchRec table of k·M rows: the same maths, one lookup).

The budget picks M per table (``compression.sizing``); tables that fit their share
stay exact (one plain lookup). Ids: any int64 is hashed; in an exact table ids
outside ``[0, N)`` are hashed into it (never an out-of-range lookup).

Example::

    ebc = compress(tables, DoubleHashingConfig(num_hashes=2, combine="concat"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import pooled_lookup
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import (
    IdMappedCollection,
    KeyParams,
    column_order,
    feature_order,
    in_order,
    in_range,
    inner_table,
    take_columns,
    with_values,
)
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

COMBINES = ("sum", "concat")
TABLES = ("shared", "separate")


@dataclass
class DoubleHashingConfig(BudgetedConfig):
    """k hashes per id, rows summed or concatenated; ``budget`` or ``rows`` picks M."""

    method: ClassVar[str] = "double_hashing"
    takes_raw_ids: ClassVar[bool] = True  # every id goes through the hash (exact tables: in-range ids only)
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"combine": ("sum", "concat")}
    # rows M per hash function (budget: null)
    rows: Optional[int] = None
    num_hashes: int = bounded(2, ge=1)
    combine: str = one_of("sum", *COMBINES)
    tables: str = one_of("shared", *TABLES)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}

    @classmethod
    def contract_examples(cls) -> list[DoubleHashingConfig]:
        return [
            cls(),
            cls(tables="separate"),
            cls(combine="concat"),
            cls(combine="concat", tables="separate", num_hashes=4, budget=Budget(ratio=2)),
            cls(budget=None, rows=40, num_hashes=3),
        ]


def _check(config: DoubleHashingConfig, tables: list[EmbeddingBagConfig]) -> None:
    if config.combine == "concat":
        for t in tables:
            if t.embedding_dim % config.num_hashes:
                raise MethodConfigError(
                    f"double_hashing with combine='concat' splits each feature's dim into num_hashes parts: "
                    f"dim {t.embedding_dim} of table '{t.name}' is not divisible by num_hashes={config.num_hashes}"
                )


def _cost(t: EmbeddingBagConfig, config: DoubleHashingConfig, fmt: TableFormat) -> FieldCost:
    """Bytes at M rows per hash: shared sum one M x d table, separate sum one k·M x d,
    shared concat one M x d/k (read by k keys per feature), separate concat k M x d/k."""
    k, d, f = config.num_hashes, t.embedding_dim, len(t.feature_names)
    separate = config.tables == "separate"
    if config.combine == "sum":  # (tables, rows per unit of M, dim, keys reading each table)
        n, per_m, dim, keys = 1, k if separate else 1, d, f
    else:
        n, per_m, dim, keys = (k, 1, d // k, f) if separate else (1, 1, d // k, k * f)
    return FieldCost(t.name, fmt.table(t.num_embeddings, d, f), 1, t.num_embeddings,
                     lambda m: n * fmt.table(per_m * m, dim, keys))  # fmt: skip


class DoubleHashedEmbeddingBagCollection(IdMappedCollection):
    """k seeded hashes per id into TorchRec tables; sum or concatenation of the k rows."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, config: DoubleHashingConfig, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="rows_per_hash", config=ctx.config)
        k = self.k = config.num_hashes
        self.concat = config.combine == "concat"
        self.separate = config.tables == "separate"
        inner: list[EmbeddingBagConfig] = []
        produced: list[tuple[str, int]] = []  # (feature, width) blocks in the inner output order
        for t in tables:
            m = plan.sizes[t.name]
            if m is None:
                feats = [f"{f}__0" for f in t.feature_names] if self.concat else t.feature_names
                inner.append(inner_table(t, features=feats))
                produced += [(f, t.embedding_dim) for f in t.feature_names]
            elif not self.concat:
                inner.append(inner_table(t, rows=m * (k if self.separate else 1)))
                produced += [(f, t.embedding_dim) for f in t.feature_names]
            elif self.separate:
                for j in range(k):
                    feats = [f"{f}__{j}" for f in t.feature_names]
                    inner.append(inner_table(t, f"{t.name}__{j}", m, t.embedding_dim // k, feats))
                produced += [(f"{f}__{j}", t.embedding_dim // k) for j in range(k) for f in t.feature_names]
            else:
                feats = [f"{f}__{j}" for f in t.feature_names for j in range(k)]
                inner.append(inner_table(t, rows=m, dim=t.embedding_dim // k, features=feats))
                produced += [(f"{f}__{j}", t.embedding_dim // k) for f in t.feature_names for j in range(k)]
        self.ebc = EmbeddingBagCollection(tables=inner, device=ctx.table_device)
        self._inner_keys = feature_order(self.ebc)
        self.hasher = UniversalHash(k, seed=ctx.seed, device=ctx.device)
        per_feature = {f: (plan.sizes[t.name], t.num_embeddings) for t in tables for f in t.feature_names}
        self._exact_features = {f for f, (m, _) in per_feature.items() if m is None}
        self.params = KeyParams(
            self.feature_names,
            {
                "rows": [m if m is not None else n for m, n in per_feature.values()],
                "exact": [int(m is None) for m, _ in per_feature.values()],
            },
            device=ctx.device,
        )
        wanted: list[tuple[str, int]] = []
        for t in tables:
            split = self.concat and plan.sizes[t.name] is not None
            for f in t.feature_names:
                wanted += [(f"{f}__{j}", t.embedding_dim // k) for j in range(k)] if split else [(f, t.embedding_dim)]
        self._perm = column_order(produced, wanted)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT the inner tables see: k hashed rows per id, as extra bag entries
        (sum) or as k keys per feature (concat, keys ``{feature}__{j}``)."""
        p = self.params.expand(features)
        ids, rows, exact = features.values(), p["rows"], p["exact"] != 0
        h = self.hasher(ids, rows.unsqueeze(-1))  # [n, k]
        if self.separate and not self.concat:  # hash j indexes row block j
            h = h + torch.arange(self.k, device=ids.device) * rows.unsqueeze(-1)
        if self._exact_features:
            h[:, 0] = torch.where(exact & in_range(ids, rows), ids, h[:, 0])
        if self.concat:
            names = features.keys()
            keys = [f"{key}__{j}" for j in range(self.k) for key in names]
            return with_values(features, h.t().reshape(-1), keys, repeat=self.k)
        return self._expanded(features, h, exact)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        out = in_order(pooled_lookup(self.ebc, self.remap(features)), self._inner_keys)
        return self.keyed(take_columns(out, self._perm))

    def _expanded(self, features: KeyedJaggedTensor, h: torch.Tensor, exact: torch.Tensor) -> KeyedJaggedTensor:
        """Each id's bag entry replaced by its k hashed rows (one row for exact features)."""
        lengths, lpk = features.lengths(), features.length_per_key()
        if not self._exact_features:
            return KeyedJaggedTensor(
                keys=features.keys(), values=h.reshape(-1), lengths=lengths * self.k,
                stride=features.stride(), length_per_key=[n * self.k for n in lpk],
            )
        keep = torch.arange(self.k, device=h.device) < torch.where(exact, 1, self.k).unsqueeze(-1)
        names = features.keys()
        fan = [1 if key in self._exact_features or key not in self.params else self.k for key in names]
        fan_t = torch.tensor(fan, dtype=lengths.dtype, device=lengths.device)
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=h[keep],
            lengths=(lengths.view(len(fan), -1) * fan_t.unsqueeze(-1)).reshape(-1),
            stride=features.stride(),
            length_per_key=[n * f for n, f in zip(lpk, fan)],
        )


@register(DoubleHashingConfig)
def build(
    tables: list[EmbeddingBagConfig], config: DoubleHashingConfig, ctx: BuildContext
) -> DoubleHashedEmbeddingBagCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        check=lambda: _check(config, tables),
        costs=lambda fmt: [_cost(t, config, fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(config.num_hashes) + KeyParams.nbytes(2, n_features) + fmt.collection(tables),
        construct=lambda plan: DoubleHashedEmbeddingBagCollection(tables, plan, config, ctx),
    )  # fmt: skip
