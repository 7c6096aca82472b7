"""Your own table (Parquet, CSV or TSV) to a processed dataset, columns declared by role.

One file is split by the seeded row hash like every other loader (``path``), or three
pre-split files are kept exactly as given (``train_path``, ``val_path``, ``test_path``).
Each column used has one role; every other column is ignored:

* ``label``: 0/1 (bool, number or text), or any number with ``label_threshold``
  (``label = value >= threshold``, as MovieLens's rating >= 4);
* ``categorical``: integers or strings (CSV/TSV values are text: ``07`` and ``7`` differ);
* ``multi_hot``: a list column, or text split at its ``separator`` (empty pieces dropped);
* ``numeric``: a number, transformed by ``none``, ``log1p`` (of ``max(x, 0)``, as
  Criteo's integers) or ``standardise`` (mean and standard deviation of the train split).

Output (``schema.py``'s contract): ``label`` float32, numeric columns float32 (empty -> 0,
after the transform), categorical int64 ids and multi-hot ``list<int64>`` ids. Ids come
from the train split: 1.. by descending count, ties by value; 0 for empty, rare (count <
``min_count``, or that column's entry in ``min_counts``) and never-seen values.

Bad input is refused with one ``DataError`` line naming the file, the row or column and
what is wrong; nothing is written to the cache then. The pipeline is polars lazy and
streaming (``tabular_build.py``), so a file larger than memory is processed in bounded
memory.

Example::

    cfg = TabularConfig(path="clicks.parquet", label="clicked", categorical=["user", "item"],
                        numeric=[NumericColumn("price", "log1p")])
    ds = cfg.prepare(Path("data/cache"))
    ds.schema.rows        # {'train': ..., 'val': ..., 'test': ...}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from recsys.data.base import DatasetConfig
from recsys.data.common import cached_dataset, file_fingerprint
from recsys.data.schema import DataError, ProcessedDataset
from recsys.data.tabular_build import preprocess_tabular
from recsys.data.tabular_columns import (
    _SPELLINGS,
    CODE_VERSION,
    TRANSFORMS,
    Columns,
    MultiHotColumn,
    NumericColumn,
)
from recsys.data.tabular_source import open_sources


@dataclass
class TabularConfig(DatasetConfig):
    """A table and the role of each column used (see the module docstring).

    ``format`` is ``parquet``, ``csv`` or ``tsv``, else taken from the file suffix.
    CSV/TSV need a header line unless ``column_names`` names the columns; ``separator``
    defaults to ``,`` (csv) or a tab (tsv), ``quote_char`` to ``"`` (null: no quoting).

    Example::

        TabularConfig(train_path="train.csv", val_path="valid.csv", test_path="test.csv",
                      categorical=["user", "item", "city"], min_counts={"user": 2})
    """

    # one file (``path``) split by ``split_by: order`` keeps its row order: sort it by time first
    ordered_by: ClassVar[Optional[str]] = "the file's row order (one file, given as path)"
    raw_ids: ClassVar[bool] = True

    name: str = "tabular"
    path: Optional[str] = None
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    format: Optional[str] = None
    separator: Optional[str] = None
    quote_char: Optional[str] = '"'
    column_names: Optional[list[str]] = None
    label: str = "label"
    label_threshold: Optional[float] = None
    categorical: list[str] = field(default_factory=list)
    multi_hot: list[MultiHotColumn] = field(default_factory=list)
    numeric: list[NumericColumn] = field(default_factory=list)
    min_count: int = 1
    min_counts: dict[str, int] = field(default_factory=dict)

    def _error(self, what: str) -> DataError:
        return DataError(f"dataset '{self.name}': {what}")

    def columns(self) -> Columns:
        """The declaration, checked: one role per column, known transforms, sane counts."""
        multi = [m if isinstance(m, MultiHotColumn) else MultiHotColumn(**dict(m)) for m in self.multi_hot]
        numeric = [n if isinstance(n, NumericColumn) else NumericColumn(**dict(n)) for n in self.numeric]
        roles: dict[str, str] = {}
        declared = [
            ("label", [self.label]),
            ("categorical", list(self.categorical)),
            ("multi_hot", [m.name for m in multi]),
            ("numeric", [n.name for n in numeric]),
        ]
        for role, names in declared:
            for name in names:
                if not name:
                    raise self._error(f"a {role} column has no name")
                if name in roles:
                    both = "twice as " + role if roles[name] == role else f"as both {roles[name]} and {role}"
                    raise self._error(f"column '{name}' is declared {both}")
                roles[name] = role
        if len(roles) == 1:
            raise self._error("no feature columns declared (categorical, multi_hot or numeric)")
        if "label" in roles and roles["label"] != "label":
            raise self._error(
                f"a {roles['label']} column cannot be named 'label' (the processed label column) "
                f"while the label is '{self.label}'"
            )
        transforms = {}
        for n in numeric:
            t = _SPELLINGS.get(n.transform, n.transform)
            if t not in TRANSFORMS:
                raise self._error(f"numeric column '{n.name}': transform '{n.transform}' is not one of {', '.join(TRANSFORMS)}")
            transforms[n.name] = t
        for m in multi:
            if m.separator == "":
                raise self._error(f"multi_hot column '{m.name}': separator is empty (null: a list column)")
        sparse = [*self.categorical, *(m.name for m in multi)]
        for name in self.min_counts:
            if name not in sparse:
                raise self._error(f"min_counts names '{name}', which is not a categorical or multi_hot column")
        min_counts = {name: int(self.min_counts.get(name, self.min_count)) for name in sparse}
        for name, count in min_counts.items():
            if count < 1:
                raise self._error(f"min_count of '{name}' is {count}; it must be at least 1")
        return Columns(
            label=self.label,
            threshold=None if self.label_threshold is None else float(self.label_threshold),
            categorical=tuple(self.categorical),
            multi_hot={m.name: m.separator for m in multi},
            numeric=transforms,
            min_counts=min_counts,
        )

    def files(self) -> dict[str, Path]:
        """``{"all": path}`` or ``{"train": ..., "val": ..., "test": ...}``."""
        split_paths = {"train": self.train_path, "val": self.val_path, "test": self.test_path}
        given = [s for s, p in split_paths.items() if p]
        if self.path and not given:
            return {"all": Path(self.path)}
        if self.split_by == "order" and len(given) == 3 and not self.path:
            raise self._error("split_by: order splits one file in its row order (path); "
                              "three files (train_path, val_path, test_path) are already split, so leave split_by: hash")  # fmt: skip
        if not self.path and len(given) == 3:
            return {s: Path(p) for s, p in split_paths.items() if p}
        raise self._error("give either path, or all three of train_path, val_path, test_path")

    def read_options(self) -> dict[str, Any]:
        """How text files are read (part of the cache key)."""
        return {
            "format": self.format,
            "separator": self.separator,
            "quote_char": self.quote_char,
            "column_names": list(self.column_names) if self.column_names is not None else None,
        }

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        """Check the declaration and the files' headers, then build (or reuse) the cache."""
        columns = self.columns()
        sources = open_sources(self.files(), columns, **self.read_options())
        key = {
            "format": "tabular",
            "code_version": CODE_VERSION,
            "files": {s: file_fingerprint(src.path) for s, src in sources.items()},
            "read": self.read_options(),
            "columns": asdict(columns),
            "seed": self.seed,
            "split": list(self.split) if "all" in sources else None,
            **self.split_key(),  # (three files take split_by: hash only: files() refused order)
        }
        return cached_dataset(
            Path(cache_root),
            self.name,
            key,
            lambda out: preprocess_tabular(
                sources, columns, out, name=self.name, seed=self.seed, split=list(self.split), split_by=self.split_by,
                ids=self.ids,
            ),
        )
