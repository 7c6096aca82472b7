"""Pre-flight memory check: refuse a config whose tables cannot fit before allocating them.

The method's module is built with its TorchRec tables on the ``meta`` device (no
memory), so the estimate is the method's own sizing, counted as ``memory_report``
counts the real module: the bytes of its tables (an uncompressed config: every row
in fp32; a budget: what the method sized for it) plus the embedding optimizer's
state (row-wise Adagrad: 4 bytes per physical row; Adam: 8 bytes per element). Every
method builds on ``meta`` (OptEmbed's supernet included: its tables are the full
ones, so it is counted at their size), so nothing is allocated.

Example::

    need = training_bytes(tables, NoCompression())
    check_fits(need, available_bytes(torch.device("cpu")), "none")   # raises if too large
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.api import CompressionConfig, compress
from compression.budget import BudgetError
from compression.memory import memory_report, planned_optimizer_bytes, uncompressed_bytes

# the tables may use this share of what is free; the rest is for the model, data, activations
HEADROOM = 0.9


class MemoryPreflightError(BudgetError):
    """A config whose tables and optimizer state cannot fit in the memory available."""


@dataclass(frozen=True)
class TrainingBytes:
    """Bytes a config's tables need for training: the rows and their optimizer state."""

    tables: int
    optimizer: int
    # the same for the uncompressed tables (what a budget ratio divides)
    uncompressed: int

    @property
    def total(self) -> int:
        return self.tables + self.optimizer


def training_bytes(
    tables: Sequence[EmbeddingBagConfig],
    config: CompressionConfig,
    seed: int = 0,
    counts: Mapping[str, np.ndarray] | None = None,
    optimizer: str = "rowwise_adagrad",
) -> TrainingBytes:
    """What ``config`` needs for ``tables``, from the method's sizing, allocating no table.

    ``counts``: the per-feature id counts frequency-aware methods size from (as for
    ``compress``). ``optimizer``: the embedding optimizer whose state is counted. A
    budget the method cannot reach raises its ``BudgetError`` here already.
    """
    full_state = planned_optimizer_bytes(optimizer, [(t.num_embeddings, t.embedding_dim) for t in tables])
    full = uncompressed_bytes(tables) + full_state
    module = compress(tables, config, counts=counts, seed=seed, table_device="meta")
    state = planned_optimizer_bytes(optimizer, [tuple(p.shape) for p in module.table_parameters()])
    return TrainingBytes(memory_report(module).bytes, state, full)


def available_bytes(device: torch.device) -> int:
    """Bytes free where the tables live: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def fitting_ratio(need: TrainingBytes, available: int) -> float:
    """The smallest round budget ratio (1, 2, 5, 10, 20 ...) at which ``need`` would fit,
    taking the bytes to shrink with the ratio (tables and their rows alike)."""
    ratio = need.uncompressed / (HEADROOM * available)
    step = 10 ** math.floor(math.log10(max(ratio, 1.0)))
    return next(m * step for m in (1, 2, 5, 10) if m * step >= ratio)


def check_fits(need: TrainingBytes, available: int, what: str, where: str = "") -> None:
    """Raise ``MemoryPreflightError`` with one line when ``need`` does not fit ``available``.

    ``what`` names the config (e.g. ``none``, ``hashing 100x``); ``where`` the memory
    (e.g. ``on this host for 2 ranks``).
    """
    if need.total <= HEADROOM * available:
        return
    ratio = fitting_ratio(need, available)
    raise MemoryPreflightError(
        f"{what}: needs {gb(need.total)} for tables + optimizer state, {gb(available)} available"
        f"{' ' + where if where else ''}; a budget of {ratio:g}x or more would fit"
    )


__all__ = [
    "HEADROOM",
    "MemoryPreflightError",
    "TrainingBytes",
    "available_bytes",
    "check_fits",
    "fitting_ratio",
    "training_bytes",
]
