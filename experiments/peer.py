"""embcomp's full-table model beside FuxiCTR's (the BARS benchmark's library), same split.

``make peer-compare PEER=<fuxictr_peer.py> DATASET=movielens_100k MODEL=deepfm`` runs
this. It composes the real Hydra config (``dataset=<DATASET> model=<MODEL>_bars
trainer=bars compression=none``), prepares the processed dataset, turns Criteo's
counts into bucketed categories as BARS's Criteo protocol does and multi-hot fields
into one id (a CSV cell holds one value; ``recsys.data.transform``), writes the splits
as CSV, and then, seed by seed and taking turns so that a
change in machine load hits both, trains

- the peer: ``<peer python> <peer script> <csv dir> --model ... --seed s`` with the
  settings read from the same composed config (embedding dim, MLP, dropout, batch
  norm, batch size, learning rate, embedding L2, epochs, patience, cross layers), in
  its own virtual environment (FuxiCTR needs polars < 2), printing one JSON line;
- embcomp: the same job as ``python -m experiments.run`` on the same processed
  split, recorded in MLflow (experiment ``peer_compare``); the peer's result is
  recorded there too, as a run tagged ``peer``.

It prints both side by side (test AUC, logloss, epochs, training samples/s as the
peer counts them: training rows x epochs / fit time, validation included) per seed
and as mean +- std with the 95% interval, and writes
``reports/peer/<dataset>-<model>.{json,md}``. A benchmark, not a test: nothing here
is imported by the library or the test suite.

Example::

    python -m experiments.peer --peer-python .peer-venv/bin/python \\
        --peer-script fuxictr_peer.py --dataset criteo_sample --model dcnv2 --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from compression.errors import EmbcompError
from experiments.config import PROJECT_ROOT, register_configs
from experiments.job import run_job
from experiments.seeds import Stat, aggregate
from experiments.tracking import use_experiment
from recsys.data.transform import ProcessedConfig, dense_as_categorical, joint_multi_hot, write_csv

METRICS = ("test_auc", "test_logloss", "epochs", "fit_samples_per_s")


def compose_job(dataset: str, model: str, overrides: list[str]) -> DictConfig:
    """The job config the comparison trains (the BARS protocol, full tables)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "experiments" / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"dataset={dataset}", f"model={model}_bars", "trainer=bars", "compression=none",
                       "mlflow.experiment_name=peer_compare", "trainer.progress=off", *overrides],
        )  # fmt: skip


def peer_args(cfg: DictConfig, dense: list[str]) -> list[str]:
    """The peer script's flags for the settings in ``cfg`` (its model and trainer)."""
    m, t = cfg.model, cfg.trainer
    if m.name.startswith("dcnv2") and m.structure != "parallel":
        raise SystemExit("error: the peer's DCNv2 is the parallel structure; set model.structure=parallel")
    if t.sparse_lr != t.dense_lr or t.sparse_optimizer != "adam":
        raise SystemExit("error: the peer trains every parameter with one Adam; set trainer.sparse_optimizer=adam "
                         "and trainer.sparse_lr equal to trainer.dense_lr")  # fmt: skip
    args = [
        "--model", "dcnv2" if m.name.startswith("dcnv2") else "deepfm",
        "--embedding-dim", str(m.embedding_dim),
        "--hidden", ",".join(str(h) for h in m.deep_layers),
        "--dropout", str(m.dropout),
        "--batch-size", str(t.batch_size),
        "--lr", str(t.dense_lr),
        "--embedding-l2", str(t.embedding_l2),
        "--epochs", str(t.epochs),
        "--patience", str(t.patience),
    ]
    if m.name.startswith("dcnv2"):
        args += ["--cross-layers", str(m.cross_layers)]
    if not m.batch_norm:
        args.append("--no-batch-norm")
    if dense:
        args += ["--dense", ",".join(dense)]
    return args


def run_peer(python: str, script: str, csv_dir: Path, args: list[str], seed: int, threads: int, log: Path) -> dict:
    """One peer run; its JSON result (its stderr goes to ``log``)."""
    cmd = [python, script, str(csv_dir), *args, "--seed", str(seed), "--threads", str(threads)]
    with log.open("w") as err:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"error: the peer failed (exit {r.returncode}); its output is in {log}")
    return json.loads(lines[-1])


def run_embcomp(cfg: DictConfig, root: Path, seed: int, out: Path) -> dict[str, Any]:
    """One embcomp run of the composed job on the processed split at ``root``."""
    job = copy.deepcopy(cfg)
    job.seed, job.seeds = seed, None
    job.dataset = OmegaConf.structured(ProcessedConfig(name=cfg.dataset.name, root=str(root)))
    summary = run_job(job, out)
    assert summary is not None  # (one process)
    m = summary.metrics
    return {"test_auc": m["test_auc"], "test_logloss": m["test_logloss"], "epochs": m["epochs_run"],
            "fit_samples_per_s": m["fit_samples_per_s"], "fit_s": m["fit_s"], "run_id": summary.run_id}  # fmt: skip


def log_peer(cfg: DictConfig, result: dict, seed: int) -> None:
    """The peer's result as an MLflow run beside embcomp's (tag ``peer``)."""
    exp_id = use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)
    client = mlflow.MlflowClient()
    tags = {"peer": result["peer"], "method": "none", "label": "fuxictr", "budget": "none",
            "model": cfg.model.name, "dataset": cfg.dataset.name, "seed": str(seed), "embcomp.status": "complete"}  # fmt: skip
    run = client.create_run(exp_id, run_name=f"fuxictr-{cfg.model.name}-{cfg.dataset.name}-s{seed}", tags=tags)
    for k in (*METRICS, "valid_auc", "fit_s", "parameters"):
        client.log_metric(run.info.run_id, k, float(result[k]))
    client.log_param(run.info.run_id, "settings", json.dumps(result["settings"])[:6000])
    client.set_terminated(run.info.run_id)


def fmt(st: Stat, digits: int = 4) -> str:
    if st.n == 0:
        return ""
    tail = f" ± {st.std:.{digits}f} (95% ±{st.ci95:.{digits}f})" if st.n > 1 else ""
    return f"{st.mean:.{digits}f}{tail}"


def side_by_side(rows: dict[str, list[dict]], title: str) -> str:
    """Markdown: per seed, then mean ± std (95% interval) of each metric, for both."""
    out = [f"**{title}**", "", "| run | seed | test AUC | logloss | epochs | train samples/s |", "|---|---:|---:|---:|---:|---:|"]
    for who, results in rows.items():
        for r in results:
            out.append(f"| {who} | {r['seed']} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | {int(r['epochs'])} "
                       f"| {r['fit_samples_per_s']:,.0f} |")  # fmt: skip
    out += ["", "| run | test AUC | logloss | epochs | train samples/s |", "|---|---:|---:|---:|---:|"]
    for who, results in rows.items():
        s = {k: aggregate(r[k] for r in results) for k in METRICS}
        out.append(f"| {who} | {fmt(s['test_auc'])} | {fmt(s['test_logloss'])} | {fmt(s['epochs'], 1)} "
                   f"| {fmt(s['fit_samples_per_s'], 0)} |")  # fmt: skip
    emb, peer = (aggregate(r["test_auc"] for r in rows[k]) for k in ("embcomp", "fuxictr"))
    speed = [aggregate(r["fit_samples_per_s"] for r in rows[k]).mean for k in ("embcomp", "fuxictr")]
    out += ["", f"embcomp - FuxiCTR: test AUC {emb.mean - peer.mean:+.4f}, training samples/s x{speed[0] / speed[1]:.2f}"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", required=True, help="the peer venv's python (FuxiCTR installed)")
    p.add_argument("--peer-script", required=True, help="fuxictr_peer.py")
    p.add_argument("--dataset", default="movielens_100k", help="a dataset config name (experiments/conf/dataset)")
    p.add_argument("--model", default="deepfm", choices=["deepfm", "dcnv2"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads of both (0: every core)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "peer")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for embcomp's job (the peer gets the same settings)")
    a = p.parse_args(argv)
    for path in (a.peer_python, a.peer_script):
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 1
    import torch

    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = compose_job(a.dataset, a.model, a.overrides)
    try:
        ds = OmegaConf.to_object(cfg.dataset).prepare(Path(cfg.cache_dir))  # type: ignore[attr-defined,union-attr]
    except EmbcompError as e:  # the split's file missing or malformed: one line, as experiments.run says it
        print(f"error: {e}", file=sys.stderr)
        return 1
    # as BARS feeds them: Criteo's counts as bucketed categories, multi-hot sets as one id
    flat = joint_multi_hot(dense_as_categorical(ds, Path(cfg.cache_dir)), Path(cfg.cache_dir))
    work = a.out / f"{a.dataset}-{a.model}"
    for old in work.glob("embcomp-seed*"):  # a fresh run each time (its checkpoints are not this run's)
        shutil.rmtree(old)
    csv_dir = work / "csv"
    write_csv(flat, csv_dir)
    args = peer_args(cfg, list(flat.schema.dense))
    print(f"{a.dataset}: {flat.schema.rows} rows, csv in {csv_dir}; peer flags: {' '.join(args)}", flush=True)
    rows: dict[str, list[dict[str, Any]]] = {"embcomp": [], "fuxictr": []}
    for seed in range(a.seeds):
        t0 = time.time()
        peer = run_peer(a.peer_python, a.peer_script, csv_dir, args, seed, threads, work / f"peer-seed{seed}.log")
        log_peer(cfg, peer, seed)
        rows["fuxictr"].append({"seed": seed, **{k: peer[k] for k in METRICS}, "fit_s": peer["fit_s"]})
        t1 = time.time()
        emb = run_embcomp(cfg, flat.root, seed, work / f"embcomp-seed{seed}")
        rows["embcomp"].append({"seed": seed, **emb})
        print(f"seed {seed}: fuxictr test AUC {peer['test_auc']:.4f} ({t1 - t0:.0f} s), "
              f"embcomp {emb['test_auc']:.4f} ({time.time() - t1:.0f} s)", flush=True)  # fmt: skip
    title = f"{a.dataset}, {a.model} (BARS protocol, full tables, {threads} threads): embcomp vs {peer['peer']}"
    md = side_by_side(rows, title)
    (work / "result.md").write_text(md)
    (work / "result.json").write_text(json.dumps({"dataset": a.dataset, "model": a.model, "threads": threads,
                                                  "peer_flags": args, "rows": rows}, indent=2))  # fmt: skip
    print(md)
    print(f"written: {work / 'result.md'}, {work / 'result.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
