"""The source files of a tabular dataset: format, header, column types, checked up front.

Everything here reads only headers and Parquet footers, so a missing column, a type
that differs between files or a file that is not what its name says is refused before
any row is read and before anything is written.

Example::

    sources = open_sources({"all": Path("clicks.csv")}, TabularConfig(...).columns())
    sources["all"].scan().head(5).collect()
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import polars as pl

from recsys.data.files import (
    check_parquet_magic,
    check_text_head,
    find_nul_byte,
    one_line,
    require_file,
    text_read_error,
)
from recsys.data.schema import DataError
from recsys.data.tabular_columns import Columns

# The 0-based data row of every scanned row; a name no user column is expected to have.
ROW = "__embcomp_row"
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
SEPARATORS = {"csv": ",", "tsv": "\t"}
# Column types a role accepts (by kind, see ``kind``).
ACCEPTS = {
    "label": {"text", "integer", "boolean", "float"},
    "numeric": {"text", "integer", "boolean", "float"},
    "categorical": {"text", "integer", "boolean"},
    "multi_hot": {"text", "list of text", "list of integer", "list of boolean"},
}


def kind(dtype: Any) -> str:
    """A column type as a role sees it: text, integer, boolean, float, list of ..."""
    if dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "text"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_integer():
        return "integer"
    if dtype.is_float() or isinstance(dtype, pl.Decimal):
        return "float"
    if isinstance(dtype, (pl.List, pl.Array)):
        return f"list of {kind(dtype.inner)}"
    if dtype == pl.Null:
        return "null"
    return str(dtype)


def family(role: str, k: str) -> str:
    """What must agree between files: numbers may mix int and float, ids may not."""
    if role in ("label", "numeric") and k in ("integer", "boolean", "float"):
        return "number"
    return k


@dataclass
class Source:
    """One input file: where it is, how it is read, its columns and their types."""

    path: Path
    split: str  # "all" (split by row hash) or the split it holds
    format: str
    separator: str = ","
    quote_char: Optional[str] = '"'
    column_names: Optional[list[str]] = None
    dtypes: dict[str, pl.DataType] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        return self.format != "parquet"

    def where(self, row: int) -> str:
        """The place of 0-based data row ``row`` for a message: ``file:line`` or ``file: row``.

        Text line numbers count the header and assume no quoted value spans lines.
        """
        if self.is_text:
            return f"{self.path}:{row + 1 + (self.column_names is None)}"
        return f"{self.path}: row {row} (0-based)"

    def scan(self) -> pl.LazyFrame:
        """All columns, lazily, plus ``ROW``; text columns stay text (no type guessing)."""
        if not self.is_text:
            return pl.scan_parquet(self.path, row_index_name=ROW)
        names = self.column_names
        return pl.scan_csv(
            self.path,
            separator=self.separator,
            quote_char=self.quote_char,
            has_header=names is None,
            schema={n: pl.String for n in names} if names is not None else None,
            infer_schema=False,  # all String: a guess from the first rows breaks on a later one
            empty_string_is_null=False,
            encoding="utf8-lossy",
            row_index_name=ROW,
        )

    def read_error(self, error: BaseException) -> DataError:
        """The one-line error for a read of this file that polars aborted."""
        if not self.is_text:
            return DataError(f"{self.path}: cannot be read as Parquet: {one_line(error)}")
        if find_nul_byte(self.path) is None:
            ragged = self._ragged_row()
            if ragged is not None:
                return ragged
        return text_read_error(self.path, error, f"{self.format.upper()} text")

    def _ragged_row(self) -> DataError | None:
        """The first row with more or fewer fields than the header (Python's csv: slow, exact)."""
        quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if self.quote_char is None else csv.QUOTE_MINIMAL
        with self.path.open(newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh, delimiter=self.separator, quotechar=self.quote_char, quoting=quoting)
            n = len(self.column_names) if self.column_names is not None else len(next(reader, []))
            for fields in reader:
                if fields and len(fields) != n:
                    return DataError(f"{self.path}:{reader.line_num}: {len(fields)} fields, expected {n}")
        return None


def _format(path: Path, given: Optional[str]) -> str:
    if given is not None:
        if given not in ("parquet", "csv", "tsv"):
            raise DataError(f"{path}: format '{given}' is not one of parquet, csv, tsv")
        return given
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell its format from the name; set format: parquet, csv or tsv")
    return fmt


def _read_header(src: Source) -> dict[str, pl.DataType]:
    if src.is_text:
        check_text_head(src.path, f"{src.format.upper()} text")
    else:
        check_parquet_magic(src.path)
    try:
        schema = src.scan().collect_schema()
    except pl.exceptions.NoDataError:
        raise DataError(f"{src.path}: empty file (no header line)") from None
    except pl.exceptions.PolarsError as e:
        raise src.read_error(e) from None
    dtypes = {n: t for n, t in schema.items() if n != ROW}
    for name in dtypes:  # polars renames a repeated header name to "<name>_duplicated_<i>"
        m = re.fullmatch(r"(.*)_duplicated_\d+", name)
        if src.is_text and m and m[1] in dtypes:
            raise DataError(f"{src.path}: column '{m[1]}' appears more than once in the header")
    return dtypes


def _present(dtypes: dict[str, pl.DataType], limit: int = 20) -> str:
    names = [repr(n) for n in dtypes]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def open_sources(
    files: dict[str, Path],
    columns: Columns,
    *,
    format: Optional[str] = None,
    separator: Optional[str] = None,
    quote_char: Optional[str] = '"',
    column_names: Optional[list[str]] = None,
) -> dict[str, Source]:
    """Open and check every file: it exists, is what its format says, has the declared
    columns with types its roles accept, and (pre-split) the same columns as train.

    Example::

        open_sources({"train": Path("a.csv"), "val": Path("b.csv"), "test": Path("c.csv")}, cols)
    """
    sources: dict[str, Source] = {}
    for split, path in files.items():
        require_file(path, "a Parquet, CSV or TSV file")
        fmt = _format(path, format)
        src = Source(
            path=path,
            split=split,
            format=fmt,
            separator=separator if separator is not None else SEPARATORS.get(fmt, ","),
            quote_char=quote_char,
            column_names=list(column_names) if column_names is not None else None,
        )
        src.dtypes = _read_header(src)
        for name in columns.used:
            if name not in src.dtypes:
                raise DataError(
                    f"{path}: no column '{name}' (declared as {columns.role(name)}); its columns: {_present(src.dtypes)}"
                )
        _check_types(src, columns)
        sources[split] = src
    first = next(iter(sources.values()))
    for src in sources.values():
        if set(src.dtypes) != set(first.dtypes):
            missing = sorted(set(first.dtypes) - set(src.dtypes))
            extra = sorted(set(src.dtypes) - set(first.dtypes))
            raise DataError(
                f"{src.path}: its columns differ from {first.path}'s (missing: {missing or 'none'}, extra: {extra or 'none'})"
            )
        for name in columns.used:
            role = columns.role(name)
            a, b = kind(first.dtypes[name]), kind(src.dtypes[name])
            if b == "null":  # no value in this file: read it as train's type
                src.dtypes[name] = first.dtypes[name]
            elif a != "null" and family(role, a) != family(role, b):
                raise DataError(
                    f"{src.path}: column '{name}' is {src.dtypes[name]} ({b}), but {first.dtypes[name]} ({a}) in "
                    f"{first.path}: a column's type must not change between files"
                )
    return sources


def _check_types(src: Source, columns: Columns) -> None:
    for name in columns.used:
        role, dtype = columns.role(name), src.dtypes[name]
        k = kind(dtype)
        if k == "null":
            continue  # no value at all: the empty-column check names it with its split
        if k not in ACCEPTS[role]:
            raise DataError(
                f"{src.path}: column '{name}' is {dtype} ({k}); a {role} column needs "
                + " or ".join(sorted(ACCEPTS[role]))
            )
        if role == "multi_hot" and k == "text" and columns.multi_hot[name] is None:
            raise DataError(
                f"{src.path}: multi_hot column '{name}' is text: give its separator "
                f"(multi_hot: [{{name: {name}, separator: '|'}}])"
            )
