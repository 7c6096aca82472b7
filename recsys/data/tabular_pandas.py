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
from recsys.data.tabular import TabularConfig
from recsys.data.tabular_columns import Columns
from recsys.data.tabular_source import SEPARATORS, SUFFIXES


def _read(cfg: TabularConfig, path: Path, cols: Columns) -> pd.DataFrame:
    """The used columns with Arrow-backed dtypes (NumPy objects would need ~10x the memory)."""
    fmt = cfg.format or SUFFIXES[path.suffix.lower()]
    if fmt == "parquet":
        return pd.read_parquet(path, columns=cols.used, dtype_backend="pyarrow")
    return pd.read_csv(
        path,
        sep=cfg.separator or SEPARATORS[fmt],
        header=None if cfg.column_names else 0,
        names=cfg.column_names,
        usecols=cols.used,
        dtype=pd.ArrowDtype(pa.string()),
        keep_default_na=False,  # "" stays "", as polars reads it
        quotechar=cfg.quote_char or '"',
        quoting=csv.QUOTE_NONE if cfg.quote_char is None else csv.QUOTE_MINIMAL,
    )


def _is_text(col: pd.Series) -> bool:
    t = getattr(col.dtype, "pyarrow_dtype", None)
    return t is not None and (pa.types.is_string(t) or pa.types.is_large_string(t))


def _present(values: pd.Series) -> pd.Series:
    """Null and (text) empty values as NA."""
    return values.mask(values == "") if _is_text(values) else values


def _number(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(_present(col)).to_numpy(dtype=np.float64, na_value=np.nan)


def _flat(col: pd.Series, sep: str | None) -> tuple[pd.Series, np.ndarray]:
    """A multi-hot column's non-empty elements, flattened, and each row's number of them."""
    lists = col.str.split(sep, regex=False) if _is_text(col) else col
    lengths = lists.list.len().fillna(0).to_numpy(dtype=np.int64)
    flat = lists.list.flatten().reset_index(drop=True)
    keep = _present(flat).notna().to_numpy(dtype=bool)
    kept = np.concatenate([[0], np.cumsum(keep)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return flat[keep].reset_index(drop=True), kept[offsets[1:]] - kept[offsets[:-1]]


def _vocab(train_values: pd.Series, min_count: int) -> pd.DataFrame:
    freq = _present(train_values).value_counts()  # NA dropped
    vocab = pd.DataFrame({"value": freq.index, "count": freq.to_numpy(dtype=np.int64)})
    vocab = vocab[vocab["count"] >= min_count].sort_values(["count", "value"], ascending=[False, True], kind="stable")
    vocab["id"] = np.arange(1, len(vocab) + 1, dtype=np.int64)
    return vocab.reset_index(drop=True)


def _ids(values: pd.Series, vocab: pd.DataFrame) -> np.ndarray:
    """Ids by position in the vocabulary (id order), 0 for NA, empty and absent values."""
    codes = pd.Categorical(_present(values), categories=pd.Index(vocab["value"])).codes
    return np.asarray(codes, dtype=np.int64) + 1  # absent: code -1 -> 0


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
        x = _number(part[cols.label])
        label = x == 1.0 if cols.threshold is None else x >= cols.threshold
        tables[s]["label"] = pa.array(label.astype(np.float32))
    stats = {}
    for name, transform in cols.numeric.items():
        t = _number(train[name])
        t = t[~np.isnan(t)]
        std = float(np.float32(t.std()))
        stats[name] = (float(np.float32(t.mean())), std if std > 0 else 1.0)
        for s, part in parts.items():
            x = _number(part[name])
            if transform == "log1p":
                x = np.log1p(np.maximum(x, 0))
            elif transform == "standardise":
                x = (x - stats[name][0]) / stats[name][1]
            tables[s][name] = pa.array(np.nan_to_num(x, nan=0.0).astype(np.float32))
    counts = []
    for name in cols.sparse:
        multi, sep = name in cols.multi_hot, cols.multi_hot.get(name)
        train_values = _flat(train[name], sep)[0] if multi else train[name]
        vocab = _vocab(train_values, cols.min_counts[name])
        zeros = int(np.sum(_ids(train_values, vocab) == 0))
        counts.append(pd.DataFrame({"field": name, "id": np.concatenate([[0], vocab["id"]]).astype(np.int64),
                                    "count": np.concatenate([[zeros], vocab["count"]]).astype(np.int64)}))
        for s, part in parts.items():
            if not multi:
                tables[s][name] = pa.array(_ids(part[name], vocab))
                continue
            flat, lengths = _flat(part[name], sep)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            tables[s][name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(_ids(flat, vocab)))
    rows = {}
    for s in SPLITS:
        order = ["label", *cols.numeric, *cols.sparse]
        pq.write_table(pa.table({c: tables[s][c] for c in order}), out_dir / f"{s}.parquet")
        rows[s] = len(parts[s])
    pd.concat(counts, ignore_index=True).to_parquet(out_dir / COUNTS_FILE, index=False)
    return rows
