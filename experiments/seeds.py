"""Several seeds per job, and what they add up to: mean, spread and a 95% interval.

``seeds: 3`` in a job's config runs it with seeds ``seed, seed+1, seed+2`` (or
``seeds: [0, 7, 42]``); each seed is its own MLflow run, tagged ``seed``, nested
under one group run per job that holds the aggregate. The interval is Student's t:
``mean +- t(0.975, n-1) * std / sqrt(n)`` with the sample standard deviation, so
three seeds give a wide interval (t = 4.30) on purpose: two methods whose intervals
overlap are not told apart by those seeds.

Example::

    resolve_seeds(3, 0)                       # [0, 1, 2]
    aggregate([0.71, 0.72, 0.70])             # Stat(mean=0.71, std=0.01, ci95=0.0248, n=3)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats  # type: ignore[import-untyped]

from compression.errors import EmbcompError

# metrics of the seed runs that the group run holds aggregated
AGGREGATED = (
    "test_auc", "test_logloss", "embedding_bytes", "compression_ratio", "embedding_optimizer_bytes",
    "samples_per_s", "fit_samples_per_s", "step_time_ms", "epochs_run", "best_epoch", "val_auc",
    "final_val_auc", "final_val_logloss", "trained_samples",
)  # fmt: skip


class SeedsError(EmbcompError, ValueError):
    """A ``seeds`` setting that is not a positive count or a list of distinct integers."""


def resolve_seeds(seeds: Any, base: int) -> list[int] | None:
    """The seeds a job runs with: None (one run, ``seed``), ``n`` or an explicit list."""
    if seeds is None:
        return None
    if isinstance(seeds, bool):
        raise SeedsError(f"seeds must be a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise SeedsError(f"seeds must be at least 1, got {seeds}")
        return [base + i for i in range(seeds)]
    if isinstance(seeds, Sequence) and not isinstance(seeds, str):
        out = list(seeds)
        if not out or not all(isinstance(s, int) and not isinstance(s, bool) for s in out):
            raise SeedsError(f"seeds must be a count or a non-empty list of integers, got {list(seeds)!r}")
        if len(set(out)) != len(out):
            raise SeedsError(f"seeds must be distinct, got {out}")
        return out
    raise SeedsError(f"seeds must be a count or a list of integers, got {seeds!r}")


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation, half-width of the 95% t interval, count."""

    mean: float
    std: float
    ci95: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.ci95 if self.ci95 == self.ci95 else self.mean

    @property
    def high(self) -> float:
        return self.mean + self.ci95 if self.ci95 == self.ci95 else self.mean

    def overlaps(self, other: Stat) -> bool:
        """Whether the two 95% intervals share a point (a single run: its value)."""
        return self.low <= other.high and other.low <= self.high


def aggregate(values: Iterable[float]) -> Stat:
    """The ``Stat`` of the finite ``values`` (NaN fields when there are none)."""
    xs = [float(v) for v in values if v == v and abs(float(v)) != math.inf]
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Stat(mean, math.nan, math.nan, 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Stat(mean, std, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), n)


def aggregate_metrics(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Group-run metrics: each aggregated metric's mean under its own name, with
    ``_std`` and ``_ci95`` beside it, and ``n_seeds``."""
    out: dict[str, float] = {"n_seeds": float(len(per_seed))}
    for key in AGGREGATED:
        st = aggregate(m[key] for m in per_seed if key in m)
        if st.n:
            out[key] = st.mean
            out[f"{key}_std"] = st.std
            out[f"{key}_ci95"] = st.ci95
    return out
