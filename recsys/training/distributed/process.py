"""The process group: this rank's ``Runtime``, and the job's ``DistributedConfig``."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from compression.api import require_fbgemm_cuda
from compression.errors import EmbcompError

MODES = ("auto", "on", "off")


class DistributedError(EmbcompError, RuntimeError):
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
        # destroyed while the interpreter is whole: a gloo group left to finalization can
        # abort the process (std::terminate from a worker thread) after an error's exit 1
        atexit.register(_destroy_group)
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one host share its cores (torchrun sets OMP_NUM_THREADS=1 itself)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return Runtime(dist.get_rank(), world, local, device, dist.get_backend())


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
