"""The budget planner: from a ``Budget`` to per-table sizes, pure functions of byte costs.

A method describes each table by a ``FieldCost``: the bytes the table holds as a
function of the method's one size knob (hash rows M, collisions c, total rows of the
hybrid, MC slots, mixed dimension ...), non-decreasing on ``[lo, hi]``, and the
bytes of the plain exact table. ``fixed`` is what the module holds whatever the
sizes (hash coefficients, per-feature parameter buffers). ``plan_budget`` then

1. refuses the budget (``BudgetError``) if even the smallest sizes exceed it, saying
   the smallest it can do in bytes and as a ratio;
2. keeps exact every table the method cannot make smaller, and every table whose
   plain form fits its share (as the PKU benchmark's threshold keeps small fields
   whole): for ``scope="model"`` a share is an equal split of the bytes left over
   the tables not yet exact (water-filling, so the small tables stay exact and the
   large ones divide the rest), for ``scope="table"`` a table's own budget; the
   bytes an exact table frees go to the others;
3. splits the rest over the other tables in proportion to their weights (default:
   the budget's per-table shares, i.e. one compression rate for every compressed
   table); a table whose smallest form exceeds its part is pinned at its smallest
   form and the others share what is left (repeated until stable), and a table whose
   plain form fits its part stays exact;
4. gives every compressed table the largest knob within its part, then tops up
   greedily with what rounding left over, so the total lands in ``[0.95, 1.0]`` of
   the target; if the sizes' granularity cannot get within 5%, ``BudgetError`` says
   so.

A method that sizes several tables as one unit (Unified Embedding's groups of
features sharing a table) passes ``units``: unit name -> the source tables it covers.
The costs are then per unit, and a unit's share of the budget is the sum of its
tables' shares.

Example::


    costs = [FieldCost("t_user", full=64_000, lo=1, hi=999, bytes_at=lambda m: 64 * m)]
    plan = plan_budget("hashing", costs, Budget(ratio=10), tables, fixed=32)
    plan.sizes["t_user"]   # rows, or None where the table stays exact
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.budget import BUDGET_TOLERANCE, Budget, BudgetError
from compression.errors import MethodConfigError
from compression.memory import uncompressed_bytes


@dataclass(frozen=True)
class FieldCost:
    """How one table's bytes grow with the method's size knob.

    ``bytes_at`` must be non-decreasing on ``[lo, hi]``; ``full`` is the bytes of the
    plain exact table the method falls back to.
    """

    table: str
    full: int
    lo: int
    hi: int
    bytes_at: Callable[[int], int]

    def largest_within(self, cap: float, lo: int | None = None) -> int | None:
        """The largest knob in ``[lo, hi]`` whose bytes are <= cap (None: none is)."""
        a, b = self.lo if lo is None else lo, self.hi
        if a > b or self.bytes_at(a) > cap:
            return None
        while a < b:
            mid = (a + b + 1) // 2
            if self.bytes_at(mid) <= cap:
                a = mid
            else:
                b = mid - 1
        return a

    @property
    def compressible(self) -> bool:
        return self.lo <= self.hi and self.bytes_at(self.lo) < self.full

    @property
    def smallest(self) -> int:
        return min(self.full, self.bytes_at(self.lo)) if self.lo <= self.hi else self.full


@dataclass
class Plan:
    """Chosen sizes: ``sizes[table]`` is the knob, or None where the table stays exact."""

    sizes: dict[str, int | None]
    bytes: dict[str, int]
    fixed: int
    target: int | None = None
    budget_label: str = "explicit"
    order: list[str] = field(default_factory=list)
    # the format the bytes are counted in (fp32, or the deployed quantized tables)
    precision: str = "fp32"

    @property
    def total(self) -> int:
        return self.fixed + sum(self.bytes.values())

    @property
    def exact(self) -> list[str]:
        return [t for t in self.order if self.sizes[t] is None]

    def describe(self, knob: str, features: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """Flat MLflow params: the budget, the planned bytes, each table's knob."""
        out: dict[str, Any] = {
            "budget": self.budget_label,
            "planned_bytes": self.total,
            "planned_precision": self.precision,
            "uncompressed_fields": ",".join(
                f for t in self.exact for f in (features[t] if features else [t])
            ),
        }
        if self.target is not None:
            out["target_bytes"] = self.target
        for t in self.order:
            out[f"{t}.{knob}"] = "exact" if self.sizes[t] is None else self.sizes[t]
        return out


def _as(precision: str) -> str:
    return "" if precision == "fp32" else f" as {precision} tables"


def _smallest_error(method: str, what: str, target: int, smallest: int, full: int, precision: str,
                    form: str = "") -> BudgetError:  # fmt: skip
    return BudgetError(
        f"{method} cannot reach {what} ({target} bytes): the smallest it can hold these tables in{_as(precision)}{form} "
        f"is {smallest} bytes, a ratio of {full / smallest:.4g}x"
    )


def plan_budget(
    method: str,
    costs: Sequence[FieldCost],
    budget: Budget,
    tables: Sequence[EmbeddingBagConfig],
    fixed: int = 0,
    weights: Mapping[str, float] | None = None,
    units: Mapping[str, Sequence[str]] | None = None,
    precision: str = "fp32",
) -> Plan:
    """Sizes that put the module's bytes within ``[0.95, 1.0]`` of ``budget``.

    ``units`` (unit -> its tables' names): size each unit as one, ``costs`` per unit.
    ``precision``: the format ``costs`` count in (named in the plan and its errors).
    """
    if not isinstance(budget, Budget):
        raise BudgetError(f"{method}: budget must be a Budget, got {budget!r}")
    target = budget.target_bytes(tables)  # validates: zero, negative, too large
    shares = budget.per_table(tables)
    if units is not None:
        shares = {u: sum(shares[t] for t in names) for u, names in units.items()}
    full_total = uncompressed_bytes(tables)
    by_name = {c.table: c for c in costs}
    order = list(units) if units is not None else [t.name for t in tables]
    w = {t: float(weights[t]) if weights is not None else float(max(shares[t], 1)) for t in order}

    smallest = fixed + sum(c.smallest for c in costs)
    if smallest > target:
        raise _smallest_error(method, budget.label(), target, smallest, full_total, precision)

    avail = target - fixed
    forced = {t for t in order if not by_name[t].compressible}  # the method cannot shrink them
    exact = _small_tables(order, by_name, forced, avail, budget.scope == "model", w)
    at_min: set[str] = set()

    def shares_of(pool: set[str]) -> dict[str, float]:
        rest = avail - sum(by_name[t].full for t in exact) - sum(by_name[t].bytes_at(by_name[t].lo) for t in at_min)
        total_w = sum(w[t] for t in pool) or 1.0
        return {t: rest * w[t] / total_w for t in pool}

    pool = {t for t in order if t not in exact}
    # tables whose smallest form exceeds their share take it; the others share the rest
    while pool:
        b = shares_of(pool)
        low = {t for t in pool if by_name[t].bytes_at(by_name[t].lo) > b[t]}
        if not low:
            break
        at_min |= low
        pool -= low
    # tables whose plain form fits their proportional share stay exact too
    while pool:
        b = shares_of(pool)
        fits = {t for t in pool if by_name[t].full <= b[t]}
        if not fits:
            break
        exact |= fits
        pool -= fits

    sizes: dict[str, int | None] = {t: None for t in exact}
    b = shares_of(pool)
    for t in at_min:
        sizes[t] = by_name[t].lo
    for t in pool:
        sizes[t] = by_name[t].largest_within(min(b[t], by_name[t].full - 1))
        assert sizes[t] is not None, t
    plan = Plan(
        sizes=sizes,
        bytes={t: _bytes(by_name[t], sizes[t]) for t in order},
        fixed=fixed,
        target=target,
        budget_label=budget.label(),
        order=order,
        precision=precision,
    )
    _top_up(plan, by_name, target)
    if plan.total > target:  # pragma: no cover - the steps above never overshoot
        raise AssertionError(f"{method}: planned {plan.total} bytes over the target {target}")
    if plan.total < (1 - BUDGET_TOLERANCE) * target and not [t for t in order if plan.sizes[t] is not None]:
        # quantized tables can be smaller than a budget meant for fp32 ones as they are
        raise BudgetError(
            f"{method}: with every table exact{_as(precision)}, the module holds {plan.total} bytes, "
            f"a ratio of {full_total / plan.total:.4g}x, below {budget.label()} ({target} bytes): nothing to "
            f"compress; ask for a higher ratio" + (", or budget_precision: fp32 to size the fp32 tables" if precision != "fp32" else "")
        )
    if plan.total < (1 - BUDGET_TOLERANCE) * target:
        raise BudgetError(
            f"{method} cannot land within {BUDGET_TOLERANCE:.0%} of {budget.label()} ({target} bytes): "
            f"its sizes come in coarse steps and the closest below is {plan.total} bytes"
        )
    return plan


def _small_tables(
    order: list[str], by_name: Mapping[str, FieldCost], forced: set[str], avail: int, equal: bool, w: Mapping[str, float]
) -> set[str]:
    """Tables kept exact because their plain form fits their share (water-filling).

    ``equal`` (model scope): a table's share is an equal split of the bytes not yet
    given to exact tables, so small tables stay exact and the large ones divide the
    rest; otherwise (table scope) a table's share is its own budget's part of it.
    Exact tables are given back, largest first, while the rest could not fit.
    """
    exact = set(forced)
    while True:
        pool = [t for t in order if t not in exact]
        rest = avail - sum(by_name[t].full for t in exact)
        if not pool or rest <= 0:
            break
        total_w = sum(w[t] for t in pool)
        fits = {t for t in pool if by_name[t].full <= (rest / len(pool) if equal else rest * w[t] / total_w)}
        if not fits:
            break
        exact |= fits

    def room(ex: set[str]) -> int:
        return avail - sum(c.full if c.table in ex else c.bytes_at(c.lo) for c in by_name.values())

    for t in sorted(exact - forced, key=lambda t: -by_name[t].full):
        if room(exact) >= 0:
            break
        exact.discard(t)
    return exact


def _bytes(cost: FieldCost, size: int | None) -> int:
    return cost.full if size is None else cost.bytes_at(size)


def _top_up(plan: Plan, by_name: Mapping[str, FieldCost], target: int) -> None:
    """Spend what rounding left: grow compressed tables (largest first) or make them exact."""
    changed = True
    while changed:
        changed = False
        for t in sorted(plan.order, key=lambda t: -plan.bytes[t]):
            size = plan.sizes[t]
            if size is None:
                continue
            c = by_name[t]
            left = target - plan.total
            if left <= 0:
                return
            if c.full <= plan.bytes[t] + left:
                plan.sizes[t], plan.bytes[t] = None, c.full
                changed = True
                continue
            grown = c.largest_within(plan.bytes[t] + left, lo=size)
            if grown is not None and grown > size:
                plan.sizes[t], plan.bytes[t] = grown, c.bytes_at(grown)
                changed = True


def plan_explicit(
    method: str,
    costs: Sequence[FieldCost],
    sizes: Mapping[str, int],
    tables: Sequence[EmbeddingBagConfig],
    fixed: int = 0,
    units: Mapping[str, Sequence[str]] | None = None,
) -> Plan:
    """Sizes given by the user (no budget); a table the knob would not shrink stays exact."""
    by_name = {c.table: c for c in costs}
    order = list(units) if units is not None else [t.name for t in tables]
    chosen: dict[str, int | None] = {}
    for t in order:
        c, s = by_name[t], sizes[t]
        if s < c.lo:
            raise MethodConfigError(f"{method}: size {s} for table '{t}' is below the smallest allowed ({c.lo})")
        chosen[t] = None if (s > c.hi or c.bytes_at(s) >= c.full) else s
    return Plan(
        sizes=chosen,
        bytes={t: _bytes(by_name[t], chosen[t]) for t in order},
        fixed=fixed,
        order=order,
    )
