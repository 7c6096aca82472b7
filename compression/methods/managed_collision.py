"""Managed collisions: TorchRec's zero-collision hashing (MCH) with LFU eviction.

Per compressed table, a ``MCHManagedCollisionModule`` (``SteadyMCH``: TorchRec's, with
one exact shortcut for evictions that evict nothing) keeps a sorted map from raw ids
to ``zch_size`` slots of a TorchRec table. The compressed tables are TorchRec's own
``ManagedCollisionEmbeddingBagCollection`` (a ``ManagedCollisionCollection`` in front
of an ``EmbeddingBagCollection``), so ``DistributedModelParallel`` shards them as one.
While training, every ``eviction_interval`` steps the ids seen since the last
eviction are counted; new ids take empty slots, then the
slots of the least frequently used ids (``LFU_EvictionPolicy``; on a tie the id
already in the table stays). The last slot (row zch_size - 1) is never given to an
id: it is the shared fallback row every id without a slot reads (unseen ids in
eval, ids that lost their slot, and, in training, ids that did not win one). An
evicted slot's row is re-initialised with the table's init, as TorchRec's sharded
MC-EBC does (its unsharded forward leaves the row as it was); unsharded, the row's
optimizer state is not reset (the optimizer lives outside the module).

TorchRec's ``ManagedCollisionEmbeddingBagCollection.forward`` returns a tuple; this
module keeps the KJT-in, KeyedTensor-out contract instead.

Unsharded on the CPU, the collection's forward (every table's profile, LFU shortcut and
remap) is one call each of ``mc_cpu.cpp`` (``mcc_forward``) where TorchRec runs about
fifteen small torch operations a table: the same slots, counts, history and step counts,
tested step by step against TorchRec's forward; an eviction itself is still TorchRec's.

Bytes: per slot, the row (4·dim) plus three int64 buffers (sorted raw ids, slot
mapping, LFU counts); per table TorchRec also holds a 1025-entry int64 segment
buffer and three scalars, all counted. The id history that MCH collects between
evictions (``_history_accumulator``, sized by TorchRec at 1.25 x the first training
batch's ids x ``eviction_interval``; ids past its end in a larger batch go uncounted)
is working memory, like activations, and not counted. Tables whose plain form is smaller stay
exact (plain TorchRec tables).

Ids: MC keys rows by the raw int64 id, so negative ids and ids beyond the declared
cardinality are just other keys; the only exception is 2^63 - 1, TorchRec's
empty-slot marker, which is read as 2^63 - 2. In exact tables ids outside [0, N) are
hashed into [0, N).

Example::

    ebc = compress(tables, ManagedCollisionConfig(budget=Budget(ratio=4)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    ManagedCollisionCollection,
    ManagedCollisionModule,
    MCHManagedCollisionModule,
    _mcc_lazy_init_inplace,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression import native
from compression.api import BuildContext, register, require_fbgemm_cuda
from compression.bags import pooled_lookup
from compression.base import _tracing
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import (
    IdMappedCollection,
    KeyParams,
    column_order,
    fold,
    in_order,
    inner_table,
    take_columns,
    with_values,
)
from compression.memory import tensor_bytes
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

_EMPTY = torch.iinfo(torch.int64).max  # TorchRec's marker of an empty slot
MIN_SLOTS = 2  # one slot for ids, one fallback


@dataclass
class ManagedCollisionConfig(BudgetedConfig):
    """TorchRec MCH with LFU eviction; ``budget`` picks the slots, or give ``zch_size``."""

    method: ClassVar[str] = "managed_collision"
    takes_raw_ids: ClassVar[bool] = (
        True  # every id goes through the hash (exact tables: in-range ids only)
    )
    # slots (rows, the fallback included) of every MC table (budget: null)
    zch_size: Optional[int] = None
    # training steps between two LFU evictions
    eviction_interval: int = bounded(1, ge=1)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"zch_size": self.zch_size}

    @classmethod
    def contract_examples(cls) -> list[ManagedCollisionConfig]:
        return [
            cls(),
            cls(budget=Budget(ratio=2), eviction_interval=3),
            cls(budget=None, zch_size=100),
        ]


class SteadyMCH(MCHManagedCollisionModule):
    """TorchRec's MCH with LFU eviction, with one shortcut that changes nothing it computes.

    At each eviction TorchRec ranks every slot's count together with the new ids' counts
    (a stable sort, slots first), evicts the slots that fall out of the top ``zch_size``
    and re-sorts its id buffers, even when nothing falls out, which at a full table is
    most steps (the Criteo sample's tables at 10x: none of 1,500 table-steps after the
    first 100). A new id can only take a slot whose count is below its own; when no new
    id's count is above the smallest slot count (counted before this history's updates,
    which only raise them), nothing is evicted, so only the ids already held have their
    counts raised, as TorchRec would raise them, and TorchRec's own path runs otherwise.
    """

    @torch.no_grad()
    def _coalesce_history(self) -> None:
        policy = self._eviction_policy
        if isinstance(policy, LFU_EvictionPolicy) and policy._threshold_filtering_func is None:
            offset: int = self._current_history_buffer_offset  # type: ignore[has-type]
            ids, counts = torch.unique(self._history_accumulator[:offset], return_counts=True)
            held = self._mch_sorted_raw_ids
            pos = torch.searchsorted(held[:-1], ids)
            hit = held[pos] == ids
            slot_counts = self._mch_metadata["counts"]
            if not bool((counts[~hit] > slot_counts[:-1].min()).any()):
                slot_counts[pos[hit]] += counts[hit]
                self._current_history_buffer_offset = 0
                return
        super()._coalesce_history()


def kernel() -> Any:
    """``mc_cpu.cpp``: TorchRec's MCH profile and remap of every table in one call each (None
    where it cannot be built; TorchRec's modules then run table by table)."""
    src = Path(__file__).parent.parent / "mc_cpu.cpp"
    return native.load(src, "managed collisions remap table by table through TorchRec's modules")


def _steady_modules(mcc: ManagedCollisionCollection) -> list[SteadyMCH] | None:
    """The MCC's modules in its tables' order, where every one is a plain ``SteadyMCH``
    (LFU without a threshold filter, no input hash, one shard): what the kernel computes."""
    modules = dict(mcc._managed_collision_modules.items())
    if list(modules) != list(mcc._table_to_features):
        return None
    for m in modules.values():
        if not (type(m) is SteadyMCH and type(m._eviction_policy) is LFU_EvictionPolicy):
            return None
        if m._eviction_policy._threshold_filtering_func is not None or m._input_hash_func is not None:
            return None
        if m._output_global_offset != 0 or m._history_metadata:
            return None
    return list(modules.values())  # type: ignore[arg-type]


def table_bounds(mcc: ManagedCollisionCollection, features: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, list[int]]:
    """``features`` in the MCC's table order (as its forward orders them) and where each
    table's ids start in its values (one more bound: the end)."""
    feats = _mcc_lazy_init_inplace(features, mcc._feature_names, mcc._features_order, mcc._created_feature_order)
    lpk = feats.length_per_key()
    bounds, f = [0], 0
    for n in mcc._table_feature_splits:
        bounds.append(bounds[-1] + sum(lpk[f : f + n]))
        f += n
    return feats, bounds


def mcc_forward(mcc: ManagedCollisionCollection, features: KeyedJaggedTensor, use_kernel: bool = True) -> KeyedJaggedTensor:
    """TorchRec's ``ManagedCollisionCollection.forward`` (each table's profile, eviction and
    remap), computed by the kernel for every table at once where the modules are plain
    ``SteadyMCH`` and the batch is one TorchRec's forward would take as is (no weights, one
    stride, history buffers made by a first forward); else TorchRec's own forward. The
    same ids, counts, history and steps either way (``test_mc_kernel``)."""
    k = kernel() if use_kernel and not _tracing() else None  # (a traced graph keeps TorchRec's ops)
    modules = _steady_modules(mcc) if k is not None else None
    if k is None or modules is None or features.weights_or_none() is not None or features.variable_stride_per_key():
        return mcc(features)
    if mcc.training and any(m._input_history_buffer_size == -1 for m in modules):
        return mcc(features)  # (TorchRec sizes the history buffers from its first batch)
    feats, bounds = table_bounds(mcc, features)
    values, lpk = feats.values(), feats.length_per_key()
    sorted_ids, slots = [m._mch_sorted_raw_ids for m in modules], [m._mch_remapped_ids_mapping for m in modules]
    if mcc.training:
        steps = [(m._current_iter if m._current_iter != -1 else int(m._current_iter_tensor.item())) for m in modules]
        at = [m._current_history_buffer_offset for m in modules]
        take = [min(bounds[t + 1] - bounds[t], m._input_history_buffer_size - at[t]) for t, m in enumerate(modules)]
        check = [
            steps[t] + 1 - (m._last_eviction_iter if m._current_iter != -1 else steps[t]) == m._eviction_interval
            for t, m in enumerate(modules)
        ]
        done = k.mch_profile(values, bounds, take, at, check, [m._history_accumulator for m in modules],
                             sorted_ids, [m._mch_counts for m in modules], slots, [m._current_iter_tensor for m in modules])  # fmt: skip
        if not done:
            return mcc(features)  # (a buffer the kernel does not take: nothing was touched)
        for t, m in enumerate(modules):
            if m._current_iter == -1:
                m._last_eviction_iter = steps[t]
            m._current_iter = steps[t] + 1
            m._current_history_buffer_offset = at[t] + take[t]
            if check[t]:
                if done[t]:
                    m._current_history_buffer_offset = 0
                else:
                    MCHManagedCollisionModule._coalesce_history(m)  # TorchRec evicts
                m._last_eviction_iter = m._current_iter
    out = k.mch_remap(values, bounds, sorted_ids, slots, [m._zch_size - 1 for m in modules])
    if out is None:  # (in eval; in training mch_profile checked the same tensors)
        return mcc(features)
    return KeyedJaggedTensor(
        keys=feats.keys(), values=out, lengths=feats.lengths(), stride=feats.stride(), length_per_key=lpk
    )


def _mch(
    slots: int, interval: int, device: torch.device, name: str | None = None
) -> MCHManagedCollisionModule:
    return SteadyMCH(
        zch_size=slots,
        device=device,
        eviction_policy=LFU_EvictionPolicy(),
        eviction_interval=interval,
        name=name,
    )


@cache
def mch_bytes() -> tuple[int, int]:
    """(bytes per slot, bytes per table) of TorchRec's MCH buffers, measured once."""
    held = [
        sum(tensor_bytes(_mch(z, 1, torch.device("cpu")).named_buffers()).values())
        for z in (MIN_SLOTS, MIN_SLOTS + 1)
    ]
    per_slot = held[1] - held[0]
    return per_slot, held[0] - MIN_SLOTS * per_slot


class ManagedCollisionEmbeddingBags(IdMappedCollection):
    """TorchRec's MC-EBC for the compressed tables, a plain EBC for the exact ones."""

    def __init__(
        self, tables: list[EmbeddingBagConfig], plan: Plan, config: Any, ctx: BuildContext
    ) -> None:
        super().__init__(tables, plan, knob="zch_size", config=ctx.config)
        mc = [
            inner_table(t, rows=plan.sizes[t.name])
            for t in tables
            if plan.sizes[t.name] is not None
        ]
        exact = [inner_table(t) for t in tables if plan.sizes[t.name] is None]
        self.mc_ebc = (
            ManagedCollisionEmbeddingBagCollection(
                EmbeddingBagCollection(tables=mc, device=ctx.table_device),
                ManagedCollisionCollection(
                    {c.name: self.slot_module(c, config, ctx) for c in mc}, mc
                ),
            )
            if mc
            else None
        )
        self.exact_ebc = (
            EmbeddingBagCollection(tables=exact, device=ctx.table_device) if exact else None
        )
        self.hasher = UniversalHash(1, seed=ctx.seed, device=ctx.device)
        self.params = KeyParams(
            self.feature_names,
            {"rows": [t.num_embeddings for t in tables for _ in t.feature_names]},
            device=ctx.device,
        )
        self._mc_keys_order = [f for c in mc for f in c.feature_names]
        self._exact_keys_order = [f for c in exact for f in c.feature_names]
        produced = [(f, c.embedding_dim) for c in mc + exact for f in c.feature_names]
        self._perm = column_order(
            produced, [(f, t.embedding_dim) for t in tables for f in t.feature_names]
        )
        self._mc_keys: list[str] | None = None

    def slot_module(
        self, table: EmbeddingBagConfig, config: Any, ctx: BuildContext
    ) -> ManagedCollisionModule:
        """The TorchRec module that maps raw ids to the slots of ``table``."""
        return _mch(table.num_embeddings, config.eviction_interval, ctx.device, table.name)

    @property
    def mcc(self) -> ManagedCollisionCollection:
        """The remapping half of the MC-EBC (its MCH modules hold the slot maps)."""
        assert self.mc_ebc is not None
        return self.mc_ebc._managed_collision_collection

    @property
    def mc_tables(self) -> EmbeddingBagCollection:
        """The TorchRec tables behind the slots."""
        assert self.mc_ebc is not None
        return self.mc_ebc._embedding_bag_collection

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        parts = []
        if self.mc_ebc is not None:
            parts.append(in_order(self._lookup_mc(features), self._mc_keys_order))
        if self.exact_ebc is not None:
            ids = fold(features.values(), self.params.expand(features)["rows"], self.hasher)
            parts.append(
                in_order(pooled_lookup(self.exact_ebc, with_values(features, ids)), self._exact_keys_order)
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.keyed(take_columns(out, self._perm))

    def _lookup_mc(self, features: KeyedJaggedTensor) -> KeyedTensor:
        ids = with_values(features, features.values().clamp(max=_EMPTY - 1))
        if not isinstance(self.mc_ebc, ManagedCollisionEmbeddingBagCollection):
            assert self.mc_ebc is not None
            return self.mc_ebc(ids)[0]  # sharded: TorchRec re-draws evicted rows itself
        # unsharded TorchRec leaves evicted rows as they were (its evict() is a TODO), so
        # remap, re-draw what was evicted, then look up, as its sharded module does
        keys = features.keys()
        if keys != self._mc_keys:  # the MCC caches the key order of its first batch
            self.mcc._features_order.clear()
            self.mcc._created_feature_order[0] = False
            self._mc_keys = list(keys)
        remapped = self.remap(ids)
        for table, slots in self.mcc.evict().items():
            if slots is not None and slots.numel():
                self._reinit(table, slots)
        return pooled_lookup(self.mc_tables, remapped)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The MCC's forward: every table's raw ids to slots (state updated as in training)."""
        return mcc_forward(self.mcc, features)

    @torch.no_grad()
    def _reinit(self, table: str, slots: torch.Tensor) -> None:
        """Fresh rows for evicted slots, drawn as the table was initialised."""
        weight = self.mc_tables.embedding_bags[table].weight
        config = next(c for c in self.mc_tables.embedding_bag_configs() if c.name == table)
        fresh = weight[slots].clone()
        config.init_fn(fresh)  # type: ignore[misc]
        weight[slots] = fresh

    def slot_of(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The slot (row) each raw id currently reads, without touching the LFU state."""
        table = next(t.name for t in self.source_tables() if feature in t.feature_names)
        module = self.mcc._managed_collision_modules[table]
        sorted_ids, mapping = module._mch_sorted_raw_ids, module._mch_remapped_ids_mapping
        ids = ids.clamp(max=_EMPTY - 1)
        pos = torch.searchsorted(sorted_ids[:-1], ids)
        hit = sorted_ids[pos] == ids
        return torch.where(hit, mapping[pos], module.output_size() - 1)


def slot_cost(t: EmbeddingBagConfig, fmt: TableFormat, held: tuple[int, int]) -> FieldCost:
    """A table's cost by slots: its rows plus ``held`` (bytes per slot, per table) of remap state."""
    per_slot, per_table = held
    d, f = t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(t.num_embeddings, d, f), MIN_SLOTS, t.num_embeddings,
                     lambda z: fmt.table(z, d, f) + per_slot * z + per_table)  # fmt: skip


def build_slotted(
    tables: list[EmbeddingBagConfig],
    config: BudgetedConfig,
    ctx: BuildContext,
    held: tuple[int, int],
    construct: Callable[[Plan], ManagedCollisionEmbeddingBags],
) -> ManagedCollisionEmbeddingBags:
    """Size an MC-EBC of slotted tables (and plain exact ones) to ``config``'s budget."""
    require_fbgemm_cuda(config.method, ctx.device)
    base = UniversalHash.nbytes(1) + KeyParams.nbytes(1, sum(len(t.feature_names) for t in tables))

    def settle(fmt: TableFormat, plan: Plan) -> int:
        # the MC tables and the exact ones are two collections: each present only when used
        mc = [t for t in tables if plan.sizes[t.name] is not None]
        exact = [t for t in tables if plan.sizes[t.name] is None]
        return base + (fmt.collection(mc) if mc else 0) + (fmt.collection(exact) if exact else 0)

    return build_sized(
        tables, config, ctx,
        costs=lambda fmt: [slot_cost(t, fmt, held) for t in tables],
        fixed=lambda fmt: base + 2 * fmt.collection(tables),  # both collections: at most this
        settle=settle,
        construct=construct,
    )  # fmt: skip


@register(ManagedCollisionConfig)
def build(
    tables: list[EmbeddingBagConfig], config: ManagedCollisionConfig, ctx: BuildContext
) -> ManagedCollisionEmbeddingBags:
    return build_slotted(
        tables,
        config,
        ctx,
        mch_bytes(),
        lambda plan: ManagedCollisionEmbeddingBags(tables, plan, config, ctx),
    )
