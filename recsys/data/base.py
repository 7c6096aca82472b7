"""Base of every dataset config: what a Hydra ``dataset/*.yaml`` file becomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recsys.data.schema import ProcessedDataset


@dataclass
class DatasetConfig:
    """Common fields of all datasets. Subclasses add their source and options.

    ``prepare`` builds (or reuses) the cached processed dataset under ``cache_root``.
    """

    name: str = "dataset"
    seed: int = 0
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare()")
