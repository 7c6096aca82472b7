"""Element pruning's plan: refusals, each table's kept count, and the bytes check (PEP, DeepLight).

``build_masked``: the element-pruning methods' path through ``compression.sizing``'s
``build_sized`` (their costs, fixed bytes, explicit sizes and planned deployed form);
``check_config``: their refusals.

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

    @register(PEPConfig)
    def build(tables, config, ctx):
        return build_masked("pep", PEPCollection, tables, config, ctx)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.api import BuildContext
from compression.base import MethodConfigError
from compression.quantization import as_quantization
from compression.sizing import FieldCost, Plan, build_sized
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

M = TypeVar("M", bound="MaskedTablesCollection")

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
        if t.num_embeddings * t.embedding_dim > MAX_INDEX:
            raise MethodConfigError(f"{method}: table '{t.name}' has over {MAX_INDEX} elements (int32 indices)")


def build_masked(method: str, cls: type[M], tables: list[EmbeddingBagConfig], config: ElementPruningConfig,
                 ctx: BuildContext) -> M:  # fmt: skip
    """PEP's or DeepLight's module through ``build_sized``: kept elements per table
    (``plan.sizes``; None: dense, unpruned) from the budget or ``target_sparsity``, no plan
    where the method's own rule decides (PEP's thresholds); the planned deployed form,
    built on ``meta``, holds exactly the bytes planned."""
    precision = config.value_precision()

    def cost(t: EmbeddingBagConfig) -> FieldCost:  # (after check_config: a precision sparse tables take)
        n, d = t.num_embeddings, t.embedding_dim
        return FieldCost(t.name, n * d * VALUE_BYTES[precision], 1, n * d - 1, lambda k: sparse_bytes(n, d, k, precision))

    def kept_at_sparsity() -> dict[str, int]:
        s = config.target_sparsity
        assert s is not None
        return {t.name: max(1, t.num_embeddings * t.embedding_dim - round(s * t.num_embeddings * t.embedding_dim))
                for t in tables}  # fmt: skip

    def planned_form(module: M, plan: Plan) -> SparseTables:
        parts = []
        for t in tables:
            n, d, k = t.num_embeddings, t.embedding_dim, plan.sizes[t.name]
            layout = "dense" if k is None else choose(n, d, k, precision, dense=False)
            parts.append(SparseTable(n, d, n * d if k is None else k, layout, precision, torch.device("meta")))
        return SparseTables(tables, parts, module.feature_names)

    return build_sized(
        tables, config, ctx,
        check=lambda: check_config(method, config, tables),
        costs=lambda fmt: [cost(t) for t in tables],
        fixed=lambda fmt: SCALE_BYTES * len(tables) if precision == "int8" else 0,
        sizes=kept_at_sparsity,
        precision=precision,
        construct=lambda plan: cls(tables, config, plan, ctx),
        unplanned=lambda: cls(tables, config, None, ctx),
        deployed=planned_form,
    )  # fmt: skip
