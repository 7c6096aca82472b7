"""The Pareto page: ``pareto.html``, test AUC against bytes that a reader can point at.

One self-contained HTML file (inline SVG and CSS, no script, nothing fetched), so it
renders the same in MLflow's artifact view, where the sweep's parent run carries it
beside ``pareto.png``, and from ``reports/<experiment>/``. Per (dataset, model, setting)
a chart: each method at each budget is a point at its mean test AUC with its 95%
interval, bytes on a log axis, the full table as a dashed line and band, the frontier of
the means as a step line. Hovering a point shows the method, budget, settings, bytes,
ratio, AUC ± interval, ΔAUC, seeds and its rank at the budget; clicking it opens its run
in the MLflow UI (its seeds' group run). Under each chart the same rows as a table.

Links point at ``ui_base`` (the tracking server, or ``make ui``'s address). In MLflow's
artifact view the page sits in a sandboxed frame that lets no link open (MLflow 3.17:
``sandbox="allow-scripts"``): there the hover text and the table still hold every figure
and the run's address, and the same page under ``reports/`` opens the runs.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from experiments.dashboard import DEFAULT_UI, run_url

W, H = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50
# a qualitative palette that stays apart for up to 20 methods
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363"]  # fmt: skip
def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _pm(mean: float, ci: float) -> str:
    return f"{mean:.4f} ± {ci:.4f}" if ci == ci else f"{mean:.4f}"


def _link(ui_base: str, r: pd.Series) -> str:
    if not r.get("run_id"):
        return ""
    return html.escape(run_url(ui_base, str(r["experiment_id"]), str(r["run_id"])), quote=True)


def _describe(r: pd.Series) -> str:
    lines = [f"{r['method']} at {r['budget']}" + (f" ({r['setting']})" if r["setting"] else ""),
             f"{int(r['bytes']):,} bytes ({r['ratio']:.1f}x)",
             f"test AUC {_pm(r['auc'], r['auc_ci95'])} over {int(r['seeds'])} seed(s)"]  # fmt: skip
    if r["delta_auc"] == r["delta_auc"] and r["method"] != "none":
        lines.append(f"ΔAUC {r['delta_auc']:+.4f} against the full table")
    if r["rank"]:
        lines.append(f"{r['rank']} at {r['budget']}")
    return "\n".join(lines)


def _chart(g: pd.DataFrame, colours: dict[str, str], ui_base: str) -> str:
    done = g[g["status"] == "complete"]
    lo_b, hi_b = math.log10(done["bytes"].min()) - 0.15, math.log10(done["bytes"].max()) + 0.15
    ci = done["auc_ci95"].fillna(0)
    lo_a, hi_a = float((done["auc"] - ci).min()), float((done["auc"] + ci).max())
    pad = max(hi_a - lo_a, 1e-3) * 0.08
    lo_a, hi_a = lo_a - pad, hi_a + pad

    def x(b: float) -> float:
        return LEFT + (math.log10(b) - lo_b) / (hi_b - lo_b) * (W - LEFT - RIGHT)

    def y(a: float) -> float:
        return TOP + (hi_a - a) / (hi_a - lo_a) * (H - TOP - BOTTOM)

    out = [f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">',
           f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" class="frame"/>']  # fmt: skip
    steps = (1,) if hi_b - lo_b > 2.5 else (1, 2, 5)  # decades of bytes; and 2, 5 on a narrow axis
    for b in (m * 10**k for k in range(math.floor(lo_b), math.ceil(hi_b) + 1) for m in steps):
        if lo_b <= math.log10(b) <= hi_b:
            out.append(f'<line x1="{x(b):.1f}" x2="{x(b):.1f}" y1="{TOP}" y2="{H - BOTTOM}" class="grid"/>'
                       f'<text x="{x(b):.1f}" y="{H - BOTTOM + 16}" class="tick" text-anchor="middle">{_bytes(b)}</text>')  # fmt: skip
    for i in range(6):
        a = lo_a + (hi_a - lo_a) * i / 5
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(a):.1f}" y2="{y(a):.1f}" class="grid"/>'
                   f'<text x="{LEFT - 6}" y="{y(a) + 4:.1f}" class="tick" text-anchor="end">{a:.4f}</text>')  # fmt: skip
    out.append(f'<text x="{(W + LEFT) / 2}" y="{H - 8}" class="label" text-anchor="middle">embedding bytes (log)</text>'
               f'<text x="16" y="{(H - BOTTOM) / 2}" class="label" text-anchor="middle" '
               f'transform="rotate(-90 16 {(H - BOTTOM) / 2})">test AUC (mean, 95% interval)</text>')  # fmt: skip
    base = done[done["method"] == "none"]
    if len(base):
        b = base.iloc[0]
        if b["auc_ci95"] == b["auc_ci95"]:
            top, bottom = y(min(b["auc"] + b["auc_ci95"], hi_a)), y(max(b["auc"] - b["auc_ci95"], lo_a))
            out.append(f'<rect x="{LEFT}" y="{top:.1f}" width="{W - LEFT - RIGHT}" height="{bottom - top:.1f}" class="band"/>')
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(b["auc"]):.1f}" y2="{y(b["auc"]):.1f}" class="base"/>')
    front = done[done["pareto"]].sort_values("bytes")
    if len(front) > 1:
        pts, prev = [], None
        for _, r in front.iterrows():
            if prev is not None:
                pts.append(f"{x(r['bytes']):.1f},{y(prev):.1f}")
            pts.append(f"{x(r['bytes']):.1f},{y(r['auc']):.1f}")
            prev = r["auc"]
        out.append(f'<polyline points="{" ".join(pts)}" class="front"/>')
    for _, r in done.iterrows():
        px, py, c = x(r["bytes"]), y(r["auc"]), colours[r["method"]]
        e = r["auc_ci95"] if r["auc_ci95"] == r["auc_ci95"] else 0.0
        link = _link(ui_base, r)
        shape = (f'<rect x="{px - 5:.1f}" y="{py - 5:.1f}" width="10" height="10" fill="#000"/>' if r["method"] == "none"
                 else f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{c}"/>')  # fmt: skip
        out.append(f'<a href="{link}" target="_top" class="point" data-method="{html.escape(r["method"])}">'
                   f'<title>{html.escape(_describe(r))}</title>'
                   f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y(r["auc"] + e):.1f}" y2="{y(r["auc"] - e):.1f}" stroke="{c}"/>'
                   f"{shape}</a>")  # fmt: skip
    out.append("</svg>")
    return "\n".join(out)


def _table(g: pd.DataFrame, ui_base: str) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in ("method", "budget", "setting", "bytes", "ratio", "test AUC",
                                                         "ΔAUC", "seeds", "at budget", "frontier", "run")) + "</tr>"  # fmt: skip
    rows = []
    for _, r in g.iterrows():
        if r["status"] != "complete":
            rows.append(f"<tr><td>{html.escape(r['method'])}</td><td>{html.escape(str(r['budget']))}</td>"
                        f"<td colspan='9'>{html.escape(r['status'])}</td></tr>")  # fmt: skip
            continue
        link = _link(ui_base, r)
        delta = f"{r['delta_auc']:+.4f}" if r["delta_auc"] == r["delta_auc"] else ""
        cells = [r["method"], r["budget"], r["setting"], f"{int(r['bytes']):,}", f"{r['ratio']:.1f}x",
                 _pm(r["auc"], r["auc_ci95"]), delta, int(r["seeds"]), r["rank"], "✓" if r["pareto"] else ""]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                    + f'<td><a href="{link}" target="_top">open</a></td></tr>')  # fmt: skip
    return f"<table>{head}{''.join(rows)}</table>"


CSS = """body{font:13px system-ui,sans-serif;margin:16px;color:#222}h2{font-size:15px;margin:18px 0 6px}
.frame{fill:none;stroke:#999}.grid{stroke:#eee}.tick{font-size:10px;fill:#555}.label{font-size:11px;fill:#333}
.band{fill:#000;opacity:.07}.base{stroke:#000;stroke-dasharray:5 4}.front{fill:none;stroke:#d62728;stroke-width:1.3;opacity:.7}
.point line{stroke-width:1.5}.point:hover circle{r:8;stroke:#000}.legend span{display:inline-block;margin-right:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}
table{border-collapse:collapse;margin-top:8px}td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}"""


def write_page(df: pd.DataFrame, path: Path, title: str, ui_base: str = DEFAULT_UI) -> None:
    """The page for the report's summary ``df`` (``experiments.report.summarise``)."""
    methods = sorted(m for m in df["method"].unique() if m != "none")
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)} | {"none": "#000"}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1 style='font-size:17px'>{html.escape(title)}</h1>"
             "<p>Each point: a method at a budget, its mean test AUC and 95% interval over seeds. Hover a point for "
             "its figures; click it to open its run (from the file under reports/: MLflow's artifact view lets no link "
             "open). Dashed: the full table (band: its interval); red: the frontier.</p>",
             "<div class='legend'>" + "".join(f"<span><i style='background:{c}'></i>{html.escape(m)}</span>"
                                             for m, c in colours.items()) + "</div>"]  # fmt: skip
    for (dataset, model, setting), g in df.groupby(["dataset", "model", "setting"], sort=False):
        parts.append(f"<h2>{html.escape(f'{dataset}, {model}' + (f', {setting}' if setting else ''))}</h2>")
        if (g["status"] == "complete").any():
            parts.append(_chart(g, colours, ui_base))
        parts.append(_table(g, ui_base))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
