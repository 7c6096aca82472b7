"""The columns of a tabular dataset by role, and the processed output's code version.

A leaf of the tabular pipeline: the config (``tabular.py``), the file sources
(``tabular_source.py``), the parser (``tabular_parse.py``) and the builder
(``tabular_build.py``) all read these, and this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Part of the cache key: bump whenever the processed output of the same input changes.
CODE_VERSION = 1
TRANSFORMS = ("none", "log1p", "standardise")
_SPELLINGS = {"standardize": "standardise"}


@dataclass
class NumericColumn:
    """A numeric column and its transform: ``none``, ``log1p`` or ``standardise``.

    Example::

        NumericColumn("price", "log1p")
    """

    name: str = ""
    transform: str = "none"


@dataclass
class MultiHotColumn:
    """A column of several values per row: a list column, or text cut at ``separator``.

    The separator is used only where the column is text (always in CSV/TSV), so one
    declaration reads both a CSV export and a Parquet file with a list column.

    Example::

        MultiHotColumn("tags", separator="|")
    """

    name: str = ""
    separator: Optional[str] = None


@dataclass(frozen=True)
class Columns:
    """The checked column declaration: every used column with its role.

    Example::

        cols = TabularConfig(categorical=["user"]).columns()
        cols.sparse        # ['user']
    """

    label: str
    threshold: Optional[float]
    categorical: tuple[str, ...]
    multi_hot: dict[str, Optional[str]]  # name -> separator
    numeric: dict[str, str]  # name -> transform
    min_counts: dict[str, int]  # every sparse column -> its min_count

    @property
    def sparse(self) -> list[str]:
        """Sparse fields in output order: categorical, then multi-hot."""
        return [*self.categorical, *self.multi_hot]

    @property
    def used(self) -> list[str]:
        """Every source column read, label first."""
        return [self.label, *self.numeric, *self.sparse]

    def role(self, name: str) -> str:
        if name == self.label:
            return "label"
        if name in self.numeric:
            return "numeric"
        return "multi_hot" if name in self.multi_hot else "categorical"
