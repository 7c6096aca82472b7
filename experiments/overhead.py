"""Each method's training-step time against ``none``, measured so that it survives a noisy
machine: every job of a sweep rebuilt in one process, the same batches, taking turns.

Step times logged by jobs that ran minutes apart divide two different machine states
(a loaded run once showed the baseline at 381 ms and a method at 7 ms). Here each
job of the sweep is rebuilt from its Hydra overrides (``<sweep dir>/<job>/.hydra/``)
with its dataset, model, method and trainer settings, and one training step of each
(``recsys.training.step.TrainStep``: forward, backward, embedding L2, clipping,
optimizer) runs on the same train batch in turn, round after round, so a change in
load hits every job alike. The median step of each job over the timed rounds is
divided by the median of ``none`` with the same dataset and model (built here when
the sweep has no baseline). The sweep callback runs this in its own process at the
end of a sweep and the report shows the ratio; by hand::

    python -m experiments.overhead --sweep-dir multirun/2026-12-01/10-00-00 --rounds 20
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from compression import BudgetError, MethodConfigError, compress
from experiments.config import PROJECT_ROOT, register_configs
from experiments.identity import describe_job, resolve_compression
from experiments.job import LazyCounts
from experiments.report import settings
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.training.optim import build_optimizers
from recsys.training.step import TrainStep

FIELDS = ["dataset", "model", "method", "budget", "setting", "step_ms", "ratio", "rounds"]


@dataclass
class Timed:
    """One job rebuilt for timing: its step, batches and times."""

    key: tuple[str, str, str, str, str]  # dataset, model, method label, budget, setting
    step: TrainStep
    batches: list[Any]
    times: list[float] = field(default_factory=list)


def job_overrides(sweep_dir: Path) -> Iterator[list[str]]:
    """The task overrides of every job Hydra ran in ``sweep_dir``."""
    for path in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        yield list(yaml.safe_load(path.read_text()) or [])


def compose_job(overrides: list[str]) -> DictConfig:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "experiments" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def build(cfg: DictConfig, n_batches: int, setting: str = "", variant: str | None = None) -> Timed | None:
    """The job's model and step on its first ``n_batches`` train batches (None: the
    method cannot be built at this budget, the sweep recorded it as unreachable).
    ``variant``: the job's ``compression=`` choice (its label in the report)."""
    tags = describe_job(cfg, variant=variant)
    ds = OmegaConf.to_object(cfg.dataset).prepare(Path(cfg.cache_dir))  # type: ignore[attr-defined,union-attr]
    model_cfg: Any = OmegaConf.to_object(cfg.model)
    trainer_cfg: Any = OmegaConf.to_object(cfg.trainer)
    tables = embedding_tables(ds.schema, model_cfg.table_dim(), model_cfg.embedding_init_std)
    try:
        module = compress(tables, resolve_compression(cfg), counts=LazyCounts(ds), seed=int(cfg.seed))
    except (BudgetError, MethodConfigError):
        return None
    model = model_cfg.build(module, len(ds.schema.dense)).train()
    step = TrainStep(model, module, build_optimizers(model, module, trainer_cfg), trainer_cfg)
    loader = BatchLoader(ds, "train", trainer_cfg.batch_size, shuffle=True, seed=int(cfg.seed))
    batches = [b for _, b in zip(range(n_batches), loader.epoch(0))]
    return Timed((tags["dataset"], tags["model"], tags["label"], tags["budget"], setting), step, batches)


def baseline_overrides(overrides: list[str]) -> list[str]:
    """The overrides of the same job with ``compression=none`` (no method settings, no budget)."""
    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    kept = [o for o in overrides if not (key(o) in ("compression", "budget") or key(o).startswith("compression."))]
    return [*kept, "compression=none"]


def measure(jobs: list[list[str]], rounds: int = 20, warmup: int = 3) -> list[dict[str, Any]]:
    """Median step time of each distinct job (given by its overrides) and its ratio to
    ``none`` with the same dataset and model (one row each)."""
    built: dict[tuple[str, str, str, str, str], Timed] = {}
    parsed = [settings(" ".join(o)) for o in jobs]
    varying = [k for k in sorted({k for p in parsed for k in p}) if len({p.get(k) for p in parsed}) > 1]
    for overrides, p in zip(jobs, parsed):
        setting = " ".join(f"{k}={p[k]}" for k in varying if k in p)
        choice = next((o.split("=", 1)[1] for o in overrides if o.startswith("compression=")), None)
        timed = build(compose_job(overrides), rounds, setting, choice)
        if timed is None or timed.key in built:
            continue
        built[timed.key] = timed
        base = (*timed.key[:2], "none", "none", setting)
        if base not in built and (ref := build(compose_job(baseline_overrides(overrides)), rounds, setting)) is not None:
            built[base] = ref
    order = list(built.values())
    time_steps(order, rounds, warmup)
    out = []
    for t in order:
        ms = statistics.median(t.times)
        base_t = built.get((*t.key[:2], "none", "none", t.key[4]))
        ref_ms = statistics.median(base_t.times) if base_t is not None else float("nan")
        out.append(dict(zip(FIELDS, [*t.key, round(ms, 3), round(ms / ref_ms, 3), rounds])))
    return out


def time_steps(order: list[Timed], rounds: int, warmup: int = 3) -> None:
    """One training step of each job in turn, ``rounds`` times (who goes first rotates),
    after ``warmup`` untimed steps each; the milliseconds land in each one's ``times``."""
    for t in order:
        for b in t.batches[:warmup]:
            t.step(b)
    for r in range(rounds):
        turn = order[r % len(order):] + order[: r % len(order)]  # who goes first rotates
        for t in turn:
            batch = t.batches[r % len(t.batches)]
            start = time.perf_counter()
            t.step(batch)
            t.times.append((time.perf_counter() - start) * 1e3)


def from_sweep(sweep_dir: Path, rounds: int = 20) -> list[dict[str, Any]]:
    """``measure`` over every job of the sweep in ``sweep_dir``."""
    return measure(list(job_overrides(sweep_dir)), rounds)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep-dir", type=Path, required=True, help="a Hydra multirun directory")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per job")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: <sweep dir>/overhead.csv)")
    a = p.parse_args(argv)
    if not any(a.sweep_dir.glob("*/.hydra/overrides.yaml")):
        print(f"error: {a.sweep_dir}: no Hydra jobs in it (expected <job>/.hydra/overrides.yaml)", file=sys.stderr)
        return 1
    rows = from_sweep(a.sweep_dir, a.rounds)
    out = a.out or a.sweep_dir / "overhead.csv"
    write_csv(rows, out)
    print(f"training step vs none, interleaved, {a.rounds} rounds, {torch.get_num_threads()} threads:")
    for r in rows:
        print(f"  {r['dataset']:>16} {r['model']:>8} {r['method']:>24} {r['budget']:>6} {r['setting']}  "
              f"{r['step_ms']:8.2f} ms  x{r['ratio']:.2f}")  # fmt: skip
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
