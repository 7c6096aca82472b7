"""Sharded training: TorchRec's planner and ``DistributedModelParallel`` (DMP) over any
compressed module, one process per rank (``torchrun``), gloo on CPUs, NCCL on GPUs.

A compressed module is an id transform in front of TorchRec collections, so DMP shards
the collections inside (``EmbeddingBagCollection``, ``EmbeddingCollection``,
``ManagedCollisionEmbeddingBagCollection``) and the transform, the combine step and the
model's dense layers run data-parallel. What this module adds:

- sharders that work on the CPU: the stock ``EmbeddingBagCollectionSharder`` offers
  row-wise sharding only on CUDA; ``EmbeddingBagCollectionSharder`` here lists it on
  the CPU too (and so does the managed-collision sharder built on it, which is
  row-wise only);
- the planner's constraints (``table_constraints``): FBGEMM's fused kernels hold
  tables whose dim is a multiple of 4 only, so other tables are replicated
  (data-parallel); then the method's own ``sharding_constraints()``; then the job
  config's ``distributed.constraints`` over both;
- the same optimizer semantics as one process: tables train with TorchRec's
  row-wise Adagrad fused into the backward (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``),
  replicated tables with the same row-wise Adagrad on their summed gradients, dense
  parameters with Adam on gradients *summed* over ranks (a DDP comm hook), and the
  loss is the sum over a rank's samples divided by the global batch size: the update
  is the one a single process makes on the whole batch (``tests/training/test_distributed.py``);
- the per-rank bytes actually held (``rank_bytes``) beside the planner's estimate.

Example::

    runtime = start(DistributedConfig(mode="on"), "cpu")   # torchrun sets the rank
    sharded = shard(model, module, runtime, DistributedConfig(), sparse_lr=0.05)
    sharded.dmp(batch.dense_features, batch.sparse_features)
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder as _StockEBCSharder,
)
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from compression.api import require_fbgemm_cuda
from compression.base import CompressedEmbeddingBagCollection
from compression.memory import held_bytes, local_tensors  # noqa: F401  (local_tensors: the trainer's)

MODES = ("auto", "on", "off")
# FBGEMM's fused table-batched kernels need each table's local columns to be a multiple of 4
FUSED_DIM_MULTIPLE = 4
# the eps of the unfused row-wise Adagrad the single-process trainer uses
ROWWISE_EPS: float = inspect.signature(RowWiseAdagrad).parameters["eps"].default


class DistributedError(RuntimeError):
    """A sharded run that cannot start (the message says why and what to change)."""


@dataclass
class DistributedConfig:
    """How a job shards (the ``distributed`` node of the job config).

    ``mode``: ``auto`` shards when started by ``torchrun`` with ``WORLD_SIZE > 1``;
    ``on`` shards in one process too (world size 1: the tables train in FBGEMM's
    fused kernel, touching only the rows a batch reads); ``off`` never shards.
    ``backend``: ``auto`` is NCCL on CUDA, gloo on the CPU.
    ``constraints``: table name -> fields of TorchRec's ``ParameterConstraints``
    (``sharding_types: [row_wise]``, ``compute_kernels``, ``min_partition`` ...),
    applied over the method's own.
    ``plan_batch_size``: the per-rank batch the planner sizes its buffers for
    (None: the trainer's batch size over the world size).
    """

    mode: str = "auto"
    backend: str = "auto"
    constraints: dict[str, Any] = field(default_factory=dict)
    plan_batch_size: Optional[int] = None


# -- the process group -------------------------------------------------------------------
@dataclass
class Runtime:
    """This process's place in the job: rank, world size, device, process group."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs to MLflow and writes outputs."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def world_size_from_env() -> int:
    """The ``WORLD_SIZE`` torchrun set (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wanted(cfg: DistributedConfig) -> bool:
    """Whether this job shards: ``on``, or ``auto`` under torchrun with several ranks."""
    if cfg.mode not in MODES:
        raise DistributedError(f"distributed.mode must be one of {MODES}, got '{cfg.mode}'")
    world = world_size_from_env()
    if cfg.mode == "off" and world > 1:
        raise DistributedError(
            f"started by torchrun with WORLD_SIZE={world} but distributed.mode=off; "
            "set distributed.mode=auto, or run one process (python -m experiments.run)"
        )
    return cfg.mode == "on" or (cfg.mode == "auto" and world > 1)


def start(cfg: DistributedConfig, device_name: str) -> Runtime:
    """Join (or, in one process, make) the process group; the ``Runtime`` of this rank.

    Under torchrun the group comes from its environment (``env://``: MASTER_ADDR,
    RANK, WORLD_SIZE); a single process gets a group of one in memory. Started
    once per process: later jobs of a sweep reuse the group.
    """
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"trainer.device={device_name} but this machine has no CUDA device")
        device = torch.device("cuda", local_rank)
        require_fbgemm_cuda("sharded training (fused TBE kernels)", device)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:  # one process, no torchrun: a group of one, nothing to rendezvous with
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one host share its cores (torchrun sets OMP_NUM_THREADS=1 itself)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return Runtime(dist.get_rank(), world, local, device, dist.get_backend())


# -- sharders and constraints -------------------------------------------------------------
class EmbeddingBagCollectionSharder(_StockEBCSharder):
    """TorchRec's EBC sharder with row-wise sharding on the CPU too (the stock one
    lists it for CUDA only; FBGEMM's CPU kernels and gloo handle it)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types.append(ShardingType.ROW_WISE.value)
        return types


class ManagedCollisionSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's MC-EBC sharder (row-wise only) over the CPU-capable EBC sharder; on the
    CPU it offers FBGEMM's fused kernel alone (it lists UVM kernels for every device,
    which the planner's CPU estimators refuse)."""

    def __init__(self) -> None:
        super().__init__(ebc_sharder=EmbeddingBagCollectionSharder())

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = list(super().compute_kernels(sharding_type, compute_device_type))
        if compute_device_type == "cpu":
            kernels = [k for k in kernels if k == EmbeddingComputeKernel.FUSED.value]
        return kernels


def sharders() -> list[ModuleSharder[nn.Module]]:
    """One sharder per TorchRec module type our methods are built of."""
    return [
        EmbeddingBagCollectionSharder(),
        EmbeddingCollectionSharder(),  # OptEmbed's tables; lists row-wise on every device
        ManagedCollisionSharder(),
    ]


def check_shardable(model: nn.Module, runtime: Runtime) -> None:
    """Refuse, in one line, what TorchRec cannot shard here (before any collective)."""
    for m in model.modules():
        reason = m.sharding_refusal() if isinstance(m, CompressedEmbeddingBagCollection) else None
        if reason:
            raise DistributedError(f"{reason}; train it in one process (distributed.mode=off)")
    mc = [m for m in model.modules() if isinstance(m, ManagedCollisionEmbeddingBagCollection)]
    if mc and runtime.device.type == "cpu":
        raise DistributedError(
            "managed_collision cannot be sharded on the CPU: TorchRec's sharded MC-EBC re-draws "
            "evicted rows with fbgemm::reset_weight_momentum, which FBGEMM implements for CUDA "
            "only; train it in one process (distributed.mode=off) or on GPUs"
        )
    for m in mc:
        for name, mch in m._managed_collision_collection._managed_collision_modules.items():
            if mch.buckets() % runtime.world_size:
                raise DistributedError(
                    f"managed_collision table '{name}' has {mch.buckets()} MCH bucket(s); TorchRec's "
                    f"row-wise MC sharding needs a multiple of the world size ({runtime.world_size})"
                )


def shardable_tables(model: nn.Module) -> dict[str, int]:
    """Table name -> dim of every table DMP will shard in ``model``."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            out.update({c.name: c.embedding_dim for c in m.embedding_bag_configs()})
        elif isinstance(m, EmbeddingCollection):
            out.update({c.name: c.embedding_dim for c in m.embedding_configs()})
    return out


def as_constraints(value: Any, table: str) -> ParameterConstraints:
    """A ``ParameterConstraints`` from one (or a config mapping of its fields)."""
    if isinstance(value, ParameterConstraints):
        return value
    known = {f.name for f in fields(ParameterConstraints)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise DistributedError(
            f"distributed.constraints.{table}: unknown field(s) {unknown}; e.g. sharding_types, "
            "compute_kernels, min_partition"
        )
    return ParameterConstraints(**dict(value))


def table_constraints(
    model: nn.Module, module: nn.Module, overrides: Mapping[str, Any] | None = None
) -> dict[str, ParameterConstraints]:
    """The planner's constraints: dims FBGEMM's fused kernels cannot hold replicated,
    then the method's ``sharding_constraints()``, then ``overrides`` (config)."""
    tables = shardable_tables(model)
    out: dict[str, ParameterConstraints] = {
        name: ParameterConstraints(sharding_types=[ShardingType.DATA_PARALLEL.value])
        for name, dim in tables.items()
        if dim % FUSED_DIM_MULTIPLE
    }
    method: dict[str, Any] = module.sharding_constraints() if isinstance(module, CompressedEmbeddingBagCollection) else {}
    for source, given in (("the method", method), ("distributed.constraints", dict(overrides or {}))):
        unknown = sorted(set(given) - set(tables))
        if unknown:
            raise DistributedError(
                f"{source} constrains unknown table(s) {unknown}; the tables are {sorted(tables)}"
            )
        out.update({name: as_constraints(c, name) for name, c in given.items()})
    for name, c in out.items():
        allowed = c.sharding_types or []
        if tables[name] % FUSED_DIM_MULTIPLE and set(allowed) - {ShardingType.DATA_PARALLEL.value}:
            raise DistributedError(
                f"table '{name}' has dim {tables[name]}: FBGEMM's fused kernels need a multiple of "
                f"{FUSED_DIM_MULTIPLE}, so only data_parallel can hold it (asked: {allowed})"
            )
    return out


# -- the plan -----------------------------------------------------------------------------
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
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False
    )
    # every rank plans (the planner is deterministic), so a refused plan fails on every
    # rank alike instead of leaving the others waiting for rank 0's broadcast
    plan = planner.plan(model, sharders())
    text = str(plan)
    if len(set(runtime.all_gather(text))) > 1:
        raise DistributedError("the ranks planned different shardings; check that every rank has the same config")
    # the storage of each shard of the plan it chose (tables, optimizer state, I/O)
    kind = "hbm" if runtime.device.type == "cuda" else "ddr"
    per_rank = [0] * runtime.world_size
    for option in planner._best_plan or []:  # the plan's ShardingOptions: no public accessor
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                per_rank[shard.rank] += int(getattr(shard.storage, kind))
    return Plan(plan, per_rank, constraints)


# -- wrapping ---------------------------------------------------------------------------------
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


# -- what each rank holds (counted by compression.memory, the one counter) -----------------
def rank_bytes(sharded: Sharded, module: nn.Module, prefix: str) -> dict[str, int]:
    """Bytes this rank holds: its table shards (and replicated tables), everything else
    of the compressed module (hashes, remap buffers, projections), and the tables'
    optimizer state; counted from the tensors (``compression.memory.held_bytes``), not
    from the plan.

    ``prefix``: the compressed module's name inside the model (e.g. ``embedding_bag_collection``).
    """
    state = sharded.dmp.state_dict()
    tables = {k for k in state if k.startswith(prefix + ".") and k.endswith(".weight")
              and any(seg in k for seg in (".embedding_bags.", ".embeddings."))}  # fmt: skip
    table_bytes = held_bytes((k, state[k]) for k in sorted(tables))
    inside = tuple(t.rsplit(".weight", 1)[0] for t in tables)
    other = held_bytes((k, v) for k, v in list(module.named_parameters()) + list(module.named_buffers())
                       if not f"{prefix}.{k}".startswith(inside))  # fmt: skip
    optimizer = held_bytes(
        (f"{key}.{k}", v)
        for key, value in sharded.dmp.fused_optimizer.state_dict()["state"].items()
        for k, v in (value.items() if isinstance(value, dict) else [("", value)])
    )
    return {"table_bytes": table_bytes, "other_bytes": other, "optimizer_bytes": optimizer,
            "total_bytes": table_bytes + other + optimizer}  # fmt: skip
