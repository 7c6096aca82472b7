"""One training step, the same wherever a step is taken (the trainer, step benchmarks).

forward -> task loss (+ the compressed module's own ``regularization()``) -> backward
-> the embedding L2's gradient -> gradient clipping -> every optimizer's step.

Example::

    step = TrainStep(model, module, build_optimizers(model, module, cfg), cfg)
    loss_value, n_samples = step(batch)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch

from recsys.training.malloc import keep_freed_memory
from recsys.training.optim import Optimizers, add_embedding_l2

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float, int]]


def local_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(mean BCE to backpropagate, its value, samples in the batch)."""
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    return loss, float(loss.detach()), len(labels)


class TrainStep:
    """A callable training step over ``model`` with ``module`` (its compressed embeddings).

    ``cfg`` gives ``embedding_l2``, ``embedding_l2_mode`` and ``clip_grad_norm``;
    ``loss_fn`` the task loss (a sharded run's: the rank's share of the global batch),
    ``reg_scale`` what the module's regularisation is multiplied by (sharded: 1 / world
    size, as its gradient is summed over ranks).
    """

    def __init__(
        self,
        model: nn.Module,
        module: Any,
        opts: Optimizers,
        cfg: Any,
        loss_fn: LossFn = local_loss,
        reg_scale: float = 1.0,
    ) -> None:
        self.model, self.module, self.opts, self.cfg = model, module, opts, cfg
        self.loss_fn, self.reg_scale = loss_fn, reg_scale
        if getattr(cfg, "keep_freed_memory", False):
            keep_freed_memory()
        self.l2 = float(cfg.embedding_l2 or 0.0)
        self.l2_mode = cfg.embedding_l2_mode
        self.clip: float = float(cfg.clip_grad_norm or 0.0)
        self.tables = [p for p in module.table_parameters() if p.requires_grad]
        self.clipped = [p for p in model.parameters() if p.requires_grad] if self.clip else []
        # where a step's time goes, phase -> seconds summed over steps (None: not timed);
        # ``experiments.benches.throughput`` sets it
        self.phases: dict[str, float] | None = None

    def _mark(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        assert self.phases is not None
        self.phases[phase] = self.phases.get(phase, 0.0) + now - start
        return now

    def __call__(self, batch: Batch) -> tuple[float, int]:
        timed = self.phases is not None
        t = time.perf_counter() if timed else 0.0
        logits = self.model(batch.dense_features, batch.sparse_features).reshape(-1)
        loss, value, n = self.loss_fn(logits, batch.labels)
        reg = self.module.regularization()
        total = loss if reg is None else loss + reg * self.reg_scale
        t = self._mark("forward", t) if timed else t
        self.opts.zero_grad()
        total.backward()
        t = self._mark("backward", t) if timed else t
        if self.l2:
            add_embedding_l2(self.tables, self.l2, self.l2_mode)
        if self.clipped:
            torch.nn.utils.clip_grad_norm_(self.clipped, self.clip)
        t = self._mark("l2_and_clip", t) if timed else t
        self.opts.step()
        if timed:
            self._mark("optimizer", t)
        return value, n
