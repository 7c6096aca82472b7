"""The plan: TorchRec's ``EmbeddingShardingPlanner`` under the job's constraints, and the
storage it estimates for each rank (read through the planner's public ``Stats`` hook)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    ShardingOption,
    Stats,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingPlan

from recsys.training.distributed.process import DistributedError, Runtime
from recsys.training.distributed.sharders import sharders


class _ChosenStorage(Stats):
    """A planner ``Stats`` reporter that keeps the storage of each shard of the plan the
    planner chose (tables, optimizer state, I/O buffers), summed per rank: the planner
    hands every reporter its best plan's ``ShardingOption``s after it plans."""

    def __init__(self, world_size: int, kind: str) -> None:
        self.per_rank = [0] * world_size
        self.kind = kind  # "hbm" on CUDA, "ddr" on the CPU

    def log(self, sharding_plan: Any, topology: Any, batch_size: int, storage_reservation: Any,
            num_proposals: int, num_plans: int, run_time: float, best_plan: list[ShardingOption],
            *args: Any, **kwargs: Any) -> None:  # fmt: skip
        self.per_rank = [0] * len(self.per_rank)
        for option in best_plan:
            for shard in option.shards:
                if shard.rank is not None and shard.storage is not None:
                    self.per_rank[shard.rank] += int(getattr(shard.storage, self.kind))


@dataclass
class Plan:
    """The planner's plan, its text, and its storage estimate per rank (bytes)."""

    plan: ShardingPlan
    estimate: list[int]
    constraints: dict[str, ParameterConstraints]

    def text(self) -> str:
        return str(self.plan)

    def sharding_types(self) -> dict[str, str]:
        """Table -> sharding type chosen."""
        return {t: ps.sharding_type for m in self.plan.plan.values() for t, ps in m.items()}  # type: ignore[union-attr]


def make_plan(
    model: nn.Module, runtime: Runtime, constraints: dict[str, ParameterConstraints], batch_size: int
) -> Plan:
    """Plan on rank 0 (TorchRec's ``collective_plan``), broadcast; with its estimate."""
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=runtime.world_size, local_world_size=runtime.local_world_size),
        kernel_config=KernelConfig(compute_device=runtime.device.type),
    )
    storage = _ChosenStorage(runtime.world_size, "hbm" if runtime.device.type == "cuda" else "ddr")
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False,
        stats=[EmbeddingStats(), storage],
    )  # fmt: skip
    # every rank plans (the planner is deterministic), so a refused plan fails on every
    # rank alike instead of leaving the others waiting for rank 0's broadcast
    plan = planner.plan(model, sharders())
    text = str(plan)
    if len(set(runtime.all_gather(text))) > 1:
        raise DistributedError("the ranks planned different shardings; check that every rank has the same config")
    return Plan(plan, storage.per_rank, constraints)
