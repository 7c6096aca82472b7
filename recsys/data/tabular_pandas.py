"""A plain pandas version of the tabular loader, to check and time ``tabular_build.py`` against.

It reads the whole file eagerly and checks nothing, but for valid input it writes the
same split Parquet files and the same ``counts.parquet`` as ``TabularConfig.prepare``
(a test asserts equality; ``bench_tabular`` does on 2M and 20M rows). Not meant for
production use.

Example::

    preprocess_tabular_pandas(TabularConfig(path="t.parquet", categorical=["user"]), Path("/tmp/ref"))
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.common import assign_splits
from recsys.data.schema import COUNTS_FILE, SPLITS
from recsys.data.tabular import Columns, TabularConfig
from recsys.data.tabular_source import SEPARATORS, SUFFIXES


def _read(cfg: TabularConfig, path: Path, cols: Columns) -> pd.DataFrame:
    fmt = cfg.format or SUFFIXES[path.suffix.lower()]
    if fmt == "parquet":
        return pd.read_parquet(path, columns=cols.used)
    return pd.read_csv(
        path,
        sep=cfg.separator or SEPARATORS[fmt],
        header=None if cfg.column_names else 0,
        names=cfg.column_names,
        usecols=cols.used,
        dtype=str,
        keep_default_na=False,  # "" stays "", as polars reads it
        quotechar=cfg.quote_char or '"',
        quoting=csv.QUOTE_NONE if cfg.quote_char is None else csv.QUOTE_MINIMAL,
    )


def _values(col: pd.Series, multi: bool, sep: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Non-empty values as an array (flattened for multi-hot) and, multi-hot, row lengths."""
    if not multi:
        return col.to_numpy(dtype=object), None
    is_text = pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty")
    lists = col.str.split(sep, regex=False) if is_text else col
    lists = lists.map(lambda x: [] if x is None or (isinstance(x, float) and np.isnan(x)) else
                      [v for v in x if v is not None and v != ""])
    lengths = lists.map(len).to_numpy(dtype=np.int64)
    flat = lists.explode().dropna().to_numpy(dtype=object)
    return flat, lengths


def _vocab(train_values: np.ndarray, min_count: int) -> pd.DataFrame:
    s = pd.Series(train_values, dtype=object)
    s = s[s.notna() & (s != "")]
    freq = s.value_counts()
    vocab = pd.DataFrame({"value": freq.index.to_numpy(), "count": freq.to_numpy()})
    vocab = vocab[vocab["count"] >= min_count].sort_values(["count", "value"], ascending=[False, True], kind="stable")
    vocab["id"] = np.arange(1, len(vocab) + 1, dtype=np.int64)
    return vocab.reset_index(drop=True)


def _ids(values: np.ndarray, vocab: pd.DataFrame) -> np.ndarray:
    index = pd.Index(vocab["value"].to_numpy(dtype=object))
    table = np.append(vocab["id"].to_numpy(dtype=np.int64), np.int64(0))
    ids = table[index.get_indexer(values)]
    empty = pd.isna(values) | (values == "")
    ids[np.asarray(empty, dtype=bool)] = 0
    return ids


def preprocess_tabular_pandas(cfg: TabularConfig, out_dir: Path) -> dict[str, int]:
    """Process ``cfg``'s files into ``out_dir`` (splits and counts, no schema); rows per split."""
    cols = cfg.columns()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = cfg.files()
    if "all" in files:
        df = _read(cfg, files["all"], cols)
        codes = assign_splits(np.arange(len(df)), cfg.seed, tuple(cfg.split))
        parts = {s: df[codes == i].reset_index(drop=True) for i, s in enumerate(SPLITS)}
    else:
        parts = {s: _read(cfg, files[s], cols) for s in SPLITS}
    train = parts["train"]
    tables: dict[str, dict[str, pa.Array]] = {s: {} for s in SPLITS}
    for s, part in parts.items():
        x = pd.to_numeric(part[cols.label].replace("", np.nan)).to_numpy(dtype=np.float64)
        label = x == 1.0 if cols.threshold is None else x >= cols.threshold
        tables[s]["label"] = pa.array(label.astype(np.float32))
    stats = {}
    for name, transform in cols.numeric.items():
        t = pd.to_numeric(train[name].replace("", np.nan)).to_numpy(dtype=np.float64)
        t = t[~np.isnan(t)]
        std = float(np.float32(t.std()))
        stats[name] = (float(np.float32(t.mean())), std if std > 0 else 1.0)
        for s, part in parts.items():
            x = pd.to_numeric(part[name].replace("", np.nan)).to_numpy(dtype=np.float64)
            if transform == "log1p":
                x = np.log1p(np.maximum(x, 0))
            elif transform == "standardise":
                x = (x - stats[name][0]) / stats[name][1]
            tables[s][name] = pa.array(np.nan_to_num(x, nan=0.0).astype(np.float32))
    counts = []
    for name in cols.sparse:
        multi, sep = name in cols.multi_hot, cols.multi_hot.get(name)
        train_values, _ = _values(train[name], multi, sep)
        vocab = _vocab(train_values, cols.min_counts[name])
        train_ids = _ids(train_values, vocab)
        counts.append(pd.DataFrame({"field": name, "id": np.concatenate([[0], vocab["id"]]).astype(np.int64),
                                    "count": np.concatenate([[np.sum(train_ids == 0)], vocab["count"]]).astype(np.int64)}))
        for s, part in parts.items():
            values, lengths = _values(part[name], multi, sep)
            ids = _ids(values, vocab)
            if lengths is None:
                tables[s][name] = pa.array(ids)
            else:
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                tables[s][name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
    rows = {}
    for s in SPLITS:
        order = ["label", *cols.numeric, *cols.sparse]
        pq.write_table(pa.table({c: tables[s][c] for c in order}), out_dir / f"{s}.parquet")
        rows[s] = len(parts[s])
    pd.concat(counts, ignore_index=True).to_parquet(out_dir / COUNTS_FILE, index=False)
    return rows
