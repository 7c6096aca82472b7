"""What the staged methods' tests share: interrupting training at one step, recording each
stage's epochs, and a batch of two single-hot features and one multi-hot feature."""

from __future__ import annotations

from typing import Any

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.training import Callback


class StopAt(Callback):
    """Raise ``KeyboardInterrupt`` (as Ctrl-C would) at ``(stage name, step)``."""

    def __init__(self, at: tuple[str, int]) -> None:
        self.at, self.stage = at, None

    def on_stage_start(self, stage: Any, n: int) -> None:
        self.stage = stage.name

    def on_step(self, step: int, metrics: Any) -> None:
        if (self.stage, step) == self.at:
            raise KeyboardInterrupt


class EpochsByStage(Callback):
    """Every epoch's metrics, as ``(stage name, metrics)`` in order."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.seen: list[tuple[str | None, dict[str, float]]] = []

    def on_stage_start(self, stage: Any, n: int) -> None:
        self.stage = stage.name

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], step: int) -> None:
        self.seen.append((self.stage, metrics))

    def of(self, stage: str) -> list[dict[str, float]]:
        return [m for s, m in self.seen if s == stage]


def user_item_tags(tables: list[EmbeddingBagConfig], seed: int = 0, batch: int = 32) -> KeyedJaggedTensor:
    """A seeded batch for tables of features user, item (one id a sample) and tags (0-3)."""
    g = torch.Generator().manual_seed(seed)
    tag_len = torch.randint(0, 4, (batch,), generator=g)
    values = [torch.randint(0, t.num_embeddings, (n,), generator=g) for t, n in zip(tables, (batch, batch, int(tag_len.sum())))]
    lengths = torch.cat([torch.ones(2 * batch, dtype=torch.int32), tag_len.int()])
    return KeyedJaggedTensor(keys=["user", "item", "tags"], values=torch.cat(values), lengths=lengths)
