"""The synthetic Criteo-shaped data (``recsys.data.synthetic``) written as a raw Criteo TSV.

For the loader's benchmarks and tests: the same rows as the processed dataset's, in the
Kaggle file's format (label, I1..I13, C1..C26 as 8 hex digits, empty fields empty),
streamed in chunks and renamed into place when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.synthetic import DEFAULT_CARDINALITIES, Generator, SyntheticConfig, _hex_bijection


def _hex8(x: np.ndarray) -> pl.Series:
    """uint32 values as 8 lowercase hex digits (vectorised through a nibble table)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    nibbles = (x.astype(np.uint64)[:, None] >> shifts) & np.uint64(0xF)
    chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    return pl.Series(np.ascontiguousarray(chars).view("S8").ravel()).cast(pl.String)


def write_criteo_tsv(
    path: Path,
    rows: int,
    seed: int = 0,
    *,
    cardinalities: list[int] | None = None,
    chunk_rows: int = 500_000,
    **options: Any,
) -> Path:
    """Write the synthetic data as a raw Criteo TSV (label, I1..I13, C1..C26), streaming.

    Categoricals are 8 hex digits (a bijection of the rank), empty values are empty
    fields. Written to a temporary name and renamed, so ``path`` is complete or absent.
    ``options`` are further ``SyntheticConfig`` fields (zipf_exponent, signal, ...).

    Example::

        write_criteo_tsv(Path("/tmp/synth.tsv"), rows=100_000, seed=0)
    """
    cards = list(cardinalities) if cardinalities is not None else list(DEFAULT_CARDINALITIES)
    if len(cards) != 26 or max(cards) > 1 << 32:
        raise ValueError("the Criteo format has 26 categorical fields of at most 2^32 values")
    cfg = SyntheticConfig(rows=rows, seed=seed, cardinalities=cards, n_dense=13, chunk_rows=chunk_rows, **options)
    gen = Generator(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            for ch in gen.chunks():
                cols: dict[str, pl.Series] = {"label": pl.Series(ch["label"])}
                for j in range(13):
                    cols[f"I{j + 1}"] = pl.Series(ch["ints"][:, j]).scatter(
                        np.flatnonzero(ch["dense_empty"][:, j]), None
                    )
                for f in range(26):
                    r = ch["ranks"][:, f]
                    cols[f"C{f + 1}"] = _hex8(_hex_bijection(np.maximum(r, 0), f, seed)).scatter(
                        np.flatnonzero(r < 0), None
                    )
                pl.DataFrame(cols).write_csv(fh, separator="\t", include_header=False, null_value="", quote_style="never")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
