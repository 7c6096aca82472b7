"""In-training embedding pruning (ITEP), the scheme of TorchRec's ITEP modules
(``torchrec/modules/itep_modules.py``) and FBGEMM's ITEP kernels, implemented here.

Why not TorchRec's module: on this stack (torchrec 1.8, fbgemm-gpu-cpu 1.8) it cannot
run. FBGEMM defines the ``init_address_lookup``, ``prune_embedding_tables`` and
``remap_indices_update_utils`` ops only in its CUDA library (the CPU wheel has a CPU
kernel for the remap but registers none of the three), so ``torch.ops.fbgemm`` lacks
them and TorchRec's ``GenericITEPModule.init_itep_state`` fails building the sharded
module; unsharded, ``GenericITEPModule`` without the sharded lookups is a documented
no-op (ids reach the smaller table unremapped, out of range).

Per compressed table of N ids, K = ``num_embeddings_post_pruning`` physical rows of a
TorchRec table; row 0 is the shared row of every pruned id, rows 1..K-1 belong to at
most K - 1 ids at a time. Training holds, per id x, its row a(x) (int32 address lookup,
0: pruned) and its utility u(x) (float32 access count). At build a(x) = x + 1 for
x < K - 1, else 0. Each training step counts the ids of the batch, u(x) += n(x), and
reads row a(x). At step i (0-based) TorchRec's schedule prunes when

    (i < 10 and (i+1) % 3 == 0) or (i < 100 and (i+1) % 30 == 0)
    or (i < 1000 and (i+1) % 300 == 0) or (i+1) % pruning_interval == 0;

a pruning decays u by ``decay`` (0.98, FBGEMM's; only once i > pruning_interval), keeps
the K - 1 ids of largest u (ties: an id holding a row keeps it, then the smaller id),
and hands the rows of the ids that fell out to the ids that came in, re-initialised
with the table's init (FBGEMM resets the weight and momentum of those rows; unsharded,
the optimizer's state of the row is not reset here: the optimizer lives outside).
Differences from FBGEMM, on purpose: u counts every step's ids (FBGEMM samples steps and
rows to save GPU time), the K - 1 kept ids are the exact top-K (FBGEMM: a threshold from
sampled utilities), and id 0 is an id like any other (FBGEMM's row 0 doubles as its
pruned row).

Deployed form (``compact``, the stage after training): the address lookup and the
utilities are dropped; the kept ids are held sorted (int64, 8 bytes a kept row, keyed
by table) and rows reordered so that kept id number j reads row j + 1; an id reads
``searchsorted`` of it, or row 0. The budget counts that form: K·row + 8·(K - 1) per
table; the training form holds 8 bytes more per id (its lookup and utilities), so a
budgeted module is above its budget until ``compact``, as dedup's is until ``merge``.
Tables whose plain form fits their share stay exact (plain rows, no remap).

- Quantization composes: the physical tables are TorchRec tables, quantized after
  ``compact`` by the ``quantize`` stage (quantization-aware training is refused: the
  compaction replaces the tables it would train).
- Sharding: refused (``sharding_refusal``): pruning rewrites rows and a per-rank remap
  in place, which needs TorchRec's ShardedITEPEmbeddingBagCollection and its CUDA ops.

Ids: outside [0, N) refused (``IdOutOfRangeError``) naming the feature.

Example::

    ebc = compress(tables, ItepConfig(budget=Budget(ratio=10), pruning_interval=100))
    ...train...; ebc.compact()      # the trainer's ``compact`` stage does this
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
from compression.base import _tracing
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import MetaForm, TableFormat
from compression.idmap import IdMappedCollection, KeyParams, inner_table, with_values
from compression.memory import memory_report
from compression.quantization import refuse_aware
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized
from compression.stages import Stage, compact_then_finetune

KEPT_ID_BYTES = 8  # deployed: one int64 key per kept id
TRAIN_ID_BYTES = 8  # training: int32 address lookup + float32 utility per id
TABLE_SHIFT = 40  # deployed keys: table index << 40 | id (ids below 2^40)
MIN_ROWS = 2  # the pruned ids' row and one kept id


@dataclass
class ItepConfig(BudgetedConfig):
    """ITEP; ``budget`` picks each table's ``num_embeddings_post_pruning`` (physical rows,
    the pruned ids' shared row included), or give it for every table (budget: null)."""

    method: ClassVar[str] = "itep"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"pruning_interval": (300, 1001)}
    sized_by_stages: ClassVar[bool] = True
    # at least the pruned ids' shared row and one kept id
    num_embeddings_post_pruning: Optional[int] = bounded(None, ge=MIN_ROWS)
    # training steps between prunings (after TorchRec's early ones); TorchRec's default
    pruning_interval: int = bounded(1001, ge=1)
    # utilities decay by this factor at each pruning after the first interval (FBGEMM's)
    decay: float = bounded(0.98, gt=0, le=1)
    finetune_epochs: int = bounded(0, ge=0)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"num_embeddings_post_pruning": self.num_embeddings_post_pruning}

    @classmethod
    def contract_examples(cls) -> list[ItepConfig]:
        return [cls(), cls(budget=Budget(ratio=3, scope="table"), pruning_interval=2),
                cls(budget=None, num_embeddings_post_pruning=50)]  # fmt: skip


def prunes_at(step: int, interval: int) -> bool:
    """TorchRec's ITEP schedule: early prunings, then every ``interval`` steps."""
    i = step + 1
    return (step < 10 and i % 3 == 0) or (step < 100 and i % 30 == 0) or (step < 1000 and i % 300 == 0) or i % interval == 0


class ItepEmbeddingBagCollection(IdMappedCollection):
    """TorchRec tables of K rows per compressed table, ids remapped by their utility."""

    address: torch.Tensor
    util: torch.Tensor
    kept_keys: torch.Tensor
    step: torch.Tensor

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, config: ItepConfig, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="num_embeddings_post_pruning", validate_ids=True, config=ctx.config)
        self.config = config
        inner = [inner_table(t, rows=plan.sizes[t.name] or t.num_embeddings) for t in tables]
        self.ebc = EmbeddingBagCollection(tables=inner, device=ctx.table_device)
        self._pruned = [t for t in tables if plan.sizes[t.name] is not None]
        offsets, at = {}, 0
        for t in self._pruned:
            offsets[t.name] = at
            at += t.num_embeddings
        self._offsets = offsets
        index = {t.name: i for i, t in enumerate(tables)}
        pairs = [(t, f) for t in tables for f in t.feature_names]
        self.params = KeyParams(self.feature_names, {
            "offset": [offsets.get(t.name, 0) for t, _ in pairs],
            "exact": [int(plan.sizes[t.name] is None) for t, _ in pairs],
            "table": [index[t.name] for t, _ in pairs],
        }, device=ctx.device)  # fmt: skip
        start = [torch.where(torch.arange(t.num_embeddings) < _rows(plan, t) - 1,
                             torch.arange(t.num_embeddings) + 1, 0) for t in self._pruned]  # fmt: skip
        address = torch.cat(start).to(torch.int32) if start else torch.zeros(0, dtype=torch.int32)
        self.register_buffer("address", address.to(ctx.device))
        self.register_buffer("util", torch.zeros(at, dtype=torch.float32, device=ctx.device))
        self.register_buffer("kept_keys", torch.zeros(0, dtype=torch.int64, device=ctx.device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.compacted = False
        self.evicted = 0  # rows handed to other ids, over the whole training
        self.prunings = 0

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        p = self.params.expand(features)
        ids = features.values()
        exact = p["exact"] != 0
        if self.compacted:
            key = (p["table"] << TABLE_SHIFT) | ids
            pos = torch.searchsorted(self.kept_keys, key)
            n = self.kept_keys.numel()
            hit = self.kept_keys[pos.clamp(max=max(n - 1, 0))] == key if n else torch.zeros_like(exact)
            rows = torch.where(hit, pos - self._key_start(p) + 1, 0)
        else:
            at = torch.where(exact, 0, p["offset"] + ids)
            if self.training and not _tracing() and not torch.all(exact):
                self._count(at[~exact])
            rows = self.address[at].to(torch.int64) if self.address.numel() else torch.zeros_like(ids)
        return pooled_lookup(self.ebc, with_values(features, torch.where(exact, ids, rows)))

    def _key_start(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Index of each id's table's first key in ``kept_keys``."""
        return torch.searchsorted(self.kept_keys, p["table"] << TABLE_SHIFT)

    @torch.no_grad()
    def _count(self, at: torch.Tensor) -> None:
        """TorchRec's order: prune at the step's start if due, then count its ids."""
        if prunes_at(int(self.step), self.config.pruning_interval):
            self.prune()
        self.util.index_add_(0, at, torch.ones_like(at, dtype=self.util.dtype))
        self.step += 1

    @torch.no_grad()
    def prune(self) -> int:
        """Keep each compressed table's K - 1 ids of largest utility; returns rows handed over."""
        if int(self.step) > self.config.pruning_interval:
            self.util.mul_(self.config.decay)
        moved = 0
        for t in self._pruned:
            start = self._offsets[t.name]
            a = self.address[start : start + t.num_embeddings]
            u = self.util[start : start + t.num_embeddings]
            holder = a > 0
            order = torch.argsort((~holder).to(torch.int8), stable=True)  # holders first, then by id
            order = order[torch.argsort(-u[order], stable=True)]
            want = torch.zeros_like(holder)
            want[order[: _rows(self.plan, t) - 1]] = True
            incoming = torch.nonzero(want & ~holder).flatten()
            outgoing = torch.nonzero(holder & ~want).flatten()
            if incoming.numel():
                free = a[outgoing].clone()
                a[incoming] = free
                a[outgoing] = 0
                self._reinit(t.name, free.to(torch.int64))
                moved += incoming.numel()
        self.evicted += moved
        self.prunings += 1
        return moved

    def _reinit(self, table: str, rows: torch.Tensor) -> None:
        weight = self.ebc.embedding_bags[table].weight
        config = next(c for c in self.ebc.embedding_bag_configs() if c.name == table)
        fresh = weight[rows].clone()
        if config.init_fn is not None:
            config.init_fn(fresh)
        else:
            bound = (1.0 / config.num_embeddings) ** 0.5
            fresh.uniform_(-bound, bound)
        weight[rows] = fresh

    def rows_of(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The physical row each id of ``feature`` reads now (0: pruned), without counting."""
        table = next(t for t in self.source_tables() if feature in t.feature_names)
        if self.plan.sizes[table.name] is None:
            return ids
        kjt = KeyedJaggedTensor(keys=[feature], values=ids, lengths=torch.ones_like(ids, dtype=torch.int32))
        p = self.params.expand(kjt)
        if self.compacted:
            key = (p["table"] << TABLE_SHIFT) | ids
            pos = torch.searchsorted(self.kept_keys, key)
            hit = self.kept_keys[pos.clamp(max=self.kept_keys.numel() - 1)] == key
            return torch.where(hit, pos - self._key_start(p) + 1, 0)
        return self.address[p["offset"] + ids].to(torch.int64)

    def stages(self) -> list[Stage]:
        return compact_then_finetune(
            "compact", self.compact, lambda: memory_report(self).bytes, self.config.finetune_epochs,
            extra=lambda: {"itep_evicted_rows": float(self.evicted), "itep_prunings": float(self.prunings)},
        )  # fmt: skip

    @torch.no_grad()
    def compact(self) -> None:
        """The deployed form, in place: sorted kept ids instead of the per-id lookup."""
        if self.compacted:
            return
        index = {t.name: i for i, t in enumerate(self.source_tables())}
        keys = []
        for t in self._pruned:
            start = self._offsets[t.name]
            a = self.address[start : start + t.num_embeddings]
            kept = torch.nonzero(a > 0).flatten()  # ascending ids
            weight = self.ebc.embedding_bags[t.name].weight
            order = torch.cat([torch.zeros(1, dtype=torch.int64, device=a.device), a[kept].to(torch.int64)])
            weight.copy_(weight[order.to(weight.device)])
            keys.append((index[t.name] << TABLE_SHIFT) | kept)
        device = self.address.device
        self.kept_keys = torch.cat(keys).to(device) if keys else self.kept_keys
        self.address = torch.zeros(0, dtype=torch.int32, device=device)
        self.util = torch.zeros(0, dtype=torch.float32, device=device)
        self.compacted = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a compacted module's state (kept ids, no lookup) loads into a fresh module
        keys = state_dict.get(prefix + "kept_keys")
        if keys is not None and keys.numel() and not self.compacted:
            self.compact()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def training_metrics(self) -> dict[str, float]:
        return {"itep_evicted_rows": float(self.evicted), "itep_prunings": float(self.prunings)}

    def sharding_refusal(self) -> str | None:
        return ("itep: pruning rewrites rows and the id remap in place on every rank; TorchRec's "
                "ShardedITEPEmbeddingBagCollection does that but needs FBGEMM's CUDA-only ITEP ops")  # fmt: skip


def _rows(plan: Plan, t: EmbeddingBagConfig) -> int:
    size = plan.sizes[t.name]
    return t.num_embeddings if size is None else size


def _compacted(tables: list[EmbeddingBagConfig], plan: Plan, params: KeyParams) -> MetaForm:
    """The compacted tables and kept ids on ``meta``: what the budget is checked against."""
    kept = sum(_rows(plan, t) - 1 for t in tables if plan.sizes[t.name] is not None)
    return MetaForm([inner_table(t, rows=_rows(plan, t)) for t in tables],
                    {"kept_keys": ((kept,), torch.int64), "step": ((), torch.int64)}, {"params": params})  # fmt: skip


def _cost(t: EmbeddingBagConfig, fmt: TableFormat) -> FieldCost:
    n, d, f = t.num_embeddings, t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(n, d, f), MIN_ROWS, n, lambda k: fmt.table(k, d, f) + KEPT_ID_BYTES * (k - 1))


def _check(config: ItepConfig, tables: list[EmbeddingBagConfig]) -> None:
    method = config.method
    for t in tables:
        if t.num_embeddings >= 1 << TABLE_SHIFT:
            raise MethodConfigError(f"{method}: table '{t.name}' has {t.num_embeddings} ids, more than 2^{TABLE_SHIFT}")
    refuse_aware(config.quantization, method, "compact replaces the tables it would train")


@register(ItepConfig)
def build(tables: list[EmbeddingBagConfig], config: ItepConfig, ctx: BuildContext) -> ItepEmbeddingBagCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        check=lambda: _check(config, tables),
        costs=lambda fmt: [_cost(t, fmt) for t in tables],
        fixed=lambda fmt: fmt.collection(tables) + KeyParams.nbytes(3, n_features) + 8,  # + the step counter
        sizes=lambda: {t.name: int(config.num_embeddings_post_pruning or 0) for t in tables},
        construct=lambda plan: ItepEmbeddingBagCollection(tables, plan, config, ctx),
        deployed=lambda module, plan: _compacted(tables, plan, module.params),
    )  # fmt: skip
