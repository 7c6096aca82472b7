"""Synthetic Criteo-like CTR data with a planted, known signal, generated in flat memory.

Every random number is ``splitmix64`` of (row, stream) or (field, id, component) under
the seed, so a row's content depends only on ``(seed, row)``: data are the same for any
``chunk_rows``, a smaller ``rows`` gives a prefix of a larger one, and nothing of size
``cardinality`` is ever materialised (tables of 10^8 ids cost nothing until seen).

Ids: per field, a rank in ``[0, N)`` is drawn from a bounded Zipf law (inverse CDF of
the continuous power law ``(x + 1)^-s`` on ``[0, N)``, floored). The processed id is
``rank + 1`` (id 0 = empty, the schema's OOV), cardinality ``N + 1``: ids are ordered
by *expected* frequency, which the train counts follow up to sampling noise in the tail.
The raw TSV writes each rank as 8 hex digits through a seeded 32-bit bijection, so it
looks like hashed Criteo values and ``criteo.py`` recovers the same partition of rows.

Labels: ``Bernoulli(sigmoid(b + z))`` where ``z`` (a function of the observed features
only, so ``sigmoid(b + z)`` is the Bayes-optimal predictor) is

* first-order effects: a hidden weight per (field, id),
* dot products of hidden ``hidden_dim``-vectors of every pair of the first
  ``interaction_fields`` fields,
* a linear function of the processed dense features,

each scaled to a fixed share of the variance ``signal**2`` measured on a pilot of the
first ``PILOT_ROWS`` rows, and ``b`` is solved on the pilot for ``base_ctr``. The AUC
of the true probabilities on the test split is stored as ``params['oracle_auc']``: the
ceiling a model (compressed or not) is measured against.

Example::

    ds = SyntheticConfig(rows=100_000, cardinalities=[1000, 10**8]).prepare(Path("data/cache"))
    ds.schema.params["oracle_auc"]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from compression.config_checks import bounded
from recsys.data.base import DatasetConfig
from recsys.data.common import (
    assign_splits,
    cached_dataset,
    ordered_splits,
    splitmix64,
    write_counts,
)
from recsys.data.schema import COUNTS_FILE, SPLITS, DatasetSchema, ProcessedDataset, SparseField

CODE_VERSION = 1
PILOT_ROWS = 100_000
# Share of the planted logit variance of each part (renormalised over the parts present).
SHARES = {"first": 0.5, "pairs": 0.3, "dense": 0.2}
# Fields with at most this many ids are counted with a dense bincount (16 MiB each), larger
# ones by merging the ids seen (memory grows with distinct ids seen, not with the field).
DENSE_COUNT_MAX = 1 << 21
AUC_BINS = 1 << 16
# Criteo-like table sizes (a scaled-down Kaggle profile: a few huge fields, many small).
DEFAULT_CARDINALITIES = [
    1_000, 500, 1_000_000, 500_000, 300, 25, 10_000, 600, 3, 50_000, 5_000, 1_000_000, 3_000,
    30, 10_000, 800_000, 10, 5_000, 2_000, 4, 1_000_000, 15, 15, 100_000, 100, 50_000,
]


@dataclass
class SyntheticConfig(DatasetConfig):
    """Shape and signal of a synthetic dataset (see the module docstring).

    Example::

        cfg = SyntheticConfig(rows=300_000, cardinalities=[100, 10_000, 10**8], seed=1)
        ds = cfg.prepare(Path("data/cache"))
    """

    ordered_by: ClassVar[Optional[str]] = "the row order (rows are generated in time)"

    name: str = "synthetic"
    rows: int = bounded(1_000_000, ge=1)
    cardinalities: list[int] = bounded(ge=2, each=True, default_factory=lambda: list(DEFAULT_CARDINALITIES))
    n_dense: int = bounded(13, ge=0)
    zipf_exponent: float = bounded(1.1, gt=0)
    hidden_dim: int = bounded(8, ge=1)
    interaction_fields: int = bounded(4, ge=0)
    signal: float = bounded(1.25, ge=0)  # std of the planted logit before the intercept (oracle AUC ~0.78)
    base_ctr: float = bounded(0.25, gt=0, lt=1)
    empty_rate: float = bounded(0.02, ge=0, lt=1)  # per value: empty categorical (id 0) or empty integer
    chunk_rows: int = bounded(1_000_000, ge=1)
    # ids that drift in time (row order): each field's popularity ranking moves by this fraction
    # of its ids over the rows (rank r at row i is id (r + floor(drift·N·i/rows)) mod N), so the
    # popular ids of the first rows fade and ids of their tail become the popular ones
    drift: float = bounded(0.0, ge=0)

    def prepare(self, cache_root: Path) -> ProcessedDataset:
        key = {"format": "synthetic", "code_version": CODE_VERSION, **asdict(self)}
        key.pop("chunk_rows")  # output does not depend on it
        key.pop("name")
        key.pop("split_by")
        key.update(self.split_key())
        if not self.drift:  # (caches made before drift existed stay valid)
            key.pop("drift")
        return cached_dataset(Path(cache_root), self.name, key, lambda out: write_processed(self, out))


def _uniform(keys: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) float64 from 53 bits of the hash of each key."""
    return (splitmix64(keys, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sub_seed(seed: int, purpose: int) -> int:
    return int(splitmix64(np.array([purpose], dtype=np.uint64), seed)[0])


def zipf_ranks(u: np.ndarray, n: int, exponent: float) -> np.ndarray:
    """Ranks in ``[0, n)`` from uniforms ``u``: bounded Zipf by inverse CDF, O(1) memory in n.

    ``P(rank = r)`` is the mass of the density ``(x + 1)^-exponent`` on ``[r, r + 1)``.

    Example::

        zipf_ranks(np.random.default_rng(0).random(5), 10**8, 1.1)
    """
    s = float(exponent)
    if s == 1.0:
        x = np.exp(u * np.log1p(float(n))) - 1.0
    else:
        top = (n + 1.0) ** (1.0 - s) - 1.0
        x = (1.0 + u * top) ** (1.0 / (1.0 - s)) - 1.0
    return np.clip(np.floor(x), 0, n - 1).astype(np.int64)


def _hex_bijection(rank: np.ndarray, field_index: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, 2^32) (murmur3 finaliser): rank -> hashed-looking value."""
    x = (rank.astype(np.uint64) + np.uint64(_sub_seed(seed, 7000 + field_index))) & np.uint64(0xFFFFFFFF)
    m = np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & m
    x ^= x >> np.uint64(13)
    x = (x * np.uint64(0xC2B2AE35)) & m
    x ^= x >> np.uint64(16)
    return x


class Generator:
    """Rows ``[start, stop)`` of one synthetic dataset; calibrated once on a pilot."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        if not cfg.cardinalities or any(n < 1 for n in cfg.cardinalities):
            raise ValueError(f"cardinalities must be positive, got {cfg.cardinalities}")
        if len(cfg.cardinalities) >= 1024 or not 0 < cfg.hidden_dim < 255:
            raise ValueError("at most 1023 fields and 1..254 hidden dimensions")
        if cfg.zipf_exponent <= 0 or not 0 < cfg.base_ctr < 1 or cfg.chunk_rows < 1:
            raise ValueError("need zipf_exponent > 0, 0 < base_ctr < 1 and chunk_rows >= 1")
        self.cfg = cfg
        self.n_fields = len(cfg.cardinalities)
        self.streams = 1 + 2 * cfg.n_dense + 2 * self.n_fields  # random numbers per row
        self.row_seed = _sub_seed(cfg.seed, 1)
        self.hidden_seed = _sub_seed(cfg.seed, 2)
        k = min(cfg.interaction_fields, self.n_fields)
        self.pairs = list(itertools.combinations(range(k), 2))
        j = np.arange(max(cfg.n_dense, 1), dtype=np.uint64)
        self.dense_mu = 3.0 * _uniform(j, _sub_seed(cfg.seed, 3))
        self.dense_sigma = 0.5 + _uniform(j, _sub_seed(cfg.seed, 4))
        self.dense_w = 2.0 * _uniform(j, _sub_seed(cfg.seed, 5)) - 1.0
        # calibration: standardise each part on the pilot, then solve the intercept
        self.dense_mean = np.zeros(cfg.n_dense)
        self.dense_std = np.ones(cfg.n_dense)
        self.scale = {"first": 1.0, "pairs": 1.0, "dense": 1.0}
        self.bias = 0.0
        pilot = self._raw(0, PILOT_ROWS)
        if cfg.n_dense:
            self.dense_mean = pilot["dense"].mean(axis=0)
            self.dense_std = pilot["dense"].std(axis=0) + 1e-9
        parts = self._parts(pilot)
        total = sum(SHARES[p] for p in parts)
        for p, z in parts.items():
            self.scale[p] = cfg.signal * np.sqrt(SHARES[p] / total) / (z.std() + 1e-12)
        self.bias = self._solve_bias(self._logit(pilot), cfg.base_ctr)

    def _uniforms(self, rows: np.ndarray, stream: int) -> np.ndarray:
        return _uniform(rows * np.uint64(self.streams) + np.uint64(stream), self.row_seed)

    def _hidden(self, f: int, ids: np.ndarray, k: int) -> np.ndarray:
        """Hidden unit-variance value (uniform on +-sqrt 3) of component k of each id of field f."""
        key = (ids.astype(np.uint64) << np.uint64(18)) | np.uint64((f << 8) | k)
        return (2.0 * _uniform(key, self.hidden_seed) - 1.0) * np.sqrt(3.0)

    def _raw(self, start: int, stop: int) -> dict[str, np.ndarray]:
        cfg = self.cfg
        rows = np.arange(start, stop, dtype=np.uint64)
        n = len(rows)
        ints = np.zeros((n, cfg.n_dense), dtype=np.int64)
        dense = np.zeros((n, cfg.n_dense), dtype=np.float32)
        dense_empty = np.zeros((n, cfg.n_dense), dtype=bool)
        for j in range(cfg.n_dense):
            u = np.clip(self._uniforms(rows, 1 + 2 * j), 1e-12, 1 - 1e-12)
            g = np.log(u / (1.0 - u)) / 1.8  # logistic, about unit variance
            v = np.floor(np.exp(np.minimum(self.dense_mu[j] + self.dense_sigma[j] * g, 20.0)))
            ints[:, j] = v.astype(np.int64) - (1 if j == 1 else 0)  # like Criteo I2: some -1
            dense_empty[:, j] = self._uniforms(rows, 2 + 2 * j) < cfg.empty_rate
            x = np.log1p(np.maximum(ints[:, j], 0).astype(np.float64)).astype(np.float32)
            dense[:, j] = np.where(dense_empty[:, j], np.float32(0), x)
        ranks = np.empty((n, self.n_fields), dtype=np.int64)
        base = 1 + 2 * cfg.n_dense
        for f, card in enumerate(cfg.cardinalities):
            r = zipf_ranks(self._uniforms(rows, base + 2 * f), card, cfg.zipf_exponent)
            if cfg.drift:
                shift = np.floor(cfg.drift * card * rows.astype(np.float64) / max(cfg.rows, 1)).astype(np.int64)
                r = (r + shift) % card
            empty = self._uniforms(rows, base + 2 * f + 1) < cfg.empty_rate
            ranks[:, f] = np.where(empty, -1, r)
        return {"rows": rows, "ints": ints, "dense": dense, "dense_empty": dense_empty, "ranks": ranks}

    def _parts(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Unscaled logit parts; an empty value contributes nothing (its hidden values are 0)."""
        ranks = raw["ranks"]
        present = ranks >= 0
        ids = np.maximum(ranks, 0)
        out = {"first": np.zeros(len(ranks))}
        for f in range(self.n_fields):
            out["first"] += np.where(present[:, f], self._hidden(f, ids[:, f], 0), 0.0)
        if self.pairs:
            vecs = {}
            for f in {f for pair in self.pairs for f in pair}:
                v = np.stack([self._hidden(f, ids[:, f], k) for k in range(1, self.cfg.hidden_dim + 1)], 1)
                vecs[f] = v * present[:, f : f + 1]
            out["pairs"] = sum(np.einsum("nd,nd->n", vecs[a], vecs[b]) for a, b in self.pairs)
        if self.cfg.n_dense:
            std = (raw["dense"] - self.dense_mean) / self.dense_std
            out["dense"] = std @ self.dense_w[: self.cfg.n_dense]
        return out

    def _logit(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        parts = self._parts(raw)
        return self.bias + np.sum([self.scale[p] * z for p, z in parts.items()], axis=0)

    @staticmethod
    def _solve_bias(z: np.ndarray, ctr: float) -> float:
        lo, hi = -30.0, 30.0  # mean sigmoid(b + z) increases in b: bisection
        for _ in range(100):
            mid = (lo + hi) / 2
            if np.mean(1.0 / (1.0 + np.exp(-(mid + z)))) < ctr:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def chunk(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)``: raw values, probabilities, labels and split codes."""
        raw = self._raw(start, stop)
        prob = 1.0 / (1.0 + np.exp(-self._logit(raw)))
        raw["prob"] = prob
        raw["label"] = (self._uniforms(raw["rows"], 0) < prob).astype(np.int8)
        if self.cfg.split_by == "order":
            raw["split"] = ordered_splits(raw["rows"], self.cfg.rows, self.cfg.split)
        else:
            raw["split"] = assign_splits(raw["rows"], self.cfg.seed, self.cfg.split)
        return raw

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        step = self.cfg.chunk_rows
        for start in range(0, self.cfg.rows, step):
            yield self.chunk(start, min(start + step, self.cfg.rows))


class _Counter:
    """Train counts of one field, merged chunk by chunk in memory bounded by ids seen."""

    def __init__(self, cardinality: int) -> None:
        self.dense = np.zeros(cardinality, np.int64) if cardinality <= DENSE_COUNT_MAX else None
        self.ids = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray) -> None:
        if self.dense is not None:
            self.dense += np.bincount(ids, minlength=len(self.dense))
            return
        u, c = np.unique(ids, return_counts=True)
        all_ids, inv = np.unique(np.concatenate([self.ids, u]), return_inverse=True)
        self.counts = np.bincount(inv, weights=np.concatenate([self.counts, c]), minlength=len(all_ids)).astype(np.int64)
        self.ids = all_ids

    def frame(self) -> pl.DataFrame:
        if self.dense is not None:
            seen = np.flatnonzero(self.dense)
            return pl.DataFrame({"id": seen.astype(np.int64), "count": self.dense[seen]})
        return pl.DataFrame({"id": self.ids, "count": self.counts})


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from score histograms per label (ties inside a bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def write_processed(cfg: SyntheticConfig, out_dir: Path) -> DatasetSchema:
    """Generate ``cfg`` straight into the processed format under ``out_dir``; returns the schema.

    Each chunk becomes one row group of each split file, so memory stays flat in ``rows``.

    Example::

        schema = write_processed(SyntheticConfig(rows=10_000), Path("/tmp/synth"))
    """
    gen = Generator(cfg)
    dense_names = [f"I{j + 1}" for j in range(cfg.n_dense)]
    sparse_names = [f"C{f + 1}" for f in range(gen.n_fields)]
    arrow_schema = pa.schema(
        [("label", pa.float32())]
        + [(c, pa.float32()) for c in dense_names]
        + [(c, pa.int64()) for c in sparse_names]
    )
    writers = {s: pq.ParquetWriter(out_dir / f"{s}.parquet", arrow_schema, compression="zstd") for s in SPLITS}
    counters = [_Counter(n + 1) for n in cfg.cardinalities]
    rows = dict.fromkeys(SPLITS, 0)
    hist = {lab: np.zeros(AUC_BINS, np.int64) for lab in (0, 1)}
    logloss, n_test, positives = 0.0, 0, 0
    try:
        for ch in gen.chunks():
            ids = ch["ranks"] + 1  # empty (-1) -> 0
            for code, s in enumerate(SPLITS):
                sel = ch["split"] == code
                if not sel.any():
                    continue
                cols = [pa.array(ch["label"][sel].astype(np.float32))]
                cols += [pa.array(ch["dense"][sel, j]) for j in range(cfg.n_dense)]
                cols += [pa.array(ids[sel, f]) for f in range(gen.n_fields)]
                writers[s].write_table(pa.Table.from_arrays(cols, schema=arrow_schema))
                rows[s] += int(sel.sum())
            train = ch["split"] == 0
            for f, counter in enumerate(counters):
                counter.add(ids[train, f])
            test = ch["split"] == 2
            p, y = ch["prob"][test], ch["label"][test]
            bins = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
            for lab in (0, 1):
                hist[lab] += np.bincount(bins[y == lab], minlength=AUC_BINS)
            pc = np.clip(p, 1e-12, 1 - 1e-12)
            logloss -= float(np.sum(y * np.log(pc) + (1 - y) * np.log1p(-pc)))
            n_test += len(y)
            positives += int(ch["label"].sum())
    finally:
        for w in writers.values():
            w.close()
    write_counts(out_dir / COUNTS_FILE, {c: counters[f].frame() for f, c in enumerate(sparse_names)})
    defaults = {"split_by": "hash", "drift": 0.0}  # (left out at their defaults, as in the cache key)
    params: dict[str, Any] = {k: v for k, v in asdict(cfg).items() if k != "name" and defaults.get(k, object()) != v}
    params.update(
        code_version=CODE_VERSION,
        id_order="rank + 1: descending expected frequency; 0 = empty" if not cfg.drift
        else "rank + 1 at the first row, the ranking moving with drift; 0 = empty",
        oracle_auc=_auc_from_hist(hist[1], hist[0]),
        oracle_logloss=logloss / n_test if n_test else float("nan"),
        ctr=positives / cfg.rows if cfg.rows else float("nan"),
        intercept=gen.bias,
    )
    return DatasetSchema(
        name=cfg.name,
        dense=dense_names,
        sparse=[SparseField(c, n + 1) for c, n in zip(sparse_names, cfg.cardinalities)],
        rows=rows,
        source={"format": "synthetic", "generator": "recsys.data.synthetic", "code_version": CODE_VERSION},
        params=params,
    )
