"""What an experiment job does differently when it shards (``torchrun`` or ``distributed.mode=on``).

``run_job`` stays one pipeline; with a ``ShardedJob`` it builds the compressed module
with its tables on the ``meta`` device (no rank ever holds a whole table), plans with
TorchRec's planner, checks the plan's per-rank estimate against the memory of each
host before DMP allocates anything, wraps the model, counts what every rank holds,
and has rank 0 alone log to MLflow: the plan as text, a per-rank table (bytes held,
planner estimate) as markdown and CSV artifacts, and the figures as params/metrics.

Example::

    job = ShardedJob.start(cfg, trainer_cfg)      # None: an ordinary single-process job
    model = job.wrap(model, module, trainer, rebuild, "hashing 10x")
    if job.main: job.log()                         # inside rank 0's MLflow run
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from compression.base import CompressedEmbeddingBagCollection
from compression.memory import MemoryReport, memory_report, planned_optimizer_bytes
from compression.preflight import TrainingBytes, available_bytes, check_fits
from recsys.training import distributed as D
from recsys.training.sharded import ShardedBackend

if TYPE_CHECKING:
    from experiments.record import RunRecord


class ShardedJob:
    """One job's sharding: runtime, plan, what each rank holds."""

    def __init__(self, runtime: D.Runtime, cfg: D.DistributedConfig) -> None:
        self.runtime = runtime
        self.cfg = cfg
        self.sharded: D.Sharded | None = None
        self.whole: MemoryReport | None = None
        self.backend: ShardedBackend | None = None
        self.ranks: list[dict[str, int]] = []

    @classmethod
    def start(cls, cfg: DictConfig, trainer_cfg: Any) -> ShardedJob | None:
        """The job's sharding, or None when it runs as one ordinary process."""
        dist_cfg: D.DistributedConfig = OmegaConf.to_object(cfg.distributed)  # type: ignore[assignment]
        if not D.wanted(dist_cfg):
            return None
        return cls(D.start(dist_cfg, trainer_cfg.device), dist_cfg)

    @property
    def main(self) -> bool:
        return self.runtime.is_main

    @property
    def shard(self) -> tuple[int, int]:
        """``BatchLoader(shard=...)``: this rank's part of every batch."""
        return (self.runtime.rank, self.runtime.world_size)

    def broadcast(self, value: Any) -> Any:
        return self.runtime.broadcast(value)

    def prepared(self, prepare: Callable[[], Any]) -> Any:
        """``prepare()`` (a dataset's cache) on rank 0 first, then on the others, which
        then open what rank 0 built; a failure on rank 0 fails every rank alike."""
        error: BaseException | None = None
        out = None
        if self.main:
            try:
                out = prepare()
            except Exception as e:  # noqa: BLE001  (raised on every rank below)
                error = e
        error = self.broadcast(error)
        if error is not None:
            raise error
        return out if self.main else prepare()

    def refuse_unsupported(self, module: CompressedEmbeddingBagCollection, method: str) -> None:
        """Methods whose own stages read or rebuild whole tables cannot train sharded."""
        staged = [s.name for s in module.stages() if s.run is not None]
        if staged:
            raise D.DistributedError(
                f"{method}'s schedule ({', '.join(staged)}) reads and rebuilds whole tables between "
                "stages, which sharded tables are not; run it in one process (distributed.mode=off)"
            )

    def wrap(
        self,
        model: nn.Module,
        module: CompressedEmbeddingBagCollection,
        trainer: Any,
        rebuild: Callable[[], nn.Module],
        label: str,
    ) -> nn.Module:
        """Plan, check memory, wrap ``model`` in DMP; the trainer runs the wrapped model."""
        whole = self.whole = memory_report(module)  # the whole module (tables on meta: counted, not held)
        runtime = self.runtime

        def check(plan: D.Plan) -> None:
            # every rank checks its own host: the estimates of the ranks that share it
            host = runtime.rank // runtime.local_world_size
            need = sum(b for r, b in enumerate(plan.estimate) if r // runtime.local_world_size == host)
            verdict = None
            try:
                check_fits(TrainingBytes(need, 0, whole.uncompressed_bytes), available_bytes(runtime.device),
                           label, f"on host {host} for {runtime.local_world_size} rank(s) (planner's estimate)")  # fmt: skip
            except Exception as e:  # noqa: BLE001  (told to every rank below)
                verdict = e
            failed = [v for v in runtime.all_gather(verdict) if v is not None]
            if failed:
                raise failed[0]

        D.check_protocol(trainer.cfg, runtime.device)
        self.sharded = D.shard(
            model, module, runtime, self.cfg, trainer.cfg.sparse_lr, batch_size=trainer.cfg.batch_size, check=check,
            sparse_optimizer=trainer.cfg.sparse_optimizer,
        )  # fmt: skip
        # what the job's trainer runs the wrapped model with (Trainer(..., backend=job.backend))
        self.backend = ShardedBackend(self.sharded, rebuild, trainer.device)
        prefix = next(n for n, m in self.sharded.dmp.module.named_modules() if m is module)
        if prefix.startswith("module."):  # DDP's wrapper name
            prefix = prefix[len("module."):]
        mine = D.rank_bytes(self.sharded, module, prefix)
        mine["replicated_optimizer_bytes"] = planned_optimizer_bytes(
            trainer.cfg.sparse_optimizer,
            [tuple(p.shape) for n, p in self.sharded.dmp.named_parameters() if n in self.sharded.replicated_tables],
        )  # the state of the replicated tables, allocated at their first step
        self.ranks = runtime.all_gather(mine)
        return self.sharded.dmp

    def log(self, record: RunRecord, output_dir: Path) -> dict[str, float]:
        """Rank 0: the plan, per-rank bytes and estimates written to ``output_dir/sharding``
        and to the job's record (params, artifacts); the per-rank figures as metrics."""
        assert self.sharded is not None
        plan = self.sharded.plan
        out = output_dir / "sharding"
        out.mkdir(parents=True, exist_ok=True)
        rows = self.table()
        for name, text in (("plan.txt", plan.text()), ("ranks.md", _markdown(rows)), ("ranks.csv", _csv(rows))):
            (out / name).write_text(text)
            record.artifact("job", out / name, "sharding")
        record.params("job", {
            "sharding.world_size": self.runtime.world_size,
            "sharding.process_group_backend": self.runtime.backend,
            **{f"sharding.table.{t}": s for t, s in plan.sharding_types().items()},
        })  # fmt: skip
        metrics: dict[str, float] = {}
        for row in rows:
            r = row["rank"]
            for k, v in row.items():
                if k != "rank":
                    metrics[f"rank{r}.{k}"] = float(v)
        metrics["max_rank_bytes"] = float(max(row["total_bytes"] for row in rows))
        return metrics

    def table(self) -> list[dict[str, int]]:
        """One row per rank: bytes held (tables, other, optimizer) and the planner's estimate."""
        assert self.sharded is not None
        return [{"rank": r, **b, "planner_estimate_bytes": est}
                for r, (b, est) in enumerate(zip(self.ranks, self.sharded.plan.estimate))]  # fmt: skip


def _markdown(rows: list[dict[str, int]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{row[k]:,}" if k != "rank" else str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, int]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def rank() -> int:
    """This process's rank under torchrun (0 otherwise), before any process group exists."""
    return int(os.environ.get("RANK", "0"))
