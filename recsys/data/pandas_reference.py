"""A plain pandas version of the Criteo preprocessing, to check and time ``criteo.py`` against.

It reads the whole file eagerly and skips most validation, but for valid input it
writes the same split Parquet files and the same ``counts.parquet`` as
``criteo.preprocess_criteo`` (tests assert equality on the real sample and the
benchmark on 2M synthetic rows). Not meant for production use.

Example::

    preprocess_criteo_pandas(Path("train.txt"), Path("/tmp/ref"), seed=0)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.common import assign_splits
from recsys.data.criteo import COLUMNS, DENSE, SPARSE
from recsys.data.schema import COUNTS_FILE, SPLITS


def _hex_to_int(col: pd.Series) -> np.ndarray:
    """Hex strings to int64, empty -> -1; parses each distinct value once, not each row."""
    codes, uniques = pd.factorize(col)
    parsed = np.array([int(u, 16) if u else -1 for u in uniques], dtype=np.int64)
    return parsed[codes]


def preprocess_criteo_pandas(
    path: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split: list[float] | None = None,
    min_count: int = 1,
) -> dict[str, int]:
    """Process ``path`` into ``out_dir`` (splits and counts, no schema); returns rows per split."""
    split = list(split) if split is not None else [0.8, 0.1, 0.1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=COLUMNS,
        dtype=str,
        na_filter=False,  # keep empty fields as "" instead of NaN
        quoting=csv.QUOTE_NONE,
    )
    out = pd.DataFrame({"label": (raw["label"] == "1").astype(np.float32)})
    for c in DENSE:
        x = raw[c].where(raw[c] != "", "0").astype(np.int64).clip(lower=0)
        out[c] = np.log1p(x.to_numpy(dtype=np.float64)).astype(np.float32)
    codes = assign_splits(np.arange(len(raw)), seed, split)
    is_train = codes == 0
    counts = []
    for c in SPARSE:
        values = pd.Series(_hex_to_int(raw[c]))
        freq = values[is_train & (values.to_numpy() >= 0)].value_counts()
        vocab = (
            pd.DataFrame({"value": freq.index.to_numpy(), "count": freq.to_numpy()})
            .query("count >= @min_count")
            .sort_values(["count", "value"], ascending=[False, True], kind="stable")
        )
        vocab["id"] = np.arange(1, len(vocab) + 1, dtype=np.int64)
        ids = values.map(pd.Series(vocab["id"].to_numpy(), index=vocab["value"].to_numpy()))
        out[c] = ids.fillna(0).astype(np.int64).to_numpy()
        oov = int(is_train.sum()) - int(vocab["count"].sum())
        counts.append(
            pd.DataFrame(
                {
                    "field": c,
                    "id": np.concatenate([[0], vocab["id"].to_numpy()]).astype(np.int64),
                    "count": np.concatenate([[oov], vocab["count"].to_numpy()]).astype(np.int64),
                }
            )
        )
    rows = {}
    for code, s in enumerate(SPLITS):
        part = out[codes == code]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), out_dir / f"{s}.parquet")
        rows[s] = len(part)
    pd.concat(counts, ignore_index=True).to_parquet(out_dir / COUNTS_FILE, index=False)
    return rows
