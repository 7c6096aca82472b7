"""What a search leaves behind: the answer as markdown and JSON, the winning config as a
Hydra experiment file, and (grid mode) the table of every point.

Written to ``reports/advise/<study>/`` and logged to the study's MLflow parent run::

    advice.md, advice.json        the answer, the finalists, the search, its cost
    experiment/advised.yaml       python -m experiments.run -cd reports/advise/<study> experiment=advised
    grid.md, grid.csv             (advise.grid=true) every point, seeds aggregated
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from experiments.advise.answer import Finalist, pm
from experiments.advise.candidates import Found, Point

GROUPS = ("dataset", "model", "compression", "trainer")


def experiment_yaml(base: Sequence[str], point: Point, seeds: int, line: str) -> str:
    """The job of ``point`` as a Hydra experiment file (``# @package _global_``): the user's
    overrides and the point's, group choices as ``override /group`` defaults."""
    defaults, values = [], {}  # type: ignore[var-annotated]
    for item in [*base, *point.overrides()]:
        key, _, raw = item.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS:
            defaults.append({f"override /{key}": raw})
            continue
        if key.split(".", 1)[0] in ("advise", "hydra", "mlflow"):  # how the search ran, not the job
            continue
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    values["seeds"] = seeds
    head = ["# @package _global_", f"# {line}", "# python -m experiments.run -cd <this file's folder>/.. experiment=advised"]
    body = yaml.safe_dump({"defaults": defaults, **values}, sort_keys=False)
    return "\n".join(head) + "\n" + body


@dataclass
class SearchSummary:
    """Per candidate: points planned, trials complete / pruned / skipped / failed, its best."""

    rows: list[dict[str, Any]]
    search_samples: float
    grid_samples: float  # what every point with `seeds` seeds to convergence would take (estimate)


def summarise_search(found: Found, trials: list[FrozenTrial], seeds: int) -> SearchSummary:
    rows, grid = [], 0.0
    by_cand: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        if "point" in t.user_attrs and "candidate" in t.params:
            by_cand.setdefault(t.params["candidate"], []).append(t)
    complete_all = [t for ts in by_cand.values() for t in ts if t.state == TrialState.COMPLETE]
    mean_all = _mean(float(t.user_attrs.get("trained_samples", 0)) for t in complete_all)
    for cand in found.candidates:
        ts = by_cand.get(cand.name, [])
        done = [t for t in ts if t.state == TrialState.COMPLETE]
        skipped = [t for t in ts if t.state == TrialState.PRUNED and "skipped" in t.user_attrs]
        pruned = [t for t in ts if t.state == TrialState.PRUNED and "skipped" not in t.user_attrs]
        best = max((t for t in done if "not_learned" not in t.user_attrs), key=lambda t: t.value, default=None)  # type: ignore[arg-type, return-value]
        per_run = _mean(float(t.user_attrs.get("trained_samples", 0)) for t in done)
        per_run = per_run if per_run == per_run else mean_all
        grid += len(found.points[cand.name]) * seeds * (per_run if per_run == per_run else 0.0)
        rows.append({
            "candidate": cand.name, "points": len(found.points[cand.name]), "complete": len(done),
            "pruned": len(pruned), "skipped": len(skipped),
            "failed": sum(t.state == TrialState.FAIL for t in ts),
            "best_val_auc": best.value if best is not None else math.nan,
            "best_settings": _settings(best, found) if best is not None else "",
            "samples": sum(float(t.user_attrs.get("trained_samples", 0)) for t in ts),
        })  # fmt: skip
    spent = sum(float(t.user_attrs.get("trained_samples", 0)) for t in trials)
    return SearchSummary(rows, spent, grid)


def _settings(t: FrozenTrial, found: Found) -> str:
    point = next((p for ps in found.points.values() for p in ps if p.key == t.user_attrs.get("point")), None)
    return point.settings() if point is not None else ""


def _mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def advice_markdown(line: str, finals: list[Finalist], summary: SearchSummary, found: Found, cost: dict[str, float],
                    budget: str, study: str) -> str:  # fmt: skip
    out = [f"# make advise: {study}", "", f"**{line}**", "",
           f"Budget {budget} ({found.target_bytes:,} bytes). Chosen on validation AUC of the deployed model; "
           "test AUC read once per finalist seed. Mean ± 95% t interval over the seeds; Δ: test AUC minus the "
           "tuned full table's, seed by seed.", "",
           "| | candidate | settings | bytes | ratio | val AUC | test AUC | Δ test AUC | seeds | search val AUC |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for f in sorted(finals, key=lambda f: (f.rank != "answer", f.point.candidate.reference, -f.val.mean)):
        m = next(iter(f.per_seed.values()), {})
        delta = f"{f.delta.mean:+.4f} ± {f.delta.ci95:.4f}" if f.delta is not None and f.delta.n else ""
        mark = f.rank + (f" (failed: {f.failed})" if f.failed else "")
        out.append(f"| {mark} | {f.name} | {f.point.settings()} | {int(m.get('embedding_bytes', 0)):,} | "
                   f"{m.get('compression_ratio', math.nan):.1f}x | {pm(f.val)} | {pm(f.test)} | {delta} | {f.test.n} | "
                   f"{f.search_value:.4f} |")  # fmt: skip
    out += ["", "## The search", "",
            "| candidate | points | complete | pruned | skipped | failed | best val AUC | its settings | samples |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in summary.rows:
        best = f"{r['best_val_auc']:.4f}" if r["best_val_auc"] == r["best_val_auc"] else ""
        out.append(f"| {r['candidate']} | {r['points']} | {r['complete']} | {r['pruned']} | {r['skipped']} | "
                   f"{r['failed']} | {best} | {r['best_settings']} | {r['samples']:,.0f} |")  # fmt: skip
    if found.refused:
        out += ["", "Refused before training:", ""] + [f"- {k}: {v}" for k, v in found.refused.items()]
    if found.dropped:
        out += ["", f"Settings out of reach ({len(found.dropped)}): " + "; ".join(f"{k}: {v}" for k, v in list(found.dropped.items())[:10])]
    out += ["", "## Cost", "",
            f"- trained samples: search {cost['search_samples']:,.0f}, finalists {cost['finalist_samples']:,.0f}, "
            f"total {cost['total_samples']:,.0f}" + (f" of a budget of {cost['budget_samples']:,.0f}" if cost.get("budget_samples") else ""),
            f"- wall time of this run: {cost['wall_s'] / 60:.1f} min",
            f"- the full grid (every point, {cost['seeds']:.0f} seeds, to convergence) would train about "
            f"{cost['grid_samples']:,.0f} samples ({cost['total_samples'] / cost['grid_samples']:.1%} of it spent here)"
            if cost["grid_samples"] else "- the full grid: not estimated (no trial finished)"]  # fmt: skip
    return "\n".join(out) + "\n"


def grid_rows(found: Found, trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """Grid mode: one row per point trained with its seeds (validation and test aggregated)."""
    from experiments.seeds import aggregate

    points = {p.key: p for ps in found.points.values() for p in ps}
    rows = []
    for t in trials:
        p = points.get(t.user_attrs.get("point", ""))
        if p is None or t.state != TrialState.COMPLETE or "per_seed" not in t.user_attrs:
            continue
        seeds = t.user_attrs["per_seed"].values()
        val, test = aggregate(s.get("final_val_auc", math.nan) for s in seeds), aggregate(s.get("test_auc", math.nan) for s in seeds)
        rows.append({"candidate": p.candidate.name, "settings": p.settings(), "default": p.default,
                     "bytes": t.user_attrs.get("embedding_bytes", math.nan), "ratio": t.user_attrs.get("compression_ratio", math.nan),
                     "val_auc": val.mean, "val_ci95": val.ci95, "test_auc": test.mean, "test_ci95": test.ci95, "seeds": test.n,
                     "samples": t.user_attrs.get("trained_samples", 0.0), "failed": t.user_attrs.get("not_learned", "")})  # fmt: skip
    return rows


def write_grid(directory: Path, rows: list[dict[str, Any]], cost: dict[str, float]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    if rows:
        with (directory / "grid.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    ok = [r for r in rows if not r["failed"]]
    lines = ["| candidate | settings | default | bytes | ratio | val AUC | test AUC | seeds |", "|---|---|:-:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["test_auc"]):
        lines.append(f"| {r['candidate']} | {r['settings']} | {'✓' if r['default'] else ''} | {int(r['bytes']):,} | "
                     f"{r['ratio']:.1f}x | {r['val_auc']:.4f} ± {r['val_ci95']:.4f} | {r['test_auc']:.4f} ± {r['test_ci95']:.4f} | "
                     f"{r['seeds']} |" + (f" failed: {r['failed']}" if r["failed"] else ""))  # fmt: skip
    head = []
    compressed = [r for r in ok if r["candidate"] != "none"]
    for title, pool, key in (("best on validation", compressed, "val_auc"), ("best on test", compressed, "test_auc"),
                             ("best default settings on test", [r for r in compressed if r["default"]], "test_auc"),
                             ("full table, best on validation", [r for r in ok if r["candidate"] == "none"], "val_auc")):  # fmt: skip
        if pool:
            b = max(pool, key=lambda r: r[key])
            head.append(f"- {title}: {b['candidate']} ({b['settings']}) test AUC {b['test_auc']:.4f} ± {b['test_ci95']:.4f}")
    head.append(f"- cost: {cost['total_samples']:,.0f} trained samples, {cost['wall_s'] / 60:.1f} min")
    text = "# Grid\n\n" + "\n".join(head) + "\n\n" + "\n".join(lines) + "\n"
    (directory / "grid.md").write_text(text)
    return text


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
