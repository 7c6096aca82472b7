"""Values to ids: vocabulary ids (``IdLookup``, ``string_ids``) and raw ids, a stable
64-bit hash of each value with no vocabulary between the file and the model (``RawIds``
for integers, ``RawTextIds`` for text); shared by the format loaders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import polars as pl

from recsys.data.common import splitmix64

RAW_ID_SEED = 0x5EED_1D5  # fixed: a raw value's id is the same in every dataset and process


def raw_ids(values: np.ndarray) -> np.ndarray:
    """``ids: raw``: each int64 value's stable 64-bit hash folded to ``[1, 2^62]`` (splitmix64,
    seeded by a constant; 0 stays free for empty values). Distinct values collide with
    probability about n^2 / 2^63 for n values."""
    return (
        splitmix64(np.asarray(values, dtype=np.int64).view(np.uint64), RAW_ID_SEED) >> np.uint64(2)
    ).astype(np.int64) + 1


class _IdMap:
    """Values -> ids elementwise, for flat columns and list columns alike (``ids``: a flat
    Series -> int64 ids); a polars ``map_batches`` function."""

    def ids(self, values: pl.Series) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, s: pl.Series) -> pl.Series:
        if not isinstance(s.dtype, pl.List):
            return pl.Series(s.name, self.ids(s), dtype=pl.Int64)
        # lists: map the flat values once, keep each row's offsets
        import pyarrow as pa

        arr = s.to_arrow()
        offsets = arr.offsets.to_numpy()
        flat = pl.from_arrow(arr.flatten())
        assert isinstance(flat, pl.Series)
        out = pa.LargeListArray.from_arrays(
            pa.array(offsets - offsets[0], type=pa.int64()),
            pa.array(self.ids(flat), type=pa.int64()),
        )
        return pl.Series(s.name, out, dtype=pl.List(pl.Int64))


class RawIds(_IdMap):
    """``IdLookup``'s counterpart for ``ids: raw``: int64 values -> ``raw_ids`` (nulls -> 0),
    no vocabulary involved (Criteo's loader).

    Example::

        pl.col("C1").map_batches(RawIds(), return_dtype=pl.Int64, is_elementwise=True)
    """

    def ids(self, values: pl.Series) -> np.ndarray:
        ids = raw_ids(values.fill_null(0).to_numpy())
        if values.null_count():
            ids[values.is_null().to_numpy()] = 0
        return ids


def frame_ids(frame: pl.DataFrame, maps: Mapping[str, _IdMap]) -> pl.DataFrame:
    """``frame`` with each column named in ``maps`` replaced by its ids, the columns
    mapped at once on as many threads as polars uses (the hash look-ups and NumPy's
    arithmetic release the GIL), for a frame already in memory; a streamed one takes the
    maps as ``map_batches``.

    Example::

        frame_ids(train, {"C1": IdLookup(vocab)})
    """
    with ThreadPoolExecutor(max_workers=pl.thread_pool_size()) as pool:
        return frame.with_columns(pool.map(lambda c: maps[c](frame[c]), maps))


def raw_text_id(text: str) -> int:
    """``ids: raw`` of one value of MovieLens or a user's table: BLAKE2b of its text (an integer as its
    decimal digits, so a CSV and a Parquet file of one table agree) to 64 bits, folded to
    ``[1, 2^62]``."""
    return (
        int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 2
    ) + 1


class RawTextIds(_IdMap):
    """``ids: raw`` for MovieLens and a user's table: every value -> ``raw_text_id``
    of its text, nulls -> 0; each batch's distinct values are hashed once.

    Example::

        pl.col("city").map_batches(RawTextIds(), return_dtype=pl.Int64, is_elementwise=True)
    """

    def ids(self, values: pl.Series) -> np.ndarray:
        text = values.cast(pl.String)
        distinct = text.drop_nulls().unique()
        hashed = pl.Series([raw_text_id(v) for v in distinct.to_list()], dtype=pl.Int64)
        return text.replace_strict(distinct, hashed, default=0, return_dtype=pl.Int64).to_numpy()


class IdLookup(_IdMap):
    """Maps raw int64 values (or lists of them) to vocabulary ids, 0 when absent or null.

    A pandas ``Index`` is used only as a hash table built once per field: polars has no
    streaming-friendly int value->id lookup that is as fast (26 left joins that keep row
    order were about 4x slower, ``replace_strict`` materialised the whole split). String
    values use ``string_ids`` instead, which is native polars and as fast.

    Example::

        lookup = IdLookup(vocab)              # columns value (int64), id
        pl.col("C1").map_batches(lookup, return_dtype=pl.Int64, is_elementwise=True)
    """

    def __init__(self, vocab: pl.DataFrame) -> None:
        self._index = pd.Index(vocab["value"].to_numpy())
        # position -1 (absent) picks the trailing 0
        self._ids = np.append(vocab["id"].to_numpy().astype(np.int64), np.int64(0))

    def ids(self, values: pl.Series) -> np.ndarray:
        """Ids of a flat int64 Series (nulls -> 0)."""
        ids = self._ids[self._index.get_indexer(values.fill_null(0).to_numpy())]
        if values.null_count():
            ids[values.is_null().to_numpy()] = 0
        return ids


def string_ids(expr: pl.Expr, vocab: pl.DataFrame) -> pl.Expr:
    """Vocabulary ids of a String expression (null, rare and unseen -> 0), native polars.

    An ``Enum`` whose categories are the vocabulary in id order makes the category code
    ``id - 1``; values outside it cast to null. Elementwise, so it streams.

    Example::

        train.select(string_ids(pl.col("country"), vocab))
    """
    categories = pl.Enum(vocab.sort("id")["value"].cast(pl.String))
    return (expr.cast(categories, strict=False).to_physical().cast(pl.Int64) + 1).fill_null(0)
