"""Base of every dataset config: what a Hydra ``dataset/*.yaml`` file becomes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compression.config_checks import ConfigError, bounded
from recsys.data.schema import ProcessedDataset


@dataclass
class DatasetConfig:
    """Common fields of all datasets. Subclasses add their source and options.

    ``prepare`` builds (or reuses) the cached processed dataset under ``cache_root``.
    """

    name: str = "dataset"
    seed: int = 0
    split: list[float] = bounded(ge=0, le=1, each=True, default_factory=lambda: [0.8, 0.1, 0.1])

    def __post_init__(self) -> None:
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-9:
            raise ConfigError(f"dataset.split: must be three fractions (train, val, test) summing to 1, got {list(self.split)}")

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare()")
