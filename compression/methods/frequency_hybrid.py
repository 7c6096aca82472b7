"""Frequency-aware hybrid: exact rows for the top-k ids, hashed rows for the rest.

The idea behind CAFE (Zhang et al., SIGMOD 2024): the few ids that carry most of the
traffic keep rows of their own, the long tail shares hashed rows. Per table, the k
ids with the largest train counts (``BuildContext.counts``, summed over the table's
features) own rows 0..k-1 (in id order, found by ``searchsorted`` on a sorted buffer
of those ids: 8 bytes per exact row, counted); every other id x goes to row
k + h(x) mod M. One TorchRec table of k + M rows per source table.

The budget picks each table's rows R = k + M (``compression.sizing``), with
k = floor(exact_fraction · R) (at most R - 1, so at least one hashed row); tables that
fit their share stay exact. Or give ``top_k`` and ``hashed_rows`` for every table
(budget: null): a table with no more than ``top_k + hashed_rows`` ids (in particular
one whose vocabulary is smaller than ``top_k``) stays a plain exact table, every id
its own row, rather than an error (so one ``top_k`` serves tables of any size).

Ids: any int64. Ids outside [0, N) are never top-k, so they take hashed rows; in a
table kept exact they are hashed into [0, N). Missing counts are refused at build.

Example::

    ebc = compress(tables, FrequencyHybridConfig(), counts=dataset.counts)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import pooled_lookup
from compression.budget import Budget
from compression.config_checks import bounded
from compression.counts import table_counts
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import IdMappedCollection, KeyParams, in_range, inner_table, with_values
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

ID_BYTES = 8  # one int64 per exact id in the sorted-id buffer


@dataclass
class FrequencyHybridConfig(BudgetedConfig):
    """Top-k ids exact, the rest hashed; ``budget`` picks k and M, or give both."""

    method: ClassVar[str] = "frequency_hybrid"
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"exact_fraction": (0.25, 0.5, 0.75)}
    # share of each compressed table's rows that are exact (top-k) rows
    exact_fraction: float = 0.5
    # explicit sizes for every table (budget: null): exact ids and hashed rows
    top_k: Optional[int] = bounded(None, ge=0)
    hashed_rows: Optional[int] = bounded(None, ge=1)

    def check(self) -> None:
        # exact_fraction splits a budget's rows: checked only under one (budget: null ignores it)
        if self.budget is not None and not 0.0 <= self.exact_fraction < 1.0:
            raise MethodConfigError(f"frequency_hybrid.exact_fraction: must be >= 0 and < 1 under a "
                                    f"frequency_hybrid.budget, got {self.exact_fraction}")  # fmt: skip
        # neither given: the builder's check_exclusive says a budget or explicit sizes are needed
        if self.budget is None and (self.top_k is None) != (self.hashed_rows is None):
            raise MethodConfigError(f"frequency_hybrid.top_k and frequency_hybrid.hashed_rows: explicit sizes need "
                                    f"both (or a budget), got {self.top_k}, {self.hashed_rows}")  # fmt: skip

    def explicit_sizes(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "hashed_rows": self.hashed_rows}

    @classmethod
    def contract_examples(cls) -> list[FrequencyHybridConfig]:
        return [cls(), cls(exact_fraction=0.0, budget=Budget(ratio=5)), cls(budget=None, top_k=5, hashed_rows=20)]


def top_ids(counts: np.ndarray, k: int) -> np.ndarray:
    """The k most frequent ids (ties: the smaller id first), sorted by id."""
    return np.sort(np.argsort(-counts, kind="stable")[:k])


class HybridEmbeddingBagCollection(IdMappedCollection):
    """Per table one TorchRec table: k exact rows (top ids) then M hashed rows."""

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        plan: Plan,
        split: Callable[[int], int],
        counts: Mapping[str, np.ndarray],
        ctx: BuildContext,
    ) -> None:
        super().__init__(tables, plan, knob="rows", config=ctx.config)
        self.top_k: dict[str, int] = {}
        per_table: dict[str, dict[str, int]] = {}
        exact_ids, key_off, start = [], 0, 0
        for t in tables:
            rows = plan.sizes[t.name]
            if rows is None:
                per_table[t.name] = {"exact": 1, "base": 0, "mod": t.num_embeddings, "key_off": 0, "start": 0}
                continue
            k = split(rows)
            ids = top_ids(counts[t.name], k)
            exact_ids.append(torch.from_numpy(ids) + key_off)
            per_table[t.name] = {"exact": 0, "base": k, "mod": rows - k, "key_off": key_off, "start": start}
            self.top_k[t.name] = k
            key_off, start = key_off + t.num_embeddings, start + k
        inner = [inner_table(t, rows=plan.sizes[t.name] or t.num_embeddings) for t in tables]
        self.ebc = EmbeddingBagCollection(tables=inner, device=ctx.table_device)
        self.hasher = UniversalHash(1, seed=ctx.seed, device=ctx.device)
        keys = torch.cat(exact_ids) if exact_ids else torch.zeros(0, dtype=torch.int64)
        # (table key offset + id) of every exact id, ascending: a row's index is its position
        self.register_buffer("exact_keys", keys.to(ctx.device), persistent=False)
        pairs = [(t, f) for t in tables for f in t.feature_names]
        names = ["rows", "exact", "base", "mod", "key_off", "start"]
        values = {n: [t.num_embeddings if n == "rows" else per_table[t.name][n] for t, _ in pairs] for n in names}
        self.params = KeyParams(self.feature_names, values, device=ctx.device)
        self._any_exact = any(plan.sizes[t.name] is None for t in tables)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({f"{t}.top_k": k for t, k in self.top_k.items()})
        return out

    def rows(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The inner row of every id of ``features.values()``."""
        p = self.params.expand(features)
        ids = features.values()
        inside = in_range(ids, p["rows"])
        rows = p["base"] + self.hasher(ids, p["mod"], which=0)
        n_exact = self.exact_keys.numel()
        if n_exact:
            key = torch.where(inside, p["key_off"] + ids, -1)
            pos = torch.searchsorted(self.exact_keys, key)
            hit = self.exact_keys[pos.clamp(max=n_exact - 1)] == key
            rows = torch.where(hit, pos - p["start"], rows)
        if self._any_exact:
            rows = torch.where((p["exact"] != 0) & inside, ids, rows)
        return rows

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return pooled_lookup(self.ebc, with_values(features, self.rows(features)))


def _cost(t: EmbeddingBagConfig, split: Callable[[int], int], fmt: TableFormat) -> FieldCost:
    d, f = t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(t.num_embeddings, d, f), 1, t.num_embeddings,
                     lambda r: fmt.table(r, d, f) + ID_BYTES * split(r))  # fmt: skip


def _splitter(config: FrequencyHybridConfig) -> Callable[[int], int]:
    """The exact (top-k) rows of a compressed table of R rows: the budget's share of R
    (at least one hashed row), or the explicit ``top_k``."""
    frac, k = config.exact_fraction, config.top_k
    if config.budget is None:
        return lambda rows: int(k or 0)
    return lambda rows: min(int(frac * rows), rows - 1)


@register(FrequencyHybridConfig)
def build(tables: list[EmbeddingBagConfig], config: FrequencyHybridConfig, ctx: BuildContext) -> HybridEmbeddingBagCollection:
    counts: dict[str, np.ndarray] = {}
    split = _splitter(config)
    n_features = sum(len(t.feature_names) for t in tables)

    def check() -> None:  # the counts first: without them nothing can be sized
        counts.update({t.name: table_counts(t, ctx.counts, "frequency_hybrid") for t in tables})

    return build_sized(
        tables, config, ctx,
        check=check,
        costs=lambda fmt: [_cost(t, split, fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(1) + KeyParams.nbytes(6, n_features) + fmt.collection(tables),
        sizes=lambda: {t.name: (config.top_k or 0) + (config.hashed_rows or 0) for t in tables},
        construct=lambda plan: HybridEmbeddingBagCollection(tables, plan, split, counts, ctx),
    )  # fmt: skip
