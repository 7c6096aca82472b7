"""CAFE (Zhang et al., SIGMOD'24): hot ids found online by a sketch, given exact rows while
hot; the rest hashed.

Per compressed table, one TorchRec table of R = K + M rows: rows [0, K) are exact slots,
rows [K, R) hashed rows (id x reads row K + h(x) mod M unless it holds an exact slot).
A HotSketch (``buckets`` x ``slots`` entries of id, score and exact slot) follows the ids
while training:

- every step, each id of the batch adds its count to its entry, in the bucket its hash
  names; an id without an entry takes the bucket's lowest entry if its count beats that
  score, as Space-Saving does (new score: the old one plus its count; at most one new
  id per bucket per step, the most frequent of the batch);
- every ``interval`` steps the scores decay (x ``decay``) and the K highest-scoring
  entries are the hot ids: an id turning hot is promoted (a free exact slot, its row
  initialised from the hashed row it read), an id no longer among them is demoted (its
  slot freed; it reads its hashed row again).

So hot ids change while training, as the data do; ``frequency_hybrid`` is the static
version (the top-k of the training split's counts, fixed before training). Scores are
lookup counts; the paper's importance is the gradient norm, of which counts are the
frequency special case. The sketch is counted in the bytes (16 bytes an entry: int64 id,
fp32 score, int32 slot); a demoted row's optimizer state is not reset (the optimizer
lives outside the module), as for ``managed_collision``.

Budget: each table's rows R (``compression.sizing``), K = floor(``hot_fraction`` · R) (at
least one hashed row), ``entries_per_hot`` entries of sketch per exact slot, rounded up to
whole buckets. Tables whose plain form fits their share stay exact. Sharding: refused
(promotion rewrites rows by the sketch's global ranking).

On the CPU, where ``hash_cpu.cpp`` is built, a step's counting and every id's row are one call
each for every table (``_rows_by_kernel``), where the torch ops sort the ids twice: the same
counts, entries and rows (tested step by step against them).

Example::

    ebc = compress(tables, CafeConfig(budget=Budget(ratio=10)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, register
from compression.bags import pooled_lookup
from compression.base import _tracing
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.hashing import kernel as hash_kernel
from compression.idmap import IdMappedCollection, KeyParams, in_range, inner_table, with_values
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

ENTRY_BYTES = 8 + 4 + 4  # id (int64), score (fp32), exact slot (int32)


@dataclass
class CafeConfig(BudgetedConfig):
    """CAFE. ``budget`` picks each table's rows; or give ``rows`` (budget: null)."""

    method: ClassVar[str] = "cafe"
    takes_raw_ids: ClassVar[bool] = (
        True  # every id goes through the hash (exact tables: in-range ids only)
    )
    rows: Optional[int] = bounded(None, ge=2)
    # the share of a table's rows that are exact slots for hot ids
    hot_fraction: float = bounded(0.5, gt=0, lt=1)
    entries_per_hot: int = bounded(4, ge=1)  # sketch entries per exact slot
    slots: int = bounded(4, ge=1)  # entries per bucket
    interval: int = bounded(50, ge=1)  # training steps between promotions
    decay: float = bounded(0.9, gt=0, le=1)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}

    @classmethod
    def contract_examples(cls) -> list[CafeConfig]:
        return [cls(), cls(budget=Budget(ratio=50), interval=1), cls(budget=None, rows=100)]


def split_rows(rows: int, config: CafeConfig) -> tuple[int, int, int]:
    """(exact slots K, hashed rows M, sketch buckets) of a table of ``rows`` rows."""
    k = max(1, min(int(config.hot_fraction * rows), rows - 1))
    return k, rows - k, math.ceil(config.entries_per_hot * k / config.slots)


class CafeCollection(IdMappedCollection):
    """Per table one TorchRec table (exact slots, then hashed rows) and a HotSketch."""

    steps: torch.Tensor

    def __init__(
        self, tables: list[EmbeddingBagConfig], plan: Plan, config: CafeConfig, ctx: BuildContext
    ) -> None:
        super().__init__(tables, plan, knob="rows", config=ctx.config)
        self.config = config
        self.coded: list[str] = []
        self.shape: dict[str, tuple[int, int, int]] = {}
        self.first_bucket: dict[str, int] = {}  # the tables' sketches: consecutive buckets of one
        for t in tables:
            if plan.sizes[t.name] is not None:
                self.coded.append(t.name)
                self.first_bucket[t.name] = sum(b for _, _, b in self.shape.values())
                self.shape[t.name] = split_rows(int(plan.sizes[t.name]), config)  # type: ignore[arg-type]
        total, dev = sum(b for _, _, b in self.shape.values()), ctx.device
        self.register_buffer(
            "keys", torch.full((total, config.slots), -1, dtype=torch.int64, device=dev)
        )
        self.register_buffer("scores", torch.zeros(total, config.slots, device=dev))
        self.register_buffer(
            "slot", torch.full((total, config.slots), -1, dtype=torch.int32, device=dev)
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=ctx.device))
        inner = [inner_table(t, rows=plan.sizes[t.name] or t.num_embeddings) for t in tables]
        self.ebc = EmbeddingBagCollection(tables=inner, device=ctx.table_device)
        self.hasher = UniversalHash(2, seed=ctx.seed, device=ctx.device)  # 0: hashed row, 1: bucket
        index = {name: i for i, name in enumerate(self.coded)}
        pairs = [(t, f) for t in tables for f in t.feature_names]
        self.params = KeyParams(self.feature_names, {
            "rows": [t.num_embeddings for t, _ in pairs],
            "table": [index.get(t.name, -1) for t, _ in pairs],
            "base": [self.shape.get(t.name, (0, 0, 0))[0] for t, _ in pairs],
            "mod": [self.shape.get(t.name, (0, t.num_embeddings, 0))[1] for t, _ in pairs],
            "first_bucket": [self.first_bucket.get(t.name, 0) for t, _ in pairs],
            "buckets": [self.shape.get(t.name, (0, 0, 1))[2] for t, _ in pairs],
        }, unknown={"table": -1}, device=ctx.device)  # fmt: skip

    def sharding_refusal(self) -> str | None:
        return "cafe: promotion rewrites rows by the sketch's ranking of the whole table, which a sharded table does not hold on one rank"

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        for name, (k, m, buckets) in self.shape.items():
            out.update(
                {
                    f"{name}.exact_slots": k,
                    f"{name}.hashed_rows": m,
                    f"{name}.sketch_entries": buckets * self.config.slots,
                }
            )
        return out

    def _sketch(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One table's buckets of the sketch (views: writing them writes the sketch)."""
        lo = self.first_bucket[name]
        hi = lo + self.shape[name][2]
        return self.keys[lo:hi], self.scores[lo:hi], self.slot[lo:hi]

    def _buckets(
        self, ids: torch.Tensor, p: dict[str, torch.Tensor], sel: torch.Tensor
    ) -> torch.Tensor:
        """The sketch bucket of the coded ids ``ids[sel]``, every table's at once."""
        return p["first_bucket"][sel] + self.hasher(ids[sel], p["buckets"][sel], which=1)

    def rows(
        self, features: KeyedJaggedTensor, p: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The inner row of every id: its exact slot while it is hot, else its hashed row
        (``p``: the per-id parameters, when the caller has them)."""
        p = self.params.expand(features) if p is None else p
        ids = features.values()
        coded = p["table"] >= 0
        rows = self._hashed_rows(ids, coded, p)
        sel = coded.nonzero().squeeze(1)
        if sel.numel():
            b = self._buckets(ids, p, sel)
            match = self.keys[b] == ids[sel].unsqueeze(1)
            s = torch.where(match, self.slot[b], -1).amax(dim=1)
            rows[sel] = torch.where(s >= 0, s.to(rows.dtype), rows[sel])
        return rows

    def _hashed_rows(self, ids: torch.Tensor, coded: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every id's row without the sketch: a coded id's hashed row, an exact table's id (folded)."""
        return torch.where(coded, p["base"] + self.hasher(ids, p["mod"], which=0),
                           torch.where(in_range(ids, p["rows"]), ids, self.hasher(ids, p["rows"], which=0)))  # fmt: skip

    @torch.no_grad()
    def observe(self, features: KeyedJaggedTensor, p: dict[str, torch.Tensor]) -> None:
        """One training step's ids into the sketches; every ``interval`` steps, promote and demote."""
        ids = features.values()
        sel = (p["table"] >= 0).nonzero().squeeze(1)
        if sel.numel():  # one (bucket, id) pair per id of each table (buckets are per table)
            b, x = self._buckets(ids, p, sel), ids[sel]
            order = torch.argsort(x, stable=True)
            order = order[torch.argsort(b[order], stable=True)]  # by bucket, then id
            b, x = b[order], x[order]
            new = torch.ones_like(b, dtype=torch.bool)
            new[1:] = (b[1:] != b[:-1]) | (x[1:] != x[:-1])
            starts = new.nonzero().squeeze(1)  # (torch.unique over the pairs: 27 ms a step, not 21)
            counts = torch.diff(starts, append=starts.new_tensor([b.numel()]))
            self._count(b[starts], x[starts], counts.to(torch.float32))
        self._tick()

    @torch.no_grad()
    def _tick(self) -> None:
        """A training step counted; every ``interval`` steps, promote and demote."""
        self.steps += 1
        if int(self.steps) % self.config.interval == 0:
            for name in self.coded:
                self._promote(name)

    def _count(self, b: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Distinct ``ids`` seen ``counts`` times, in their buckets ``b``, into the sketch."""
        keys, scores, slot = self.keys, self.scores, self.slot
        n_buckets = keys.shape[0]
        match = keys[b] == ids.unsqueeze(1)
        found = match.any(dim=1)
        j = match.to(torch.int8).argmax(dim=1)
        scores.index_put_((b[found], j[found]), counts[found], accumulate=True)
        new, nb, nc = ids[~found], b[~found], counts[~found]
        if new.numel() == 0:
            return
        # per bucket the most frequent new id (ties: the smallest id)
        best = torch.full((n_buckets,), -1.0, device=ids.device).scatter_reduce(0, nb, nc, "amax")
        top = nc == best[nb]
        winner = torch.full(
            (n_buckets,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=ids.device
        )
        winner = winner.scatter_reduce(0, nb[top], new[top], "amin")
        buckets = (winner != torch.iinfo(torch.int64).max).nonzero().squeeze(1)
        low, at = scores[buckets].min(dim=1)
        take = best[buckets] > low
        buckets, low, at = buckets[take], low[take], at[take]
        keys[buckets, at] = winner[buckets]
        scores[buckets, at] = low + best[buckets]
        slot[buckets, at] = -1  # a replaced hot id loses its slot (freed at the next promotion)

    def _promote(self, name: str) -> None:
        """Decay; the K highest entries hold the exact slots: new ones get a free slot, their
        row copied from the hashed row they read; the others let theirs go."""
        keys, scores, slot = self._sketch(name)
        k, m, _ = self.shape[name]
        scores.mul_(self.config.decay)
        flat_scores = torch.where(keys.flatten() >= 0, scores.flatten(), -1.0)
        hot = torch.zeros_like(flat_scores, dtype=torch.bool)
        order = torch.topk(flat_scores, min(k, flat_scores.numel())).indices
        hot[order[flat_scores[order] > 0]] = True
        flat_slot = slot.view(-1)
        flat_slot[~hot & (flat_slot >= 0)] = -1  # demoted
        used = torch.zeros(k, dtype=torch.bool, device=flat_slot.device)
        used[flat_slot[flat_slot >= 0].long()] = True
        want = (hot & (flat_slot < 0)).nonzero().squeeze(1)
        free = (~used).nonzero().squeeze(1)[: want.numel()]
        want = want[: free.numel()]
        if want.numel() == 0:
            return
        flat_slot[want] = free.to(torch.int32)
        weight = self.ebc.embedding_bags[name].weight  # type: ignore[index]
        promoted = keys.view(-1)[want]
        hashed = k + self.hasher(promoted, torch.full_like(promoted, m), which=0)
        weight[free] = weight[hashed]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        p = self.params.expand(features)  # (once: the sketch and the rows read the same)
        rows = self._rows_by_kernel(features, p)
        if rows is None:
            if self.training and self.coded:
                self.observe(features, p)
            rows = self.rows(features, p)
        return pooled_lookup(self.ebc, with_values(features, rows))

    def _rows_by_kernel(self, features: KeyedJaggedTensor, p: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``observe`` (in training) and ``rows`` by ``hash_cpu.cpp``'s sketch functions, every
        table at once, the same counts, entries and rows; None, nothing touched, where the
        kernel does not take the tensors (another device, no compiler, tracing)."""
        k = hash_kernel() if self.coded and self.keys.device.type == "cpu" and not _tracing() else None
        if k is None:
            return None
        ids = features.values()
        coded = p["table"] >= 0
        b = p["first_bucket"] + self.hasher(ids, p["buckets"], which=1)  # (a coded id's bucket)
        if self.training:
            if not k.sketch_count(ids, b, coded, self.keys, self.scores, self.slot):
                return None
            self._tick()
        rows = self._hashed_rows(ids, coded, p)
        if not k.sketch_rows(ids, b, coded, self.keys, self.slot, rows):  # (only if the sketch moved device)
            return self.rows(features, p)
        return rows


def _cost(t: EmbeddingBagConfig, config: CafeConfig, fmt: TableFormat) -> FieldCost:
    d, f = t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(t.num_embeddings, d, f), 2, t.num_embeddings,
                     lambda r: fmt.table(r, d, f) + ENTRY_BYTES * config.slots * split_rows(r, config)[2])  # fmt: skip


@register(CafeConfig)
def build(
    tables: list[EmbeddingBagConfig], config: CafeConfig, ctx: BuildContext
) -> CafeCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        costs=lambda fmt: [_cost(t, config, fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(2) + KeyParams.nbytes(6, n_features) + 8 + fmt.collection(tables),
        construct=lambda plan: CafeCollection(tables, plan, config, ctx),
    )  # fmt: skip
