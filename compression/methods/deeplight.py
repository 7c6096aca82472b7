"""DeepLight's embedding pruning (Deng et al., "DeepLight: Deep Lightweight Feature
Interactions for Accelerating CTR Predictions in Ad Serving", WSDM 2021): magnitude
pruning of embedding elements to a sparsity that rises gradually during training, stored
sparse.

Every ``prune_every`` training steps of the ``prune`` stage, each table keeps its
``N·(1 - S(t))`` elements of largest |w| (per table: each table's target comes from the
budget's plan, so its bytes are exact; the paper prunes each layer to its own rate too),
with the cubic schedule of DeepLight (after Zhu and Gupta, "To prune, or not to prune",
2017):

    S(t) = S_target · (1 - (1 - t/T)^3),   T = ``prune_ramp`` · the stage's steps,

S_target = 1 - k/N for a table planned to keep k of its N elements. The mask is applied
in the forward (w ⊙ M: pruned elements read 0 and get no gradient) and pruned elements
are written 0 in the table when they are pruned, so they stay zero. At the end of the
stage each table keeps exactly k (largest |w ⊙ M|; the trainer's best-epoch restore may
have brought back an earlier, denser mask); ``finetune`` then trains the kept elements
for ``finetune_epochs`` with the mask fixed; ``compact`` stores each table as CSR, COO
or dense, whichever is smallest, index bytes counted (``compression.sparse``), then
``quantize`` if the config asks (int8 values, one scale a table, or fp16).

A budget or ``target_sparsity`` is required (the schedule needs a target). Bytes,
budget, quantization, sharding: ``compression.masked``.

Example::

    ebc = compress(tables, DeepLightConfig(budget=Budget(ratio=10)))
    # the trainer runs prune -> finetune -> compact
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.api import BuildContext, register
from compression.budget import Budget
from compression.config_checks import bounded
from compression.masked import ElementPruningConfig, MaskedTablesCollection
from compression.masked_plan import build_masked
from compression.stages import Stage


@dataclass
class DeepLightConfig(ElementPruningConfig):
    """DeepLight: ``budget`` or ``target_sparsity`` (budget: null) sets each table's kept
    elements."""

    method: ClassVar[str] = "deeplight"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"prune_ramp": (0.5, 0.75)}
    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=10))
    finetune_epochs: int = bounded(1, ge=0)

    @classmethod
    def contract_examples(cls) -> list[DeepLightConfig]:
        return [cls(), cls(budget=None, target_sparsity=0.8)]


class DeepLightCollection(MaskedTablesCollection):
    """Full tables with magnitude masks until ``compact``."""

    def stages(self) -> list[Stage]:
        c = self.config
        assert isinstance(c, DeepLightConfig)
        out = [Stage("prune", run=self.run_prune, params={"schedule": "cubic", "prune_ramp": c.prune_ramp,
                                                           "prune_every": c.prune_every})]  # fmt: skip
        if c.finetune_epochs:
            out.append(Stage("finetune", run=lambda ctx: self.run_fixed(ctx, c.finetune_epochs),
                             params={"epochs": c.finetune_epochs}))  # fmt: skip
        out.append(Stage("compact", run=self.run_compact, checkpoint=False))
        return out


@register(DeepLightConfig)
def build(tables: list[EmbeddingBagConfig], config: DeepLightConfig, ctx: BuildContext) -> DeepLightCollection:
    return build_masked("deeplight", DeepLightCollection, tables, config, ctx)
