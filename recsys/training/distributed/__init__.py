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

One module per part: ``process`` (the process group, ``Runtime``, ``DistributedConfig``),
``sharders`` (sharders and the planner's constraints), ``planning`` (the plan and its
storage estimate), ``wrapping`` (DMP, fused optimizers, summed dense gradients, loading
unsharded weights), ``held`` (what each rank holds).

Example::

    runtime = start(DistributedConfig(mode="on"), "cpu")   # torchrun sets the rank
    sharded = shard(model, module, runtime, DistributedConfig(), sparse_lr=0.05)
    sharded.dmp(batch.dense_features, batch.sparse_features)
"""

from recsys.training.distributed.held import rank_bytes
from recsys.training.distributed.planning import Plan, make_plan
from recsys.training.distributed.process import (
    MODES,
    DistributedConfig,
    DistributedError,
    Runtime,
    start,
    wanted,
    world_size_from_env,
)
from recsys.training.distributed.sharders import (
    FUSED_DIM_MULTIPLE,
    EmbeddingBagCollectionSharder,
    ManagedCollisionSharder,
    as_constraints,
    check_shardable,
    shardable_tables,
    sharders,
    table_constraints,
)
from recsys.training.distributed.wrapping import (
    FUSED_OPTIMIZERS,
    ROWWISE_EPS,
    Sharded,
    SummedDataParallel,
    check_protocol,
    load_unsharded,
    shard,
)

__all__ = [
    "FUSED_DIM_MULTIPLE", "FUSED_OPTIMIZERS", "MODES", "ROWWISE_EPS", "DistributedConfig", "DistributedError",
    "EmbeddingBagCollectionSharder", "ManagedCollisionSharder", "Plan", "Runtime", "Sharded", "SummedDataParallel",
    "as_constraints", "check_protocol", "check_shardable", "load_unsharded", "make_plan", "rank_bytes", "shard",
    "shardable_tables", "sharders", "start", "table_constraints", "wanted", "world_size_from_env",
]  # fmt: skip
