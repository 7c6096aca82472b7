"""Honest byte accounting: what a deployed module holds, counted from its tensors.

Every parameter and buffer of the module is counted by the storage it occupies (a
storage shared by two tensors is counted once), so remap tables, hash parameters,
quantized rows with their scale/bias and padding are all in. Two details of
quantized tables: TorchRec's int4/int2 weights are ``UIntXTensor`` wrappers, counted
by the uint8 storage they wrap; fbgemm's inference TBE keeps its weight storage and
per-feature offsets/placements as plain tensor attributes, not buffers, and those are
counted too (the storage once, with the table views into it). Optimizer state is
reported beside it, never inside it. The ratio is against the same source tables
held uncompressed in fp32.

Example::

    report = memory_report(module)
    report.bytes, report.ratio
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.tensor_types import UIntXTensor

from compression.formats import FP32_BYTES, table_bytes


def uncompressed_bytes(tables: Sequence[EmbeddingBagConfig]) -> int:
    """Bytes of ``tables`` as plain fp32 rows: the reference every ratio is against."""
    return sum(table_bytes(t.num_embeddings, t.embedding_dim, "fp32") for t in tables)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns the storage (TorchRec's packed int4/int2 wrap a uint8 one)."""
    return t.elem if isinstance(t, UIntXTensor) else t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    if t.device.type == "meta":  # no data: every meta storage's pointer is 0, its handle is not
        return ("meta", s._cdata)
    return (str(t.device), s.data_ptr())


def tensor_bytes(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Bytes per named tensor, by the storage each occupies, shared storages once."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for name, t in tensors:
        if t is None:
            continue
        t = _plain(t)
        key = _storage_key(t)
        if key in seen and t.untyped_storage().nbytes() > 0:
            continue
        seen.add(key)
        out[name] = t.untyped_storage().nbytes()
    return out


def local_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors this process holds of a value: a tensor itself, the local shards of a
    ``ShardedTensor`` or a ``DTensor`` (the forms a sharded ``state_dict`` holds), none
    of anything else."""
    if isinstance(value, ShardedTensor):
        return [s.tensor for s in value.local_shards()]
    if isinstance(value, DTensor):  # TorchRec's local part may hold several shards
        from torchrec.distributed.shards_wrapper import LocalShardsWrapper  # sharded runs only

        local = value.to_local()
        return list(local.local_shards()) if isinstance(local, LocalShardsWrapper) else [local]
    return [value] if torch.is_tensor(value) else []


def held_bytes(values: Iterable[tuple[str, Any]]) -> int:
    """Bytes this process holds of named ``values`` (tensors, sharded tensors: their
    local shards), counted as ``tensor_bytes`` counts, a storage once; a meta tensor
    holds nothing.

    Example::

        held_bytes(dmp.state_dict().items())     # what this rank holds of the model
    """
    local = [(f"{name}#{i}", t) for name, v in values for i, t in enumerate(local_tensors(v)) if t.device.type != "meta"]
    return sum(tensor_bytes(local).values())


@dataclass
class MemoryReport:
    """Bytes a module holds (parameters + buffers), its ratio, optimizer state beside."""

    bytes: int
    parameter_bytes: int
    buffer_bytes: int
    uncompressed_bytes: int
    by_tensor: dict[str, int] = field(default_factory=dict)
    optimizer_bytes: int | None = None

    @property
    def ratio(self) -> float:
        """Compression ratio: fp32 uncompressed bytes over the bytes held."""
        return self.uncompressed_bytes / self.bytes if self.bytes else float("inf")

    def as_metrics(self, prefix: str = "embedding_") -> dict[str, float]:
        out = {
            f"{prefix}bytes": float(self.bytes),
            f"{prefix}parameter_bytes": float(self.parameter_bytes),
            f"{prefix}buffer_bytes": float(self.buffer_bytes),
            f"{prefix}uncompressed_bytes": float(self.uncompressed_bytes),
            "compression_ratio": self.ratio,
        }
        if self.optimizer_bytes is not None:
            out[f"{prefix}optimizer_bytes"] = float(self.optimizer_bytes)
        return out


def tbe_attributes(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors fbgemm's inference TBEs inside ``module`` hold as plain attributes."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen):
            out += [(f"tbe:{name}.{k}", v) for k, v in vars(m).items() if torch.is_tensor(v)]
    return out


def memory_report(module: nn.Module, source_tables: Sequence[EmbeddingBagConfig] | None = None) -> MemoryReport:
    """Count the bytes ``module`` holds; ``source_tables`` default to the module's own."""
    if source_tables is None:
        source_tables = module.source_tables()  # type: ignore[operator]
    params = tensor_bytes((f"param:{n}", p) for n, p in module.named_parameters())
    # a buffer that aliases a parameter's storage is not counted twice
    both = tensor_bytes(
        [(f"param:{n}", p) for n, p in module.named_parameters()]
        + [(f"buffer:{n}", b) for n, b in module.named_buffers()]
        + tbe_attributes(module)
    )
    pbytes = sum(params.values())
    total = sum(both.values())
    return MemoryReport(
        bytes=total,
        parameter_bytes=pbytes,
        buffer_bytes=total - pbytes,
        uncompressed_bytes=uncompressed_bytes(source_tables),
        by_tensor=both,
    )


# fp32 optimizer state an embedding optimizer keeps: (bytes per row, bytes per element)
OPTIMIZER_STATE_BYTES: dict[str, tuple[int, int]] = {
    "rowwise_adagrad": (FP32_BYTES, 0),  # one accumulator per row
    "adagrad": (0, FP32_BYTES),  # one accumulator per element
    "adam": (0, 2 * FP32_BYTES),  # two moments per element
    "sgd": (0, 0),
}


def planned_optimizer_bytes(optimizer: str, shapes: Iterable[tuple[int, ...]]) -> int:
    """Optimizer state ``optimizer`` will allocate for tables of these shapes (rows, dim)."""
    try:
        per_row, per_elem = OPTIMIZER_STATE_BYTES[optimizer]
    except KeyError:
        raise ValueError(f"unknown embedding optimizer '{optimizer}'; known: {', '.join(OPTIMIZER_STATE_BYTES)}") from None
    total = 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        elems = 1
        for n in shape:
            elems *= n
        total += per_row * rows + per_elem * elems
    return total


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[torch.Tensor]) -> int:
    """Bytes of optimizer state held for ``params`` (e.g. Adagrad accumulators)."""
    wanted = {id(p) for p in params}
    tensors: list[tuple[str, torch.Tensor]] = []
    for i, opt in enumerate(optimizers):
        for p, state in opt.state.items():
            if id(p) in wanted:
                for k, v in state.items():
                    if torch.is_tensor(v):
                        tensors.append((f"{i}:{id(p)}:{k}", v))
    return sum(tensor_bytes(tensors).values())
