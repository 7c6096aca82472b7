"""The hashing trick (Weinberger et al. 2009): each feature's ids hashed into M rows.

Per table, an id x is looked up at row ``h(x) mod M`` of a TorchRec table of M rows,
``h`` a seeded universal hash (``compression.hashing``). The budget picks M per
table (``compression.sizing``); a table whose plain form fits its share stays exact.

Ids: every int64 is accepted. In a hashed table any id (negative, or beyond the
declared cardinality) is just hashed. In a table kept exact, ids in ``[0, N)`` keep
their own row and any other id is hashed into ``[0, N)`` (sharing a row with a real
id), never an out-of-range lookup.

Example::

    ebc = compress(tables, HashingConfig(budget=Budget(ratio=10)))
    ebc.describe()   # {'t_user.rows': 1000, 'uncompressed_fields': 'country', ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, register
from compression.bags import pooled_lookup
from compression.budget import Budget
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import IdMappedCollection, KeyParams, in_range, inner_table, with_values
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized


@dataclass
class HashingConfig(BudgetedConfig):
    """Hashing trick. ``budget`` picks each table's rows; or give ``rows`` (budget: null)."""

    method: ClassVar[str] = "hashing"
    takes_raw_ids: ClassVar[bool] = True  # every id goes through the hash (exact tables: in-range ids only)
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # rows of every hashed table (tables with fewer ids stay exact)
    rows: Optional[int] = None

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}

    @classmethod
    def contract_examples(cls) -> list[HashingConfig]:
        return [cls(), cls(budget=Budget(ratio=3, scope="table")), cls(budget=None, rows=50)]


class HashedEmbeddingBagCollection(IdMappedCollection):
    """One TorchRec table of M rows per source table; ids hashed on the way in.

    ``weighted``: the tables take per-sample weights, ``num_hashes``: functions drawn for
    the hasher (function 0 picks the row), for a variant that derives more from an id
    (``signed_hashing``'s sign)."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, ctx: BuildContext, *,
                 weighted: bool = False, num_hashes: int = 1) -> None:  # fmt: skip
        super().__init__(tables, plan, knob="rows", config=ctx.config)
        inner = [inner_table(t, rows=plan.sizes[t.name] or t.num_embeddings) for t in tables]
        self.ebc = EmbeddingBagCollection(tables=inner, is_weighted=weighted, device=ctx.table_device)
        self.hasher = UniversalHash(num_hashes, seed=ctx.seed, device=ctx.device)
        rows = {f: c.num_embeddings for c in inner for f in c.feature_names}
        exact = {f: int(plan.sizes[t.name] is None) for t in tables for f in t.feature_names}
        self.params = KeyParams(
            self.feature_names,
            {"rows": [rows[f] for f in self.feature_names], "exact": [exact[f] for f in self.feature_names]},
            device=ctx.device,
        )

    def rows(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The inner row of every id of ``features.values()``."""
        return self.lookup(features)[0]

    def lookup(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner row of every id, and whether it is an exact table's own id (own row)."""
        p = self.params.expand(features)
        ids = features.values()
        own = (p["exact"] != 0) & in_range(ids, p["rows"])
        return torch.where(own, ids, self.hasher(ids, p["rows"], which=0)), own

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return pooled_lookup(self.ebc, with_values(features, self.rows(features)))


def _cost(t: EmbeddingBagConfig, fmt: TableFormat) -> FieldCost:
    d, f = t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(t.num_embeddings, d, f), 1, t.num_embeddings, lambda m: fmt.table(m, d, f))


@register(HashingConfig)
def build(tables: list[EmbeddingBagConfig], config: HashingConfig, ctx: BuildContext) -> HashedEmbeddingBagCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        costs=lambda fmt: [_cost(t, fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(1) + KeyParams.nbytes(2, n_features) + fmt.collection(tables),
        construct=lambda plan: HashedEmbeddingBagCollection(tables, plan, ctx),
    )  # fmt: skip
