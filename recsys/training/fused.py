"""Fused table optimizers while training (``trainer.fused_tables``).

With ``trainer.fused_tables: true`` the plain TorchRec ``EmbeddingBagCollection``s inside a
method that declares ``fusable_tables`` (its forward reads its rows only through them) become
TorchRec's ``FusedEmbeddingBagCollection`` for the training stage: fbgemm's TBE kernel, whose
backward applies the embedding optimizer to the rows the batch touched, in place. Without
it each table gets a dense gradient and the optimizer walks every row every step, so a step
costs what the whole tables cost (Criteo's 33.7M ids: 98% of a step; ``docs/results.md``).

The update is the unfused one's: fbgemm's exact row-wise Adagrad, Adagrad or SGD with the
learning rate and epsilon of ``recsys.training.optim``'s optimizers, with no embedding L2
(``embedding_l2: 0``: the trainer's ``table`` L2 decays every row every step, which no fused
kernel does, and fbgemm's weight decay is not its ``batch_rows`` L2 either: row-wise Adagrad
and SGD ignore it, Adagrad's drifts from it within three steps) and no gradient clipping (the
rows' gradients never exist as tensors). After the stage the tables are plain collections
again holding the trained rows, so bytes, quantization, export and the later stages see what
they see without fusing.

Example::

    fused = FusedTables.fuse(module, cfg)       # None: the method or config does not allow it
    opts = fused.optimizers(model, module, cfg)  # the rows' optimizer steps in the backward
    ... train ...
    fused.unfuse()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from compression.api import quiet_logs
from recsys.training.optim import Optimizers, build_optimizers

# the trainer's sparse optimizers fbgemm runs fused on the CPU, with the unfused ones' epsilon
FUSED_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": 1e-10}),
    "adagrad": (torch.optim.Adagrad, {"eps": 1e-10}),
    "sgd": (torch.optim.SGD, {}),
}


def config_refusal(cfg: Any) -> str | None:
    """Why the trainer config cannot train with fused tables (None: it can), one line."""
    if cfg.sparse_optimizer not in FUSED_OPTIMIZERS:
        return (f"trainer.fused_tables: sparse_optimizer '{cfg.sparse_optimizer}' has no fused kernel on every device; "
                f"use one of {', '.join(FUSED_OPTIMIZERS)}")  # fmt: skip
    if cfg.embedding_l2:
        return (f"trainer.fused_tables: fbgemm's fused kernels do not apply the embedding L2 as the trainer does "
                f"(measured: row-wise Adagrad and SGD ignore a weight decay, Adagrad's drifts from it), so "
                f"embedding_l2={cfg.embedding_l2} would change the protocol; set trainer.embedding_l2=0")  # fmt: skip
    if cfg.clip_grad_norm:
        return "trainer.fused_tables: the fused rows' gradients are never formed, so clip_grad_norm cannot see them; unset it"
    return None


class FusedTables:
    """The fused collections swapped into a module, their optimizer, and the way back."""

    def __init__(self, swaps: list[tuple[nn.Module, str, EmbeddingBagCollection, FusedEmbeddingBagCollection]]) -> None:
        self.swaps = swaps
        self.optimizer = CombinedOptimizer([(f"fused{i}", f.fused_optimizer()) for i, (*_, f) in enumerate(swaps)])

    @classmethod
    def fuse(cls, module: Any, cfg: Any) -> FusedTables | None:
        """Swap every plain TorchRec ``EmbeddingBagCollection`` of ``module`` for a fused one
        holding the same rows; None where the method does not declare ``fusable_tables``
        or holds no such collection."""
        config = module.compression_config
        if not getattr(config, "fusable_tables", False):
            return None
        if config.quantization is not None and config.quantization.aware:  # QAT reads the rows itself
            return None
        opt_type, defaults = FUSED_OPTIMIZERS[cfg.sparse_optimizer]
        kwargs: dict[str, Any] = {"lr": cfg.sparse_lr, **defaults}
        swaps = []
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not EmbeddingBagCollection:
                    continue
                weights = list(child.parameters())
                if not weights or weights[0].device.type == "meta":
                    continue
                if any(t.embedding_dim % 4 for t in child.embedding_bag_configs()):
                    continue  # fbgemm's CPU kernel takes dims that are multiples of 4: stays plain
                with quiet_logs():  # fbgemm logs its TBE's settings to the root logger, line by line
                    fused = FusedEmbeddingBagCollection(
                        tables=child.embedding_bag_configs(), optimizer_type=opt_type, optimizer_kwargs=kwargs,
                        is_weighted=child.is_weighted(), device=weights[0].device,
                    )  # fmt: skip
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
                swaps.append((parent, name, child, fused))
        return cls(swaps) if swaps else None

    def parameter_ids(self) -> set[int]:
        """The fused rows (their optimizer is this one, stepped in the backward)."""
        return {id(p) for *_, f in self.swaps for p in f.parameters()}

    def optimizers(self, model: nn.Module, module: Any, cfg: Any) -> Optimizers:
        """``build_optimizers`` with the fused rows' optimizer in place of theirs: every other
        parameter of ``model`` as without fusing."""
        taken = self.parameter_ids()
        return build_optimizers([p for p in model.parameters() if id(p) not in taken], module, cfg, fused=self.optimizer)

    def state_bytes(self) -> int:
        """The fused optimizer's state (row-wise Adagrad: one fp32 a row)."""
        total = 0
        for value in self.optimizer.state.values():
            for t in value.values() if isinstance(value, dict) else []:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def unfuse(self) -> None:
        """Put the plain collections back, holding the fused ones' rows."""
        for parent, name, plain, fused in reversed(self.swaps):
            with torch.no_grad():
                plain.load_state_dict(fused.state_dict())
            setattr(parent, name, plain)
        self.swaps = []
