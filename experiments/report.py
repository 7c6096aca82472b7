"""The Pareto report: test AUC against exact bytes over seeds, read back from MLflow.

``python -m experiments.report --experiment comparison`` (``make report EXP=...``)
reads the runs of the latest sweep of an experiment (or ``--parent RUN_ID``) with
``mlflow.search_runs`` from the real store: every seed run (a multi-seed job's runs
sit under its group run, all tagged ``embcomp.sweep``). Per (dataset, model, method,
budget) it gives the mean, standard deviation and 95% t interval of test AUC and
logloss over the seeds (``experiments.seeds``), the exact bytes and ratio, AUC against
the baseline's mean, and the training-step time against ``none`` measured in one
process, interleaved (``experiments.overhead``, when the sweep has it). At each
budget the method with the best mean AUC is marked ``best`` and every method whose
interval overlaps the best one's ``tied``: those differences are not answers yet.

Written under ``reports/<experiment>/``: ``pareto.png`` (mean AUC with its interval
against bytes on a log axis, the frontier of the means, the baseline as a band),
``pareto.html`` (the same chart to point at: hover a point for its figures, click it for
its run; ``experiments.pareto_page``), ``table.md`` and ``table.csv``; logged to the
sweep's parent run as artifacts.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from experiments.dashboard import ui_base
from experiments.job import PARENT_TAG
from experiments.pareto_page import write_page
from experiments.seeds import Stat, aggregate
from recsys.training.metrics import not_learned

KEYS = ["dataset", "model", "method", "budget", "setting"]
# job overrides that the columns already show, or that do not change a result
SHOWN = ("compression", "budget", "budget_scope", "seed", "seeds", "dataset", "model", "experiment", "hydra",
         "mlflow", "trainer.progress", "cache_dir", "report_dir", "checkpoint_dir")  # fmt: skip
COLUMNS = [
    *KEYS, "seeds", "bytes", "ratio", "auc", "auc_std", "auc_ci95", "logloss", "logloss_std", "logloss_ci95",
    "delta_auc", "step_vs_base", "rank", "pareto", "status",
]  # fmt: skip
OVERHEAD_ARTIFACT = "report/overhead.csv"
LEARNED = ("_base_logloss", "_rows", "_positives")


@dataclass
class Report:
    directory: Path
    table: pd.DataFrame
    markdown: str


def latest_sweep(experiment: str) -> str | None:
    """Run id of the most recent sweep parent in ``experiment``."""
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string="tags.`embcomp.kind` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def _runs(experiment: str, parent_run_id: str | None) -> list:
    if parent_run_id is None:
        return mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=50000)
    found = {}
    for flt in (f"tags.`embcomp.sweep` = '{parent_run_id}'", f"tags.`{PARENT_TAG}` = '{parent_run_id}'"):
        for r in mlflow.search_runs(experiment_names=[experiment], filter_string=flt, output_format="list", max_results=50000):
            found[r.info.run_id] = r
    return list(found.values())


def collect(experiment: str, parent_run_id: str | Sequence[str] | None = None) -> pd.DataFrame:
    """One row per finished (or unreachable) seed run of the sweep, with its figures; of
    several sweeps (a study run in parts) when given several ids, a job run again in a
    later sweep (same dataset, model, method, budget, seed) keeping its latest record."""
    rows = []
    parents = [parent_run_id] if parent_run_id is None or isinstance(parent_run_id, str) else list(parent_run_id)
    for r in [r for parent in parents for r in _runs(experiment, parent)]:
        t, m = r.data.tags, r.data.metrics
        if t.get("embcomp.kind") in ("sweep", "seed_group") or "peer" in t:
            continue
        status = t.get("embcomp.status", r.info.status.lower())
        if status not in ("complete", "unreachable"):
            continue
        rows.append(
            {
                "dataset": t.get("dataset"),
                "model": t.get("model"),
                "method": t.get("label", t.get("method")),
                "budget": t.get("budget"),
                "seed": t.get("seed", "0"),
                "bytes": m.get("embedding_bytes", math.nan),
                "ratio": m.get("compression_ratio", math.nan),
                "auc": m.get("test_auc", math.nan),
                "logloss": m.get("test_logloss", math.nan),
                # what tells a model that learned from a constant predictor (recsys.training.metrics)
                **{f"_{k}": m.get(f"test_{k}", math.nan) for k in ("base_logloss", "rows", "positives")},
                "status": status if status == "complete" else "unreachable: " + t.get("embcomp.reason", "")[:160],
                # the run a reader opens: the seeds' group run, or the run itself when it has none
                "run_id": t[PARENT_TAG] if t.get(PARENT_TAG) not in (None, *parents) else r.info.run_id,
                "experiment_id": r.info.experiment_id,
                "start": r.info.start_time,
                "_overrides": settings(t.get("embcomp.overrides", "")),
            }
        )
    df = pd.DataFrame(rows, columns=[*KEYS, "seed", "bytes", "ratio", "auc", "logloss", *LEARNED, "status", "run_id",
                                     "experiment_id", "start", "_overrides"])  # fmt: skip
    if df.empty:
        return df.drop(columns="_overrides")
    # what else the sweep varies (trainer=bars, trainer.sparse_lr=...) tells rows apart
    keys = sorted({k for o in df["_overrides"] for k in o})
    varying = [k for k in keys if len({o.get(k) for o in df["_overrides"]}) > 1]
    df["setting"] = [" ".join(f"{k}={o[k]}" for k in varying if k in o) for o in df["_overrides"]]
    df = df.drop(columns="_overrides")
    # a seed resumed or rerun in the same sweep: keep its latest record
    return df.sort_values("start").drop_duplicates([*KEYS, "seed"], keep="last").drop(columns="start")


def settings(overrides: str) -> dict[str, str]:
    """``key=value`` overrides of a job that are not already a column of the report."""
    out = {}
    for item in overrides.split():
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not any(key == s or key.startswith(s + ".") for s in SHOWN):
            out[key] = value
    return out


def summarise(runs: pd.DataFrame, overhead: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (dataset, model, method, budget): seeds aggregated, ties and frontier."""
    rows = []
    for key, g in runs.groupby(KEYS, sort=False, dropna=False):
        done = g[g["status"] == "complete"]
        auc, logloss = aggregate(done["auc"]), aggregate(done["logloss"])
        status = "complete" if len(done) else g["status"].iloc[-1]
        if len(done) and (why := _not_learned(auc.mean, logloss.mean, done)) is not None:
            status = f"failed: has not learned ({why})"  # never best, tied or on the frontier
        rows.append({
            **dict(zip(KEYS, key)), "seeds": len(done),
            "bytes": done["bytes"].mean() if len(done) else math.nan,
            "ratio": done["ratio"].mean() if len(done) else math.nan,
            "auc": auc.mean, "auc_std": auc.std, "auc_ci95": auc.ci95,
            "logloss": logloss.mean, "logloss_std": logloss.std, "logloss_ci95": logloss.ci95,
            "status": status,
            # the run a reader opens (none for runs given without their ids)
            **{k: g[k].iloc[-1] if k in g else None for k in ("run_id", "experiment_id")},
        })  # fmt: skip
    df = pd.DataFrame(rows)
    df["delta_auc"] = math.nan
    df["step_vs_base"] = math.nan
    df["rank"] = ""
    df["pareto"] = False
    if overhead is not None and len(overhead):
        overhead = overhead.assign(setting="") if "setting" not in overhead else overhead.fillna({"setting": ""})
        ratio = {tuple(str(x) for x in r[KEYS]): r["ratio"] for _, r in overhead.iterrows()}
        df["step_vs_base"] = [ratio.get(tuple(str(x) for x in r[KEYS]), math.nan) for _, r in df.iterrows()]
    for _, g in df.groupby(["dataset", "model", "setting"]):
        base = g[(g["method"] == "none") & (g["status"] == "complete")]
        if len(base):
            df.loc[g.index, "delta_auc"] = g["auc"] - base["auc"].iloc[0]
        done = g[g["status"] == "complete"]
        df.loc[pareto_front(done), "pareto"] = True
        for _, at in done[done["method"] != "none"].groupby("budget"):
            df.loc[at.index, "rank"] = ties(at)
    # baseline first, then each method from the largest budget (most bytes) down
    df["_base"] = df["method"] != "none"
    df = df.sort_values(["dataset", "model", "setting", "_base", "method", "bytes"],
                        ascending=[True, True, True, True, True, False])  # fmt: skip
    return df.drop(columns="_base").reset_index(drop=True)


def _not_learned(auc: float, logloss: float, runs: pd.DataFrame) -> str | None:
    """Why a method's seeds, taken together, have learned nothing on the test split (None:
    they have): their mean AUC and logloss against a constant predictor's on that split."""
    first = runs.iloc[0]
    return not_learned({"auc": auc, "logloss": logloss, **{k[1:]: first.get(k, math.nan) for k in LEARNED}})


def _stat(r: pd.Series, col: str = "auc") -> Stat:
    return Stat(r[col], r[f"{col}_std"], r[f"{col}_ci95"], int(r["seeds"]))


def ties(at: pd.DataFrame) -> list[str]:
    """'best' for the best mean AUC at one budget, 'tied' where a 95% interval overlaps it."""
    best = at["auc"].idxmax()
    top = _stat(at.loc[best])
    return ["best" if i == best else ("tied" if _stat(r).overlaps(top) else "") for i, r in at.iterrows()]


def pareto_front(g: pd.DataFrame) -> list:
    """Index of the rows no other row beats on both bytes (fewer) and mean AUC (higher)."""
    front, best = [], -math.inf
    for idx, row in g.sort_values(["bytes", "auc"], ascending=[True, False]).iterrows():
        if row["auc"] > best:
            front.append(idx)
            best = row["auc"]
    return front


def _pm(mean: float, ci: float) -> str:
    return f"{mean:.4f} ± {ci:.4f}" if ci == ci else f"{mean:.4f}"


def to_markdown(df: pd.DataFrame) -> str:
    out = []
    for (dataset, model, setting), g in df.groupby(["dataset", "model", "setting"], sort=False):
        n = int(g["seeds"].max()) if len(g) else 0
        out.append(f"**{dataset}, {model}{', ' + setting if setting else ''}** (test AUC and logloss: mean ± 95% interval over {n} seed(s); "
                   "step: training step time against none, interleaved in one process)\n")  # fmt: skip
        out.append("| method | budget | bytes | ratio | test AUC | logloss | ΔAUC | seeds | step × none | at budget | frontier |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|")
        for _, r in g.iterrows():
            if r["status"] != "complete":
                out.append(f"| {r['method']} | {r['budget']} | | | | | | | | | {r['status']} |")
                continue
            step = f"{r['step_vs_base']:.2f}×" if r["step_vs_base"] == r["step_vs_base"] else ""
            delta = f"{r['delta_auc']:+.4f}" if r["delta_auc"] == r["delta_auc"] else ""
            out.append(
                f"| {r['method']} | {r['budget']} | {int(r['bytes']):,} | {r['ratio']:.1f}× "
                f"| {_pm(r['auc'], r['auc_ci95'])} | {_pm(r['logloss'], r['logloss_ci95'])} | {delta} "
                f"| {int(r['seeds'])} | {step} | {r['rank']} | {'✓' if r['pareto'] else ''} |"
            )
        out.append("")
    return "\n".join(out)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(df[df["status"] == "complete"].groupby(["dataset", "model", "setting"], sort=False))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6.5 * max(1, len(groups)), 4.8), squeeze=False)
    for ax, ((dataset, model, setting), g) in zip(axes[0], groups):
        for method, gm in g.groupby("method"):
            if method == "none":
                continue
            yerr = gm["auc_ci95"].fillna(0)
            ax.errorbar(gm["bytes"], gm["auc"], yerr=yerr, fmt="o", ms=5, capsize=3, label=method)
        base = g[g["method"] == "none"]
        if len(base):
            b = base.iloc[0]
            ax.axhline(b["auc"], color="k", ls="--", lw=1, label="uncompressed (mean)")
            if b["auc_ci95"] == b["auc_ci95"]:
                ax.axhspan(b["auc"] - b["auc_ci95"], b["auc"] + b["auc_ci95"], color="k", alpha=0.08)
            ax.scatter(base["bytes"], base["auc"], color="k", marker="*", s=90)
        front = g[g["pareto"]].sort_values("bytes")
        ax.step(front["bytes"], front["auc"], where="post", color="tab:red", lw=1.2, alpha=0.7, label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (log)")
        ax.set_ylabel("test AUC (mean, 95% interval)")
        ax.set_title(f"{dataset}, {model}" + (f"\n{setting}" if setting else ""), fontsize=9 if setting else None)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_overhead(parent_run_id: str | Sequence[str] | None) -> pd.DataFrame | None:
    """The interleaved step times logged to the sweep's parent run, if it has them (of
    several sweeps: each sweep's, measured against ``none`` in its own process)."""
    if not parent_run_id:
        return None
    if not isinstance(parent_run_id, str):
        parts = [o for o in (sweep_overhead(p) for p in parent_run_id) if o is not None]
        return pd.concat(parts, ignore_index=True) if parts else None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar in a report's output
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=parent_run_id, artifact_path=OVERHEAD_ARTIFACT, dst_path=tmp)
            return pd.read_csv(local, dtype={"budget": str, "setting": str})
    except Exception:  # noqa: BLE001  (a sweep without the measurement: no column)
        return None


def build_report(
    experiment: str,
    parent_run_id: str | Sequence[str] | None = None,
    out_root: Path = Path("reports"),
    overhead: pd.DataFrame | None = None,
) -> Report | None:
    """Write the report of ``experiment``'s latest sweep (or ``parent_run_id``, or several
    sweeps' ids together) and log it to the (first) sweep's parent run."""
    parent_run_id = parent_run_id or latest_sweep(experiment)
    runs = collect(experiment, parent_run_id)
    if runs.empty:
        print(f"no finished runs in experiment '{experiment}'" + (f" under sweep {parent_run_id}" if parent_run_id else ""))
        return None
    df = summarise(runs, overhead if overhead is not None else sweep_overhead(parent_run_id))
    parents = [parent_run_id] if isinstance(parent_run_id, str) else list(parent_run_id or [])
    df.attrs["parent_run_id"] = ",".join(parents)
    directory = out_root / experiment
    directory.mkdir(parents=True, exist_ok=True)
    md = to_markdown(df)
    (directory / "table.md").write_text(md)
    df[COLUMNS].to_csv(directory / "table.csv", index=False)
    plot(df, directory / "pareto.png")
    title = f"{experiment}: test AUC against embedding bytes"
    write_page(df, directory / "pareto.html", title, ui_base(mlflow.get_tracking_uri()))
    if parents:
        client = mlflow.MlflowClient()
        for name in ("table.md", "table.csv", "pareto.png", "pareto.html"):
            client.log_artifact(parents[0], str(directory / name), artifact_path="report")
    return Report(directory=directory, table=df, markdown=md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--parent", default=None, nargs="+",
                   help="sweep parent run id(s) (default: the latest sweep); several: one report of a study run "
                        "in parts, a job rerun in a later sweep replacing its earlier record")  # fmt: skip
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--out", default="reports", type=Path)
    args = p.parse_args(argv)
    from experiments.tracking import tracking_refusal

    if (refusal := tracking_refusal(args.tracking_uri)) is not None:
        print(refusal)
        return 1
    mlflow.set_tracking_uri(args.tracking_uri)
    if mlflow.get_experiment_by_name(args.experiment) is None:
        print(f"error: no MLflow experiment named '{args.experiment}' in {args.tracking_uri}")
        return 1
    for parent in args.parent or []:
        try:
            kind = mlflow.get_run(parent).data.tags.get("embcomp.kind")
        except mlflow.exceptions.MlflowException:
            print(f"error: no run {parent} in {args.tracking_uri}")
            return 1
        if kind == "advise":
            print(f"error: run {parent} is a make advise study, whose points differ in settings this report "
                  "does not tell apart: its report is advice.md and grid.md under advise.report_dir")  # fmt: skip
            return 1
    report = build_report(args.experiment, args.parent, args.out)
    if report is None:
        return 1
    print(report.markdown)
    print(f"report: {report.directory}/table.md, {report.directory}/table.csv, {report.directory}/pareto.png, "
          f"{report.directory}/pareto.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
