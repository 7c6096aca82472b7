"""Where the trainer's model lives: one process (``LocalBackend``) or sharded by
TorchRec's DMP over a process group (``recsys.training.sharded.ShardedBackend``).

The trainer's loop is the same for both; a backend owns what differs: putting the model
on its device, the optimizers, the loss of a (global) batch, evaluation over a split,
copying and restoring the best weights, counting optimizer state, and, for the stages
that need whole tables after training (post-training quantization), the model gathered
into one process.

Example::

    trainer = Trainer(cfg)                                      # LocalBackend on cfg.device
    trainer = Trainer(cfg, backend=ShardedBackend(sharded, rebuild, device))
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import nn

from compression.base import CompressedEmbeddingBagCollection
from compression.memory import optimizer_state_bytes
from recsys.data.loader import BatchLoader
from recsys.training.metrics import evaluate
from recsys.training.optim import Optimizers, build_optimizers
from recsys.training.step import local_loss


class Backend(Protocol):
    device: torch.device
    # the module's regularization() is added on every rank: each adds its share
    reg_scale: float

    def prepare(self, model: nn.Module) -> None: ...

    def optimizers(self, model: nn.Module, module: CompressedEmbeddingBagCollection, cfg: Any) -> Optimizers: ...

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]: ...

    def evaluate(self, model: nn.Module, loader: BatchLoader) -> dict[str, float]: ...

    def snapshot(self, model: nn.Module) -> Any: ...

    def restore(self, model: nn.Module, snapshot: Any) -> None: ...

    def optimizer_bytes(self, opts: Optimizers, module: CompressedEmbeddingBagCollection) -> int | None: ...

    def gather(self, model: nn.Module, loaders: tuple[BatchLoader, ...]) -> tuple[nn.Module | None, Backend]:
        """The model whole in this process, for post-training stages, and the backend to
        run them with (local: ``model`` itself and this backend; sharded: rank 0's gathered
        copy, None on the other ranks)."""
        ...


class LocalBackend:
    """One process: the model on ``device``, plain optimizers, the batch's mean loss."""

    reg_scale = 1.0

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def prepare(self, model: nn.Module) -> None:
        model.to(self.device)

    def optimizers(self, model: nn.Module, module: CompressedEmbeddingBagCollection, cfg: Any) -> Optimizers:
        return build_optimizers(model, module, cfg)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        return local_loss(logits, labels)

    def evaluate(self, model: nn.Module, loader: BatchLoader) -> dict[str, float]:
        return evaluate(model, loader, self.device)

    def snapshot(self, model: nn.Module) -> Any:
        return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    def restore(self, model: nn.Module, snapshot: Any) -> None:
        model.load_state_dict(snapshot)

    def optimizer_bytes(self, opts: Optimizers, module: CompressedEmbeddingBagCollection) -> int | None:
        return optimizer_state_bytes(opts, module.table_parameters())

    def gather(self, model: nn.Module, loaders: tuple[BatchLoader, ...]) -> tuple[nn.Module | None, Backend]:
        return model, self
