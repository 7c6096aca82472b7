"""PEP: Plug-in Embedding Pruning (Liu et al., "Learnable Embedding Sizes for Recommender
Systems", ICLR 2021), element-wise pruning by learned soft thresholds, stored sparse.

Each table's weight V is read through a soft threshold with a learnable threshold s:

    V' = sign(V) · relu(|V| - g(s)),   g = sigmoid,

so an element is exactly 0 while |V| <= g(s), and its gradient (and s's) flows where it is
not. ``granularity``: ``table`` (one s per table: the paper's feature-wise threshold, a
field being a table here) or ``dim`` (one s per table and dimension: its
feature-dimension one). s starts at ``threshold_init`` (-15: g(s) ~ 3e-7, nothing pruned)
and trains with its own Adam (``threshold_lr``), as the paper trains it with the model.

Why a floor (the paper's mechanism stalls on small data, as OptEmbed's thresholds do, see
``optembed.py``): Adam moves s by about ``threshold_lr`` a step, and only while the loss
prefers smaller magnitudes, so a few hundred steps of MovieLens-100K take g(s) nowhere
near the magnitudes of trained rows. Under a budget (or ``target_sparsity``) the kept
count of each table therefore also falls, every ``prune_every`` steps, to
``cubic_keep`` (sparsity S·(1 - (1 - t)^3) over ``prune_ramp`` of the stage's steps, the
schedule DeepLight uses) by the largest |V' ⊙ M|; at the end of the stage each table keeps
exactly its planned count (largest |V' ⊙ M|), so the deployed bytes are those planned.
With neither (``budget: null``, ``target_sparsity: null``) the thresholds alone decide:
the elements V' leaves non-zero are kept (the paper's setting).

Schedule: ``prune`` (thresholds and floor, then the cut: V := V' ⊙ M baked into the
tables), ``retrain`` for ``retrain_epochs`` with the mask fixed, ``compact`` (the sparse
tables of ``compression.sparse``: per table CSR, COO or dense, whichever is smallest,
index bytes counted), then ``quantize`` if the config asks (int8 values with one scale a
table, or fp16). The retrain fine-tunes the kept weights from their pruned values; the
paper's lottery-ticket retrain from the initial weights is not offered (it needs a second
copy of every table, and the seeded init is the trainer's, not ours to replay).

Bytes, budget, quantization, sharding: ``compression.masked``.

Example::

    ebc = compress(tables, PEPConfig(budget=Budget(ratio=10)))
    # the trainer runs prune -> retrain -> compact; then memory_report(ebc).bytes <= full / 10
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.api import BuildContext, register
from compression.base import MethodConfigError
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.masked import ElementPruningConfig, MaskedTablesCollection
from compression.masked_plan import build_masked
from compression.stages import Stage, StageContext

GRANULARITIES = ("table", "dim")


@dataclass
class PEPConfig(ElementPruningConfig):
    """PEP: ``budget`` (or ``target_sparsity``) sets each table's kept elements; both null
    is the paper's setting (thresholds alone)."""

    method: ClassVar[str] = "pep"
    unbudgeted: ClassVar[Optional[str]] = "its learned thresholds"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"threshold_lr": (1e-3, 1e-2)}
    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=10))
    granularity: str = one_of("table", *GRANULARITIES)
    threshold_init: float = -15.0
    threshold_lr: float = 1e-2
    retrain_epochs: int = bounded(1, ge=0)

    def check(self) -> None:
        if self.budget is not None and self.target_sparsity is not None:
            raise MethodConfigError("pep.budget and pep.target_sparsity: set either a budget or target_sparsity, "
                                    "not both (budget: null for target_sparsity)")  # fmt: skip

    @classmethod
    def contract_examples(cls) -> list[PEPConfig]:
        return [cls(), cls(budget=None, target_sparsity=0.5, granularity="dim"), cls(budget=None)]


class PEPCollection(MaskedTablesCollection):
    """Tables read through their soft thresholds until the cut, then masked."""

    def __init__(self, tables: list[EmbeddingBagConfig], config: PEPConfig, plan: Any, ctx: BuildContext) -> None:
        super().__init__(tables, config, plan, ctx)
        self.pep = config
        width = max(t.embedding_dim for t in tables) if config.granularity == "dim" else 1
        self.thresholds = nn.Parameter(torch.full((len(tables), width), float(config.threshold_init), device=ctx.device))

    def transform(self, i: int, v: torch.Tensor) -> torch.Tensor:
        if int(self.phase) != 0:  # the cut baked V' into the tables
            return v
        g = torch.sigmoid(self.thresholds[i, : v.shape[-1]] if self.thresholds.shape[1] > 1 else self.thresholds[i])
        return torch.sign(v) * torch.relu(v.abs() - g)

    @torch.no_grad()
    def bake(self) -> None:
        self.phase.fill_(0)  # transform as in the pruning stage, once more
        for i in range(len(self.units)):
            self.weight(i).copy_(self.effective(i))
        self.thresholds.requires_grad_(False)

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        if not self.thresholds.requires_grad:
            return []
        return [torch.optim.Adam([self.thresholds], lr=self.pep.threshold_lr)]

    def stages(self) -> list[Stage]:
        c = self.pep
        out = [Stage("prune", run=self.run_prune, params={"granularity": c.granularity, "threshold_init": c.threshold_init,
                                                           "threshold_lr": c.threshold_lr, "prune_ramp": c.prune_ramp})]  # fmt: skip
        if c.retrain_epochs:
            out.append(Stage("retrain", run=lambda ctx: self.run_fixed(ctx, c.retrain_epochs),
                             params={"epochs": c.retrain_epochs, "from": "pruned weights, mask fixed"}))  # fmt: skip
        out.append(Stage("compact", run=self.run_compact, checkpoint=False))
        return out

    def run_prune(self, ctx: StageContext) -> dict[str, float]:
        self.thresholds.requires_grad_(True)
        return {**super().run_prune(ctx), **self.threshold_metrics()}

    def threshold_metrics(self) -> dict[str, float]:
        with torch.no_grad():
            g = torch.sigmoid(self.thresholds).mean(dim=1)
        return {f"threshold.{u}": float(x) for u, x in zip(self.units, g)}

    def training_metrics(self) -> dict[str, float]:
        out = super().training_metrics()
        return {**out, **self.threshold_metrics()} if out else out

    def drop_training_state(self) -> None:
        del self.thresholds


@register(PEPConfig)
def build(tables: list[EmbeddingBagConfig], config: PEPConfig, ctx: BuildContext) -> PEPCollection:
    return build_masked("pep", PEPCollection, tables, config, ctx)
