"""Deduplication of trained rows by locality-sensitive hashing: train, merge similar rows,
train on (the VLDB'24 embedding-compression benchmark's deduplication family; the LSH is
Charikar's random-hyperplane SimHash, STOC 2002, sign(w · r) per hyperplane r).

Schedule (its own stages):

1. ``train``: the full TorchRec tables, the trainer's standard loop (above the budget
   while it runs, as a quantized config is until its ``quantize`` stage).
2. ``merge``: per compressed table, each row w (centred by the table's mean row, so the
   signs split the rows rather than their common offset) gets a b-bit signature
   s(w) = [w · r_i > 0]_{i<b}, r_i ~ N(0, I) seeded per (seed, table). The budget gives
   the table's merged row count M; b is the largest number of bits whose signatures give
   at most M buckets, and the largest buckets are then split by bit b+1 until there are
   exactly M (rows still identical at 62 bits are split by id, a no-op for the output).
   Each bucket becomes one row, the mean of its rows; ids map to their bucket's row
   through an int32 remap (4 bytes per id, counted), buckets numbered by their smallest id.
3. ``finetune``: ``finetune_epochs`` more epochs on the merged tables.

Deployed: one TorchRec table of M rows per compressed table (quantizable after training
like any method's tables) and the int32 remap. The budget counts exactly those, so the
remap bounds the ratio: 4 bytes an id against 4·d, below d x at fp32 (16 at dim 16);
1000x is refused with the smallest reachable ratio.

Example::

    ebc = compress(tables, DedupConfig(budget=Budget(ratio=4)))
    ...train...; ebc.merge()      # the trainer's ``merge`` stage does this
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, register
from compression.bags import pooled_lookup
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import MetaForm, TableFormat
from compression.idmap import IdMappedCollection, KeyParams, inner_table, with_values
from compression.memory import memory_report
from compression.quantization import refuse_aware
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized
from compression.stages import Stage, compact_then_finetune

ID_BYTES = 4  # the remap id -> merged row is int32
MAX_BITS = 62  # signatures held as int64 keys, one bit to spare for the split


@dataclass
class DedupConfig(BudgetedConfig):
    """Rows merged by LSH after a first training stage; ``budget`` picks each table's merged
    rows, or give ``rows`` for every table (budget: null)."""

    method: ClassVar[str] = "dedup"
    sized_by_stages: ClassVar[bool] = True
    # the remap's 4 bytes an id cap the ratio below the dim (the default suits dim 8)
    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=4))
    rows: Optional[int] = bounded(None, ge=1)
    finetune_epochs: int = bounded(1, ge=0)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}


def lsh_groups(rows: torch.Tensor, groups: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """(group of every row in [0, groups), signature bits used): similar rows share a group.

    Buckets of the longest signature prefix giving at most ``groups`` buckets, the largest
    split by the next bit until there are exactly ``groups``; numbered by smallest row.
    """
    n = len(rows)
    if groups >= n:
        return torch.arange(n), 0
    x = (rows - rows.mean(0)).float().cpu()
    planes = torch.randn(x.shape[1], MAX_BITS, generator=generator)
    bits = (x @ planes > 0).to(torch.int64)

    def keys(b: int) -> torch.Tensor:
        return (bits[:, :b] << torch.arange(b - 1, -1, -1)).sum(1) if b else torch.zeros(n, dtype=torch.int64)

    lo, hi = 0, MAX_BITS  # the most bits with at most `groups` buckets (monotone in b)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if torch.unique(keys(mid)).numel() <= groups else (lo, mid - 1)
    b = lo
    parent = keys(b)
    label = parent
    if b < MAX_BITS:  # split the largest buckets by bit b + 1
        child = parent * 2 + bits[:, b]
        pids, pinv, psize = torch.unique(parent, return_inverse=True, return_counts=True)
        split = torch.zeros(len(pids), dtype=torch.bool).index_fill_(0, pinv[bits[:, b] == 1], True)
        split &= torch.zeros(len(pids), dtype=torch.bool).index_fill_(0, pinv[bits[:, b] == 0], True)
        order = sorted(torch.nonzero(split).flatten().tolist(), key=lambda p: (-int(psize[p]), int(pids[p])))
        chosen = torch.zeros(len(pids), dtype=torch.bool)
        chosen[order[: groups - len(pids)]] = True
        label = torch.where(chosen[pinv], child, parent * 2)
    _, inv = torch.unique(label, return_inverse=True)
    short = groups - int(inv.max()) - 1
    if short > 0:  # rows identical at every bit: peel single rows off the largest buckets
        rank = torch.zeros(n, dtype=torch.int64)
        by = torch.argsort(inv * n + torch.arange(n))
        starts = torch.searchsorted(inv[by], inv[by])
        rank[by] = torch.arange(n) - starts
        size = torch.bincount(inv)[inv]
        cand = torch.nonzero(rank > 0).flatten()  # by rank in bucket, then larger bucket, then id
        cand = cand[torch.argsort(-size[cand], stable=True)]
        cand = cand[torch.argsort(rank[cand], stable=True)][:short]
        inv = inv.clone()
        inv[cand] = int(inv.max()) + 1 + torch.arange(len(cand))
    first = torch.full((groups,), n, dtype=torch.int64).scatter_reduce(0, inv, torch.arange(n), "amin")
    renumber = torch.empty(groups, dtype=torch.int64)
    renumber[torch.argsort(first)] = torch.arange(groups)
    return renumber[inv], b


def _merged(tables: list[EmbeddingBagConfig], plan: Plan) -> list[EmbeddingBagConfig]:
    return [inner_table(t, rows=plan.sizes[t.name] or t.num_embeddings) for t in tables]


def _remap_len(tables: list[EmbeddingBagConfig], plan: Plan) -> int:
    return sum(t.num_embeddings for t in tables if plan.sizes[t.name] is not None)


class DedupEmbeddingBagCollection(IdMappedCollection):
    """Full tables until ``merge()``, then merged tables behind an int32 remap."""

    remap: torch.Tensor

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, config: DedupConfig, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="rows", validate_ids=True, config=ctx.config)
        self.config, self.seed = config, ctx.seed
        self.ebc = EmbeddingBagCollection(tables=[inner_table(t) for t in tables], device=ctx.table_device)
        offsets, at = {}, 0
        for t in tables:
            offsets[t.name] = at
            at += t.num_embeddings if plan.sizes[t.name] is not None else 0
        pairs = [(t, f) for t in tables for f in t.feature_names]
        self.params = KeyParams(self.feature_names, {"offset": [offsets[t.name] for t, _ in pairs],
                                                     "exact": [int(plan.sizes[t.name] is None) for t, _ in pairs]},
                                device=ctx.device)  # fmt: skip
        self.register_buffer("remap", torch.zeros(0, dtype=torch.int32, device=ctx.device))
        self.merged = False
        self.lsh_bits: dict[str, int] = {}

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        if not self.merged:
            return pooled_lookup(self.ebc, features)
        p = self.params.expand(features)
        ids = features.values()
        exact = p["exact"] != 0
        rows = self.remap[torch.where(exact, 0, p["offset"] + ids)].to(torch.int64)
        return pooled_lookup(self.ebc, with_values(features, torch.where(exact, ids, rows)))

    def stages(self) -> list[Stage]:
        return compact_then_finetune(
            "merge", self.merge, lambda: memory_report(self).bytes, self.config.finetune_epochs,
            extra=lambda: {f"lsh_bits.{t}": float(b) for t, b in self.lsh_bits.items()}, train_at_budget=False,
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Merge each compressed table's rows into its planned count (in place)."""
        if self.merged:
            return
        tables = self.source_tables()
        old = self.ebc
        device = old.embedding_bags[tables[0].name].weight.device
        self.ebc = EmbeddingBagCollection(tables=_merged(tables, self.plan), device=device)
        remaps = []
        for i, t in enumerate(tables):
            w, new = old.embedding_bags[t.name].weight, self.ebc.embedding_bags[t.name].weight
            m = self.plan.sizes[t.name]
            if m is None:
                new.copy_(w)
                continue
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            group, self.lsh_bits[t.name] = lsh_groups(w.detach(), m, g)
            group = group.to(w.device)
            sums = torch.zeros_like(new).index_add_(0, group, w)
            new.copy_(sums / torch.bincount(group, minlength=m).clamp(min=1).unsqueeze(1).to(w.dtype))
            remaps.append(group.to(torch.int32))
        self.remap = torch.cat(remaps).to(self.remap.device) if remaps else self.remap
        self.merged = True

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({f"{t}.lsh_bits": b for t, b in self.lsh_bits.items()})
        return out


def _cost(t: EmbeddingBagConfig, fmt: TableFormat) -> FieldCost:
    n, d, f = t.num_embeddings, t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(n, d, f), 1, n - 1, lambda m: fmt.table(m, d, f) + ID_BYTES * n)


@register(DedupConfig)
def build(tables: list[EmbeddingBagConfig], config: DedupConfig, ctx: BuildContext) -> DedupEmbeddingBagCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        check=lambda: refuse_aware(config.quantization, config.method, "the merge stage replaces the tables it would train"),
        costs=lambda fmt: [_cost(t, fmt) for t in tables],
        fixed=lambda fmt: fmt.collection(tables) + KeyParams.nbytes(2, n_features),
        sizes=lambda: {t.name: int(config.rows or 0) for t in tables},
        construct=lambda plan: DedupEmbeddingBagCollection(tables, plan, config, ctx),
        deployed=lambda module, plan: MetaForm(_merged(tables, plan), {"remap": ((_remap_len(tables, plan),), torch.int32)},
                                                {"params": module.params}),
    )  # fmt: skip
