"""Train counts per table: the one way a frequency-aware method reads ``BuildContext.counts``.

``counts`` maps a feature to the train count of each of its ids (the processed dataset's
``counts.parquet``); a table's count of an id is the sum over the features that share the
table. Frequency hybrid, DPQ/MGQE's hot tier and AutoSrh's groups read them here, with one
check and one message (a missing feature, or an array that is not one count per id).

Example::

    table_counts(EmbeddingBagConfig(name="t_user", embedding_dim=16, num_embeddings=4,
                                    feature_names=["user"]), {"user": [9, 0, 3]}, "dpq")
    # array([9, 0, 3, 0])   (ids past the array: never seen in training)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from compression.errors import MethodConfigError


def table_counts(table: Any, counts: Mapping[str, Any], method: str) -> np.ndarray:
    """Train count (int64) of every id of ``table`` (an ``EmbeddingBagConfig``), summed
    over its features; ids past a feature's array count 0."""
    n = table.num_embeddings
    total = np.zeros(n, dtype=np.int64)
    for f in table.feature_names:
        if f not in counts:
            raise MethodConfigError(
                f"{method} needs the train counts of feature '{f}' (compress(..., counts=...) / "
                f"BuildContext.counts); it has counts for {sorted(counts) or 'none'}"
            )
        c = np.asarray(counts[f])
        if c.ndim != 1 or len(c) > n:
            raise MethodConfigError(
                f"{method}: counts of feature '{f}' must be one count per id of table '{table.name}', at most "
                f"{n} of them; got shape {c.shape}"
            )
        total[: len(c)] += c.astype(np.int64)
    return total
