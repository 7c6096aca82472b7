"""Element pruning's plan: refusals, each table's kept count, and the bytes check (PEP, DeepLight).

Functions of a config and the tables (``check_config``, ``plan_kept``) or of a built
``compression.masked.MaskedTablesCollection`` (``verify_plan``); no module state.

Budget: a table keeping ``k`` elements costs ``sparse_bytes(rows, dim, k)`` (CSR or COO,
``compression.sparse``), or its dense bytes when it keeps all. ``compression.sizing``'s
``plan_budget`` turns the budget into each table's kept count (its knob, 1..rows·dim-1;
a table whose dense form fits its share stays dense and unpruned), so the deployed bytes
land in [0.95, 1.0] of the target and an unreachable budget is refused with the smallest
ratio (one element in each table). ``target_sparsity`` (no budget) keeps
``round((1 - s)·rows·dim)`` of every table. The values are counted in the precision the
budget means (``ElementPruningConfig.value_precision``: int8 adds one fp32 scale a table).

Refused (``check_config``, one line each): quantization other than int8/fp16 after
training, pooling other than sum or mean, a table of more elements than int32 indexes.

Example::

    check_config("pep", config, tables)
    plan = plan_kept("pep", config, tables)   # plan.sizes: table -> kept elements (None: dense)
    verify_plan("pep", module, plan, config.value_precision())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from compression.base import MethodConfigError
from compression.deployed import TableFormat, deployed_bytes
from compression.quantization import as_quantization
from compression.sizing import FieldCost, Plan, plan_budget, plan_explicit, verify
from compression.sparse import (
    MAX_INDEX,
    SCALE_BYTES,
    VALUE_BYTES,
    SparseTable,
    SparseTables,
    choose,
    sparse_bytes,
)

if TYPE_CHECKING:
    from compression.masked import ElementPruningConfig, MaskedTablesCollection

SPARSE_PRECISIONS = ("int8", "fp16")


def check_config(method: str, config: ElementPruningConfig, tables: list[EmbeddingBagConfig]) -> None:
    """One line per refusal: quantization, pooling, tables too large (the schedule knobs
    are declared on ``ElementPruningConfig``'s fields and checked when it is made)."""
    q = as_quantization(config.quantization)
    if q is not None and (q.aware or q.precision not in SPARSE_PRECISIONS):
        raise MethodConfigError(
            f"{method}: quantization {q.label()} does not compose: the sparse tables' values are quantized "
            f"after training to {' or '.join(SPARSE_PRECISIONS)} (one scale a table); use one of those, aware: false"
        )
    for t in tables:
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise MethodConfigError(f"{method}: table '{t.name}' pools by {t.pooling}; sum or mean only")
        if t.num_embeddings * t.embedding_dim > MAX_INDEX:
            raise MethodConfigError(f"{method}: table '{t.name}' has over {MAX_INDEX} elements (int32 indices)")


def plan_kept(method: str, config: ElementPruningConfig, tables: list[EmbeddingBagConfig]) -> Optional[Plan]:
    """Kept elements per table (``plan.sizes``; None: dense, unpruned) from the budget or
    ``target_sparsity``; None when neither is set (the method's own rule decides)."""
    precision = config.value_precision()
    v = VALUE_BYTES[precision]

    def cost(t: EmbeddingBagConfig) -> FieldCost:
        n, d = t.num_embeddings, t.embedding_dim
        return FieldCost(t.name, n * d * v, 1, n * d - 1, lambda k: sparse_bytes(n, d, k, precision))

    costs = [cost(t) for t in tables]
    fixed = SCALE_BYTES * len(tables) if precision == "int8" else 0
    if config.budget is not None:
        return plan_budget(method, costs, config.budget, tables, fixed, precision=precision)
    if config.target_sparsity is None:
        return None
    s = config.target_sparsity
    sizes = {t.name: max(1, t.num_embeddings * t.embedding_dim - round(s * t.num_embeddings * t.embedding_dim))
             for t in tables}  # fmt: skip
    return plan_explicit(method, costs, sizes, tables, fixed)


def verify_plan(method: str, module: MaskedTablesCollection, plan: Optional[Plan], precision: str) -> None:
    """The planned deployed form, built on ``meta``, holds exactly the bytes planned."""
    if plan is None:
        return
    parts = []
    for t in module.source_tables():
        n, d, k = t.num_embeddings, t.embedding_dim, plan.sizes[t.name]
        layout = "dense" if k is None else choose(n, d, k, precision, dense=False)
        parts.append(SparseTable(n, d, n * d if k is None else k, layout, precision, torch.device("meta")))
    held = deployed_bytes(SparseTables(module.source_tables(), parts, module.feature_names), TableFormat())
    verify(method, plan, held)
