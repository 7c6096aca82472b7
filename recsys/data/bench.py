"""Benchmark: the polars Criteo pipeline against the pandas reference on synthetic data.

Writes (once, cached under ``--out``) a synthetic Criteo-format TSV, runs each pipeline
in its own subprocess so that each peak RSS is its own, checks that the outputs are
equal and prints a markdown table. ``cpu`` is the pipeline a clean file takes
(``criteo_cpu.cpp``), ``cpu-streamed`` the same as a file over ``IN_MEMORY_MAX_BYTES`` runs it
(a piece at a time, parsed twice); ``polars`` and ``polars-spilled`` are polars' pipeline,
which every other file takes (the kernels off: ``EMBCOMP_CPU_KERNELS=0``), in memory and as a
file over ``IN_MEMORY_MAX_BYTES`` runs it (through intermediate files). All on the same file.

Example::

    python -m recsys.data.bench --rows 2000000 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

PIPELINES = ("cpu", "cpu-streamed", "polars", "polars-spilled", "pandas")


def _peak_rss_mib() -> float:
    """Peak RSS of this process so far.

    Linux's ``VmHWM`` belongs to the current address space, so it starts afresh at
    ``exec``; ``ru_maxrss`` does not (a child exec'd from a big parent inherits the
    parent's peak), hence it is only the fallback elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _worker(pipeline: str, src: Path, dst: Path, seed: int) -> None:
    """Run one pipeline in this process and print its measurements as one JSON line."""
    from recsys.data import criteo
    from recsys.data.criteo import preprocess_criteo
    from recsys.data.pandas_reference import preprocess_criteo_pandas

    if pipeline.endswith(("-streamed", "-spilled")):
        criteo.IN_MEMORY_MAX_BYTES = 0

    imported_rss = _peak_rss_mib()  # the imports (the data pipeline loads no torch)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    if pipeline != "pandas":
        rows = preprocess_criteo(src, dst, seed=seed).rows
    else:
        rows = preprocess_criteo_pandas(src, dst, seed=seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"rows": sum(rows.values()), "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mib": _peak_rss_mib(), "import_rss_mib": imported_rss}))


def _run(pipeline: str, src: Path, dst: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "recsys.data.bench", "--worker", pipeline, "--seed", str(seed),
           "--src", str(src), "--dst", str(dst)]
    env = {**os.environ, **({"EMBCOMP_CPU_KERNELS": "0"} if pipeline.startswith("polars") else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{pipeline} pipeline failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def outputs_equal(a: Path, b: Path) -> bool:
    """Whether two processed directories hold the same split files and counts."""
    import polars as pl

    return all(
        pl.read_parquet(a / f"{name}.parquet").equals(pl.read_parquet(b / f"{name}.parquet"))
        for name in ("train", "val", "test", "counts")
    )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; as ``--worker`` run one pipeline, else the whole benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--out", type=Path, default=Path("data/cache/bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per pipeline; the fastest is reported")
    ap.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.src, args.dst, args.seed)
        return

    from recsys.data.synthetic_tsv import write_criteo_tsv

    src = args.out / f"synthetic-criteo-{args.rows}-seed{args.seed}.tsv"
    if not src.is_file():
        t0 = time.perf_counter()
        write_criteo_tsv(src, args.rows, args.seed)
        print(f"wrote {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    runs: dict[str, list[dict]] = {p: [] for p in PIPELINES}
    for _ in range(args.repeat):  # interleaved, so background load hits both alike
        for p in PIPELINES:
            runs[p].append(_run(p, src, args.out / f"out-{p}", args.seed))
    results = {p: min(r, key=lambda x: x["wall_s"]) for p, r in runs.items()}
    equal = all(outputs_equal(args.out / f"out-{p}", args.out / "out-pandas") for p in PIPELINES[:-1])
    size = src.stat().st_size / 2**20
    print(f"\nCriteo-format TSV: {args.rows:,} rows, {size:.0f} MiB ({src})\n")
    print("| pipeline | wall (s) | rows/s | MB/s | CPU (s) | peak RSS (MiB) | of which imports (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p, r in results.items():
        print(f"| {p} | {r['wall_s']:.2f} | {r['rows'] / r['wall_s']:,.0f} | {src.stat().st_size / 1e6 / r['wall_s']:.0f} "
              f"| {r['cpu_s']:.1f} "
              f"| {r['peak_rss_mib']:.0f} | {r['import_rss_mib']:.0f} |")
    if args.repeat > 1:
        walls = {p: ", ".join(f"{x['wall_s']:.1f}" for x in r) for p, r in runs.items()}
        print(f"\nall wall times (s): {walls}")
    wall = {p: r["wall_s"] for p, r in results.items()}
    print(f"\nin memory, the C++ pipeline is {wall['polars'] / wall['cpu']:.2f}x polars' and "
          f"{wall['pandas'] / wall['cpu']:.2f}x pandas' speed; a file over the in-memory limit: "
          f"{wall['polars-spilled'] / wall['cpu-streamed']:.2f}x polars'; outputs equal: {equal}")
    if not equal:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
