"""Memory budgets: "10x smaller than fp32" or "at most N bytes", whole model or per table.

A method derives its own sizes (rows, collisions, top-k, dims) from a budget so that
the bytes its module holds land in ``[0.95, 1.0]`` of the target, or raises
``BudgetError`` saying the smallest it can do.

Example::

    Budget(ratio=10).target_bytes(tables)        # uncompressed fp32 bytes / 10
    Budget(bytes=2**20, scope="table").per_table(tables)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.config_checks import bounded, one_of
from compression.errors import BudgetError
from compression.memory import uncompressed_bytes

SCOPES = ("model", "table")
# A method must land within this fraction of its target bytes.
BUDGET_TOLERANCE = 0.05


@dataclass
class Budget:
    """A memory budget: exactly one of ``ratio`` (x smaller than fp32) or ``bytes``."""

    # checked (compression.config_checks) when a job's config is composed: > 0, and a
    # ratio of at least 1 (below 1 asks for more than the uncompressed tables)
    ratio: Optional[float] = bounded(None, ge=1)
    bytes: Optional[int] = bounded(None, ge=1)
    scope: str = one_of("model", *SCOPES)

    def validate(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        if (self.ratio is None) == (self.bytes is None):
            raise BudgetError(f"a budget needs exactly one of ratio or bytes, got {self}")
        if self.scope not in SCOPES:
            raise BudgetError(f"budget scope must be one of {SCOPES}, got '{self.scope}'")
        if self.ratio is not None and not self.ratio > 0:
            raise BudgetError(f"budget ratio must be positive, got {self.ratio}")
        if self.bytes is not None and self.bytes <= 0:
            raise BudgetError(f"budget bytes must be positive, got {self.bytes}")
        if self.ratio is not None and self.ratio < 1:
            raise BudgetError(
                f"budget ratio {self.ratio} asks for more memory than the uncompressed tables"
            )
        full = self._reference(tables)
        if self.bytes is not None and self.bytes > full:
            raise BudgetError(
                f"budget of {self.bytes} bytes is larger than the uncompressed tables "
                f"({full} bytes{' per table' if self.scope == 'table' else ''}); nothing to compress"
            )

    def _reference(self, tables: Sequence[EmbeddingBagConfig]) -> int:
        if self.scope == "table":
            return min(uncompressed_bytes([t]) for t in tables)
        return uncompressed_bytes(tables)

    def target_bytes(self, tables: Sequence[EmbeddingBagConfig]) -> int:
        """Byte target for the whole module (scope=table: the sum of the per-table targets)."""
        self.validate(tables)
        return sum(self.per_table(tables).values())

    def per_table(self, tables: Sequence[EmbeddingBagConfig]) -> dict[str, int]:
        """Byte target of each table: its own share (scope=table) or a share of the whole."""
        self.validate(tables)
        if self.scope == "table":
            return {
                t.name: int(uncompressed_bytes([t]) / self.ratio) if self.ratio else int(self.bytes)  # type: ignore[arg-type]
                for t in tables
            }
        full = uncompressed_bytes(tables)
        total = int(full / self.ratio) if self.ratio else int(self.bytes)  # type: ignore[arg-type]
        return {t.name: int(total * uncompressed_bytes([t]) / full) for t in tables}

    def label(self) -> str:
        """Short name for run names and reports: '10x' or '1.0MB'."""
        if self.ratio is not None:
            return f"{self.ratio:g}x"
        return f"{self.bytes / 2**20:.3g}MiB{'/table' if self.scope == 'table' else ''}"  # type: ignore[operator]
