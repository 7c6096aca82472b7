"""The Pareto report: test AUC against exact bytes, read back from MLflow.

``python -m experiments.report --experiment comparison`` (``make report EXP=...``)
reads the runs of the latest sweep of an experiment (or ``--parent RUN_ID``) with
``mlflow.search_runs`` from the real store and writes, under
``reports/<experiment>/``: ``pareto.png`` (AUC vs bytes on a log axis, one marker per
method, the Pareto frontier drawn, the baseline as a line), ``table.md`` and
``table.csv`` (method, budget, bytes, ratio, AUC, logloss, delta AUC, step time).
Both are logged to the sweep's parent run as artifacts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from experiments.job import PARENT_TAG

COLUMNS = ["dataset", "model", "method", "budget", "bytes", "ratio", "auc", "logloss", "delta_auc", "step_ms", "step_vs_base", "pareto", "status"]


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


def collect(experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per finished (or unreachable) job of the sweep, with its figures."""
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else "tags.`embcomp.kind` != 'sweep'"
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=flt, output_format="list", max_results=5000)
    rows = []
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        status = t.get("embcomp.status", r.info.status.lower())
        if status not in ("complete", "unreachable"):
            continue
        rows.append(
            {
                "dataset": t.get("dataset"),
                "model": t.get("model"),
                "method": t.get("label", t.get("method")),
                "budget": t.get("budget"),
                "bytes": m.get("embedding_bytes", math.nan),
                "ratio": m.get("compression_ratio", math.nan),
                "auc": m.get("test_auc", math.nan),
                "logloss": m.get("test_logloss", math.nan),
                "step_ms": m.get("step_time_ms", math.nan),
                "status": status if status == "complete" else "unreachable: " + t.get("embcomp.reason", "")[:160],
                "start": r.info.start_time,
            }
        )
    df = pd.DataFrame(rows, columns=[*COLUMNS, "start"])
    if df.empty:
        return df
    # a job resumed or rerun in the same sweep: keep its latest record
    df = df.sort_values("start").drop_duplicates(["dataset", "model", "method", "budget"], keep="last")
    return add_derived(df.drop(columns="start"))


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Delta AUC and step time against the baseline of the same dataset and model; the frontier."""
    df = df.copy()
    df["delta_auc"] = math.nan
    df["step_vs_base"] = math.nan
    df["pareto"] = False
    for _, g in df.groupby(["dataset", "model"]):
        base = g[g["method"] == "none"]
        if len(base):
            df.loc[g.index, "delta_auc"] = g["auc"] - base["auc"].iloc[0]
            df.loc[g.index, "step_vs_base"] = g["step_ms"] / base["step_ms"].iloc[0]
        done = g[g["status"] == "complete"]
        df.loc[pareto_front(done), "pareto"] = True
    # baseline first, then each method from the largest budget (most bytes) down
    df["_base"] = df["method"] != "none"
    df = df.sort_values(["dataset", "model", "_base", "method", "bytes"], ascending=[True, True, True, True, False])
    return df.drop(columns="_base").reset_index(drop=True)


def pareto_front(g: pd.DataFrame) -> list:
    """Index of the runs no other run beats on both bytes (fewer) and AUC (higher)."""
    front, best = [], -math.inf
    for idx, row in g.sort_values(["bytes", "auc"], ascending=[True, False]).iterrows():
        if row["auc"] > best:
            front.append(idx)
            best = row["auc"]
    return front


def to_markdown(df: pd.DataFrame) -> str:
    out = []
    for (dataset, model), g in df.groupby(["dataset", "model"], sort=False):
        out.append(f"**{dataset}, {model}**\n")
        out.append("| method | budget | bytes | ratio | test AUC | logloss | ΔAUC | step ms (× base) | frontier |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|:-:|")
        for _, r in g.iterrows():
            if r["status"] != "complete":
                out.append(f"| {r['method']} | {r['budget']} | | | | | | | {r['status']} |")
                continue
            step = f"{r['step_ms']:.1f}" if r["step_ms"] == r["step_ms"] else ""
            if step and r["step_vs_base"] == r["step_vs_base"]:
                step += f" ({r['step_vs_base']:.2f}×)"
            delta = f"{r['delta_auc']:+.4f}" if r["delta_auc"] == r["delta_auc"] else ""
            out.append(
                f"| {r['method']} | {r['budget']} | {int(r['bytes']):,} | {r['ratio']:.1f}× | {r['auc']:.4f} "
                f"| {r['logloss']:.4f} | {delta} | {step} | {'✓' if r['pareto'] else ''} |"
            )
        out.append("")
    return "\n".join(out)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(df[df["status"] == "complete"].groupby(["dataset", "model"], sort=False))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6.5 * max(1, len(groups)), 4.8), squeeze=False)
    for ax, ((dataset, model), g) in zip(axes[0], groups):
        for method, gm in g.groupby("method"):
            if method == "none":
                continue
            ax.scatter(gm["bytes"], gm["auc"], label=method, s=36)
        base = g[g["method"] == "none"]
        if len(base):
            ax.axhline(base["auc"].iloc[0], color="k", ls="--", lw=1, label="uncompressed")
            ax.scatter(base["bytes"], base["auc"], color="k", marker="*", s=90)
        front = g[g["pareto"]].sort_values("bytes")
        ax.step(front["bytes"], front["auc"], where="post", color="tab:red", lw=1.2, alpha=0.7, label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (log)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{dataset}, {model}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(experiment: str, parent_run_id: str | None = None, out_root: Path = Path("reports")) -> Report | None:
    """Write the report of ``experiment``'s latest sweep (or ``parent_run_id``) and log it."""
    parent_run_id = parent_run_id or latest_sweep(experiment)
    df = collect(experiment, parent_run_id)
    if df.empty:
        print(f"no finished runs in experiment '{experiment}'" + (f" under sweep {parent_run_id}" if parent_run_id else ""))
        return None
    df.attrs["parent_run_id"] = parent_run_id or ""
    directory = out_root / experiment
    directory.mkdir(parents=True, exist_ok=True)
    md = to_markdown(df)
    (directory / "table.md").write_text(md)
    df[COLUMNS].to_csv(directory / "table.csv", index=False)
    plot(df, directory / "pareto.png")
    if parent_run_id:
        client = mlflow.MlflowClient()
        for name in ("table.md", "table.csv", "pareto.png"):
            client.log_artifact(parent_run_id, str(directory / name), artifact_path="report")
    return Report(directory=directory, table=df, markdown=md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--parent", default=None, help="sweep parent run id (default: the latest sweep)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--out", default="reports", type=Path)
    args = p.parse_args(argv)
    from experiments.tracking import TrackingError, check_tracking

    try:
        check_tracking(args.tracking_uri)
    except TrackingError as e:
        print(f"error: {e}")
        return 1
    mlflow.set_tracking_uri(args.tracking_uri)
    if mlflow.get_experiment_by_name(args.experiment) is None:
        print(f"error: no MLflow experiment named '{args.experiment}' in {args.tracking_uri}")
        return 1
    report = build_report(args.experiment, args.parent, args.out)
    if report is None:
        return 1
    print(report.markdown)
    print(f"report: {report.directory}/table.md, {report.directory}/table.csv, {report.directory}/pareto.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
