"""MPZCH: TorchRec's multi-probe zero-collision hashing (``HashZchManagedCollisionModule``).

Per compressed table, TorchRec's MPZCH module keeps an identity table of ``zch_size``
slots: an id hashes (FBGEMM's murmur3) to a home slot and probes up to ``max_probe``
slots from there for its own or an empty one, so ids that find a slot never share
a row. An id that finds none (its whole window taken) reads its home slot's row,
shared with the id there. (TorchRec's other choice, ``disable_fallback``, drops such
an id but keeps its bag's length right only when every bag holds one id, so it is not
offered.) The compressed tables are TorchRec's ``ManagedCollisionEmbeddingBagCollection``
with the MPZCH modules in its ``ManagedCollisionCollection``, as TorchRec builds them.

Eviction (``eviction``): ``none`` (default: a slot is kept for good), ``ttl`` (FBGEMM's policy
0: a new id takes the first slot of its window not read for ``ttl_steps`` training
steps) or ``lru`` (policy 1: the least recently read of such slots). TorchRec counts
that time in wall-clock hours, which an offline run of minutes never advances; here
it is counted in training steps of the module (a buffer, saved with the state), fed
to TorchRec's eviction config as its TTL. An evicted slot's row is re-drawn with the
table's init, as for ``managed_collision``.

On the CPU, FBGEMM's ``zero_collision_hash`` kernel answers lookups only (its CPU
build refuses inserts); training inserts go through ``compression.zch_cpu``, which
follows FBGEMM's CUDA kernel, and every lookup outside training (and everything on
CUDA) goes through FBGEMM's own kernel, as do training lookups once a table without
eviction is full (it stays full: no insert can place an id). Unsharded on the CPU,
the collection's remap of every table, inserts and evictions included, is one call of
``mc_cpu.cpp`` (``zch_forward``) where TorchRec runs a dozen small torch operations and
FBGEMM's kernel a table: the same slots, identities, times, evictions and step counts, tested
step by step against TorchRec's forward.

Bytes: per slot, the row (4·dim), the int64 identity and, with eviction, the int32
time of last read; per table the bucket count and the step clock (all counted from
the module's tensors). Tables whose plain form is smaller stay exact.

Ids: keys are raw int64 ids (``takes_raw_ids``); -1 is FBGEMM's empty-slot marker and
reads as -2, and 2^63 - 1 as 2^63 - 2. Sharding: TorchRec's sharded MC-EBC needs a
CUDA-only FBGEMM op on the CPU, so a sharded run is refused as for ``managed_collision``.

Example::

    ebc = compress(tables, MpzchConfig(budget=Budget(ratio=10)))  # no eviction
    ebc = compress(tables, MpzchConfig(budget=Budget(ratio=10), eviction="lru", ttl_steps=100))
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.hash_mc_evictions import HashZchEvictionConfig, HashZchEvictionPolicyName
from torchrec.modules.hash_mc_modules import HashZchManagedCollisionModule
from torchrec.modules.mc_modules import ManagedCollisionCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from compression.api import BuildContext, quiet_logs, register
from compression.base import _tracing
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.memory import tensor_bytes
from compression.methods.managed_collision import (
    MIN_SLOTS,
    ManagedCollisionEmbeddingBags,
    build_slotted,
    kernel,
    table_bounds,
)
from compression.sizing import BudgetedConfig
from compression.zch_cpu import EMPTY, zero_collision_hash_insert

EVICTIONS = {
    "none": None,
    "ttl": HashZchEvictionPolicyName.SINGLE_TTL_EVICTION,
    "lru": HashZchEvictionPolicyName.LRU_EVICTION,
}


@dataclass
class MpzchConfig(BudgetedConfig):
    """TorchRec's MPZCH; ``budget`` picks the slots, or give ``zch_size``."""

    method: ClassVar[str] = "mpzch"
    takes_raw_ids: ClassVar[bool] = True
    # slots (rows) of every MPZCH table (budget: null)
    zch_size: Optional[int] = None
    # slots an id probes from its home slot, for its own or a free one
    max_probe: int = bounded(128, ge=1)
    # which slot a new id may take when its window is full: none, ttl or lru. none: chosen
    # on validation AUC (MovieLens-100K and drifting synthetic ids split in time, 10x,
    # against lru with 25, 100 and 1000 steps), and TorchRec's default
    eviction: str = one_of("none", *EVICTIONS)
    # training steps a slot must go unread before a new id may take it
    ttl_steps: int = bounded(1000, ge=1)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"zch_size": self.zch_size}

    @classmethod
    def contract_examples(cls) -> list[MpzchConfig]:
        return [
            cls(),
            cls(budget=Budget(ratio=2), eviction="ttl", ttl_steps=1, max_probe=4),
            cls(budget=None, zch_size=100, eviction="lru", ttl_steps=2),
        ]


class _StepEviction(torch.nn.Module):
    """TorchRec's TTL scores (time of read + TTL, threshold now) in training steps."""

    def __init__(self, ttl: int, clock: Callable[[], int]) -> None:
        super().__init__()
        self.ttl = ttl
        self.clock = clock  # reads the owner's step buffer wherever it has moved

    def forward(self, feature: JaggedTensor) -> tuple[torch.Tensor, int]:
        now = self.clock()
        return torch.full_like(feature.values(), now + self.ttl, dtype=torch.int32), now


class StepMpzch(HashZchManagedCollisionModule):
    """TorchRec's MPZCH module, trainable on the CPU, its eviction clock in steps.

    Takes TorchRec's constructor arguments, so TorchRec's own rebuilds (sharding)
    make this class again; ``eviction_config.single_ttl`` is read as steps.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("_steps", torch.zeros((), dtype=torch.int64))
        if self._eviction_module is not None:  # type: ignore[has-type]
            ttl = self._eviction_config.single_ttl if self._eviction_config else None
            assert ttl is not None, "MPZCH eviction needs a TTL"
            self._eviction_module = _StepEviction(ttl, lambda: int(self._steps))
        # without eviction a full table stays full: no insert can place an id, so a training
        # lookup is FBGEMM's lookup (empty slots recounted every 64 lookups, and after a load)
        self._empty_slots, self._counted_at, self._lookups = -1, (-1, -1), 0

    def remap(
        self, features: dict[str, JaggedTensor], *args: Any, **kwargs: Any
    ) -> dict[str, JaggedTensor]:
        if self.training:
            self._steps += 1
        return super().remap(features, *args, **kwargs)

    def _zero_collision_hash(self, **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        values = kwargs["input"]
        kwargs["input"] = torch.where(values == EMPTY, EMPTY - 1, values)
        if values.is_cuda:
            return super()._zero_collision_hash(**kwargs)
        if kwargs["readonly"] or self._full(kwargs["identities"]):  # FBGEMM's CPU lookup
            kwargs.update(readonly=True, metadata=None, input_metadata=None, eviction_threshold=-1)
            return super()._zero_collision_hash(**kwargs)
        return zero_collision_hash_insert(
            kwargs["input"], kwargs["identities"].data, kwargs["max_probe"], kwargs["local_sizes"],
            kwargs["offsets"], kwargs["metadata"], kwargs["input_metadata"], kwargs["eviction_threshold"],
            kwargs["eviction_policy"], kwargs["disable_fallback"],
        )  # fmt: skip

    def _full(self, identities: torch.Tensor) -> bool:
        """Whether no id can be placed: no eviction and no empty slot."""
        if self._eviction_module is not None:
            return False
        at = (id(identities), identities._version)  # a load copies into it: counted again
        if at != self._counted_at or self._lookups % 64 == 0:
            self._empty_slots, self._counted_at = int((identities == EMPTY).sum()), at
        self._lookups += 1
        return self._empty_slots == 0


_NO_METADATA = torch.empty(0, dtype=torch.int32)  # (a table without eviction)


def _plain_modules(mcc: ManagedCollisionCollection) -> list[StepMpzch] | None:
    """The MCC's modules in its tables' order, where every one is a ``StepMpzch`` of one
    unsharded bucket with fallback, no reserved slots, logger or runtime metadata, and CPU
    int64 identities: what the kernel computes (eviction is checked by the caller)."""
    modules = dict(mcc._managed_collision_modules.items())
    if list(modules) != list(mcc._table_to_features):
        return None
    for m in modules.values():
        if type(m) is not StepMpzch or m._buckets != 1 or m.is_sharded or m._disable_fallback:
            return None
        if m._output_global_offset_tensor is not None or m._opt_in_prob != -1 or m._scalar_logger is not None:
            return None
        if m._track_id_freq or m._write_runtime_meta_dim > 0 or m._input_hash_size != 0:
            return None
        if any(f.lower().endswith(m._read_only_suffix) for f in mcc._table_to_features[m._name]):
            return None
    return list(modules.values())  # type: ignore[arg-type]


def zch_forward(
    mcc: ManagedCollisionCollection, features: KeyedJaggedTensor, use_kernel: bool = True
) -> KeyedJaggedTensor:
    """TorchRec's ``ManagedCollisionCollection.forward`` of MPZCH modules (every table's remap,
    and in training its inserts, evictions and step count), computed by the kernel for every
    table at once where the modules are as ``_plain_modules`` asks and the batch is one
    TorchRec's forward would take as is (no weights, one stride); else TorchRec's own forward.
    The same slots, identities, times of last read, evicted slots and steps either way
    (``test_mpzch``)."""
    k = kernel() if use_kernel and not _tracing() else None  # (a traced graph keeps TorchRec's ops)
    modules = _plain_modules(mcc) if k is not None else None
    if k is None or modules is None or features.weights_or_none() is not None or features.variable_stride_per_key():
        return mcc(features)
    evictions = [m._eviction_module if mcc.training else None for m in modules]
    if any(e is not None and type(e) is not _StepEviction for e in evictions):
        return mcc(features)
    feats, bounds = table_bounds(mcc, features)
    out, evicted = k.zch_remap(
        feats.values(), bounds, [m._hash_zch_identities.data for m in modules], [m._max_probe for m in modules],
        [m._steps for m in modules], mcc.training, [-1 if e is None else e.ttl for e in evictions],
        [m.eviction_flag for m in modules],
        [_NO_METADATA if e is None else m._hash_zch_metadata.data for m, e in zip(modules, evictions)],
    )  # fmt: skip
    if out is None:
        return mcc(features)  # (a tensor the kernel does not take: nothing was touched)
    for m, slots in zip(modules, evicted):
        if slots.numel():  # (TorchRec's remap keeps them so; the MCC's evict() collects them)
            m._evicted_indices.append(slots)
    return KeyedJaggedTensor(
        keys=feats.keys(), values=out, lengths=feats.lengths(), stride=feats.stride(),
        length_per_key=feats.length_per_key(),
    )  # fmt: skip


def slot_module(slots: int, config: MpzchConfig, device: torch.device, name: str) -> StepMpzch:
    policy = EVICTIONS[config.eviction]
    # TorchRec logs each module's settings, line by line, and warns for each that it skips
    # its state validation (which its MPZCH module always does)
    with quiet_logs(logging.WARNING), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # TorchRec's own
        return StepMpzch(
            zch_size=slots, device=device, total_num_buckets=1, max_probe=config.max_probe, name=name,
            eviction_policy_name=policy,
            eviction_config=HashZchEvictionConfig(features=[], single_ttl=config.ttl_steps) if policy else None,
        )  # fmt: skip


@cache
def zch_bytes(eviction: str) -> tuple[int, int]:
    """(bytes per slot, bytes per table) of the MPZCH module's tensors, measured once."""
    config = MpzchConfig(eviction=eviction)
    held = [
        sum(tensor_bytes(slot_module(z, config, torch.device("cpu"), "t").named_buffers()).values())
        for z in (MIN_SLOTS, MIN_SLOTS + 1)
    ]
    per_slot = held[1] - held[0]
    return per_slot, held[0] - MIN_SLOTS * per_slot


class MpzchEmbeddingBags(ManagedCollisionEmbeddingBags):
    """TorchRec's MC-EBC with MPZCH modules for the compressed tables."""

    def slot_module(self, table: EmbeddingBagConfig, config: Any, ctx: BuildContext) -> StepMpzch:
        return slot_module(table.num_embeddings, config, ctx.device, table.name)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return zch_forward(self.mcc, features)

    def slot_of(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The slot (row) each raw id reads now (FBGEMM's lookup)."""
        table = next(t.name for t in self.source_tables() if feature in t.feature_names)
        module = self.mcc._managed_collision_modules[table]
        was = module.training
        module.eval()
        try:
            return module({feature: JaggedTensor(values=ids, lengths=torch.ones_like(ids))})[
                feature
            ].values()
        finally:
            module.train(was)


@register(MpzchConfig)
def build(
    tables: list[EmbeddingBagConfig], config: MpzchConfig, ctx: BuildContext
) -> ManagedCollisionEmbeddingBags:
    construct = lambda plan: MpzchEmbeddingBags(tables, plan, config, ctx)  # noqa: E731
    return build_slotted(tables, config, ctx, zch_bytes(config.eviction), construct)
