"""Candidates and the points of their search spaces, refused or kept before any training.

A candidate is a compression config (``conf/compression/<name>.yaml``) at one table
precision (``qr+int4``: QR whose tables are int4 once trained, sized so that the
deployed module holds the budget). The full table (``none``) is the reference: tuned
like every candidate, never the answer. A candidate's points cross its method's
``search_space`` (declared on its config class) with the trainer's
(``recsys.training.trainer.search_space``); its first point is its default settings.

Every point is sized before anything trains: its module is built with its TorchRec
tables on ``meta`` (milliseconds), so a budget the method cannot reach is refused with
the method's own one-line reason, and the user's constraints (step time against the
full table's, shardable, exportable) are checked on the candidate's default point.

Example::

    found = find_candidates(job_overrides, AdviseConfig(precisions=["fp32", "int4"]), context)
    [c.name for c in found.candidates]      # ['none', 'hashing', 'hashing+int4', 'qr', ...]
    found.refused                           # {'managed_collision': 'cannot reach 10x ...'}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import compression
from compression import BudgetError, MethodConfigError, compress, memory_report
from compression.deployed import TableFormat, deployed_bytes
from experiments.advise.config import AdviseConfig
from experiments.identity import parse_budget, resolve_compression
from experiments.job import LazyCounts
from recsys.data.schema import embedding_tables
from recsys.training.trainer import search_space as trainer_space

REFERENCE = "none"


@dataclass(frozen=True)
class Candidate:
    """A compression config at one precision, with the knobs a search tunes for it."""

    name: str
    choice: str  # conf/compression/<choice>.yaml
    precision: str = "fp32"
    reference: bool = False
    # override key (compression.<field> or trainer.<field>) -> the values to try
    space: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def overrides(self) -> list[str]:
        out = [f"compression={self.choice}"]
        if self.precision != "fp32":
            out.append(f"+compression.quantization.precision={self.precision}")
        return out


@dataclass(frozen=True)
class Point:
    """One setting of a candidate's knobs: what a trial trains."""

    candidate: Candidate
    values: tuple[tuple[str, Any], ...]
    round: int  # its place in the candidate's order (0: the default settings)

    @property
    def default(self) -> bool:
        return self.round == 0

    def overrides(self) -> list[str]:
        return [*self.candidate.overrides(), *(f"{k}={_yaml(v)}" for k, v in self.values)]

    def settings(self) -> str:
        """The knobs as a person reads them: ``combine=add sparse_lr=0.15 embedding_l2=0``."""
        return " ".join(f"{k.split('.', 1)[1]}={_yaml(v)}" for k, v in self.values)

    def attrs(self) -> dict[str, Any]:
        """What a queued trial of this point carries: the point, its round, the pruner's group
        (a compressed candidate's default settings meet the others' defaults)."""
        group = "defaults" if self.default and not self.candidate.reference else self.candidate.name
        return {"point": self.key, "round": self.round, "group": group}

    def params(self) -> dict[str, Any]:
        """The Optuna params of this point: the candidate, and each knob under its name."""
        return {"candidate": self.candidate.name, **{param_name(self.candidate, k): v for k, v in self.values}}

    @property
    def key(self) -> str:
        """A short digest naming the point (its trial directory)."""
        text = json.dumps([self.candidate.name, [[k, v] for k, v in self.values]], default=str)
        return f"{self.candidate.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def param_name(candidate: Candidate, key: str) -> str:
    """A knob's Optuna param name: per candidate (``qr.combine``), since two methods' knobs
    of one name have different values and Optuna keeps one distribution per name."""
    return f"{candidate.name}.{key.split('.', 1)[1]}"


def _yaml(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class Found:
    """The candidates kept (the reference first), their points, and why others were refused."""

    candidates: list[Candidate]
    points: dict[str, list[Point]]  # candidate name -> its points, default first
    refused: dict[str, str] = field(default_factory=dict)
    # points of kept candidates that cannot be built (a knob value out of the budget's reach)
    dropped: dict[str, str] = field(default_factory=dict)
    target_bytes: int = 0

    def plan(self) -> list[Point]:
        """Every point in the order trials take them: each candidate's default first
        (round 0 of every candidate), then round 1 of every candidate, and so on."""
        out: list[Point] = []
        for r in itertools.count():
            layer = [ps[r] for ps in self.points.values() if r < len(ps)]
            if not layer:
                return out
            out.extend(layer)
        return out  # (unreachable: count() never ends)


@dataclass
class JobContext:
    """What sizing needs of the job: its composed config, the tables and id counts."""

    cfg: DictConfig
    ds: Any  # the processed dataset
    tables: list
    counts: Any
    train_rows: int


def job_context(cfg: DictConfig) -> JobContext:
    """The job's dataset prepared (or opened from its cache), its tables and counts."""
    ds = OmegaConf.to_object(cfg.dataset).prepare(Path(cfg.cache_dir))  # type: ignore[attr-defined,union-attr]
    model: Any = OmegaConf.to_object(cfg.model)
    tables = embedding_tables(ds.schema, model.table_dim(), model.embedding_init_std)
    return JobContext(cfg, ds, tables, LazyCounts(ds), int(ds.schema.rows["train"]))


def candidate_choices(advise: AdviseConfig) -> list[str]:
    """The compression configs to consider: those asked for, or every registered method."""
    names = list(advise.methods) if advise.methods is not None else sorted(compression.registered_methods())
    names = [n for n in names if n not in advise.exclude]
    return [REFERENCE, *[n for n in names if n != REFERENCE]]


def find_candidates(compose: Any, base: Sequence[str], advise: AdviseConfig, ctx: JobContext) -> Found:
    """Every candidate of ``advise`` sized against the job's budget, with its points.

    ``compose(overrides)`` composes a job config; ``base`` are the user's overrides. With
    ``advise.max_step_ratio``, the kept candidates' steps are timed against the full table."""
    budget = parse_budget(ctx.cfg.budget, ctx.cfg.get("budget_scope", "model"))
    target = budget.target_bytes(ctx.tables)
    found = Found([], {}, target_bytes=target)
    rng = random.Random(advise.seed)
    for choice in candidate_choices(advise):
        for precision in advise.precisions:
            if choice == REFERENCE and precision == "fp32":
                cand = Candidate(REFERENCE, REFERENCE, reference=True)
            else:
                cand = Candidate(choice if precision == "fp32" else f"{choice}+{precision}", choice, precision)
            try:
                cfg = compose([*base, *cand.overrides()])
            except Exception as e:  # noqa: BLE001  (an unknown config name, a bad key: said per candidate)
                found.refused[cand.name] = _first_line(e)
                continue
            comp = resolve_compression(cfg)
            space = {f"compression.{k}": tuple(v) for k, v in type(comp).search_space.items()}
            trainer: Any = OmegaConf.to_object(cfg.trainer)
            space.update({f"trainer.{k}": v for k, v in trainer_space(trainer).items()})
            cand = Candidate(cand.name, cand.choice, cand.precision, cand.reference, tuple(space.items()))
            defaults = {k: OmegaConf.select(cfg, k) for k in space}
            why = _refusal(comp, ctx, target, cand, advise)
            if why is not None:
                found.refused[cand.name] = why
                continue
            points = _points(cand, defaults, rng)[: 1 if advise.defaults_only else None]
            kept: list[Point] = []
            for p in points:
                reason = None if p.default else _refusal(resolve_compression(compose([*base, *p.overrides()])), ctx, target, cand)
                if reason is None:
                    kept.append(Point(cand, p.values, len(kept)))
                else:
                    found.dropped[f"{cand.name} {p.settings()}"] = reason
            found.candidates.append(cand)
            found.points[cand.name] = kept
    if advise.max_step_ratio is not None:
        _refuse_slow(found, base, advise.max_step_ratio, compose)
    return found


def _points(cand: Candidate, defaults: dict[str, Any], rng: random.Random) -> list[Point]:
    """The default point, then every other combination of the knobs in a seeded order."""
    keys = [k for k, _ in cand.space]
    first = tuple((k, defaults[k]) for k in keys)
    rest = [tuple(zip(keys, vs)) for vs in itertools.product(*(v for _, v in cand.space))]
    rest = [r for r in rest if r != first]
    rng.shuffle(rest)
    return [Point(cand, v, i) for i, v in enumerate([first, *rest])]


def _refusal(comp: Any, ctx: JobContext, target: int, cand: Candidate, advise: AdviseConfig | None = None) -> str | None:
    """Why this config cannot be a candidate at the budget (None: it can), without training:
    built on ``meta``; a method without a budget must hold the budget's bytes as it is."""
    try:
        module = compress(ctx.tables, comp, counts=ctx.counts, seed=int(ctx.cfg.seed), table_device="meta")
    except (BudgetError, MethodConfigError, ValueError) as e:
        return _first_line(e)
    if not cand.reference and comp.budget_label() == "none":
        q = comp.quantization
        held = deployed_bytes(module, TableFormat(q.precision)) if q is not None and not q.aware else memory_report(module).bytes
        if held > target:
            return f"holds {held:,} bytes deployed, over the budget's {target:,}"
    if advise is not None and advise.shardable and (why := module.sharding_refusal()) is not None:
        return f"not shardable: {why}"
    if advise is not None and advise.exportable and (why := _export_refusal(comp, ctx)) is not None:
        return f"not exportable: {why}"
    return None


def _export_refusal(comp: Any, ctx: JobContext) -> str | None:
    """Why the candidate's model cannot go through ``torch.export`` (built, untrained)."""
    from compression.export import export_model
    from recsys.data.loader import BatchLoader

    ds = ctx.ds
    model_cfg: Any = OmegaConf.to_object(ctx.cfg.model)
    try:
        module = compress(ctx.tables, comp, counts=ctx.counts, seed=int(ctx.cfg.seed))
        model = model_cfg.build(module, len(ds.schema.dense)).eval()
        batch = next(iter(BatchLoader(ds, "val", 64).epoch(0)))
        with tempfile.TemporaryDirectory() as tmp:
            export_model(model, batch, Path(tmp) / "model.pt2")
    except Exception as e:  # noqa: BLE001  (whatever torch.export raises is the reason)
        return _first_line(e)
    return None


def _refuse_slow(found: Found, base: Sequence[str], limit: float, compose: Any, rounds: int = 10) -> None:
    """Refuse candidates whose training step is over ``limit`` times the full table's,
    their default points timed in this process against the reference, taking turns
    (``experiments.overhead``: the same batches, one step of each in turn)."""
    from experiments.overhead import build, time_steps

    timed = {c.name: build(compose([*base, *found.points[c.name][0].overrides()]), rounds) for c in found.candidates}
    kept = {name: t for name, t in timed.items() if t is not None}
    time_steps(list(kept.values()), rounds)
    ref = statistics.median(kept[REFERENCE].times)
    for cand in list(found.candidates):
        if cand.reference or cand.name not in kept:
            continue
        ratio = statistics.median(kept[cand.name].times) / ref
        if ratio > limit:
            found.refused[cand.name] = f"training step {ratio:.2f}x the full table's, over advise.max_step_ratio={limit:g}"
            found.candidates.remove(cand)
            del found.points[cand.name]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
