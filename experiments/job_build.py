"""A resolved job built, once: its data, the memory pre-flight, the compressed module,
the model, the loaders and the trainer that will run them.

Sharded, the module's tables are built on the ``meta`` device and the model wrapped by
TorchRec's DMP under the method's constraints, with the pre-flight against the plan's
per-rank estimate. A budget (or memory) out of reach ends here: raised alone, recorded
as an ``unreachable`` run in a sweep (``JobUnreachable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import DictConfig

from compression import BudgetError, compress
from compression.base import CompressedEmbeddingBagCollection
from compression.preflight import available_bytes, check_fits, training_bytes
from experiments.job_resolve import JOB_KEY_FILE, JobUnreachable, Resolved
from experiments.resources import reset_peak_rss
from experiments.sharding import ShardedJob
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.training import Trainer
from recsys.training.distributed import DistributedError


class LazyCounts(dict):
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


@dataclass
class Built:
    """A job's data, module, model and loaders, and the trainer that will run them."""

    ds: Any
    module: CompressedEmbeddingBagCollection
    model: torch.nn.Module
    loaders: dict[str, BatchLoader]
    trainer: Trainer
    chosen: dict[str, Any]

    def test(self, cfg: DictConfig) -> BatchLoader | None:
        """The test split's loader, or None where the job must not read it (a search trial)."""
        return self.loaders["test"] if cfg.get("evaluate_test", True) else None


def build(r: Resolved) -> Built:
    """Data (prepared or opened), the memory pre-flight, the compressed module, the model,
    the loaders; sharded: the model wrapped by DMP under the method's constraints."""
    cfg, job, sharded = r.cfg, r.job, r.sharded
    torch.manual_seed(cfg.seed)
    reset_peak_rss()  # this job's peak, not the sweep's so far
    ds = job.prepared(lambda: r.dataset.prepare(Path(cfg.cache_dir)))  # sharded: rank 0 builds the cache
    schema = ds.schema
    trainer = Trainer(r.trainer, checkpoint_dir=r.ckdir if sharded is None else None)
    tables = embedding_tables(schema, r.model.table_dim(), r.model.embedding_init_std)
    label = f"{r.tags['label']}" + (f" {r.tags['budget']}" if r.tags["budget"] != "none" else "")
    try:
        if sharded is None:  # before any table exists (sharded: against the plan, in job.wrap)
            need = training_bytes(tables, r.comp, cfg.seed, LazyCounts(ds), optimizer=r.trainer.sparse_optimizer)
            check_fits(need, available_bytes(trainer.device), label)
        module: CompressedEmbeddingBagCollection = compress(
            tables, r.comp, counts=LazyCounts(ds), device=trainer.device, seed=cfg.seed,
            table_device="meta" if sharded is not None else None,
        )  # fmt: skip
    except BudgetError as e:
        out_of_reach(e, r)
    chosen = module.describe()
    model = r.model.build(module, len(schema.dense))
    loaders = {
        split: BatchLoader(
            ds,
            split,
            r.trainer.batch_size if split == "train" else r.trainer.eval_batch_size,
            shuffle=split == "train",
            seed=cfg.seed,
            max_batches=r.trainer.max_steps_per_epoch if split == "train" else None,
            shard=job.shard,
            in_memory=r.trainer.in_memory,
        )
        for split in ("train", "val", "test")
    }
    r.ckdir.mkdir(parents=True, exist_ok=True)
    (r.ckdir / JOB_KEY_FILE).write_text(r.key)
    built = Built(ds, module, model, loaders, trainer, chosen)
    if sharded is not None:
        built.model, built.trainer = _shard(r, sharded, built, tables, label)
    return built


def _shard(r: Resolved, job: ShardedJob, b: Built, tables: Any, label: str) -> tuple[torch.nn.Module, Trainer]:
    """The model wrapped by DMP (the memory pre-flight against the plan's per-rank
    estimate), and the trainer that runs it; a method that cannot shard is refused."""
    cfg, device = r.cfg, b.trainer.device  # (the sharded trainer's too: the same config)
    job.refuse_unsupported(b.module, type(r.comp).method)
    if cfg.export:
        raise DistributedError("export=true needs the model unsharded: run the job in one process")

    def rebuild() -> torch.nn.Module:  # the model unsharded, for post-training stages on rank 0
        whole = compress(tables, r.comp, counts=LazyCounts(b.ds), device=device, seed=cfg.seed)
        return r.model.build(whole, len(b.ds.schema.dense))

    try:  # the memory pre-flight against the plan's per-rank estimate
        model = job.wrap(b.model, b.module, b.trainer, rebuild, label)
    except BudgetError as e:
        out_of_reach(e, r)
    return model, Trainer(r.trainer, backend=job.backend)  # sharded runs do not resume


def out_of_reach(e: BudgetError, r: Resolved) -> NoReturn:
    """A budget (or memory) the job cannot meet: raised alone; in a sweep, recorded as an
    ``unreachable`` run with the reason (rank 0) and skipped, so the sweep goes on."""
    if not r.in_sweep:
        raise e
    if r.record is not None:
        r.record.start("job", run_name=r.run_name, tags={**r.tags, "embcomp.status": "unreachable"},
                       parent=r.parent_run_id)  # fmt: skip
        r.record.tags("job", {"embcomp.reason": str(e)})
        r.record.end("job")
    raise JobUnreachable(str(e)) from None
