"""Bad tabular input is refused with one line naming file, row or column; no cache is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.schema import DataError
from recsys.data.tabular import MultiHotColumn, NumericColumn, TabularConfig
from tests.data.conftest import leftovers

HEADER = "label,user,city,tags,price"
ROWS = [f"{i % 2},{i % 7},c{i % 3},a|b{i % 4},{i * 1.5}" for i in range(40)]
DECL = dict(categorical=["user", "city"], multi_hot=[MultiHotColumn("tags", "|")],
            numeric=[NumericColumn("price", "log1p")])


def _csv(tmp_path: Path, rows: list[str] = ROWS, name: str = "data.csv", header: str = HEADER) -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in [header, *rows]))
    return path


def _refused(tmp_path: Path, match: str, **cfg) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=match) as info:
        TabularConfig(**{**DECL, **cfg}).prepare(cache)
    assert "\n" not in str(info.value)  # one line
    assert leftovers(cache) == []  # no final directory and no *.tmp-* directory


def _with(row: int, column: int, value: str, rows: list[str] = ROWS) -> list[str]:
    out = list(rows)
    fields = out[row].split(",")
    fields[column] = value
    out[row] = ",".join(fields)
    return out


def _presplit(tmp_path: Path, suffix: str = ".csv", **texts: list[str]) -> dict[str, str]:
    paths = {}
    for split in ("train", "val", "test"):
        path = tmp_path / f"{split}{suffix}"
        if split in texts:
            path.write_text("".join(line + "\n" for line in texts[split]))
        else:
            _csv(tmp_path, name=path.name)
        paths[f"{split}_path"] = str(path)
    return paths


# --- files ---------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    _refused(tmp_path, r"nope\.csv: no such file", path=str(tmp_path / "nope.csv"))
    (tmp_path / "adir.csv").mkdir()
    _refused(tmp_path, r"adir\.csv: is a directory, not a file", path=str(tmp_path / "adir.csv"))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("label,user\n1,2\n")
    _refused(tmp_path, r"data\.txt: cannot tell its format from the name; set format", path=str(path))


def test_parquet_file_that_is_not_parquet(tmp_path):
    fake = tmp_path / "data.parquet"
    fake.write_text(HEADER + "\n" + "\n".join(ROWS))
    _refused(tmp_path, r"data\.parquet: not a Parquet file \(no PAR1 magic", path=str(fake))
    truncated = tmp_path / "cut.parquet"
    pl.DataFrame({"label": [0, 1]}).write_parquet(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    _refused(tmp_path, r"cut\.parquet: not a Parquet file", path=str(truncated))


def test_binary_file_as_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(np.random.default_rng(0).bytes(50_000))
    _refused(tmp_path, r"data\.csv:\d+: NUL byte at byte \d+: binary data, not CSV text$", path=str(path))


def test_parquet_named_csv(tmp_path):
    path = tmp_path / "data.csv"
    pl.DataFrame({"label": [0, 1]}).write_parquet(path)
    _refused(tmp_path, r"data\.csv: a Parquet file, not text", path=str(path))


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    _refused(tmp_path, r"empty\.csv: empty file \(no header line\)", path=str(tmp_path / "empty.csv"))
    _refused(tmp_path, r"data\.csv: no rows$", path=str(_csv(tmp_path, [])))


def test_row_with_too_many_fields(tmp_path):
    rows = list(ROWS)
    rows[12] += ",extra"
    _refused(tmp_path, r"data\.csv:14: 6 fields, expected 5$", path=str(_csv(tmp_path, rows)))


def test_repeated_header_name(tmp_path):
    path = _csv(tmp_path, [r + ",1" for r in ROWS], header=HEADER + ",city")
    _refused(tmp_path, r"data\.csv: column 'city' appears more than once in the header", path=str(path))


# --- columns and types ---------------------------------------------------------------


def test_missing_column_is_named_with_the_columns_present(tmp_path):
    _refused(
        tmp_path,
        r"data\.csv: no column 'shop' \(declared as categorical\); its columns: 'label', 'user', 'city', 'tags', 'price'$",
        path=str(_csv(tmp_path)),
        categorical=["user", "shop"],
    )
    _refused(tmp_path, r"no column 'clicked' \(declared as label\)", path=str(_csv(tmp_path)), label="clicked")


def test_type_changes_between_files(tmp_path):
    df = pl.DataFrame({"label": [0, 1, 1], "user": [1, 2, 3], "city": ["a", "b", "c"], "tags": [["x"], [], ["y"]],
                       "price": [1.0, 2.0, 3.0]})
    paths = {}
    for split in ("train", "val", "test"):
        part = df.with_columns(pl.col("user").cast(pl.String)) if split == "val" else df
        part.write_parquet(tmp_path / f"{split}.parquet")
        paths[f"{split}_path"] = str(tmp_path / f"{split}.parquet")
    _refused(tmp_path, r"val\.parquet: column 'user' is String \(text\), but Int64 \(integer\) in .*train\.parquet: "
             r"a column's type must not change between files", **paths)


def test_numeric_column_that_turns_to_text_mid_file(tmp_path):
    # what a type guess from the first rows would break on: refused at its line
    _refused(tmp_path, r"data\.csv:32: column 'price': 'n/a' is not a number$",
             path=str(_csv(tmp_path, _with(30, 4, "n/a"))))


def test_type_a_role_cannot_take(tmp_path):
    pl.DataFrame({"label": [0, 1], "user": [0.5, 1.5], "city": ["a", "b"], "tags": ["x", "y"],
                  "price": [1, 2]}).write_parquet(tmp_path / "t.parquet")
    _refused(tmp_path, r"t\.parquet: column 'user' is Float64 \(float\); a categorical column needs boolean or integer or text",
             path=str(tmp_path / "t.parquet"))


def test_text_multi_hot_without_separator(tmp_path):
    _refused(tmp_path, r"multi_hot column 'tags' is text: give its separator", path=str(_csv(tmp_path)),
             multi_hot=[MultiHotColumn("tags")])


def test_presplit_file_with_other_columns(tmp_path):
    val = [HEADER + ",extra", *(r + ",1" for r in ROWS)]
    _refused(tmp_path, r"val\.csv: its columns differ from .*train\.csv's \(missing: none, extra: \['extra'\]\)",
             **_presplit(tmp_path, val=val))


# --- declarations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decl", "match"),
    [
        ({"numeric": [NumericColumn("user")]}, r"column 'user' is declared as both categorical and numeric"),
        ({"categorical": ["user", "user"]}, r"column 'user' is declared twice as categorical"),
        ({"categorical": ["label", "user"]}, r"column 'label' is declared as both label and categorical"),
        ({"label": "user", "categorical": ["label"]}, r"a categorical column cannot be named 'label'"),
        ({"numeric": [NumericColumn("price", "zscore")]}, r"numeric column 'price': transform 'zscore' is not one of none, log1p, standardise"),
        ({"min_counts": {"price": 3}}, r"min_counts names 'price', which is not a categorical or multi_hot column"),
        ({"min_count": 0}, r"min_count of 'user' is 0; it must be at least 1"),
        ({"categorical": [], "multi_hot": [], "numeric": []}, r"no feature columns declared"),
    ],
)
def test_bad_declaration(tmp_path, decl, match):
    _refused(tmp_path, rf"dataset 'tabular': {match}", path=str(_csv(tmp_path)), **decl)


def test_path_and_split_paths_are_exclusive(tmp_path):
    _refused(tmp_path, r"give either path, or all three of train_path, val_path, test_path",
             path=str(_csv(tmp_path)), train_path=str(_csv(tmp_path)))


# --- rows ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2", "-1", "yes", "0.5"])
def test_label_not_zero_or_one(tmp_path, value):
    what = "is not a number" if value == "yes" else "is not 0 or 1"
    _refused(tmp_path, rf"data\.csv:19: column 'label': '{value}' {what}$", path=str(_csv(tmp_path, _with(17, 0, value))))


def test_label_empty(tmp_path):
    _refused(tmp_path, r"data\.csv:6: column 'label' is empty: every row needs a label$",
             path=str(_csv(tmp_path, _with(4, 0, ""))))


def test_label_not_zero_or_one_in_parquet(tmp_path):
    pl.DataFrame({"label": [0, 1, 3, 2], "user": [1, 2, 3, 4], "city": ["a"] * 4, "tags": [["x"]] * 4,
                  "price": [1.0] * 4}).write_parquet(tmp_path / "t.parquet")
    _refused(tmp_path, r"t\.parquet: row 2 \(0-based\): column 'label': 3 is not 0 or 1$", path=str(tmp_path / "t.parquet"))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_numeric_not_finite(tmp_path, value):
    _refused(tmp_path, rf"data\.csv:9: column 'price': '{value}' is not a finite number",
             path=str(_csv(tmp_path, _with(7, 4, value))))


def test_first_bad_row_is_reported(tmp_path):
    rows = _with(30, 0, "7", _with(9, 4, "abc"))
    _refused(tmp_path, r"data\.csv:11: column 'price': 'abc'", path=str(_csv(tmp_path, rows)))


def test_bad_row_in_a_presplit_file(tmp_path):
    _refused(tmp_path, r"test\.csv:4: column 'label': '9' is not 0 or 1",
             **_presplit(tmp_path, test=[HEADER, *_with(2, 0, "9")]))


def test_all_empty_column(tmp_path):
    rows = [",".join(r.split(",")[:2] + [""] + r.split(",")[3:]) for r in ROWS]
    _refused(tmp_path, r"data\.csv \(train split\): column 'city' is empty in every row$", path=str(_csv(tmp_path, rows)))
    rows = [",".join(r.split(",")[:4] + [""]) for r in ROWS]
    _refused(tmp_path, r"column 'price' is empty in every row$", path=str(_csv(tmp_path, rows)))
    rows = [",".join(r.split(",")[:3] + ["||"] + r.split(",")[4:]) for r in ROWS]
    _refused(tmp_path, r"column 'tags' is empty in every row$", path=str(_csv(tmp_path, rows)))


def test_all_null_parquet_column(tmp_path):
    pl.DataFrame({"label": [0, 1], "user": [None, None], "city": ["a", "b"], "tags": [["x"], ["y"]],
                  "price": [1.0, 2.0]}).write_parquet(tmp_path / "t.parquet")
    paths = {f"{s}_path": str(tmp_path / "t.parquet") for s in ("train", "val", "test")}
    _refused(tmp_path, r"t\.parquet: column 'user' is empty in every row$", **paths)


def test_empty_split(tmp_path):
    _refused(tmp_path, r"val\.csv: no rows \(it is the val split\)$", **_presplit(tmp_path, val=[HEADER]))
    _refused(tmp_path, r"data\.csv: the test split is empty \(3 rows split \[0\.8, 0\.1, 0\.1\]\)",
             path=str(_csv(tmp_path, ROWS[:3])))
