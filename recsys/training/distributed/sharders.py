"""What DMP may shard and how: sharders that work on the CPU, and the planner's constraints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder as _StockEBCSharder,
)
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from compression.base import CompressedEmbeddingBagCollection
from recsys.training.distributed.process import DistributedError, Runtime

# FBGEMM's fused table-batched kernels need each table's local columns to be a multiple of 4
FUSED_DIM_MULTIPLE = 4


class EmbeddingBagCollectionSharder(_StockEBCSharder):
    """TorchRec's EBC sharder with row-wise sharding on the CPU too (the stock one
    lists it for CUDA only; FBGEMM's CPU kernels and gloo handle it)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types.append(ShardingType.ROW_WISE.value)
        return types


class ManagedCollisionSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's MC-EBC sharder (row-wise only) over the CPU-capable EBC sharder; on the
    CPU it offers FBGEMM's fused kernel alone (it lists UVM kernels for every device,
    which the planner's CPU estimators refuse)."""

    def __init__(self) -> None:
        super().__init__(ebc_sharder=EmbeddingBagCollectionSharder())

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = list(super().compute_kernels(sharding_type, compute_device_type))
        if compute_device_type == "cpu":
            kernels = [k for k in kernels if k == EmbeddingComputeKernel.FUSED.value]
        return kernels


def sharders() -> list[ModuleSharder[nn.Module]]:
    """One sharder per TorchRec module type our methods are built of."""
    return [
        EmbeddingBagCollectionSharder(),
        EmbeddingCollectionSharder(),  # OptEmbed's tables; lists row-wise on every device
        ManagedCollisionSharder(),
    ]


def check_shardable(model: nn.Module, runtime: Runtime) -> None:
    """Refuse, in one line, what TorchRec cannot shard here (before any collective)."""
    for m in model.modules():
        reason = m.sharding_refusal() if isinstance(m, CompressedEmbeddingBagCollection) else None
        if reason:
            raise DistributedError(f"{reason}; train it in one process (distributed.mode=off)")
    mc = [m for m in model.modules() if isinstance(m, ManagedCollisionEmbeddingBagCollection)]
    if mc and runtime.device.type == "cpu":
        raise DistributedError(
            "managed collisions (managed_collision, mpzch) cannot be sharded on the CPU: TorchRec's sharded MC-EBC re-draws "
            "evicted rows with fbgemm::reset_weight_momentum, which FBGEMM implements for CUDA "
            "only; train it in one process (distributed.mode=off) or on GPUs"
        )
    for m in mc:
        for name, mch in m._managed_collision_collection._managed_collision_modules.items():
            if mch.buckets() % runtime.world_size:
                raise DistributedError(
                    f"managed-collision table '{name}' has {mch.buckets()} bucket(s); TorchRec's "
                    f"row-wise MC sharding needs a multiple of the world size ({runtime.world_size})"
                )


def shardable_tables(model: nn.Module) -> dict[str, int]:
    """Table name -> dim of every table DMP will shard in ``model``."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            out.update({c.name: c.embedding_dim for c in m.embedding_bag_configs()})
        elif isinstance(m, EmbeddingCollection):
            out.update({c.name: c.embedding_dim for c in m.embedding_configs()})
    return out


def as_constraints(value: Any, table: str) -> ParameterConstraints:
    """A ``ParameterConstraints`` from one (or a config mapping of its fields)."""
    if isinstance(value, ParameterConstraints):
        return value
    known = {f.name for f in fields(ParameterConstraints)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise DistributedError(
            f"distributed.constraints.{table}: unknown field(s) {unknown}; e.g. sharding_types, "
            "compute_kernels, min_partition"
        )
    return ParameterConstraints(**dict(value))


def table_constraints(
    model: nn.Module, module: nn.Module, overrides: Mapping[str, Any] | None = None
) -> dict[str, ParameterConstraints]:
    """The planner's constraints: dims FBGEMM's fused kernels cannot hold replicated,
    then the method's ``sharding_constraints()``, then ``overrides`` (config)."""
    tables = shardable_tables(model)
    out: dict[str, ParameterConstraints] = {
        name: ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value])
        for name, dim in tables.items()
        if dim % FUSED_DIM_MULTIPLE
    }
    method: dict[str, Any] = module.sharding_constraints() if isinstance(module, CompressedEmbeddingBagCollection) else {}
    for source, given in (("the method", method), ("distributed.constraints", dict(overrides or {}))):
        unknown = sorted(set(given) - set(tables))
        if unknown:
            raise DistributedError(
                f"{source} constrains unknown table(s) {unknown}; the tables are {sorted(tables)}"
            )
        out.update({name: as_constraints(c, name) for name, c in given.items()})
    for name, c in out.items():
        allowed = c.sharding_types or []
        if tables[name] % FUSED_DIM_MULTIPLE and set(allowed) - {ShardingType.DATA_PARALLEL.value}:
            raise DistributedError(
                f"table '{name}' has dim {tables[name]}: FBGEMM's fused kernels need a multiple of "
                f"{FUSED_DIM_MULTIPLE}, so only data_parallel can hold it (asked: {allowed})"
            )
    return out
