"""Element pruning's training form, its schedule steps and its deployed form (PEP, DeepLight).

Training form: each table is a full TorchRec table (an ``EmbeddingCollection`` per dim:
the lookups come back per id, unpooled) and a boolean mask of its elements. A lookup is
``transform(V)[ids] ⊙ M[ids]``, pooled by the table's sum or mean (``compression.sparse.pool``):
``transform`` is the identity (DeepLight; PEP once its thresholds are baked in) or PEP's
soft threshold. Pruned elements get no gradient and are written as 0 where pruning sets
them, so the table itself is sparse.

Pruning is per table (each table's count comes from the plan, so its bytes are exact):
every ``prune_every`` steps of the pruning stage its kept count falls on the cubic
schedule (``cubic_keep``), and at the end of the stage it keeps exactly its count (the
largest |transform(V) ⊙ M|). Evaluation during that stage reads each table already cut to
its count (``read_mask``): otherwise the trainer's best-epoch restore picks an early,
denser epoch (on MovieLens-100K at 10x, epoch 1 at 24% kept: val AUC 0.767, 0.728 once
cut), and the cut then thins it at once; with it, the epoch restored is the best at the
budget and the cut changes nothing the validation saw.

Budget: each table's kept count comes from ``compression.masked_plan.build_masked``
(sparse bytes per kept count, planned by ``compression.sizing.build_sized``), with the
refusals (``check_config``) and the check that the planned deployed form holds the bytes
planned.

Quantization: the deployed tables' values become int8 (one fp32 scale per table,
symmetric, so pruned zeros stay 0) or fp16 in the ``quantize`` stage after ``compact``;
the index arrays are unchanged. The budget counts that form (``budget_precision:
deployed``) or the fp32 one. int4/int2 and quantization-aware training are refused.

Sharding: refused (``sharding_refusal``): the pruning steps rank every element of a table
by magnitude, which a sharded table does not hold on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext
from compression.bags import collections_by_dim, pool, unpooled
from compression.base import CompressedEmbeddingBagCollection, MethodConfigError
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import TableFormat, deployed_bytes
from compression.quantization import as_quantization
from compression.sizing import BudgetedConfig, Plan
from compression.sparse import SparseTable, SparseTables, choose
from compression.stages import Stage, StageContext

PRUNE, FIXED = 0, 1  # phase: the schedule prunes / the mask is fixed


def cubic_keep(total: int, kept: int, t: float) -> int:
    """Elements kept at fraction ``t`` of the ramp: sparsity S(t) = S·(1 - (1 - t)^3)
    (Zhu and Gupta 2017, DeepLight's schedule), S = 1 - kept/total."""
    t = min(max(t, 0.0), 1.0)
    return total - round((total - kept) * (1 - (1 - t) ** 3))


@dataclass
class ElementPruningConfig(BudgetedConfig):
    """Base of the element-pruning configs: a ``budget`` or ``target_sparsity``."""
    sized_by_stages: ClassVar[bool] = True

    budget: Optional[Budget] = None
    target_sparsity: Optional[float] = bounded(None, ge=0, lt=1)
    # epochs of the stage that prunes (None: the trainer's number), and the fraction of its
    # steps over which the kept count falls to the target
    prune_epochs: Optional[int] = None
    prune_ramp: float = bounded(0.75, ge=0, le=1)
    prune_every: int = bounded(10, ge=1)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"target_sparsity": self.target_sparsity}

    def table_format(self, device: torch.device) -> TableFormat:
        """fp32: no TorchRec table is quantized; the sparse tables' values carry the
        precision the budget counts (``value_precision``)."""
        return TableFormat()

    def value_precision(self) -> str:
        """The values' format the budget counts: the quantized one (deployed) or fp32."""
        q = as_quantization(self.quantization)
        if q is None or self.budget is None or self.budget_precision == "fp32":
            return "fp32"
        return q.precision

    def post_training_stages(self) -> list[Stage]:
        """``quantize``: the sparse tables' values to int8 or fp16 (after ``compact``)."""
        q = as_quantization(self.quantization)
        if q is None:
            return []
        precision = q.precision

        def run(ctx: StageContext) -> dict[str, float]:
            module = ctx.module
            assert isinstance(module, MaskedTablesCollection)
            before = module.deployed_bytes()
            module.quantize_values(precision)
            return {**{f"val_{k}": v for k, v in ctx.evaluate().items()},
                    "embedding_bytes_before": float(before), "embedding_bytes": float(module.deployed_bytes())}  # fmt: skip

        return [Stage("quantize", run=run, params={"precision": precision}, checkpoint=False)]


class MaskedTablesCollection(CompressedEmbeddingBagCollection):
    """Full tables with element masks; ``compact()`` makes them ``SparseTables``.

    Subclasses give ``transform`` (what a lookup reads of V) and ``bake`` (write the
    transform into V when the mask is fixed) and their ``stages``.
    """

    phase: torch.Tensor
    steps_taken: torch.Tensor

    def __init__(self, tables: list[EmbeddingBagConfig], config: ElementPruningConfig, plan: Optional[Plan],
                 ctx: BuildContext) -> None:  # fmt: skip
        super().__init__(tables, config=ctx.config)
        self.config, self.plan = config, plan
        self.units = [t.name for t in tables]
        self.numel = [t.num_embeddings * t.embedding_dim for t in tables]
        self._unit_of = {f: i for i, t in enumerate(tables) for f in t.feature_names}
        self.ec = collections_by_dim([unpooled(t) for t in tables], ctx.table_device)
        for t in tables:
            self.register_buffer(f"mask_{t.name}", torch.ones(t.num_embeddings, t.embedding_dim, dtype=torch.bool,
                                                               device=ctx.table_device))  # fmt: skip
        self.register_buffer("phase", torch.tensor(PRUNE, device=ctx.device))
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.int64, device=ctx.device))
        self._ramp_steps = 0
        self.compact_module: Optional[SparseTables] = None
        self.history: list[float] = []
        self._cut: dict[int, torch.Tensor] = {}
        self._cut_key: tuple[int, ...] = ()

    # -- what a subclass gives ---------------------------------------------------------
    def transform(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """What a lookup of table ``i`` reads of its rows ``v`` (before the mask)."""
        return v

    @torch.no_grad()
    def bake(self) -> None:
        """Write ``transform`` into the tables (when the mask becomes fixed)."""

    def on_prune_step(self, step: int) -> None:
        """Every ``prune_every`` training steps of the pruning stage: move the masks."""
        if self.plan is None:
            return
        t = step / self._ramp_steps if self._ramp_steps > 0 else 1.0
        for i, k in enumerate(self.kept_targets()):
            if k is not None:
                self.keep_largest(i, cubic_keep(self.numel[i], k, t))

    # -- tables and masks ----------------------------------------------------------------
    def weight(self, i: int) -> torch.Tensor:
        t = self.source_tables()[i]
        return self.ec[f"d{t.embedding_dim}"].embeddings[t.name].weight  # type: ignore[index,union-attr]

    def mask(self, i: int) -> torch.Tensor:
        return getattr(self, f"mask_{self.units[i]}")

    def kept_targets(self) -> list[Optional[int]]:
        """Each table's planned kept count (None: dense, or no plan)."""
        if self.plan is None:
            return [None] * len(self.units)
        return [self.plan.sizes[u] for u in self.units]

    @torch.no_grad()
    def effective(self, i: int) -> torch.Tensor:
        """The table as the model reads it: transform(V) ⊙ M."""
        return self.transform(i, self.weight(i)) * self.mask(i)

    @torch.no_grad()
    def largest(self, i: int, keep: int) -> torch.Tensor:
        """The mask of the ``keep`` largest |transform(V) ⊙ M| of table ``i`` (ties by position)."""
        score = self.effective(i).abs().flatten()
        order = torch.argsort(score, descending=True, stable=True)
        flags = torch.zeros_like(score, dtype=torch.bool)
        flags[order[:keep]] = True
        return flags.view_as(self.mask(i))

    @torch.no_grad()
    def keep_largest(self, i: int, keep: int) -> None:
        """Mask all but the ``keep`` largest of table ``i`` (per table), and write 0 into V
        where it masks."""
        self.mask(i).copy_(self.largest(i, keep))
        self.weight(i).mul_(self.mask(i))

    def read_mask(self, i: int) -> torch.Tensor:
        """The mask a lookup of table ``i`` applies. Evaluation while pruning sees the cut
        the stage will end with (each table at its planned count), so every epoch's
        validation AUC is that of the budget's sparsity, and the epoch the trainer restores
        as best is the best at the budget, not an early, denser one (which the cut would
        then thin at once). Cached until the tables, masks or thresholds change."""
        if self.training or self.plan is None or int(self.phase) != PRUNE or self.kept_targets()[i] is None:
            return self.mask(i)
        key = tuple(int(p._version) for p in (*self.parameters(), *self.buffers()))
        if self._cut_key != key:
            self._cut = {j: self.largest(j, k) for j, k in enumerate(self.kept_targets()) if k is not None}
            self._cut_key = key
        return self._cut[i]

    def kept_fraction(self) -> dict[str, float]:
        """Non-zero elements the model reads, per table and over all (logged per epoch)."""
        out, total = {}, 0
        for i, u in enumerate(self.units):
            if self.compact_module is not None:
                part = self.compact_module.table(u)
                k = part.values.numel() if part.layout != "dense" else int((part.values != 0).sum())
            else:
                k = int((self.effective(i) != 0).sum())
            total += k
            out[f"kept_fraction.{u}"] = k / self.numel[i]
        out["kept_fraction"] = total / sum(self.numel)
        return out

    # -- forward -------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        if self.compact_module is not None:
            return self.compact_module(features)
        if self.training and int(self.phase) == PRUNE:
            self._cut_key = ()  # (a fused optimizer may update the tables without a version bump)
            step = int(self.steps_taken)
            self.steps_taken += 1
            if step % self.config.prune_every == 0:
                self.on_prune_step(step)
        lookups = {f: jt for ec in self.ec.values() for f, jt in ec(features).items()}
        batch = features.stride()
        pooled = []
        for f in self.feature_names:
            i = self._unit_of[f]
            jt = lookups[f]
            ids = features[f].values()
            e = self.transform(i, jt.values()) * self.read_mask(i)[ids].to(jt.values().dtype)
            pooled.append(pool(e, jt.lengths(), batch, self.source_tables()[i].pooling))
        return KeyedTensor(keys=self.feature_names, length_per_key=[p.shape[1] for p in pooled],
                           values=torch.cat(pooled, dim=1))  # fmt: skip

    # -- schedule steps ------------------------------------------------------------------
    def run_prune(self, ctx: StageContext) -> dict[str, float]:
        """Train while pruning, then fix the masks (exactly the planned counts) and bake."""
        self.phase.fill_(PRUNE)
        self.steps_taken.zero_()
        self._ramp_steps = int(self.config.prune_ramp * ctx.steps(self.config.prune_epochs))
        metrics = ctx.fit(self.config.prune_epochs)  # (its best epoch restored: masks too)
        self.fix_masks()
        ctx.model.to(ctx.device)
        metrics.update({f"cut_val_{k}": v for k, v in ctx.evaluate().items()})
        return {**metrics, **self.kept_fraction()}

    @torch.no_grad()
    def fix_masks(self) -> None:
        """The end of pruning: each planned table keeps exactly its count (largest
        |transform(V) ⊙ M|); without a plan, the non-zeros; then ``bake``."""
        for i, k in enumerate(self.kept_targets()):
            if k is not None:
                self.keep_largest(i, k)
            elif self.plan is None:
                self.mask(i).copy_(self.effective(i) != 0)
        self.bake()
        self.phase.fill_(FIXED)

    def run_fixed(self, ctx: StageContext, epochs: int) -> dict[str, float]:
        """Train the kept elements with the masks fixed."""
        self.phase.fill_(FIXED)
        return {**ctx.fit(epochs), **self.kept_fraction()}

    def run_compact(self, ctx: StageContext) -> dict[str, float]:
        before = self.deployed_bytes()
        self.compact()
        ctx.model.to(ctx.device)
        return {**{f"val_{k}": v for k, v in ctx.evaluate().items()}, "training_bytes": float(before),
                "embedding_bytes": float(self.deployed_bytes()), **self.kept_fraction(),
                **{f"layout.{u}": float(["dense", "csr", "coo"].index(self.layouts()[u])) for u in self.units}}  # fmt: skip

    def deployed_bytes(self) -> int:
        return deployed_bytes(self, TableFormat())

    # -- deployed form -------------------------------------------------------------------
    def layouts(self) -> dict[str, str]:
        """Each table's layout (planned before ``compact``, held after)."""
        if self.compact_module is not None:
            return {u: self.compact_module.table(u).layout for u in self.units}
        out = {}
        for t, k in zip(self.source_tables(), self.kept_targets()):
            out[t.name] = "dense" if k is None else choose(t.num_embeddings, t.embedding_dim, k, dense=False)
        return out

    @torch.no_grad()
    def compact(self) -> None:
        """Replace the full tables and masks by their sparse form (in place)."""
        if self.compact_module is not None:
            return
        if int(self.phase) != FIXED:
            self.fix_masks()
        parts = []
        for i, t in enumerate(self.source_tables()):
            n, d, k = t.num_embeddings, t.embedding_dim, self.kept_targets()[i]
            # planned: dense where the plan keeps the table whole, else its sparse layout;
            # no plan: whichever form is smallest for the count kept
            if self.plan is not None:
                layout = "dense" if k is None else choose(n, d, k, dense=False)
            else:
                layout = choose(n, d, int(self.mask(i).sum()))
            parts.append(SparseTable.from_masked(self.effective(i), self.mask(i), layout))
        self.compact_module = SparseTables(self.source_tables(), parts, self.feature_names)
        del self.ec
        self.ec = None  # type: ignore[assignment]
        for u in self.units:
            delattr(self, f"mask_{u}")
        del self.phase, self.steps_taken
        self.drop_training_state()

    def drop_training_state(self) -> None:
        """Remove what only training needs (e.g. PEP's thresholds) after ``compact``."""

    def quantize_values(self, precision: str) -> None:
        if self.compact_module is None:
            raise MethodConfigError(f"{self.config.method}: quantize needs the sparse tables: run compact first")
        self.compact_module.quantize_(precision)

    def table_parameters(self) -> list[nn.Parameter]:
        return [] if self.ec is None else list(self.ec.parameters())

    def sharding_refusal(self) -> str | None:
        return (f"{self.config.method}: its pruning ranks every element of a table by magnitude, which a sharded "
                "table does not hold on one rank; train it unsharded")  # fmt: skip

    def training_metrics(self) -> dict[str, float]:
        if self.compact_module is not None:
            return {}
        out = self.kept_fraction()
        self.history.append(out["kept_fraction"])
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = self.plan.describe("kept") if self.plan is not None else {"budget": "none"}
        out.update({f"{u}.layout": layout for u, layout in self.layouts().items()})
        return out
