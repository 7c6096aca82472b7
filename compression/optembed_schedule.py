"""OptEmbed's schedule: its four stages and the row-pruning floor they drive.

Functions of the module (``OptEmbedCollection`` in ``compression.methods.optembed``, which
lists them as its stages): ``supernet`` (rows pruned by the learned thresholds, or down
to a level by the floor, checked by ``compression.prune_guard``), ``search`` (evolution
over one dim per field, ``compression.evolution``), ``retrain`` (the architecture fixed,
the whole model restarted), ``compact_stage`` (the compact export). The bytes each
candidate holds are the module's byte model (``compression.optembed_bytes``).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import nn

from compression.budget import BudgetError
from compression.evolution import evolutionary_search
from compression.prune_guard import PruningGuard, ThresholdPruning
from compression.stages import StageContext

if TYPE_CHECKING:
    from compression.methods.optembed import OptEmbedCollection

log = logging.getLogger(__name__)


def supernet(m: OptEmbedCollection, ctx: StageContext) -> dict[str, float]:
    m.mode = "supernet"
    m._dense_init = dense_state(ctx.model, ctx.module)  # what a retrain from scratch restarts from
    m.unit_dims.copy_(torch.tensor(m.full_dims))
    m.thresholds.requires_grad_(True)
    m.supernet_steps.zero_()
    m._ramp_steps = int(m.config.prune_ramp * ctx.steps(m.config.supernet_epochs))
    tolerance = m.config.guard_tolerance if kept_target(m) is None else None
    guard = PruningGuard(ThresholdPruning(m, partial(ctx.evaluate, max_batches=m.config.guard_val_batches)),
                         tolerance)  # fmt: skip
    metrics = ctx.fit(m.config.supernet_epochs, on_epoch=guard.epoch)
    freeze_rows(m)
    metrics.update(m.threshold_metrics())
    return metrics


def search(m: OptEmbedCollection, ctx: StageContext) -> dict[str, float]:
    m.mode = "fixed"
    ctx.model.eval()

    def fitness(dims: tuple[int, ...]) -> float:
        m.unit_dims.copy_(torch.tensor(dims, dtype=torch.int64))
        return ctx.evaluate(max_batches=m.config.search_val_batches)["auc"]

    def log(gen: int, best: float) -> None:
        m.history["fitness"].append(best)
        ctx.log({"search_best_auc": best}, step=gen)

    best, best_auc = evolutionary_search(
        m.search_space(), m.full_dims, fitness, m.candidate_bytes, m.target_bytes(),
        m.config, m.seed, log,
    )
    if not any(best):  # every field dropped: try the best single field that fits instead
        best, best_auc = best_single_field(m, fitness)
    m.unit_dims.copy_(torch.tensor(best, dtype=torch.int64))
    return {"search_best_val_auc": best_auc, "search_bytes": float(m.candidate_bytes(best)),
            **{f"dim.{u}": float(d) for u, d in zip(m.units, best)}}


def best_single_field(m: OptEmbedCollection, fitness: Any) -> tuple[tuple[int, ...], float]:
    """Under a budget so small that the search dropped every field: each field alone at
    the largest dim that fits, the fittest of them; a ``BudgetError`` if none fits."""
    n, target = len(m.units), m.target_bytes()
    alone = []
    for i in range(n):
        fits = [d for d in range(1, m.full_dims[i] + 1)
                if target is None or m.candidate_bytes([d if j == i else 0 for j in range(n)]) <= target]  # fmt: skip
        if fits:
            alone.append(tuple(fits[-1] if j == i else 0 for j in range(n)))
    if not alone:
        smallest = min(m.candidate_bytes([1 if j == i else 0 for j in range(n)]) for i in range(n))
        raise BudgetError(
            f"optembed cannot reach the budget of {target} bytes with any field kept: the smallest "
            f"architecture that keeps one field (at dim 1) holds {smallest} bytes"
        )
    scored = [(fitness(c), c) for c in alone]
    auc, arch = max(scored, key=lambda x: (x[0], m.candidate_bytes(list(x[1]))))
    return arch, auc


def retrain(m: OptEmbedCollection, ctx: StageContext) -> dict[str, float]:
    m.mode = "fixed"
    m.thresholds.requires_grad_(False)
    if m.config.retrain_from == "scratch":  # the whole model restarts (see the module docstring)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(m.seed + 1)
            for w, c in zip(m.weights(), m.table_configs()):
                assert c.init_fn is not None  # TorchRec's EmbeddingConfig sets its default
                c.init_fn(w)
        if m._dense_init is not None:
            restart_dense(ctx.model, m._dense_init)
        else:
            log.warning("optembed: the supernet ran before this process (resumed), so the retrain's dense "
                        "layers continue from the supernet's; only the tables restart")  # fmt: skip
    return ctx.fit(m.config.retrain_epochs)


def compact_stage(m: OptEmbedCollection, ctx: StageContext) -> dict[str, float]:
    kept_before = m.kept_counts()
    m.compact()
    assert m.kept_counts() == [k if d > 0 else 0 for k, d in zip(kept_before, m.unit_dims.tolist())]
    ctx.model.to(ctx.device)
    kept = m.kept_counts()
    return {"kept_rows": float(sum(kept)), "kept_row_ratio": sum(kept) / sum(m.rows),
            **{f"kept_rows.{u}": float(k) for u, k in zip(m.units, kept)}}


def kept_target(m: OptEmbedCollection) -> Optional[float]:
    """The fraction of all rows the supernet keeps: ``target_kept``; under a budget
    without one, what the budget holds at ``budget_dim_share`` of every dim; None (the
    thresholds alone decide, the paper's setting) otherwise."""
    if not m._target_known:
        m._target_kept, m._target_known = kept_target_of(m), True
    return m._target_kept


def kept_target_of(m: OptEmbedCollection) -> Optional[float]:
    c, target = m.config, m.target_bytes()
    if c.target_kept is not None or target is None:
        return c.target_kept
    dims = [max(1, round(c.budget_dim_share * d)) for d in m.full_dims]

    def fits(rho: float) -> bool:
        return m.bytes_of([max(1, math.floor(rho * n)) for n in m.rows], dims) <= target

    if fits(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def advance_floor(m: OptEmbedCollection) -> None:
    """Every ``prune_every_steps`` supernet steps, raise the floor towards the target:
    the kept fraction falls linearly from 1 to it over the first ``_ramp_steps``."""
    step = int(m.supernet_steps)
    m.supernet_steps += 1
    if step % max(1, m.config.prune_every_steps):
        return
    target = kept_target(m)
    assert target is not None
    ramp = min(1.0, (step + 1) / m._ramp_steps) if m._ramp_steps > 0 else 1.0
    apply_floor(m, 1.0 - (1.0 - target) * ramp)


@torch.no_grad()
def apply_floor(m: OptEmbedCollection, keep: float) -> None:
    """Keep ``keep`` of all rows: those above their table's threshold first, then the
    rest, each group by worth, a row's worth being its importance times how often the
    supernet looked it up (the L1 mass it adds to the pooled outputs).

    Every kept row costs the same bytes at a given dim, so one cut across tables
    keeps the most mass per byte: it falls on the rare tail of the large tables,
    never on the few, constantly used rows of a small one (a cut on importance
    alone, which ignores use, emptied 7-row fields of a Frappe-shaped dataset).
    The thresholds rank rows here; the level decides how many are kept. When they
    could also cut below it, a seed whose thresholds rose further kept 255 user and
    257 item rows under a 5x budget on ``sparse_signal`` (the others about 600 and
    1,000), and the search, every dim already full, left the model at 6.6x.
    """
    worth = []
    for i, (u, w) in enumerate(zip(m.units, m.weights())):
        imp = m.importance(i, w)
        score = getattr(m, f"seen_{u}") * imp
        # above the threshold: the worth (>= 0); below: in (-1, 0), still ordered by worth
        worth.append(torch.where(imp > m.thresholds[i], score, -1.0 / (1.0 + score)))
    flat = torch.cat(worth)
    top = torch.argsort(flat, descending=True, stable=True)[: int(keep * flat.numel())]
    flags = torch.zeros_like(flat, dtype=torch.bool)
    flags[top] = True
    for u, part in zip(m.units, torch.split(flags, m.rows)):
        getattr(m, f"kept_{u}").copy_(part)


@torch.no_grad()
def freeze_rows(m: OptEmbedCollection) -> None:
    """Fix the kept rows from the thresholds over every row of every table (at the
    target level exactly, when there is one)."""
    target = kept_target(m)
    if target is not None:
        apply_floor(m, target)  # the floor's rows are within the thresholds' already
        return
    for i, (u, w) in enumerate(zip(m.units, m.weights())):
        getattr(m, f"kept_{u}").copy_(m.importance(i, w) > m.thresholds[i])


def figures(m: OptEmbedCollection) -> dict[str, Any]:
    """Plots of the schedule (thresholds, kept rows, search fitness, dims)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    if m.history["thresholds"]:
        for key, title in (("thresholds", "threshold t (units of the typical row norm)"),
                           ("kept", "fraction of rows kept")):
            fig, ax = plt.subplots(figsize=(7, 4))
            arr = np.array(m.history[key])
            for j, u in enumerate(m.units):
                ax.plot(np.arange(1, len(arr) + 1), arr[:, j], label=u)
            if key == "kept":  # every table together: what the pruning level counts
                ax.plot(np.arange(1, len(arr) + 1), m.history["rows"], "k--", label="all rows")
            ax.set_xlabel("supernet epoch")
            ax.set_title(title)
            ax.legend(fontsize=6, ncol=3)
            figs[f"optembed_{key}.png"] = fig
    if m.history["fitness"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(len(m.history["fitness"])), m.history["fitness"], marker="o")
        ax.set_xlabel("generation")
        ax.set_ylabel("best validation AUC")
        figs["optembed_search.png"] = fig
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(m.units, m.unit_dims.tolist())
    ax.set_ylabel("chosen dim")
    ax.tick_params(axis="x", rotation=90, labelsize=6)
    figs["optembed_dims.png"] = fig
    return figs


def dense_state(model: nn.Module, module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state outside its embedding module ``module`` (the dense layers)."""
    prefix = next(f"{name}." for name, m in model.named_modules() if m is module)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(prefix)}


@torch.no_grad()
def restart_dense(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the dense layers of ``model`` the weights ``state`` holds (``dense_state``)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected


