"""libFM files: labels, fields by index range, multi-hot detection, refusals."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from omegaconf import OmegaConf

from recsys.data.libfm import LibFMConfig, LibFMField
from recsys.data.schema import DataError
from tests.data.conftest import leftovers

FIELDS = [LibFMField("user", 0, 5), LibFMField("tag", 5, 10), LibFMField("item", 10, 15)]
# user 0 twice, tag is multi-hot (row 1 has two, row 3 none), item 12 only in row 3
TEXT = """1 0:1 5:1 6:1 10:1
-1 1:1 7:1 11:1
1 2:1 12:1
-1  0:1\t5:1   11:1
"""


def _prepare(tmp_path: Path, text: str = TEXT, **kw) -> object:
    path = tmp_path / "data.libfm"
    path.write_text(text)
    cfg = LibFMConfig(path=str(path), fields=kw.pop("fields", FIELDS), split=[1.0, 0.0, 0.0], **kw)
    return cfg.prepare(tmp_path / "cache")


def test_tiny_file(tmp_path):
    ds = _prepare(tmp_path)
    df = pl.read_parquet(ds.split_path("train"))
    assert df["label"].to_list() == [1.0, 0.0, 1.0, 0.0]
    # user: raw 0 (x2) -> 1, then 1 -> 2, 2 -> 3 (ties by value)
    assert df["user"].to_list() == [1, 2, 3, 1]
    # tag raw = idx - 5: 0 (x2) -> 1, 1 -> 2, 2 -> 3; row 3 has none -> []
    assert df["tag"].to_list() == [[1, 2], [3], [], [1]]
    assert df["tag"].dtype == pl.List(pl.Int64)
    # item raw = idx - 10: 1 (x2) -> 1, 0 -> 2, 2 -> 3
    assert df["item"].to_list() == [2, 1, 3, 1]
    sparse = {f.name: f for f in ds.schema.sparse}
    assert [sparse[n].multi_hot for n in ("user", "tag", "item")] == [False, True, False]
    assert [sparse[n].cardinality for n in ("user", "tag", "item")] == [4, 4, 4]
    assert ds.schema.dense == []
    assert ds.counts("tag").tolist() == [0, 2, 1, 1] and ds.counts("user").tolist() == [0, 2, 1, 1]


def test_zero_one_labels_and_missing_single_field(tmp_path):
    ds = _prepare(tmp_path, "0 0:1 10:1\n1 1:1\n1 12:1\n")
    df = pl.read_parquet(ds.split_path("train"))
    assert df["label"].to_list() == [0.0, 1.0, 1.0]
    assert df["user"].to_list() == [1, 2, 0]  # row 3 has no user: id 0
    assert df["tag"].to_list() == [0, 0, 0]  # never present: a single field of id 0 only
    assert ds.counts("user").tolist() == [1, 1, 1]


def test_min_count_and_unseen(tmp_path):
    ds = _prepare(tmp_path, min_count=2)
    df = pl.read_parquet(ds.split_path("train"))
    assert df["user"].to_list() == [1, 0, 0, 1] and df["tag"].to_list() == [[1, 0], [0], [], [1]]
    assert ds.schema.cardinality("user") == 2


def test_separate_split_files(tmp_path):
    paths = {}
    for s, text in {"train": "1 0:1 5:1\n-1 1:1 5:1 6:1\n", "val": "1 1:1 7:1\n", "test": "-1 3:1\n"}.items():
        paths[f"{s}_path"] = str(tmp_path / f"{s}.libfm")
        Path(paths[f"{s}_path"]).write_text(text)
    ds = LibFMConfig(fields=FIELDS, **paths).prepare(tmp_path / "cache")
    assert ds.schema.rows == {"train": 2, "val": 1, "test": 1}
    val = pl.read_parquet(ds.split_path("val"))
    assert val["user"].to_list() == [2] and val["tag"].to_list() == [[0]]  # tag 7 unseen in train
    assert pl.read_parquet(ds.split_path("test"))["user"].to_list() == [0]


def test_structured_config_with_dict_fields(tmp_path):
    """What Hydra does with a dataset YAML: merge it into the structured config."""
    yaml = f"path: {tmp_path / 'data.libfm'}\nfields:\n  - {{name: user, start: 0, end: 5}}\n"
    cfg = OmegaConf.merge(OmegaConf.structured(LibFMConfig), OmegaConf.create(yaml))
    (tmp_path / "data.libfm").write_text("1 0:1\n0 1:1\n")
    obj = OmegaConf.to_object(cfg)
    assert obj.field_list() == [LibFMField("user", 0, 5)]
    assert sum(obj.prepare(tmp_path / "cache").schema.rows.values()) == 2


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("1 0:1 99:1", r"data\.libfm:3: index 99 is in no field's range"),
        ("1 0:1 -2:1", r"data\.libfm:3: index -2 is in no field's range"),
        ("1 0:0.5", r"data\.libfm:3: token '0:0.5': value is not 1 \(weighted features are not supported\)"),
        ("1 0:1 abc", r"data\.libfm:3: token 'abc' is not index:value"),
        ("1 0:1:1", r"data\.libfm:3: token '0:1:1' is not index:value"),
        ("2 0:1", r"data\.libfm:3: label '2' is not -1, 0 or 1"),
        ("", r"data\.libfm:3: label '' is not -1, 0 or 1"),
    ],
)
def test_refusals(tmp_path, line, match):
    text = "1 0:1\n0 1:1\n" + line + "\n1 0:0.5 99:1\n"  # a later line has errors too
    with pytest.raises(DataError, match=match):
        _prepare(tmp_path, text)
    assert leftovers(tmp_path / "cache") == []


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        LibFMConfig(path="x", fields=[LibFMField("a", 0, 5), LibFMField("b", 4, 8)]).field_list()
    with pytest.raises(ValueError, match="either path"):
        LibFMConfig(path="x", train_path="y", fields=FIELDS).files()
    with pytest.raises(DataError, match="no such file"):
        LibFMConfig(path=str(tmp_path / "nope.libfm"), fields=FIELDS).prepare(tmp_path / "cache")
    (tmp_path / "empty.libfm").write_text("")
    with pytest.raises(DataError, match="empty file"):
        LibFMConfig(path=str(tmp_path / "empty.libfm"), fields=FIELDS).prepare(tmp_path / "cache")
