"""The trainer's sharded backend: loss over the global batch, optimizers, gathered
predictions, best-weight copies of this rank's shards, and a rank-0 copy of the trained
model for post-training stages.

``ShardedBackend`` is what the trainer runs a ``DistributedModelParallel`` model with
(``recsys.training.distributed``); one process is the same code with world size 1.
Each rank's batch is its part of the global batch, padded with empty samples
(label ``PAD_LABEL``) to the same size on every rank (``BatchLoader(shard=...)``).

Example::

    loss, value, n = global_loss(logits, batch.labels)   # value: the global batch's mean
    loss.backward(); opts.step()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.optim.optimizers import in_backward_optimizer_filter

from compression.base import CompressedEmbeddingBagCollection
from compression.memory import local_tensors
from recsys.data.loader import PAD_LABEL, BatchLoader
from recsys.training.backends import LocalBackend
from recsys.training.distributed import Sharded
from recsys.training.metrics import binary_metrics
from recsys.training.metrics import predict as local_predict
from recsys.training.optim import Optimizers, build_optimizers


def global_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """This rank's share of the global batch's mean BCE, that mean, and the batch's size.

    The share is the sum over this rank's real samples over the global sample count,
    so the shares' gradients add up (tables: TorchRec's backward all-to-all; dense:
    the summing DDP hook) to the gradient of the whole batch's mean.
    """
    real = labels != PAD_LABEL
    count = real.sum().to(torch.float64).reshape(1)
    dist.all_reduce(count)
    per = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
    loss = (per * real).sum() / count.to(per.dtype)
    value = loss.detach().clone().reshape(1)
    dist.all_reduce(value)
    return loss, float(value), int(count)


def sharded_optimizers(sharded: Sharded, module: CompressedEmbeddingBagCollection, cfg: Any) -> Optimizers:
    """``build_optimizers`` of a DMP-wrapped model: the fused optimizer of the sharded
    tables, ``cfg.sparse_optimizer`` for the replicated tables, Adam for the dense rest."""
    rest = [(n, p) for n, p in in_backward_optimizer_filter(sharded.dmp.named_parameters()) if p.requires_grad]
    return build_optimizers([p for _, p in rest], module, cfg, fused=sharded.dmp.fused_optimizer,
                            tables=[p for n, p in rest if n in sharded.replicated_tables])  # fmt: skip


@torch.no_grad()
def predict(
    model: nn.Module, loader: BatchLoader, device: torch.device, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every real sample of the split, gathered from all ranks
    (every rank gets them all: early stopping decides the same everywhere)."""
    mine = local_predict(model, loader, device, max_batches, empty_ok=True)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out_logits = torch.cat([p[0] for p in parts])
    if not len(out_logits):
        raise ValueError(f"split '{loader.split}' of {loader.path} has no rows to evaluate")
    return out_logits, torch.cat([p[1] for p in parts])


def unshard(sharded: Sharded, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
    """The trained model as one unsharded module on rank 0 (None on the others).

    ``rebuild()`` makes the model with real, unsharded tables; every sharded tensor
    is gathered into it (a collective: every rank calls this). For stages that need
    whole tables after training (post-training quantization) and their evaluation.
    """
    rank = dist.get_rank()
    model = rebuild() if rank == 0 else None
    target = model.state_dict() if model is not None else {}
    for key, value in sharded.dmp.state_dict().items():
        if isinstance(value, ShardedTensor):  # a collective: every rank sends its shards
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if model is not None:
                target[key] = out
        elif isinstance(value, DTensor):  # a collective too
            full = value.full_tensor()
            if model is not None:
                target[key] = full
        elif model is not None and key in target:  # replicated: every rank holds it whole
            target[key] = value
    if model is not None:
        model.load_state_dict(target)
    return model


class ShardedBackend:
    """The trainer's model wrapped by DMP (``sharded``); ``rebuild()`` makes it again
    with real, unsharded tables, for the stages that run on rank 0 after training."""

    def __init__(self, sharded: Sharded, rebuild: Callable[[], nn.Module], device: torch.device) -> None:
        self.sharded, self.rebuild, self.device = sharded, rebuild, device
        self.reg_scale = 1.0 / sharded.world_size

    def prepare(self, model: nn.Module) -> None:
        pass  # DMP placed every shard on its rank's device

    def optimizers(self, model: nn.Module, module: CompressedEmbeddingBagCollection, cfg: Any) -> Optimizers:
        return sharded_optimizers(self.sharded, module, cfg)  # fused tables; the dense rest on summed gradients

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        return global_loss(logits, labels)

    def evaluate(self, model: nn.Module, loader: BatchLoader) -> dict[str, float]:
        return binary_metrics(*predict(model, loader, self.device))

    def snapshot(self, model: nn.Module) -> Any:
        # this rank's shards, each copied alone: a deep copy of their views would copy the
        # whole table batch once per table
        return {k: [t.detach().clone() for t in local_tensors(v)] for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module, snapshot: Any) -> None:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                for dst, src in zip(local_tensors(v), snapshot[k]):
                    dst.copy_(src)

    def optimizer_bytes(self, opts: Optimizers, module: CompressedEmbeddingBagCollection) -> int | None:
        return None  # each rank's share: recsys.training.distributed.rank_bytes

    def gather(self, model: nn.Module, loaders: tuple[BatchLoader, ...]) -> tuple[nn.Module | None, LocalBackend]:
        """The model gathered unsharded on rank 0 (None on the others: their part is done),
        the loaders unsharded (the rest of the schedule runs on rank 0 alone, on whole
        splits), and the backend to run it with: local, on this device."""
        whole = unshard(self.sharded, self.rebuild)
        if whole is not None:
            for loader in loaders:
                loader.shard = None
            whole.to(self.device)
        return whole, LocalBackend(self.device)
