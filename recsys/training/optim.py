"""Optimizers and the embedding-side protocol: which optimizer trains the rows, L2 on
the tables, gradient clipping, learning rate decay on a validation plateau.

The embedding rows (``module.table_parameters()``) get ``sparse_optimizer``:

- ``rowwise_adagrad`` (TorchRec's ``RowWiseAdagrad``, one fp32 accumulator per row:
  the choice for tables too big for per-element state; its update for all tables at once,
  ``ForeachRowWiseAdagrad``; sharded, FBGEMM's fused kernel),
- ``adam`` (every row element has two moments: what FuxiCTR/BARS train with),
- ``adagrad``, ``sgd``.

Everything else is dense and trains with Adam (torch's fused kernel, ``adam``). A
compressed module may bring optimizers of its own (``extra_optimizers()``, e.g.
OptEmbed's thresholds on plain SGD); their parameters are left out of both.

L2 on the embeddings (``embedding_l2 = lambda``) has FuxiCTR's semantics by default
(``embedding_l2_mode="table"``): the loss gains ``lambda/2 * ||W||^2`` over every
table, every step, so every row decays every step, looked up or not. It is applied
as its gradient ``lambda * W`` added to the tables' gradients (the same update as
putting the term in the loss, without a second pass through the tables).
``"batch_rows"`` applies it only to the rows the batch touched (the rows with a
gradient), as fused sparse kernels' weight decay does.

Example::

    opts = build_optimizers(model, module, TrainerConfig(sparse_optimizer="adam"))
    loss.backward(); add_embedding_l2(module.table_parameters(), 0.05); opts.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from compression.base import CompressedEmbeddingBagCollection
from recsys.models.fused import kernel


class ForeachRowWiseAdagrad(RowWiseAdagrad):
    """TorchRec's ``RowWiseAdagrad``, its update made for every table at once: the same
    state (``sum``, ``step``) and checkpoint. Where the CPU kernel is built
    (``recsys.models.fused.kernel``) and every table is a contiguous float32 CPU tensor, one
    call updates every row of every table, in blocks of rows on torch's threads: the same
    arithmetic as TorchRec's ops, to float rounding (its square root correctly rounded,
    torch's vectorized one not always; a row's squares summed in order). Elsewhere torch's
    ``_foreach`` ops, where TorchRec loops over the tables with eight ops each: the same
    bits. Groups with weight decay, lr decay, ``maximize`` or a sparse gradient take
    TorchRec's own step."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        plain = all(
            g["weight_decay"] == 0 and g["lr_decay"] == 0 and not g["maximize"]
            and not any(p.grad is not None and p.grad.is_sparse for p in g["params"])
            for g in self.param_groups
        )  # fmt: skip
        if not plain:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            sums = [s["sum"] for s in states]
            torch._foreach_add_([s["step"] for s in states], 1)
            k = kernel()  # False where a table is not a contiguous float32 CPU tensor
            if k is not None and k.rowwise_adagrad(params, grads, sums, group["lr"], group["eps"]):
                continue
            torch._foreach_add_(sums, [g.mean(dim=1, keepdim=True) for g in torch._foreach_pow(grads, 2)])
            std = torch._foreach_sqrt(sums)
            torch._foreach_add_(std, group["eps"])
            torch._foreach_addcdiv_(params, grads, std, value=-group["lr"])
        return loss


def adam(params: Sequence[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam with torch's fused kernel where every parameter is a float tensor on the CPU
    or CUDA (one pass over each parameter where the default makes a dozen: a third of its
    time on the CPU), the default implementation otherwise."""
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": ForeachRowWiseAdagrad,
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
L2_MODES = ("table", "batch_rows")


class Optimizers:
    """Several optimizers stepped, zeroed, decayed and checkpointed as one."""

    def __init__(self, named: dict[str, torch.optim.Optimizer]) -> None:
        self.named = named

    def zero_grad(self) -> None:
        for opt in self.named.values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.named.values():
            opt.step()

    def decay_lr(self, factor: float, min_lr: float) -> float:
        """Multiply every learning rate by ``factor`` (not below ``min_lr``); the largest
        rate after it. Modules' own optimizers (``extraN``) keep their schedule."""
        largest = 0.0
        for name, opt in self.named.items():
            if name.startswith("extra"):
                continue
            for group in opt.param_groups:
                group["lr"] = max(group["lr"] * factor, min_lr)
                largest = max(largest, group["lr"])
        return largest

    def state_dict(self) -> dict[str, Any]:
        return {k: opt.state_dict() for k, opt in self.named.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.named):
            raise RuntimeError(f"checkpoint has optimizers {sorted(state)}, this run {sorted(self.named)}")
        for k, opt in self.named.items():
            opt.load_state_dict(state[k])

    def __iter__(self):
        return iter(self.named.values())


def sparse_optimizer(params: Sequence[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of ``SPARSE_OPTIMIZERS``) over embedding rows."""
    try:
        cls = SPARSE_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"trainer.sparse_optimizer must be one of {', '.join(SPARSE_OPTIMIZERS)}, got '{name}'"
        ) from None
    if cls is torch.optim.Adam:
        return adam(params, lr)
    return cls(params, lr=lr)  # type: ignore[call-arg]


def build_optimizers(
    model: nn.Module | Iterable[nn.Parameter],
    module: CompressedEmbeddingBagCollection,
    cfg: Any,
    fused: torch.optim.Optimizer | None = None,
    tables: Sequence[nn.Parameter] | None = None,
) -> Optimizers:
    """``cfg.sparse_optimizer`` (default row-wise Adagrad) over the tables, Adam over the
    rest of ``model`` (a module, or its parameters), the module's own optimizers beside them.

    Sharded (``recsys.training.sharded``): ``fused`` is DMP's optimizer of the sharded
    tables (its step is a no-op: it ran in the backward), ``model`` the parameters left
    outside it, and ``tables`` the replicated tables among them; one process: the tables
    are ``module.table_parameters()``.
    """
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    rows = [p for p in (module.table_parameters() if tables is None else tables) if p.requires_grad]
    extra: list[torch.optim.Optimizer] = module.extra_optimizers()
    taken = {id(p) for p in rows}
    for opt in extra:
        taken.update(id(p) for g in opt.param_groups for p in g["params"])
    dense = [p for p in params if p.requires_grad and id(p) not in taken]
    named: dict[str, torch.optim.Optimizer] = {} if fused is None else {"sparse": fused}
    if rows:
        named["sparse" if fused is None else "sparse_replicated"] = sparse_optimizer(rows, cfg.sparse_optimizer, cfg.sparse_lr)
    if dense:
        named["dense"] = adam(dense, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    for i, opt in enumerate(extra):
        named[f"extra{i}"] = opt
    return Optimizers(named)


@torch.no_grad()
def add_embedding_l2(tables: Iterable[torch.Tensor], lam: float, mode: str = "table") -> None:
    """Add the gradient of ``lam/2 * ||W||^2`` to each table's gradient.

    ``mode="table"``: every row (FuxiCTR's embedding regulariser); ``"batch_rows"``:
    only rows that already have a gradient this step (the rows the batch looked up).
    """
    if mode not in L2_MODES:
        raise ValueError(f"trainer.embedding_l2_mode must be one of {L2_MODES}, got '{mode}'")
    if lam == 0:
        return
    for w in tables:
        if not w.requires_grad:
            continue
        if w.grad is None:
            if mode == "table":
                w.grad = lam * w.detach().clone()
            continue
        if w.grad.is_sparse:
            raise ValueError("embedding L2 needs dense table gradients")
        if mode == "table":
            w.grad.add_(w, alpha=lam)
        else:
            touched = w.grad.ne(0).any(dim=1, keepdim=True) if w.dim() == 2 else w.grad.ne(0)
            w.grad.add_(w * touched, alpha=lam)


def embedding_l2_value(tables: Iterable[torch.Tensor], lam: float) -> float:
    """``lam/2 * sum ||W||^2`` over ``tables`` (what the table-mode L2 adds to the loss)."""
    with torch.no_grad():
        return float(sum(0.5 * lam * float(w.float().pow(2).sum()) for w in tables))
