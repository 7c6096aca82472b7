"""Raw columns of one source to typed values, and the checks that refuse a bad row.

``parsed`` gives the first pass its columns: ``label`` (float32), numeric columns as
float64 (null = empty; transformed after the train statistics are known), categorical
values as int64 or string (null = empty) and multi-hot values as lists (empty pieces
dropped). ``checks`` are the conditions that make a row bad; the first pass ORs them into
one flag per row and ``diagnose`` evaluates them again on the first flagged row only, so
the vectorised pass and the message always agree.

Example::

    lf = src.scan().select(ROW, *parsed(src, cols), bad_flag(src, cols))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from recsys.data.schema import DataError
from recsys.data.tabular_columns import Columns
from recsys.data.tabular_source import ROW, Source, kind

FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Check:
    """One way a value can be bad: the column, the condition, what to tell the user."""

    column: str
    bad: pl.Expr
    says: str  # completes "<file:row>: column 'x': <value> ..."
    shows_value: bool = True


def _is_text(src: Source, name: str) -> bool:
    return kind(src.dtypes[name]) == "text"


def _number(src: Source, name: str) -> pl.Expr:
    """A label or numeric column as float64; unparsable text -> null (a check refuses it)."""
    return pl.col(name).cast(pl.Float64, strict=False)


def _empty(src: Source, name: str) -> pl.Expr:
    col = pl.col(name)
    return col.is_null() | (col.cast(pl.String) == "") if _is_text(src, name) else col.is_null()


def _element_kind(src: Source, name: str) -> str:
    k = kind(src.dtypes[name])
    return k.removeprefix("list of ") if k.startswith("list of ") else k


def sparse_dtype(src: Source, name: str) -> Any:
    """Type of one categorical value (or one multi-hot element) after parsing."""
    k = _element_kind(src, name)
    return pl.String if k in ("text", "null") else pl.Int64


def parsed(src: Source, cols: Columns) -> list[pl.Expr]:
    """The typed columns of the first pass, named as the declared columns (label: ``label``)."""
    x = _number(src, cols.label)
    label = (x == 1.0) if cols.threshold is None else (x >= cols.threshold)
    out = [label.cast(pl.Float32).alias("label")]
    out += [_number(src, n).alias(n) for n in cols.numeric]
    for n in cols.categorical:
        dtype = sparse_dtype(src, n)
        col = pl.col(n).cast(dtype, strict=False)
        out.append((pl.when(col != "").then(col) if dtype == pl.String else col).alias(n))
    for n, sep in cols.multi_hot.items():
        dtype = sparse_dtype(src, n)
        if kind(src.dtypes[n]) == "text":
            assert sep is not None  # open_sources refused a text column without one
            lists = pl.col(n).str.split(sep, literal=True)
        else:
            lists = pl.col(n).cast(pl.List(dtype), strict=False)
        keep = pl.element().is_not_null()
        if dtype == pl.String:
            keep = keep & (pl.element() != "")
        lists = lists.list.eval(pl.element().filter(keep))
        out.append(lists.fill_null(pl.lit([], dtype=pl.List(dtype))).alias(n))
    return out


def checks(src: Source, cols: Columns) -> list[Check]:
    """Every check of this source's rows, in the order a message reports them."""
    found: list[Check] = []
    name = cols.label
    x = _number(src, name)
    found.append(Check(name, _empty(src, name), "is empty: every row needs a label", shows_value=False))
    found.append(Check(name, ~_empty(src, name) & x.is_null(), "is not a number"))
    if cols.threshold is None:
        found.append(Check(name, x.is_not_null() & ~x.is_in([0.0, 1.0]), "is not 0 or 1"))
    else:
        found.append(Check(name, x.is_nan(), "is not a number"))
    for name, transform in cols.numeric.items():
        x = _number(src, name)
        found.append(Check(name, ~_empty(src, name) & x.is_null(), "is not a number"))
        found.append(Check(name, ~x.is_finite(), "is not a finite number (NaN and inf are refused)"))
        if transform == "none":
            found.append(Check(name, x.abs() > FLOAT32_MAX, "does not fit in float32"))
    for name in cols.categorical:
        if src.dtypes[name] == pl.UInt64:
            found.append(Check(name, pl.col(name) > INT64_MAX, "does not fit in int64"))
    return found


def bad_flag(src: Source, cols: Columns) -> pl.Expr:
    """True for a row that fails any check (false, not null, where values are empty)."""
    return pl.any_horizontal([c.bad.fill_null(False) for c in checks(src, cols)]).alias("_bad")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def diagnose(src: Source, cols: Columns, row: int) -> DataError:
    """The error for data row ``row`` of ``src``, known to fail a check."""
    one = src.scan().filter(pl.col(ROW) == row).collect(engine="streaming")
    all_checks = checks(src, cols)
    flags = one.select(c.bad.fill_null(False).alias(str(i)) for i, c in enumerate(all_checks)).row(0)
    for check, failed in zip(all_checks, flags):
        if failed:
            value = f": {_show(one[check.column][0])}" if check.shows_value else ""
            return DataError(f"{src.where(row)}: column '{check.column}'{value} {check.says}")
    raise AssertionError(f"{src.where(row)}: flagged bad but no check fails")  # pragma: no cover
