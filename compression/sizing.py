"""The one path from a budgeted config to its module (``build_sized``), and the config base
of every budgeted method (``BudgetedConfig``).

Every budgeted method builds through ``build_sized``, in one of three ways: planned (its
sizes come from the budget or its explicit sizes before training, and the module holds
exactly the bytes planned), searched (``search``: a stage of its schedule chooses the
sizes within the budget; here the budget is checked against what the search can reach),
or by its own rule (``BudgetedConfig.unbudgeted``: neither budget nor explicit sizes,
PEP's learned thresholds, OptEmbed's paper setting).

A method describes its tables' bytes as functions of its one size knob (``FieldCost``,
``compression.budget_plan``, where the planner splits a budget over the tables);
Bytes are those of a ``TableFormat`` (``compression.deployed``): fp32 tables, or,
when a config quantizes and its budget means the deployed module (the default), the
quantized tables it will hold. ``BudgetedConfig`` is the base of every budgeted
method's config; ``build_sized`` is the one path from its budget to its module:
check, costs, fixed bytes, plan, construct, verify (the module holds exactly the
bytes planned, counted from its tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, TypeVar

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.api import BuildContext, CompressionConfig
from compression.base import CompressedEmbeddingBagCollection
from compression.budget import Budget, BudgetError
from compression.budget_plan import (  # noqa: F401  (re-exported)
    FieldCost,
    Plan,
    _smallest_error,
    _top_up,
    plan_budget,
    plan_explicit,
)
from compression.config_checks import one_of
from compression.deployed import TableFormat, deployed_bytes
from compression.memory import uncompressed_bytes
from compression.quantization import as_quantization, check_quantizable, row_alignment

# what a budget counts when the config quantizes its tables (BudgetedConfig.budget_precision)
BUDGET_PRECISIONS = ("deployed", "fp32")
B = TypeVar("B", bound="BudgetedConfig")
M = TypeVar("M", bound=CompressedEmbeddingBagCollection)


@dataclass
class BudgetedConfig(CompressionConfig):
    """Base of every method whose sizes come from a memory ``budget``.

    ``budget``: ``Budget(ratio=10)`` (10x smaller than the fp32 tables) or
    ``Budget(bytes=...)``; None: the method's explicit sizes (``explicit_sizes()``).
    ``budget_precision``: what the budget counts when the config also quantizes:

    - ``"deployed"`` (default): the bytes the deployed module holds, its tables
      quantized. "10x with int8" is a module 10x smaller than the fp32 tables once
      quantized; the method sizes its tables for int8 rows (more rows than for fp32),
      and trains them in fp32, above the budget until the ``quantize`` stage.
    - ``"fp32"``: the bytes of the fp32 tables it trains; quantization then shrinks
      them below the budget ("10x, then int4" ends near 50x at dim 16).

    "deployed" is the default because a budget is a memory limit for serving: a user
    who asks for "10x with int8" expects the model they deploy to be 10x smaller, and
    gets more rows for it (about 3x at dim 16) than an fp32 plan would leave them.

    Example::

        QRConfig(budget=Budget(ratio=10), quantization=Quantization("int8"))   # 10x as deployed
        QRConfig(budget=Budget(ratio=10), quantization=Quantization("int8"), budget_precision="fp32")
    """

    # what sizes the method when it has neither a budget nor explicit sizes (None: one of
    # them is required, and build_sized refuses a config with neither)
    unbudgeted: ClassVar[Optional[str]] = None

    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=10))
    budget_precision: str = one_of("deployed", *BUDGET_PRECISIONS)

    def with_budget(self: B, budget: Budget | None) -> B:
        return dataclasses.replace(self, budget=budget)

    def budget_label(self) -> str:
        return self.budget.label() if self.budget is not None else "none"

    def explicit_sizes(self) -> dict[str, Any]:
        """The knobs that size the method without a budget (budget: null), by name."""
        return {}

    def table_format(self, device: torch.device) -> TableFormat:
        """The format the budget counts the tables in: their quantized form when the
        config quantizes and the budget means the deployed module, else fp32. Row
        alignment: the quantization's, else fbgemm's default on ``device``."""
        q = as_quantization(self.quantization)
        if q is None or self.budget is None or self.budget_precision == "fp32":
            return TableFormat()
        return TableFormat(q.precision, row_alignment(q.row_alignment, device))


def check_exclusive(method: str, budget: Budget | None, **overrides: Any) -> None:
    """Exactly one of a budget or explicit sizes; a clear line naming both otherwise."""
    given = [k for k, v in overrides.items() if v is not None]
    if budget is not None and given:
        raise BudgetError(
            f"{method}: set either a budget or {'/'.join(given)}, not both "
            f"(set budget: null to use explicit sizes)"
        )
    if budget is None and not given:
        raise BudgetError(f"{method}: needs a budget or explicit sizes ({'/'.join(overrides)})")


@dataclass(frozen=True)
class Reach:
    """The bytes a searched method's forms can hold: its smallest form's (``form`` says
    what that is) and its largest's (None: no lower bound is checked)."""

    smallest: int
    form: str
    largest: Optional[int] = None

    def check(self, method: str, budget: Budget, tables: Sequence[EmbeddingBagConfig], precision: str) -> int:
        """The budget's target bytes, or a ``BudgetError`` naming the ratio the method can reach."""
        target = budget.target_bytes(tables)
        full = uncompressed_bytes(tables)
        if self.smallest > target:
            raise _smallest_error(method, budget.label(), target, self.smallest, full, precision, f" ({self.form})")
        if self.largest is not None and self.largest < 0.95 * target:
            as_ = "" if precision == "fp32" else f" as {precision} tables"
            raise BudgetError(f"{method}: with every field at its full size{as_} the module holds {self.largest} bytes, "
                              f"a ratio of {full / self.largest:.4g}x, below {budget.label()}: nothing to compress")  # fmt: skip
        return target


def verify(method: str, plan: Plan, actual: int) -> None:
    """The built module must hold exactly the bytes planned (bytes are counted, not guessed)."""
    if actual != plan.total:
        raise AssertionError(f"{method}: planned {plan.total} bytes but the module holds {actual}")


def build_sized(
    tables: list[EmbeddingBagConfig],
    config: BudgetedConfig,
    ctx: BuildContext,
    *,
    construct: Callable[[Plan], M] | None = None,
    unplanned: Callable[[], M] | None = None,
    costs: Callable[[TableFormat], Sequence[FieldCost]] | None = None,
    fixed: Callable[[TableFormat], int] | None = None,
    check: Callable[[], object] | None = None,
    sizes: Callable[[], Mapping[str, int]] | None = None,
    units: Mapping[str, Sequence[str]] | None = None,
    weights: Mapping[str, float] | None = None,
    settle: Callable[[TableFormat, Plan], int] | None = None,
    deployed: Callable[[M, Plan], nn.Module] | None = None,
    search: Callable[[TableFormat], Reach] | None = None,
    precision: str | None = None,
) -> M:
    """The one path from a budgeted config to its module: check, costs, fixed bytes,
    plan, construct, verify.

    The method supplies what is its own: ``costs(fmt)`` (one ``FieldCost`` per table,
    or per unit of ``units``, in the bytes of ``fmt``), ``fixed(fmt)`` (bytes held
    whatever the sizes) and ``construct(plan)``; optionally ``check()`` (its config
    against the tables, after budget-or-sizes), ``sizes()`` (explicit sizes per table
    or unit when there is no budget; default: the config's one explicit knob for
    every table), ``weights`` (each table's share of a model-scope budget) and
    ``settle(fmt, plan)``, the fixed bytes of the sizes chosen where they depend on
    them (at most ``fixed(fmt)``: what that frees is spent on the tables), and, for a
    method that reaches its budgeted form in a stage of its schedule (``sized_by_stages``:
    dedup's merge, ITEP's compact, DPQ's pack), ``deployed(module, plan)``: that form on
    ``meta``, which is what the budget and the quantization are checked against.

    A method whose sizes a stage searches within the budget gives ``search(fmt)``
    instead of costs: what its forms can reach (``Reach``), against which the budget is
    checked here, and ``unplanned()`` to make its module without a plan. A method sized by
    its own rule (``BudgetedConfig.unbudgeted``) is made by ``unplanned()`` when it has
    neither budget nor explicit sizes.
    ``precision``: the format the costs count in where it is not the tables' format
    (element pruning's sparse values).

    Example::

        @register(HashingConfig)
        def build(tables, config, ctx):
            return build_sized(tables, config, ctx,
                               costs=lambda fmt: [_cost(t, fmt) for t in tables],
                               fixed=lambda fmt: UniversalHash.nbytes(1) + fmt.collection(tables),
                               construct=lambda plan: HashedEmbeddingBagCollection(tables, plan, ctx))
    """
    method = type(config).method
    explicit = config.explicit_sizes()
    own_rule = config.unbudgeted is not None and config.budget is None and all(v is None for v in explicit.values())
    if not own_rule:
        check_exclusive(method, config.budget, **explicit)
    if check is not None:
        check()
    fmt = config.table_format(ctx.device)
    if own_rule or search is not None:
        if search is not None and config.budget is not None:
            search(fmt).check(method, config.budget, tables, fmt.precision)
        assert unplanned is not None, f"{method}: build_sized needs unplanned() to build without a plan"
        built = unplanned()
        built.sizing = "own rule" if own_rule else "search"
        return built
    assert costs is not None and fixed is not None and construct is not None, \
        f"{method}: build_sized needs costs, fixed bytes and construct(plan), or a search"
    counted_in = precision or fmt.precision
    priced, held = list(costs(fmt)), fixed(fmt)
    if config.budget is not None:
        plan = plan_budget(method, priced, config.budget, tables, held, weights, units, counted_in)
    else:
        if sizes is None:
            (size,) = [v for v in explicit.values() if v is not None]
            names = list(units) if units is not None else [t.name for t in tables]
            chosen: Mapping[str, int] = {n: size for n in names}
        else:
            chosen = sizes()
        plan = plan_explicit(method, priced, chosen, tables, held, units=units)
    if settle is not None:
        plan.fixed = settle(fmt, plan)
        if plan.target is not None:
            _top_up(plan, {c.table: c for c in priced}, plan.target)
    module = construct(plan)
    form: nn.Module = module if deployed is None else deployed(module, plan)
    if fmt.quantized:  # a format the tables cannot take is refused here, not miscounted
        q = as_quantization(config.quantization)
        assert q is not None
        check_quantizable(form, q, method)
    verify(method, plan, deployed_bytes(form, fmt))
    module.sizing = "plan"
    return module
