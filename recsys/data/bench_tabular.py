"""Benchmark: the polars tabular loader against a plain pandas reading of the same file.

For each size, writes (once, cached under ``--out``) a synthetic click-log Parquet file
(``tabular_synth.write_bench_parquet``: 3 integer and 3 string categoricals, a list of
tags, 3 numeric columns), runs each pipeline in a fresh subprocess so that each peak RSS
is its own, checks that both wrote the same output, and prints a markdown table with the
file's in-memory size beside the peaks (streaming: polars' peak stays flat as rows grow).

``--frappe DIR`` instead writes the Frappe-shaped CSV splits into DIR (if missing), reads
them as ``dataset=frappe_shaped`` does and prints their row counts and vocabulary sizes;
``python -m experiments.run dataset=frappe_shaped model=deepfm trainer=smoke`` trains on them.

Example::

    python -m recsys.data.bench_tabular --rows 2000000 20000000
    python -m recsys.data.bench_tabular --frappe data/raw/frappe-shaped
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recsys.data.bench import _peak_rss_mib

PIPELINES = ("polars", "pandas")
# The table's declaration: every role but a label threshold.
DECLARATION = {
    "label": "label",
    "categorical": ["user", "item", "shop", "country", "device", "site"],
    "multi_hot": [{"name": "tags"}],
    "numeric": [
        {"name": "price", "transform": "log1p"},
        {"name": "age", "transform": "standardise"},
        {"name": "dwell", "transform": "none"},
    ],
}
CHUNK_ROWS = 2_000_000  # rows compared at a time, so checking 20M rows needs little memory


def _config(src: Path):
    from recsys.data.tabular import TabularConfig

    return TabularConfig(path=str(src), **DECLARATION)  # type: ignore[arg-type]


def _worker(pipeline: str, src: Path, dst: Path) -> None:
    """Run one pipeline in this process and print its measurements as one JSON line."""
    from recsys.data.tabular_build import preprocess_tabular
    from recsys.data.tabular_pandas import preprocess_tabular_pandas
    from recsys.data.tabular_source import open_sources

    imported_rss = _peak_rss_mib()
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    cfg = _config(src)
    t0, c0 = time.perf_counter(), time.process_time()
    if pipeline == "polars":
        cols = cfg.columns()
        rows = preprocess_tabular(open_sources(cfg.files(), cols), cols, dst).rows
    else:
        rows = preprocess_tabular_pandas(cfg, dst)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"rows": sum(rows.values()), "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mib": _peak_rss_mib(), "import_rss_mib": imported_rss}))


def pandas_frame_mib(src: Path) -> float:
    """The table's size as a pandas DataFrame (deep: with its Python objects), scaled up
    from the first row group (reading all of a big file into pandas is what we avoid)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    part = pf.read_row_group(0).to_pandas()
    return float(part.memory_usage(deep=True).sum()) * pf.metadata.num_rows / len(part) / 2**20


def _run(pipeline: str, src: Path, dst: Path) -> dict:
    cmd = [sys.executable, "-m", "recsys.data.bench_tabular", "--worker", pipeline, "--src", str(src), "--dst", str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{pipeline} pipeline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def outputs_equal(a: Path, b: Path) -> bool:
    """Whether two processed directories hold the same splits and counts (chunk by chunk)."""
    import polars as pl

    for name in ("train", "val", "test", "counts"):
        pa, pb = a / f"{name}.parquet", b / f"{name}.parquet"
        n = pl.scan_parquet(pa).select(pl.len()).collect().item()
        if n != pl.scan_parquet(pb).select(pl.len()).collect().item():
            return False
        for start in range(0, max(n, 1), CHUNK_ROWS):
            x = pl.scan_parquet(pa).slice(start, CHUNK_ROWS).collect()
            if not x.equals(pl.scan_parquet(pb).slice(start, CHUNK_ROWS).collect()):
                return False
    return True


def in_memory_mib(src: Path) -> float:
    """The table's size as a polars DataFrame (Arrow buffers), measured chunk by chunk."""
    import polars as pl

    n = pl.scan_parquet(src).select(pl.len()).collect().item()
    total = sum(pl.scan_parquet(src).slice(s, CHUNK_ROWS).collect().estimated_size() for s in range(0, n, CHUNK_ROWS))
    return total / 2**20


def bench(rows: int, out: Path, seed: int, pipelines: list[str]) -> None:
    from recsys.data.tabular_synth import write_bench_parquet

    src = out / f"clicks-{rows}-seed{seed}.parquet"
    if not src.is_file():
        t0 = time.perf_counter()
        write_bench_parquet(src, rows, seed)
        print(f"wrote {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    results = {p: _run(p, src, out / f"out-{rows}-{p}") for p in pipelines}
    equal = outputs_equal(out / f"out-{rows}-polars", out / f"out-{rows}-pandas") if len(results) == 2 else None
    memory = in_memory_mib(src)
    print(f"\n{rows:,} rows ({src}): Parquet {src.stat().st_size / 2**20:.0f} MiB on disk, in memory "
          f"{memory:.0f} MiB as a polars DataFrame, {pandas_frame_mib(src):.0f} MiB as a NumPy-backed pandas one\n")
    print("| pipeline | wall (s) | rows/s | CPU (s) | peak RSS (MiB) | of which imports (MiB) | peak / polars in-memory size |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p, r in results.items():
        print(f"| {p} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:,.0f} | {r['cpu_s']:.1f} "
              f"| {r['peak_rss_mib']:.0f} | {r['import_rss_mib']:.0f} | {r['peak_rss_mib'] / memory:.2f} |")
    if equal is not None:
        print(f"\noutputs equal: {equal}")
        if not equal:
            raise SystemExit("outputs differ")


def frappe(directory: Path, cache: Path) -> None:
    """Write the Frappe-shaped splits if missing, read them as ``dataset=frappe_shaped``
    declares (a test keeps the two in step), print rows and vocabulary sizes."""
    from recsys.data.tabular import TabularConfig
    from recsys.data.tabular_synth import FRAPPE_FIELDS, write_frappe_csv

    paths = write_frappe_csv(directory)
    cfg = TabularConfig(name="frappe_shaped", train_path=str(paths["train"]), val_path=str(paths["val"]),
                        test_path=str(paths["test"]), categorical=list(FRAPPE_FIELDS))
    t0 = time.perf_counter()
    ds = cfg.prepare(cache)
    print(f"prepared {ds.root} in {time.perf_counter() - t0:.1f} s")
    print("rows:", ds.schema.rows)
    print("vocabularies (ids 1.., id 0 not counted):", {f.name: f.cardinality - 1 for f in ds.schema.sparse})


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; as ``--worker`` run one pipeline, else the whole benchmark."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 20_000_000])
    ap.add_argument("--out", type=Path, default=Path("data/cache/bench-tabular"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    ap.add_argument("--frappe", type=Path, metavar="DIR", help="the Frappe-shaped splits in DIR: rows and vocabularies")
    ap.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.src, args.dst)
    elif args.frappe:
        frappe(args.frappe, args.out)
    else:
        for rows in args.rows:
            bench(rows, args.out, args.seed, args.pipelines)


if __name__ == "__main__":
    main()
