"""Finalists and the answer: chosen on validation, the test split read once per seed.

The best finished trial of each of the ``finalists`` best candidates (by validation AUC
of the deployed model, models that learned nothing left out), and the reference's best
(the tuned full table), are trained again with fresh seeds (not the search's, so the
figures are not the ones they were picked on), each seed to convergence and evaluated on
the test split. The answer is the finalist with the best mean validation AUC; every
finalist whose validation interval overlaps it is marked tied. Its test AUC is set against
the tuned full table's seed by seed (same seeds): the mean difference with its 95%
interval.

Example::

    finals = [Finalist.of(point, summary) for point, summary in ...]
    answer = decide(finals)        # the Finalist to use, its rank set; ties marked on the others
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from experiments.advise.candidates import Point
from experiments.job_summary import JobSummary
from experiments.seeds import Stat, aggregate
from recsys.training.metrics import not_learned


@dataclass
class Finalist:
    """A point trained with several seeds: its validation and test figures, its bytes."""

    point: Point
    per_seed: dict[str, dict[str, float]]
    run_id: str = ""
    rank: str = ""  # "answer", "tied", "reference" or ""
    delta: Stat | None = None  # test AUC against the reference, paired on seeds
    failed: str | None = None
    search_value: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, point: Point, summary: JobSummary, search_value: float = math.nan) -> Finalist:
        per_seed = {str(k): dict(v) for k, v in (summary.per_seed or {}).items()}
        f = cls(point, per_seed, summary.run_id or "", search_value=search_value)
        f.failed = f._failed()
        if point.candidate.reference:
            f.rank = "reference"
        return f

    def stat(self, key: str) -> Stat:
        return aggregate(m.get(key, math.nan) for m in self.per_seed.values())

    @property
    def val(self) -> Stat:
        return self.stat("final_val_auc")

    @property
    def test(self) -> Stat:
        return self.stat("test_auc")

    def mean(self, key: str) -> float:
        return self.stat(key).mean

    def samples(self) -> float:
        return sum(float(m.get("trained_samples", 0.0)) for m in self.per_seed.values())

    def _failed(self) -> str | None:
        if not self.per_seed:
            return "no seed finished"
        first = next(iter(self.per_seed.values()))
        means = {k: self.mean(f"final_val_{k}") for k in ("auc", "logloss")}
        means.update({k: first.get(f"final_val_{k}", math.nan) for k in ("base_logloss", "rows", "positives")})
        return not_learned(means)

    @property
    def name(self) -> str:
        return self.point.candidate.name

    def describe(self) -> str:
        return f"{self.name} ({self.point.settings()})"


def paired_delta(f: Finalist, ref: Finalist, key: str = "test_auc") -> Stat:
    """Mean and 95% interval of ``f``'s ``key`` minus the reference's, over their common seeds."""
    seeds = sorted(set(f.per_seed) & set(ref.per_seed))
    return aggregate(f.per_seed[s].get(key, math.nan) - ref.per_seed[s].get(key, math.nan) for s in seeds)


def decide(finals: list[Finalist]) -> Finalist | None:
    """Mark the answer (best mean validation AUC among the candidates that learned) and
    those tied with it; set each one's test AUC difference against the reference. None:
    no candidate learned anything."""
    ref = next((f for f in finals if f.point.candidate.reference), None)
    for f in finals:
        if ref is not None and f is not ref:
            f.delta = paired_delta(f, ref)
    eligible = [f for f in finals if not f.point.candidate.reference and f.failed is None]
    if not eligible:
        return None
    answer = max(eligible, key=lambda f: f.val.mean)
    answer.rank = "answer"
    for f in eligible:
        if f is not answer and f.val.overlaps(answer.val):
            f.rank = "tied"
    return answer


def runner_up(finals: list[Finalist], answer: Finalist) -> Finalist | None:
    rest = [f for f in finals if f is not answer and not f.point.candidate.reference and f.failed is None]
    return max(rest, key=lambda f: f.val.mean, default=None)


def pm(s: Stat) -> str:
    return f"{s.mean:.4f} ± {s.ci95:.4f}" if s.ci95 == s.ci95 else f"{s.mean:.4f}"


def answer_line(answer: Finalist | None, finals: list[Finalist], budget: str) -> str:
    """One line a person can act on: the method, its settings, bytes, Δ and the runner-up."""
    if answer is None:
        return f"no answer at {budget}: no finalist learned anything (see the table)"
    ref = next((f for f in finals if f.point.candidate.reference), None)
    m = next(iter(answer.per_seed.values()))
    line = (f"use {answer.describe()} at {budget}: {int(m.get('embedding_bytes', 0)):,} bytes "
            f"({m.get('compression_ratio', math.nan):.1f}x), test AUC {pm(answer.test)}")  # fmt: skip
    if ref is not None and answer.delta is not None:
        line += f", {answer.delta.mean:+.4f} ± {answer.delta.ci95:.4f} against the tuned full table ({pm(ref.test)})"
    line += f", {answer.test.n} seeds"
    second = runner_up(finals, answer)
    if second is not None:
        line += f"; runner-up {second.describe()} {pm(second.test)}" + (" (tied on validation)" if second.rank == "tied" else "")
    return line
