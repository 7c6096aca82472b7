"""Base of every dataset config: what a Hydra ``dataset/*.yaml`` file becomes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from compression.config_checks import ConfigError, bounded, one_of
from recsys.data.schema import ProcessedDataset


@dataclass
class DatasetConfig:
    """Common fields of all datasets. Subclasses add their source and options.

    ``prepare`` builds (or reuses) the cached processed dataset under ``cache_root``.
    """

    # what ``split_by: order`` follows in this dataset (None: it has no order the loader knows)
    ordered_by: ClassVar[Optional[str]] = None
    # whether the loader can write ``ids: raw`` (a stable 64-bit hash of each raw value)
    raw_ids: ClassVar[bool] = False

    name: str = "dataset"
    seed: int = 0
    split: list[float] = bounded(ge=0, le=1, each=True, default_factory=lambda: [0.8, 0.1, 0.1])
    # "hash": each row to a split by a seeded hash of its index (i.i.d. splits); "order": the
    # first ``split[0]`` of the rows in the data's order (``ordered_by``: time) train, the
    # next validate, the last test, so validation and test lie after everything trained on
    split_by: str = one_of("hash", "hash", "order")
    # "vocab": each field's values become ids 1.. by descending train count (0: empty, rare or
    # unseen), the vocabulary a serving system must then hold; "raw": each value becomes a
    # stable 64-bit hash of itself (1 .. 2^62, 0 only for empty), as a production system feeds
    # hashing methods, so a value first seen in validation or test keeps an id of its own
    ids: str = one_of("vocab", "vocab", "raw")

    def __post_init__(self) -> None:
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-9:
            raise ConfigError(f"dataset.split: must be three fractions (train, val, test) summing to 1, got {list(self.split)}")
        if self.split_by == "order" and self.ordered_by is None:
            raise ConfigError(f"dataset.split_by: order needs data with an order, and the {type(self).__name__} loader "
                              f"knows none; split the data in time yourself (three files) or use split_by: hash")  # fmt: skip

        if self.ids == "raw" and not self.raw_ids:
            raise ConfigError(f"dataset.ids: raw is written by the criteo, movielens and tabular loaders, and the "
                              f"{type(self).__name__} loader writes vocabulary ids only; use ids: vocab")  # fmt: skip

    def split_key(self) -> dict[str, str]:
        """The split protocol's and the ids' part of the cache key (empty for the defaults, so
        caches made before ``split_by`` and ``ids`` existed stay valid)."""
        return {**({} if self.split_by == "hash" else {"split_by": self.split_by}),
                **({} if self.ids == "vocab" else {"ids": self.ids})}  # fmt: skip

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare()")
