"""One experiment job: data -> tables -> compress -> model -> train -> MLflow.

``run_job`` is what ``python -m experiments.run`` calls for each Hydra job; tests
call it through Hydra's compose API with the same config.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from compression import compress, memory_report
from compression.base import CompressedEmbeddingBagCollection
from experiments.tracking import MLflowCallback, check_tracking, dataset_input, flatten, use_experiment
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.training import Trainer

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"


def describe_job(cfg: DictConfig) -> dict[str, str]:
    """Tags that name a job in the MLflow UI: method, budget, model, dataset."""
    comp: Any = OmegaConf.to_object(cfg.compression)
    budget = getattr(comp, "budget", None)
    return {
        "method": type(comp).method,
        "budget": budget.label() if budget is not None else "none",
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
    }


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def run_job(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run one configured job and return its summary (also written to summary.json)."""
    dataset_cfg: Any = OmegaConf.to_object(cfg.dataset)
    model_cfg: Any = OmegaConf.to_object(cfg.model)
    comp_cfg: Any = OmegaConf.to_object(cfg.compression)
    trainer_cfg: Any = OmegaConf.to_object(cfg.trainer)
    check_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.connect_timeout_s)
    use_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name)

    torch.manual_seed(cfg.seed)
    ds = dataset_cfg.prepare(Path(cfg.cache_dir))
    schema = ds.schema
    trainer = Trainer(trainer_cfg, callbacks=[MLflowCallback()], checkpoint_dir=None)
    tables = embedding_tables(schema, model_cfg.embedding_dim)
    module: CompressedEmbeddingBagCollection = compress(
        tables, comp_cfg, counts=_LazyCounts(ds), device=trainer.device, seed=cfg.seed
    )
    model = model_cfg.build(module, len(schema.dense))
    loaders = {
        split: BatchLoader(
            ds,
            split,
            trainer_cfg.batch_size if split == "train" else trainer_cfg.eval_batch_size,
            shuffle=split == "train",
            seed=cfg.seed,
            max_batches=trainer_cfg.max_steps_per_epoch if split == "train" else None,
        )
        for split in ("train", "val", "test")
    }

    ckdir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else output_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    trainer.checkpoint_dir = ckdir
    run_id_path = ckdir / RUN_ID_FILE
    resume_id = run_id_path.read_text().strip() if run_id_path.is_file() else None
    tags = {**describe_job(cfg), **cfg.mlflow.tags}
    run_name = cfg.mlflow.run_name or "-".join(
        [tags["method"]] + ([tags["budget"]] if tags["budget"] != "none" else []) + [tags["model"], tags["dataset"]]
    )
    memory = memory_report(module)
    n_params = sum(p.numel() for p in model.parameters())
    with mlflow.start_run(
        run_id=resume_id, run_name=run_name, tags=tags, log_system_metrics=cfg.mlflow.log_system_metrics
    ) as run:
        if resume_id is None:
            run_id_path.write_text(run.info.run_id)
            params = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            params.update({f"compression.chosen.{k}": v for k, v in module.describe().items()})
            params.update({"dataset.rows." + k: v for k, v in schema.rows.items()})
            params.update({"dataset.cache_dir": str(ds.root), "device": str(trainer.device)})
            mlflow.log_params(params)
            mlflow.log_input(dataset_input(ds), context="training")
        else:
            log.info("resuming MLflow run %s from %s", resume_id, ckdir)
        result = trainer.run(model, module, loaders["train"], loaders["val"], loaders["test"])
        mlflow.flush_async_logging()
        metrics: dict[str, float] = {f"test_{k}": v for k, v in result.test.items()}
        metrics.update(memory.as_metrics())
        metrics["parameters"] = float(n_params)
        metrics["dense_parameters"] = float(n_params - sum(p.numel() for p in module.parameters()))
        for name, stage_metrics in result.stages.items():
            prefix = "" if len(result.stages) == 1 else f"{name}."
            metrics.update({f"{prefix}{k}": v for k, v in stage_metrics.items()})
        if result.fit is not None:
            metrics["epochs_run"] = float(result.fit.epochs_run)
            metrics["best_epoch"] = float(result.fit.best_epoch)
            if result.fit.optimizer_bytes is not None:
                metrics["embedding_optimizer_bytes"] = float(result.fit.optimizer_bytes)
        summary = {
            "run_id": run.info.run_id,
            "run_name": run_name,
            "experiment": cfg.mlflow.experiment_name,
            "tags": tags,
            "metrics": metrics,
            "memory_by_tensor": memory.by_tensor,
            "stages": result.stages,
            "history": result.fit.history if result.fit else [],
            "config": OmegaConf.to_container(cfg, resolve=True),
            "dataset": {"root": str(ds.root), "schema": asdict(schema)},
        }
        # the summary lands on disk first: a tracking failure below loses nothing
        _write_json_atomic(summary, output_dir / "summary.json")
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v and abs(v) != float("inf")})
        mlflow.log_artifact(str(output_dir / "summary.json"))
        mlflow.set_tag("embcomp.status", "complete")
    return summary


class _LazyCounts(dict):
    """Per-feature id counts, read from the dataset only when a method asks."""

    def __init__(self, ds) -> None:
        super().__init__()
        self._ds = ds

    def __missing__(self, key: str):
        value = self._ds.counts(key)
        self[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._ds.schema.sparse_names
