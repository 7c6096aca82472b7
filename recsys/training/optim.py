"""Optimizers: row-wise Adagrad (TorchRec's) for embedding rows, Adam for the rest.

A compressed module may bring optimizers of its own (``extra_optimizers()``, e.g.
OptEmbed's thresholds on plain SGD); their parameters are left out of Adam.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad


class Optimizers:
    """Several optimizers stepped, zeroed and checkpointed as one."""

    def __init__(self, named: dict[str, torch.optim.Optimizer]) -> None:
        self.named = named

    def zero_grad(self) -> None:
        for opt in self.named.values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.named.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {k: opt.state_dict() for k, opt in self.named.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.named):
            raise RuntimeError(f"checkpoint has optimizers {sorted(state)}, this run {sorted(self.named)}")
        for k, opt in self.named.items():
            opt.load_state_dict(state[k])

    def __iter__(self):
        return iter(self.named.values())


def build_optimizers(model: nn.Module, module: nn.Module, cfg: Any) -> Optimizers:
    """Row-wise Adagrad over ``module.table_parameters()``, Adam over the rest."""
    tables = [p for p in module.table_parameters() if p.requires_grad]  # type: ignore[operator]
    extra: list[torch.optim.Optimizer] = list(getattr(module, "extra_optimizers", lambda: [])())
    taken = {id(p) for p in tables}
    for opt in extra:
        taken.update(id(p) for g in opt.param_groups for p in g["params"])
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    named: dict[str, torch.optim.Optimizer] = {}
    if tables:
        named["sparse"] = RowWiseAdagrad(tables, lr=cfg.sparse_lr)
    if dense:
        named["dense"] = torch.optim.Adam(dense, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    for i, opt in enumerate(extra):
        named[f"extra{i}"] = opt
    return Optimizers(named)
