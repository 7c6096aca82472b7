"""OptEmbed's row pruning, measured: rows kept against AUC, and hashing at the same bytes.

For each seed and each kept fraction asked for (``target_kept``; 1 keeps every row),
OptEmbed's whole schedule runs (a supernet whose pruning floor ramps to the level,
search, retrain, compact) on the job configs' data, model and trainer; then the hashing
trick is trained holding the bytes that OptEmbed's result holds. Recorded per run: test
AUC, bytes, rows kept, and along the supernet each epoch's validation AUC beside the
fraction of rows kept then. Printed: mean test AUC per level, and the first level at
which it falls more than ``--drop`` below the unpruned one.

Usage::

    python -m experiments.benches.pruning --seeds 0 1 2 --levels 1 0.8 0.6 0.4 0.2 0.1 0.05 \\
        --out reports/pruning.json [dataset=movielens_100k model=deepfm compression=optembed_fast]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from compression import Budget, compress, memory_report
from compression.methods.hashing import HashingConfig
from compression.methods.optembed import OptEmbedConfig
from experiments.config import register_configs
from experiments.seeds import aggregate
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.training import Callback, Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"


class _Epochs(Callback):
    """Each supernet epoch's validation AUC and the fraction of rows kept then."""

    def __init__(self) -> None:
        self.stage = ""
        self.curve: list[dict[str, float]] = []

    def on_stage_start(self, stage: Any, n_stages: int) -> None:
        self.stage = stage.name

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], step: int) -> None:
        if self.stage == "supernet":
            self.curve.append({"epoch": float(epoch), "val_auc": metrics["val_auc"],
                               "kept_row_ratio": metrics["kept_row_ratio"]})


def run(cfg: Any, comp: Any, seed: int) -> dict[str, Any]:
    dataset: Any = OmegaConf.to_object(cfg.dataset)
    model_cfg: Any = OmegaConf.to_object(cfg.model)
    trainer_cfg: Any = OmegaConf.to_object(cfg.trainer)
    trainer_cfg.seed = seed
    ds = dataset.prepare(Path(cfg.cache_dir))
    torch.manual_seed(seed)
    tables = embedding_tables(ds.schema, model_cfg.table_dim(), model_cfg.embedding_init_std)
    module = compress(tables, comp, seed=seed)
    model = model_cfg.build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, trainer_cfg.batch_size if s == "train" else trainer_cfg.eval_batch_size,
                           shuffle=s == "train", seed=seed) for s in ("train", "val", "test")]
    epochs = _Epochs()
    result = Trainer(trainer_cfg, callbacks=[epochs]).run(model, module, *loaders)
    out: dict[str, Any] = {"test_auc": result.test["auc"], "bytes": memory_report(module).bytes,
                           "uncompressed_bytes": memory_report(module).uncompressed_bytes}
    if "compact" in result.stages:
        out.update(kept_row_ratio=result.stages["compact"]["kept_row_ratio"], supernet=epochs.curve,
                   dims=module.describe())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--levels", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05])
    ap.add_argument("--drop", type=float, default=0.001)
    ap.add_argument("--no-hashing", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--combine", type=Path, nargs="+", help="only print the table of these --out files")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of experiments/conf/config.yaml")
    args = ap.parse_args(argv)
    if args.combine:
        report([r for p in args.combine for r in json.loads(p.read_text())], args.drop)
        return
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["dataset=movielens_100k", "model=deepfm",
                                                        "compression=optembed_fast", *args.overrides])
    base = OmegaConf.to_object(cfg.compression)
    assert isinstance(base, OptEmbedConfig), "compression= must be an optembed config"
    rows: list[dict[str, Any]] = []
    for level in args.levels:
        for seed in args.seeds:
            oe = run(cfg, OptEmbedConfig(**{**base.__dict__, "target_kept": level, "budget": None}), seed)
            row = {"level": level, "seed": seed, "optembed": oe}
            if not args.no_hashing:
                row["hashing"] = run(cfg, HashingConfig(budget=Budget(bytes=oe["bytes"])), seed)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=float), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, default=float))
    report(rows, args.drop)


def report(rows: list[dict[str, Any]], drop: float) -> None:
    """Test AUC per level over the seeds (mean +- the 95% t interval, ``experiments.seeds``),
    hashing's at the same bytes, and the first level whose mean falls more than ``drop``
    below keeping every row (and whether that drop is outside both intervals)."""
    levels = sorted({r["level"] for r in rows}, reverse=True)
    print(f"\n{'kept':>6} {'rows kept':>9} {'bytes':>9} {'optembed AUC':>18} {'hashing AUC':>18} seeds")
    stats = {}
    for level in levels:
        at = [r for r in rows if r["level"] == level]
        oe = stats[level] = aggregate(r["optembed"]["test_auc"] for r in at)
        hashed = aggregate(r["hashing"]["test_auc"] for r in at) if "hashing" in at[0] else None
        print(f"{level:6.2f} {statistics.mean(r['optembed']['kept_row_ratio'] for r in at):9.3f} "
              f"{statistics.mean(r['optembed']['bytes'] for r in at):9.0f} {_pm(oe):>18} "
              f"{_pm(hashed) if hashed else '-':>18} {len(at)}")  # fmt: skip
    top = stats[max(stats)]
    first = next((lv for lv in levels if stats[lv].mean < top.mean - drop), None)
    beyond = first is not None and not stats[first].overlaps(top)
    print(f"first level with mean test AUC more than {drop} below keeping {max(stats):g}: {first}"
          + ("" if first is None else f" ({'outside' if beyond else 'inside'} the seeds' intervals)"))
    told = next((lv for lv in levels if stats[lv].mean < top.mean - drop and not stats[lv].overlaps(top)), None)
    print(f"first level whose drop the seeds tell apart (intervals apart): {told}")


def _pm(s: Any) -> str:
    return f"{s.mean:.4f} +- {s.ci95:.4f}" if s.n > 1 else f"{s.mean:.4f}"


if __name__ == "__main__":
    main()
