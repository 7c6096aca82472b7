"""Mixed-dimension embeddings (Ginart et al., ISIT 2021): a dim per field, projected back.

Every table keeps all its rows but gets its own dim d_t <= d, by the paper's power
rule d_t proportional to n_t^(-alpha): n_t is the table's cardinality
(``rule="cardinality"``) or its cardinality over its train traffic
(``rule="popularity"``, from ``BuildContext.counts``: a table whose rows are rarely
read gets fewer dims). A bias-free ``Linear(d_t, d)`` (dense, trained by Adam; its
bytes counted) maps the field back to the model's dim; a table that keeps d_t = d is
a plain exact table with no projection.

The budget sets the rule's scale (``compression.sizing``, with per-table weights
n_t^(1-alpha), the bytes the rule gives each table, for ``scope="model"``). So that
the bytes can land within 5% of any budget, a table's size is a number of scalars s
rather than a whole dim: ids [0, r) get d_t values and ids [r, N) get d_t - 1, with
N·(d_t - 1) + r = s (the paper's blocks by popularity, in two blocks; ids are
numbered by descending train frequency, so the first r are the most frequent). Both
blocks share the projection (the lower block's missing last value is zero). The
smallest form is d_t = 1 (about 1/dim of the fp32 bytes: higher ratios raise a
``BudgetError`` with that figure). Or give whole ``dims`` per table (budget: null).

Ids: rows are exact, so ids outside [0, N) are refused with ``IdOutOfRangeError``
naming the feature, as the uncompressed baseline does.

Example::

    ebc = compress(tables, MixedDimConfig(budget=Budget(ratio=4), alpha=0.3))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import bag_index, pooled_lookup
from compression.budget import Budget
from compression.config_checks import one_of
from compression.deployed import TableFormat
from compression.formats import FP32_BYTES
from compression.idmap import IdMappedCollection, KeyParams, feature_order, in_order, inner_table
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

RULES = ("cardinality", "popularity")


@dataclass
class MixedDimConfig(BudgetedConfig):
    """Per-table dims by the power rule; ``budget`` sets its scale, or give ``dims``."""

    method: ClassVar[str] = "mixed_dim"
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"alpha": (0.2, 0.3, 0.5)}
    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=4))
    # the power rule's temperature: 0 gives every table the same dim
    alpha: float = 0.3
    rule: str = one_of("cardinality", *RULES)
    # explicit dim per table name (budget: null); tables not listed keep their dim
    dims: Optional[dict[str, int]] = None

    def explicit_sizes(self) -> dict[str, Any]:
        return {"dims": self.dims}

    @classmethod
    def contract_examples(cls) -> list[MixedDimConfig]:
        return [cls(), cls(rule="popularity", budget=Budget(ratio=2)), cls(budget=None, dims={"t_big": 3, "t_mid": 5})]


def power_weights(
    tables: list[EmbeddingBagConfig], config: MixedDimConfig, counts: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Bytes weight per table, n_t^(1 - alpha), n_t from cardinality or popularity."""
    out = {}
    for t in tables:
        n = float(t.num_embeddings)
        if config.rule == "popularity":
            missing = [f for f in t.feature_names if f not in counts]
            if missing:
                raise MethodConfigError(f"mixed_dim with rule='popularity' needs the train counts of feature(s) {missing}")
            traffic = float(sum(np.asarray(counts[f]).sum() for f in t.feature_names))
            effective = n / max(traffic, 1.0)
            out[t.name] = n * effective ** (-config.alpha)
        else:
            out[t.name] = n ** (1 - config.alpha)
    return out


def split(scalars: int, rows: int) -> tuple[int, int]:
    """A table of ``scalars`` embedding values over ``rows`` ids as (dim, r).

    Ids ``[0, r)`` get ``dim`` values, ids ``[r, rows)`` get ``dim - 1``; ``r`` in
    ``[1, rows]``, so ``scalars = rows·(dim - 1) + r``.
    """
    dim = (scalars - 1) // rows + 1
    return dim, scalars - rows * (dim - 1)


class MixedDimEmbeddingBagCollection(IdMappedCollection):
    """Per source table: rows [0, r) at dim d_t, rows [r, N) at d_t - 1, projected to d."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="scalars", validate_ids=True, config=ctx.config)
        inner: list[EmbeddingBagConfig] = []
        self._split: dict[str, tuple[int, int]] = {}
        per_feature = []  # (table, dim, has lower block) per feature, source order
        for t in tables:
            s = plan.sizes[t.name]
            dim, r = (t.embedding_dim, t.num_embeddings) if s is None else split(s, t.num_embeddings)
            low = r < t.num_embeddings
            inner.append(inner_table(t, rows=r, dim=dim))
            if low:
                inner.append(inner_table(t, f"{t.name}__b", t.num_embeddings - r, dim - 1, [f"{f}__b" for f in t.feature_names]))
            if s is not None:
                self._split[t.name] = (dim, r)
            per_feature += [(t.name, dim, low) for _ in t.feature_names]
        self.ebc = EmbeddingBagCollection(tables=inner, device=ctx.table_device)
        self._inner_keys = feature_order(self.ebc)
        self.projections = nn.ModuleDict(
            {
                t.name: nn.Linear(self._split[t.name][0], t.embedding_dim, bias=False, device=ctx.device)
                for t in tables
                if t.name in self._split
            }
        )
        upper_rows = [self._split[t.name][1] if t.name in self._split else t.num_embeddings for t in tables]
        self.params = KeyParams(
            self.feature_names, {"r": [r for t, r in zip(tables, upper_rows) for _ in t.feature_names]}, device=ctx.device
        )
        # the inner output's blocks in column order (their widths), and which of them is each
        # feature's upper (dim) and lower (dim - 1) block
        self._widths: list[int] = []
        at: dict[str, int] = {}
        for x in inner:
            for f in x.feature_names:
                at[f] = len(self._widths)
                self._widths.append(x.embedding_dim)
        self._blocks = [
            (table, at[f], at[f"{f}__b"] if low else None) for f, (table, _, low) in zip(self.feature_names, per_feature)
        ]
        self._any_lower = any(low for _, _, low in per_feature)

    def _split_blocks(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Ids below r keep their key (upper block); the others go to key ``{f}__b`` as id - r."""
        ids, lengths = features.values(), features.lengths()
        r = self.params.expand(features)["r"]
        upper = ids < r
        bag = bag_index(lengths.long(), ids.numel())
        len_upper = torch.zeros_like(lengths).index_add_(0, bag, upper.to(lengths.dtype))
        names = features.keys()
        return KeyedJaggedTensor(
            keys=names + [f"{k}__b" for k in names],
            values=torch.cat([ids[upper], (ids - r)[~upper]]),
            lengths=torch.cat([len_upper, lengths - len_upper]),
            stride=features.stride(),
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        for t, (dim, r) in self._split.items():
            out[f"{t}.dim"] = dim
            out[f"{t}.rows_at_dim"] = r
        return out

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        inner = self._split_blocks(features) if self._any_lower else features
        pooled = in_order(pooled_lookup(self.ebc, inner), self._inner_keys)
        # one split, not a slice a block: each slice's backward writes a zero gradient as wide
        # as the whole output and adds it up, a split's backward is one concatenation
        blocks = pooled.split(self._widths, dim=1)
        out = []
        for table, upper, lower in self._blocks:
            x = blocks[upper]
            if lower is not None:  # the lower block lacks the last dim: pad it with zero
                x = x + F.pad(blocks[lower], (0, 1))
            out.append(x if table not in self.projections else self.projections[table](x))
        return self.keyed(torch.cat(out, dim=1))


def _cost(t: EmbeddingBagConfig, fmt: TableFormat) -> FieldCost:
    """Bytes at s scalars: rows [0, r) at dim d_t, rows [r, N) at d_t - 1 (a second table
    when there are any), and the fp32 projection d_t -> d (a dense layer, never quantized)."""
    n, d, f = t.num_embeddings, t.embedding_dim, len(t.feature_names)

    def bytes_at(s: int) -> int:
        dim, r = split(s, n)
        lower = fmt.table(n - r, dim - 1, f) if r < n else 0
        return fmt.table(r, dim, f) + lower + FP32_BYTES * d * dim

    return FieldCost(t.name, fmt.table(n, d, f), n, n * d, bytes_at)


def _check_dims(config: MixedDimConfig, tables: list[EmbeddingBagConfig]) -> None:
    dims = dict(config.dims or {})
    unknown = sorted(set(dims) - {t.name for t in tables})
    if unknown:
        raise MethodConfigError(f"mixed_dim: dims name unknown tables {unknown}")
    for name, k in dims.items():
        d = next(t.embedding_dim for t in tables if t.name == name)
        if not 1 <= k <= d:
            raise MethodConfigError(f"mixed_dim: dim {k} for table '{name}' must be in [1, {d}]")


@register(MixedDimConfig)
def build(tables: list[EmbeddingBagConfig], config: MixedDimConfig, ctx: BuildContext) -> MixedDimEmbeddingBagCollection:
    budget, dims = config.budget, dict(config.dims or {})
    weights: dict[str, float] = {}

    def check() -> None:
        if budget is None:
            _check_dims(config, tables)
        else:
            weights.update(power_weights(tables, config, ctx.counts))

    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        check=check,
        costs=lambda fmt: [_cost(t, fmt) for t in tables],
        fixed=lambda fmt: KeyParams.nbytes(1, n_features) + fmt.collection(tables),
        # a model-scope budget shares the bytes by the power rule; a table-scope one is each table's
        weights=weights if budget is not None and budget.scope == "model" else None,
        sizes=lambda: {t.name: t.num_embeddings * dims.get(t.name, t.embedding_dim) for t in tables},
        construct=lambda plan: MixedDimEmbeddingBagCollection(tables, plan, ctx),
    )  # fmt: skip
