"""OptEmbed (Lyu et al., CIKM 2022): learned row pruning, per-field dimension search,
retraining, and a compact export, as one method with its own four-stage schedule.

1. ``supernet``: every field f has a learnable threshold t_f. A row e is kept when
   its importance exceeds t_f: mask = step(imp(e) - t_f), whose backward is the
   reference code's surrogate (2 - 4|x| for |x| <= 0.4, 0.4 for |x| <= 1, 0 beyond).
   The loss adds alpha * sum_f exp(-t_f); thresholds train with their own SGD. At the
   same time each (sample, field) keeps only the first i dims, i ~ U{1..D}, so every
   architecture trains in the one supernet. Validation uses no dimension masks.
2. ``search``: evolution over one dim per field (population 10 mutations + 10
   crossovers, mutation probability 0.1, 30 generations, top-15 parents), fitness the
   supernet's validation AUC under the candidate's dims. With a ``budget``, candidates
   must fit it (a field may then take dim 0: dropped), so the search answers "the best
   architecture that fits this budget".
3. ``retrain``: the rows kept and dims found are fixed; the whole model restarts from the
   weights it was built with (``retrain_from="scratch"``: tables and dense layers) or goes
   on from the supernet.
4. ``compact``: each field becomes a TorchRec table of only its kept rows at its dim,
   plus one zero row for pruned ids, behind a sorted int32 list of kept ids
   (``torch.searchsorted`` remap, 4 bytes per kept row, counted); a field that kept
   every row needs neither. Output is padded with zeros back to D, exactly what the
   masked model computes, so DLRM takes it.

Importance is the row's L1 norm over a running mean of the norms of the rows the field
looked up, so a threshold is in units of "the field's typical row" whatever the scale. A
masked row still learns in the supernet (straight through), so a row masked before it had
learned can come back. The guard (``compression.prune_guard``) checks each supernet epoch's
pruning against the same supernet unpruned, on validation, and in the paper's setting
backs the thresholds off past ``guard_tolerance``. Pruning to a level (``target_kept``, or
a budget) raises a floor over the first ``prune_ramp`` of the supernet's steps, one cut
across tables by importance times use. ``budget: null`` and ``target_kept: null`` is the
paper's setting: the thresholds alone decide. The schedule is ``compression.optembed_schedule``,
the byte model ``compression.optembed_bytes``; why each choice was made, with its
measurements, is in ``docs/methods.md`` (OptEmbed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression import optembed_schedule as schedule
from compression.api import BuildContext, register
from compression.bags import bag_index, collections_by_dim, unpooled
from compression.base import CompressedEmbeddingBagCollection
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.deployed import TableFormat
from compression.optembed_bytes import export_bytes
from compression.prune_guard import (
    add_guard_state,
    drop_guard_state,
)
from compression.pruned import CompactTables
from compression.sizing import BudgetedConfig, Reach, build_sized
from compression.stages import Stage

log = logging.getLogger(__name__)
# rows drawn to estimate a table's initial row norm when its tables are on meta (no values)
NORM_SAMPLE_ROWS = 4096


class SurrogateStep(torch.autograd.Function):
    """Heaviside step forward; the reference code's piecewise-linear gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        a = x.abs()
        slope = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * slope


@dataclass
class OptEmbedConfig(BudgetedConfig):
    """OptEmbed. ``budget: null`` is the paper's setting (no memory constraint); a budget
    bounds the compact export (its deployed, quantized form when the config quantizes)."""

    method: ClassVar[str] = "optembed"
    unbudgeted: ClassVar[Optional[str]] = "its learned thresholds and the dim search (the paper's setting)"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"alpha": (1e-2, 3e-2)}
    sized_by_stages: ClassVar[bool] = True
    budget: Optional[Budget] = None
    alpha: float = bounded(1e-2, ge=0)
    threshold_lr: float = bounded(0.1, ge=0)
    threshold_init: float = 0.0
    norm_momentum: float = bounded(0.99, ge=0, lt=1)
    supernet_epochs: Optional[int] = bounded(None, ge=1)
    retrain_epochs: Optional[int] = bounded(None, ge=1)
    retrain_from: str = one_of("scratch", "scratch", "supernet")
    mutations: int = bounded(10, ge=0)
    crossovers: int = bounded(10, ge=0)
    mutation_prob: float = bounded(0.1, ge=0, le=1)
    generations: int = bounded(30, ge=0)
    parents: int = bounded(15, ge=1)
    search_val_batches: Optional[int] = bounded(None, ge=1)
    # row pruning to a level asked for (see the module docstring): keep this fraction of all
    # rows after the supernet (None: the thresholds alone decide, the paper's setting, unless
    # a budget sets it); the floor rises over the first prune_ramp of the supernet's steps
    target_kept: Optional[float] = bounded(None, gt=0, le=1)
    prune_ramp: float = bounded(0.5, ge=0, le=1)
    prune_every_steps: int = bounded(10, ge=1)
    # under a budget without target_kept: keep the rows the budget holds at this share of
    # each table's dim (the search then chooses the dims)
    budget_dim_share: float = bounded(0.5, gt=0, le=1)
    # the supernet's pruning checked after each epoch against the same supernet unpruned,
    # on validation (compression.prune_guard): where it costs more AUC than this, the
    # thresholds back off and stop; None: the cost is logged only. Without a target (the
    # paper's setting) only: a target or budget must be met
    guard_tolerance: Optional[float] = bounded(0.001, ge=0)
    # validation batches each of the guard's evaluations reads (None: the whole split)
    guard_val_batches: Optional[int] = bounded(None, ge=1)

    @classmethod
    def contract_examples(cls) -> list[OptEmbedConfig]:
        return [cls(), cls(budget=Budget(ratio=4))]


class OptEmbedCollection(CompressedEmbeddingBagCollection):
    """The OptEmbed supernet (modes ``supernet``, ``fixed``) and, after ``compact()``,
    its compact export. The unit of pruning and dimension search is a table (a field;
    features sharing a table share its rows, threshold and dim); every feature's output
    keeps its table's full dim D_t, zero-padded."""

    guard_thresholds: torch.Tensor  # (compression.prune_guard's state)
    guard_stopped: torch.Tensor

    def __init__(self, tables: list[EmbeddingBagConfig], config: OptEmbedConfig, ctx: BuildContext) -> None:
        super().__init__(tables, config=ctx.config)
        self.config = config
        self.seed = ctx.seed
        self.units = [t.name for t in tables]
        self.unit_features = [list(t.feature_names) for t in tables]
        self.full_dims = [t.embedding_dim for t in tables]
        self.rows = [t.num_embeddings for t in tables]
        self._unit_of = {f: i for i, t in enumerate(tables) for f in t.feature_names}
        # what the budget counts the compact export in (fp32, or its quantized tables)
        self.table_format = config.table_format(ctx.device)
        # TorchRec's EmbeddingCollection holds tables of one dim: one collection per dim
        self.ec = collections_by_dim([unpooled(t) for t in tables], ctx.table_device)
        n = len(tables)
        self.thresholds = nn.Parameter(torch.full((n,), float(config.threshold_init), device=ctx.device))
        # start the running row-norm scale at the initial tables' mean
        scale = torch.stack([initial_row_norm(w, c) for w, c in zip(self.weights(), self.table_configs())])
        self.register_buffer("norm_scale", scale.clamp_min(1e-12).to(ctx.device))
        self.register_buffer("unit_dims", torch.tensor(self.full_dims, dtype=torch.int64, device=ctx.device))
        for u, rows in zip(self.units, self.rows):  # one flag per row: where the tables are
            self.register_buffer(f"kept_{u}", torch.ones(rows, dtype=torch.bool, device=ctx.table_device))
        # supernet training steps taken (the pruning floor's schedule; resumes with the model)
        self.register_buffer("supernet_steps", torch.zeros((), dtype=torch.int64, device=ctx.device))
        # the pruning guard's state: the last thresholds it accepted, whether it stopped them
        add_guard_state(self)
        self.open_units: frozenset[int] = frozenset()  # fields read unpruned (the guard's look)
        self._ramp_steps = 0  # steps over which the floor reaches the target (set by the stage)
        self._target_kept: Optional[float] = None
        self._target_known = False
        if self.kept_target() is not None:  # lookups per row: what a row is worth is how often it is used
            for u, rows in zip(self.units, self.rows):
                self.register_buffer(f"seen_{u}", torch.zeros(rows, dtype=torch.float32, device=ctx.table_device))
        self.mode = "supernet"
        # the rest of the model's initial weights (a copy taken when the supernet starts; not state)
        self._dense_init: dict[str, torch.Tensor] | None = None
        self.compact_module: CompactTables | None = None
        self.history: dict[str, list[Any]] = {"thresholds": [], "kept": [], "rows": [], "fitness": []}

    def weights(self) -> list[torch.Tensor]:
        """The full table of every unit, in unit order."""
        return [self.ec[f"d{d}"].embeddings[u].weight for u, d in zip(self.units, self.full_dims)]  # type: ignore[index,union-attr]

    def table_configs(self) -> list[EmbeddingConfig]:
        """The TorchRec config (its ``init_fn`` included) of every unit's table, in unit order."""
        configs = {c.name: c for ec in self.ec.values() for c in ec.embedding_configs()}  # type: ignore[operator]
        return [configs[u] for u in self.units]

    # -- parameters and schedule --------------------------------------------------------
    def table_parameters(self) -> list[nn.Parameter]:
        if self.compact_module is not None:
            return list(self.compact_module.ebc.parameters()) if self.compact_module.ebc is not None else []
        return list(self.ec.parameters())

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD([self.thresholds], lr=self.config.threshold_lr)]

    def regularization(self) -> torch.Tensor | None:
        if self.mode == "supernet" and self.training and not self.guard_stopped:
            return self.config.alpha * torch.exp(-self.thresholds).sum()
        return None

    def stages(self) -> list[Stage]:
        c = self.config
        return [
            Stage("supernet", run=partial(schedule.supernet, self),
                  params={"alpha": c.alpha, "threshold_lr": c.threshold_lr}, at_budget=False),
            Stage("search", run=partial(schedule.search, self),
                  params={"generations": c.generations, "mutations": c.mutations, "crossovers": c.crossovers,
                          "mutation_prob": c.mutation_prob, "parents": c.parents}),
            Stage("retrain", run=partial(schedule.retrain, self), params={"retrain_from": c.retrain_from}),
            Stage("compact", run=partial(schedule.compact_stage, self), checkpoint=False),
        ]  # fmt: skip

    # -- the pruning floor (compression.optembed_schedule) ------------------------------
    def kept_target(self) -> Optional[float]:
        """The fraction of all rows the supernet keeps (None: the thresholds alone decide)."""
        return schedule.kept_target(self)

    def apply_floor(self, keep: float) -> None:
        """Keep at most ``keep`` of all rows, those worth most (``schedule.apply_floor``)."""
        schedule.apply_floor(self, keep)

    def freeze_rows(self) -> None:
        """Fix the kept rows from the thresholds (at the target level, when there is one)."""
        schedule.freeze_rows(self)

    def figures(self) -> dict[str, Any]:
        """Plots of the schedule (thresholds, kept rows, search fitness, dims)."""
        return schedule.figures(self)

    # -- forward ----------------------------------------------------------------------
    def importance(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """Row importance in units of the table's typical looked-up row norm."""
        # a copy of the scale: the running mean is updated in place after the division
        return rows.abs().sum(dim=-1) / self.norm_scale[i].clone()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        if self.compact_module is not None:
            return self.compact_module(features)
        lookups = {f: jt for ec in self.ec.values() for f, jt in ec(features).items()}
        batch = features.stride()
        sampling = self.mode == "supernet" and self.training
        floor = self.mode == "supernet" and self.kept_target() is not None
        if sampling and floor:
            schedule.advance_floor(self)
        pooled = []
        for f in self.feature_names:
            i = self._unit_of[f]
            dim = self.full_dims[i]
            jt = lookups[f]
            e = jt.values()
            if self.mode == "supernet":
                if sampling and e.numel():
                    with torch.no_grad():
                        m = self.config.norm_momentum
                        self.norm_scale[i] = m * self.norm_scale[i] + (1 - m) * e.abs().sum(dim=-1).mean()
                t = self.thresholds[i].detach() if self.guard_stopped else self.thresholds[i]
                mask = SurrogateStep.apply(self.importance(i, e) - t)
                if i in self.open_units:  # the guard's look at the same supernet unpruned
                    mask = torch.ones_like(mask)
                if floor and i not in self.open_units:  # the rows the pruning schedule has cut so far
                    ids = features[f].values()
                    if sampling:
                        getattr(self, f"seen_{self.units[i]}").index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
                    mask = mask * getattr(self, f"kept_{self.units[i]}")[ids].to(e.dtype)
            else:
                mask = getattr(self, f"kept_{self.units[i]}")[features[f].values()].to(e.dtype)
            seg = bag_index(jt.lengths(), e.shape[0])
            m = mask.unsqueeze(-1)
            if sampling:  # a masked row still learns what the loss wants of it (see the module)
                kept = e * m + (e - e.detach()) * (1 - m.detach())
            else:
                kept = e * m
            bag = torch.zeros(batch, dim, device=e.device, dtype=e.dtype).index_add(0, seg, kept)
            if sampling:  # each (sample, feature) keeps its first i ~ U{1..D} dims
                keep = torch.randint(1, dim + 1, (batch, 1), device=e.device)
            else:
                keep = self.unit_dims[i].expand(batch, 1)
            pooled.append(bag * (torch.arange(dim, device=e.device) < keep).to(bag.dtype))
        return KeyedTensor(
            keys=self.feature_names, length_per_key=[p.shape[1] for p in pooled], values=torch.cat(pooled, dim=1)
        )

    # -- rows, dims, bytes ---------------------------------------------------------------
    def kept_counts(self) -> list[int]:
        if self.compact_module is not None:
            return [self.compact_module.kept_count(i) for i in range(len(self.units))]
        return [int(getattr(self, f"kept_{u}").sum()) for u in self.units]

    def search_space(self) -> list[int]:
        """Smallest dim per table: 1 without a budget; 0 (table dropped) with one."""
        return [0 if self.config.budget is not None else 1] * len(self.units)

    def candidate_bytes(self, dims) -> int:
        """Bytes the compact export of ``dims`` holds with the rows now kept."""
        return self.bytes_of(self.kept_counts(), list(dims))

    def bytes_of(self, kept: list[int], dims: list[int]) -> int:
        """Bytes of a compact export keeping ``kept`` rows per table at ``dims``, its tables in
        the format the budget counts (``table_format``): ``optembed_bytes.export_bytes``."""
        return export_bytes(self.table_format, self.units, self.unit_features, self.rows, kept, dims)

    def training_metrics(self) -> dict[str, float]:
        """Thresholds and kept-row ratios per table at each supernet epoch end (recorded)."""
        if self.mode != "supernet" or self.compact_module is not None:
            return {}
        out = self.threshold_metrics()
        self.history["rows"].append(out["kept_row_ratio"])
        self.history["thresholds"].append([out[f"threshold.{u}"] for u in self.units])
        self.history["kept"].append([out[f"kept_ratio.{u}"] for u in self.units])
        return out

    def threshold_metrics(self) -> dict[str, float]:
        """Each table's threshold and the fraction of its rows the threshold keeps."""
        out: dict[str, float] = {}
        kept = 0
        with torch.no_grad():
            for i, (u, w) in enumerate(zip(self.units, self.weights())):
                kept_rows = self.importance(i, w) > self.thresholds[i]
                if self.kept_target() is not None:
                    kept_rows &= getattr(self, f"kept_{u}")
                k = int(kept_rows.sum())
                kept += k
                out[f"threshold.{u}"] = float(self.thresholds[i])
                out[f"kept_ratio.{u}"] = k / self.rows[i]
        out["kept_row_ratio"] = kept / sum(self.rows)  # beside the epoch's val AUC: AUC against rows kept
        return out

    @torch.no_grad()
    def compact(self) -> None:
        """Replace the full tables by the kept rows at each table's dim (in place)."""
        dims = [int(d) for d in self.unit_dims]
        kept = [torch.nonzero(getattr(self, f"kept_{u}")).flatten() for u in self.units]
        module = CompactTables(self.units, self.unit_features, kept, dims, self.full_dims, self.feature_names,
                               self.unit_dims.device, self.rows)
        for i, (w, ids, d) in enumerate(zip(self.weights(), kept, dims)):
            if d > 0 and module.identity[i]:
                module.table(i).copy_(w[:, :d])
            elif d > 0:
                module.table(i).copy_(torch.cat([w[ids, :d], torch.zeros(1, d, device=w.device)]))
        self.compact_module = module
        del self.ec
        self.ec = None  # type: ignore[assignment]
        for u in self.units:
            delattr(self, f"kept_{u}")
            self.register_buffer(f"kept_{u}", torch.zeros(0, dtype=torch.bool))
        del self.supernet_steps  # the supernet's schedule and guard: not part of the export
        drop_guard_state(self)
        for u in self.units:
            if hasattr(self, f"seen_{u}"):
                delattr(self, f"seen_{u}")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.config.budget.label() if self.config.budget else "none"}
        for u, d in zip(self.units, self.unit_dims.tolist()):
            out[f"{u}.dim"] = d
        return out

@torch.no_grad()
def initial_row_norm(weight: torch.Tensor, config: EmbeddingConfig) -> torch.Tensor:
    """The mean L1 norm of a table's rows as initialised.

    A table on ``meta`` holds no values (DMP, or the memory pre-flight, allocates
    none): its rows' expected norm is then measured on a sample of rows drawn by the
    table's own ``init_fn``, so building on meta needs no real table.
    """
    if weight.device.type != "meta":
        return weight.abs().sum(dim=1).mean()
    sample = torch.empty(min(config.num_embeddings, NORM_SAMPLE_ROWS), config.embedding_dim)
    assert config.init_fn is not None  # TorchRec's EmbeddingConfig sets its default
    config.init_fn(sample)
    return sample.abs().sum(dim=1).mean()


def _reach(tables: list[EmbeddingBagConfig], fmt: TableFormat) -> Reach:
    """The smallest export the search can reach: one field kept at dim 1 (one row of it, or
    all its rows where that is smaller: no kept-id list), the rest dropped."""
    n = len(tables)
    units, feats, rows = [t.name for t in tables], [list(t.feature_names) for t in tables], [t.num_embeddings for t in tables]
    one = [export_bytes(fmt, units, feats, rows, [kept if i == k else 1 for i in range(n)], [int(i == k) for i in range(n)])
           for k in range(n) for kept in (1, rows[k])]  # fmt: skip
    return Reach(min(one), "one field kept at dim 1")


@register(OptEmbedConfig)
def build(tables: list[EmbeddingBagConfig], config: OptEmbedConfig, ctx: BuildContext) -> OptEmbedCollection:
    return build_sized(tables, config, ctx, search=lambda fmt: _reach(tables, fmt),
                       unplanned=lambda: OptEmbedCollection(tables, config, ctx))  # fmt: skip
