"""Wrapping: DMP over the planned model, the fused table optimizers, dense gradients
summed over ranks, and loading an unsharded model's weights into the shards."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingType
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.training.distributed.planning import Plan, make_plan
from recsys.training.distributed.process import DistributedConfig, DistributedError, Runtime
from recsys.training.distributed.sharders import check_shardable, sharders, table_constraints

# the eps of the unfused row-wise Adagrad the single-process trainer uses
ROWWISE_EPS: float = inspect.signature(RowWiseAdagrad).parameters["eps"].default


def _sum_hook(group, bucket):  # type: ignore[no-untyped-def]
    """DDP's all-reduce without the division by the world size: gradients are summed.

    (No annotations: DDP compares the ``bucket`` annotation to ``dist.GradBucket`` and
    this module's annotations are strings.)
    """
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()  # type: ignore[union-attr]
    return fut.then(lambda f: f.value()[0])


class SummedDataParallel(DefaultDataParallelWrapper):
    """TorchRec's DDP wrapper, with dense gradients summed over ranks (each rank's loss
    is already divided by the global batch size), so one step equals one process's."""

    def wrap(self, dmp: DistributedModelParallel, env: Any, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        ddp = dmp._dmp_wrapped_module
        if isinstance(ddp, nn.parallel.DistributedDataParallel):
            ddp.register_comm_hook(env.process_group, _sum_hook)


@dataclass
class Sharded:
    """A model wrapped by DMP, with its plan and what each optimizer owns."""

    dmp: DistributedModelParallel
    plan: Plan
    # parameter names of the replicated (data-parallel) tables: row-wise Adagrad, not Adam
    replicated_tables: set[str]
    sparse_lr: float
    world_size: int


# the optimizers FBGEMM fuses into the sharded tables' backward, by trainer.sparse_optimizer
FUSED_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    # FBGEMM's default eps (1e-8) is not TorchRec's RowWiseAdagrad's (1e-10): pass it
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": ROWWISE_EPS}),
    "adagrad": (torch.optim.Adagrad, {}),
    "sgd": (torch.optim.SGD, {}),
    "adam": (torch.optim.Adam, {}),
}


def check_protocol(trainer_cfg: Any, device: torch.device) -> None:
    """Refuse, in one line, a training protocol the fused sharded tables cannot follow."""
    name = trainer_cfg.sparse_optimizer
    if name not in FUSED_OPTIMIZERS:
        raise DistributedError(f"trainer.sparse_optimizer '{name}' has no fused sharded form; use one of {sorted(FUSED_OPTIMIZERS)}")
    if name == "adam" and device.type != "cuda":
        raise DistributedError(
            "trainer.sparse_optimizer=adam: FBGEMM's fused Adam runs on CUDA only; sharded on the CPU use "
            "rowwise_adagrad, adagrad or sgd (or train in one process: distributed.mode=off)"
        )
    if trainer_cfg.embedding_l2:
        raise DistributedError(
            "trainer.embedding_l2 is applied to the tables' gradients, which FBGEMM's fused sharded tables "
            "never expose; set trainer.embedding_l2=0 or train in one process (distributed.mode=off)"
        )
    if trainer_cfg.clip_grad_norm:
        raise DistributedError(
            "trainer.clip_grad_norm needs every gradient, and FBGEMM's fused sharded tables apply theirs in "
            "the backward; set trainer.clip_grad_norm=null or train in one process (distributed.mode=off)"
        )


def shard(
    model: nn.Module,
    module: nn.Module,
    runtime: Runtime,
    cfg: DistributedConfig,
    sparse_lr: float,
    batch_size: int = 512,
    state: Mapping[str, Any] | None = None,
    check: Callable[[Plan], None] | None = None,
    sparse_optimizer: str = "rowwise_adagrad",
) -> Sharded:
    """Plan, then wrap ``model`` in DMP; its tables train by the fused ``sparse_optimizer``.

    ``module`` is the compressed module inside ``model`` (its constraints apply).
    Sharding does not copy weights: a module built with real tables passes
    ``state`` (its unsharded ``state_dict()``), loaded after wrapping; a module built
    with ``table_device="meta"`` gets TorchRec's initialisation of each shard.
    ``check(plan)`` runs before anything is allocated (the memory pre-flight).
    """
    check_shardable(model, runtime)
    tables = [p for p in module.table_parameters() if p.requires_grad]  # type: ignore[operator]
    opt_cls, kwargs = FUSED_OPTIMIZERS[sparse_optimizer]
    _apply_optimizer_in_backward(opt_cls, tables, {"lr": sparse_lr, **kwargs})
    constraints = table_constraints(model, module, cfg.constraints)
    per_rank_batch = cfg.plan_batch_size or max(1, batch_size // runtime.world_size)
    plan = make_plan(model, runtime, constraints, per_rank_batch)
    if check is not None:
        check(plan)
    dmp = DistributedModelParallel(
        model, device=runtime.device, plan=plan.plan, sharders=sharders(),
        data_parallel_wrapper=SummedDataParallel(),
    )  # fmt: skip
    if state is not None:
        load_unsharded(dmp, state)
    replicated = set()
    for path, tables_plan in plan.plan.plan.items():
        for table, ps in tables_plan.items():  # type: ignore[union-attr]
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                pattern = re.compile(rf"^{re.escape(path)}\..*\b{re.escape(table)}\.weight$")
                replicated |= {n for n, _ in dmp.named_parameters() if pattern.match(n)}
    return Sharded(dmp, plan, replicated, sparse_lr, runtime.world_size)


# TorchRec cannot load unsharded managed-collision buffers (sorted ids, slot map, LFU
# counts) into sharded ones; before training they are empty in both, so they are skipped
_MC_STATE = "._managed_collision_collection."


def load_unsharded(dmp: DistributedModelParallel, state: Mapping[str, Any]) -> None:
    """Load an unsharded model's ``state_dict`` into its DMP-wrapped copy (each rank
    takes its shards); managed-collision remap state must be untrained (empty)."""
    keep = {k: v for k, v in state.items() if _MC_STATE not in f".{k}"}
    missing, unexpected = dmp.load_state_dict(keep, strict=False)
    missing = [k for k in missing if _MC_STATE not in f".{k}"]
    if missing or unexpected:
        raise DistributedError(f"state does not fit the sharded model: missing {missing}, unexpected {unexpected}")
