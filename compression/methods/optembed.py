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
3. ``retrain``: the rows kept and dims found are fixed; weights restart from scratch
   (``retrain_from="scratch"``) or from the supernet.
4. ``compact``: each field becomes a TorchRec table of only its kept rows at its dim,
   plus one zero row for pruned ids, behind a sorted int32 list of kept ids
   (``torch.searchsorted`` remap, 4 bytes per kept row, counted). Output is padded
   with zeros back to D, exactly what the masked model computes, so DLRM takes it.

Threshold scale (the reference code's thresholds stayed ~1e-5 against row L1 norms
of 0.1-1, so nothing but never-seen rows was pruned): importance here is the row's
L1 norm divided by a running mean of the L1 norms of the rows the field looked up
(a detached buffer), so t_f is in units of "the field's typical row" (0.5 prunes rows
below half of it) whatever the embedding scale, with alpha and the SGD rate set for
that scale (defaults alpha=0.01, SGD rate 0.1: on MovieLens-100K thresholds reach about
0.4 in 4 epochs; alpha=0.1 reaches about 0.95 and prunes about half the rows). Defects of the reference search are not reproduced: crossover cuts over
fields, fitness is each candidate's own AUC, candidates are copied before mutation,
and sizes count dimensions, not dimension indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, register
from compression.base import CompressedEmbeddingBagCollection, MethodConfigError
from compression.budget import Budget, BudgetError
from compression.sizing import BudgetedConfig
from compression.stages import Stage, StageContext

ID_BYTES = 4  # kept ids are stored as int32
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
    budget: Optional[Budget] = None
    alpha: float = 1e-2
    threshold_lr: float = 0.1
    threshold_init: float = 0.0
    norm_momentum: float = 0.99
    supernet_epochs: Optional[int] = None
    retrain_epochs: Optional[int] = None
    retrain_from: str = "scratch"
    mutations: int = 10
    crossovers: int = 10
    mutation_prob: float = 0.1
    generations: int = 30
    parents: int = 15
    search_val_batches: Optional[int] = None

    @classmethod
    def contract_examples(cls) -> list[OptEmbedConfig]:
        return [cls(), cls(budget=Budget(ratio=4))]


class OptEmbedCollection(CompressedEmbeddingBagCollection):
    """The OptEmbed supernet (modes ``supernet``, ``fixed``) and, after ``compact()``,
    its compact export. The unit of pruning and dimension search is a table (a field;
    features sharing a table share its rows, threshold and dim); every feature's output
    keeps its table's full dim D_t, zero-padded."""

    def __init__(self, tables: list[EmbeddingBagConfig], config: OptEmbedConfig, ctx: BuildContext) -> None:
        super().__init__(tables, config=ctx.config)
        if config.retrain_from not in ("scratch", "supernet"):
            raise MethodConfigError(f"optembed: retrain_from must be 'scratch' or 'supernet', got '{config.retrain_from}'")
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
        self.ec = nn.ModuleDict({
            f"d{dim}": EmbeddingCollection(
                tables=[
                    EmbeddingConfig(name=t.name, embedding_dim=dim, num_embeddings=t.num_embeddings,
                                    feature_names=list(t.feature_names))
                    for t in tables if t.embedding_dim == dim
                ],
                device=ctx.table_device,
            )
            for dim in sorted({t.embedding_dim for t in tables})
        })
        n = len(tables)
        self.thresholds = nn.Parameter(torch.full((n,), float(config.threshold_init), device=ctx.device))
        # start the running row-norm scale at the initial tables' mean
        scale = torch.stack([initial_row_norm(w, c) for w, c in zip(self.weights(), self.table_configs())])
        self.register_buffer("norm_scale", scale.clamp_min(1e-12).to(ctx.device))
        self.register_buffer("unit_dims", torch.tensor(self.full_dims, dtype=torch.int64, device=ctx.device))
        for u, rows in zip(self.units, self.rows):  # one flag per row: where the tables are
            self.register_buffer(f"kept_{u}", torch.ones(rows, dtype=torch.bool, device=ctx.table_device))
        self.mode = "supernet"
        self.compact_module: CompactTables | None = None
        self.history: dict[str, list[Any]] = {"thresholds": [], "kept": [], "fitness": []}

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
        if self.mode == "supernet" and self.training:
            return self.config.alpha * torch.exp(-self.thresholds).sum()
        return None

    def stages(self) -> list[Stage]:
        c = self.config
        return [
            Stage("supernet", run=self._run_supernet, params={"alpha": c.alpha, "threshold_lr": c.threshold_lr}),
            Stage("search", run=self._run_search, params={"generations": c.generations, "mutations": c.mutations,
                                                          "crossovers": c.crossovers, "mutation_prob": c.mutation_prob,
                                                          "parents": c.parents}),
            Stage("retrain", run=self._run_retrain, params={"retrain_from": c.retrain_from}),
            Stage("compact", run=self._run_compact, checkpoint=False),
        ]

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
                mask = SurrogateStep.apply(self.importance(i, e) - self.thresholds[i])
            else:
                mask = getattr(self, f"kept_{self.units[i]}")[features[f].values()].to(e.dtype)
            seg = torch.repeat_interleave(torch.arange(batch, device=e.device), jt.lengths())
            bag = torch.zeros(batch, dim, device=e.device, dtype=e.dtype).index_add(0, seg, e * mask.unsqueeze(-1))
            if sampling:  # each (sample, feature) keeps its first i ~ U{1..D} dims
                keep = torch.randint(1, dim + 1, (batch, 1), device=e.device)
            else:
                keep = self.unit_dims[i].expand(batch, 1)
            pooled.append(bag * (torch.arange(dim, device=e.device) < keep).to(bag.dtype))
        return KeyedTensor(
            keys=self.feature_names, length_per_key=[p.shape[1] for p in pooled], values=torch.cat(pooled, dim=1)
        )

    # -- the stages --------------------------------------------------------------------
    def _run_supernet(self, ctx: StageContext) -> dict[str, float]:
        self.mode = "supernet"
        self.unit_dims.copy_(torch.tensor(self.full_dims))
        self.thresholds.requires_grad_(True)
        metrics = ctx.fit(self.config.supernet_epochs)
        self.freeze_rows()
        metrics.update(self.threshold_metrics())
        return metrics

    def _run_search(self, ctx: StageContext) -> dict[str, float]:
        self.mode = "fixed"
        ctx.model.eval()

        def fitness(dims: tuple[int, ...]) -> float:
            self.unit_dims.copy_(torch.tensor(dims, dtype=torch.int64))
            return ctx.evaluate(max_batches=self.config.search_val_batches)["auc"]

        def log(gen: int, best: float) -> None:
            self.history["fitness"].append(best)
            ctx.log({"search_best_auc": best}, step=gen)

        best, best_auc = evolutionary_search(
            self.search_space(), self.full_dims, fitness, self.candidate_bytes, self.target_bytes(),
            self.config, self.seed, log,
        )
        if not any(best):  # every field dropped: try the best single field that fits instead
            best, best_auc = self._best_single_field(fitness)
        self.unit_dims.copy_(torch.tensor(best, dtype=torch.int64))
        return {"search_best_val_auc": best_auc, "search_bytes": float(self.candidate_bytes(best)),
                **{f"dim.{u}": float(d) for u, d in zip(self.units, best)}}

    def _best_single_field(self, fitness: Any) -> tuple[tuple[int, ...], float]:
        """Under a budget so small that the search dropped every field: each field alone at
        the largest dim that fits, the fittest of them; a ``BudgetError`` if none fits."""
        n, target = len(self.units), self.target_bytes()
        alone = []
        for i in range(n):
            fits = [d for d in range(1, self.full_dims[i] + 1)
                    if target is None or self.candidate_bytes([d if j == i else 0 for j in range(n)]) <= target]  # fmt: skip
            if fits:
                alone.append(tuple(fits[-1] if j == i else 0 for j in range(n)))
        if not alone:
            smallest = min(self.candidate_bytes([1 if j == i else 0 for j in range(n)]) for i in range(n))
            raise BudgetError(
                f"optembed cannot reach the budget of {target} bytes with any field kept: the smallest "
                f"architecture that keeps one field (at dim 1) holds {smallest} bytes"
            )
        scored = [(fitness(c), c) for c in alone]
        auc, arch = max(scored, key=lambda x: (x[0], self.candidate_bytes(list(x[1]))))
        return arch, auc

    def _run_retrain(self, ctx: StageContext) -> dict[str, float]:
        self.mode = "fixed"
        self.thresholds.requires_grad_(False)
        if self.config.retrain_from == "scratch":  # TorchRec's default init, seeded
            g = torch.Generator().manual_seed(self.seed + 1)
            with torch.no_grad():
                for w, rows in zip(self.weights(), self.rows):
                    bound = math.sqrt(1.0 / rows)
                    w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=g))
        return ctx.fit(self.config.retrain_epochs)

    def _run_compact(self, ctx: StageContext) -> dict[str, float]:
        kept_before = self.kept_counts()
        self.compact()
        assert self.kept_counts() == [k if d > 0 else 0 for k, d in zip(kept_before, self.unit_dims.tolist())]
        ctx.model.to(ctx.device)
        kept = self.kept_counts()
        return {"kept_rows": float(sum(kept)), "kept_row_ratio": sum(kept) / sum(self.rows),
                **{f"kept_rows.{u}": float(k) for u, k in zip(self.units, kept)}}

    # -- rows, dims, bytes ---------------------------------------------------------------
    @torch.no_grad()
    def freeze_rows(self) -> None:
        """Fix the kept rows from the thresholds over every row of every table."""
        for i, (u, w) in enumerate(zip(self.units, self.weights())):
            getattr(self, f"kept_{u}").copy_(self.importance(i, w) > self.thresholds[i])

    def kept_counts(self) -> list[int]:
        if self.compact_module is not None:
            return [int(getattr(self.compact_module, f"ids_{u}").numel()) for u in self.units]
        return [int(getattr(self, f"kept_{u}").sum()) for u in self.units]

    def search_space(self) -> list[int]:
        """Smallest dim per table: 1 without a budget; 0 (table dropped) with one."""
        return [0 if self.config.budget is not None else 1] * len(self.units)

    def candidate_bytes(self, dims) -> int:
        """Bytes the compact export of ``dims`` holds (rows, zero row, kept-id list, buffers),
        its tables in the format the budget counts (``table_format``)."""
        fmt, kept = self.table_format, self.kept_counts()
        configs = compact_configs(self.units, self.unit_features, kept, list(dims))
        total = sum(fmt.table(c.num_embeddings, c.embedding_dim, len(c.feature_names)) for c in configs)
        total += (fmt.collection(configs) if configs else 0) + ID_BYTES * sum(k for k, d in zip(kept, dims) if d > 0)
        # thresholds (fp32), norm scales (fp32) and chosen dims (int64) stay in the module
        return total + len(self.units) * (4 + 4 + 8)

    def target_bytes(self) -> Optional[int]:
        if self.config.budget is None:
            return None
        return self.config.budget.target_bytes(self.source_tables())

    def training_metrics(self) -> dict[str, float]:
        """Thresholds and kept-row ratios per table at each supernet epoch end (recorded)."""
        if self.mode != "supernet" or self.compact_module is not None:
            return {}
        out = self.threshold_metrics()
        self.history["thresholds"].append([out[f"threshold.{u}"] for u in self.units])
        self.history["kept"].append([out[f"kept_ratio.{u}"] for u in self.units])
        return out

    def threshold_metrics(self) -> dict[str, float]:
        """Each table's threshold and the fraction of its rows the threshold keeps."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for i, (u, w) in enumerate(zip(self.units, self.weights())):
                out[f"threshold.{u}"] = float(self.thresholds[i])
                out[f"kept_ratio.{u}"] = float((self.importance(i, w) > self.thresholds[i]).float().mean())
        return out

    @torch.no_grad()
    def compact(self) -> None:
        """Replace the full tables by the kept rows at each table's dim (in place)."""
        dims = [int(d) for d in self.unit_dims]
        kept = [torch.nonzero(getattr(self, f"kept_{u}")).flatten() for u in self.units]
        module = CompactTables(self.units, self.unit_features, kept, dims, self.full_dims, self.feature_names,
                               self.unit_dims.device)
        for i, (w, ids, d) in enumerate(zip(self.weights(), kept, dims)):
            if d > 0:
                module.table(i).copy_(torch.cat([w[ids, :d], torch.zeros(1, d, device=w.device)]))
        self.compact_module = module
        del self.ec
        self.ec = None  # type: ignore[assignment]
        for u in self.units:
            delattr(self, f"kept_{u}")
            self.register_buffer(f"kept_{u}", torch.zeros(0, dtype=torch.bool))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.config.budget.label() if self.config.budget else "none"}
        for u, d in zip(self.units, self.unit_dims.tolist()):
            out[f"{u}.dim"] = d
        return out

    def figures(self) -> dict[str, Any]:
        """Plots of the schedule (thresholds, kept rows, search fitness, dims)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figs = {}
        if self.history["thresholds"]:
            for key, title in (("thresholds", "threshold t (units of the typical row norm)"),
                               ("kept", "fraction of rows kept")):
                fig, ax = plt.subplots(figsize=(7, 4))
                arr = np.array(self.history[key])
                for j, u in enumerate(self.units):
                    ax.plot(np.arange(1, len(arr) + 1), arr[:, j], label=u)
                ax.set_xlabel("supernet epoch")
                ax.set_title(title)
                ax.legend(fontsize=6, ncol=3)
                figs[f"optembed_{key}.png"] = fig
        if self.history["fitness"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(range(len(self.history["fitness"])), self.history["fitness"], marker="o")
            ax.set_xlabel("generation")
            ax.set_ylabel("best validation AUC")
            figs["optembed_search.png"] = fig
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(self.units, self.unit_dims.tolist())
        ax.set_ylabel("chosen dim")
        ax.tick_params(axis="x", rotation=90, labelsize=6)
        figs["optembed_dims.png"] = fig
        return figs


def compact_configs(units: list[str], unit_features: list[list[str]], kept: list[int], dims: list[int]) -> list[EmbeddingBagConfig]:
    """The compact export's tables: each live unit's kept rows and a zero row, at its dim."""
    return [
        EmbeddingBagConfig(name=f"compact_{u}", embedding_dim=d, num_embeddings=k + 1, feature_names=list(fs))
        for u, fs, k, d in zip(units, unit_features, kept, dims) if d > 0
    ]


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


class CompactTables(nn.Module):
    """Kept rows only, at each table's dim, behind a sorted int32 list of kept ids."""

    def __init__(self, units: list[str], unit_features: list[list[str]], kept: list[torch.Tensor], dims: list[int],
                 full_dims: list[int], feature_order: list[str], device: torch.device) -> None:
        super().__init__()
        self.units, self.dims, self.feature_order = units, dims, feature_order
        self._unit_of = {f: i for i, fs in enumerate(unit_features) for f in fs}
        self._full = full_dims
        configs = compact_configs(units, unit_features, [len(k) for k in kept], dims)
        self.ebc = EmbeddingBagCollection(tables=configs, device=device) if configs else None
        for u, k, d in zip(units, kept, dims):
            self.register_buffer(f"ids_{u}", (k if d > 0 else k[:0]).to(torch.int32).to(device))

    def table(self, i: int) -> torch.Tensor:
        assert self.ebc is not None
        return self.ebc.embedding_bags[f"compact_{self.units[i]}"].weight

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        d = features.to_dict()
        batch = features.stride()
        live = [f for f in self.feature_order if self.dims[self._unit_of[f]] > 0]
        pooled: dict[str, torch.Tensor] = {}
        if live:
            remapped = []
            for f in live:
                ids = d[f].values()
                kept = getattr(self, f"ids_{self.units[self._unit_of[f]]}")
                pos = torch.searchsorted(kept, ids.to(torch.int32)).clamp(max=max(len(kept) - 1, 0))
                hit = (kept[pos] == ids) if len(kept) else torch.zeros_like(ids, dtype=torch.bool)
                remapped.append(torch.where(hit, pos.to(torch.int64), torch.full_like(ids, len(kept))))
            kjt = KeyedJaggedTensor(
                keys=live, values=torch.cat(remapped), lengths=torch.cat([d[f].lengths() for f in live]), stride=batch,
            )
            assert self.ebc is not None
            pooled = self.ebc(kjt).to_dict()
        out = []
        for f in self.feature_order:
            i = self._unit_of[f]
            part = pooled[f] if self.dims[i] > 0 else torch.zeros(batch, 0, device=features.values().device)
            out.append(torch.nn.functional.pad(part, (0, self._full[i] - self.dims[i])))
        return KeyedTensor(keys=self.feature_order, length_per_key=[o.shape[1] for o in out], values=torch.cat(out, dim=1))


def evolutionary_search(low, high, fitness, size_of, target, config: OptEmbedConfig, seed: int, log=None):
    """Best per-field dims in ``[low_f, high_f]`` by evolution, and its fitness (``high``:
    an int for every field or a list).

    Every candidate keeps its own fitness (a cache keyed by the candidate), parents are
    copied before they mutate, crossovers cut between fields. Candidates whose
    ``size_of`` exceeds ``target`` are repaired, lowering the dim of the field whose
    step saves the most bytes until they fit, and never evaluated over budget.
    """
    rng = np.random.default_rng([seed, 0x0E7E])
    n = len(low)
    high = [int(high)] * n if isinstance(high, int) else [int(h) for h in high]
    cache: dict[tuple[int, ...], float] = {}

    def repair(c) -> tuple[int, ...]:
        c = list(c)
        while target is not None and size_of(c) > target:
            steps = [(size_of(c) - size_of(c[:i] + [c[i] - 1] + c[i + 1:]), i) for i in range(n) if c[i] > low[i]]
            if not steps:
                raise BudgetError(
                    f"optembed cannot reach the budget of {target} bytes: with the rows the supernet kept, "
                    f"the smallest architecture holds {size_of(c)} bytes"
                )
            c[max(steps)[1]] -= 1
        return tuple(c)

    def score(c: tuple[int, ...]) -> float:
        if c not in cache:
            cache[c] = float(fitness(c))
        return cache[c]

    population = {repair(tuple(int(rng.integers(low[i], high[i] + 1)) for i in range(n)))
                  for _ in range(config.mutations + config.crossovers)}
    population.add(repair(tuple(high)))
    for c in sorted(population):
        score(c)
    for gen in range(config.generations):
        parents = sorted(cache, key=lambda c: (-cache[c], c))[: config.parents]
        children = []
        for _ in range(config.mutations):
            child = list(parents[int(rng.integers(len(parents)))])  # a copy: the parent stays as recorded
            for i in range(n):
                if rng.random() < config.mutation_prob:
                    child[i] = int(rng.integers(low[i], high[i] + 1))
            children.append(repair(child))
        for _ in range(config.crossovers):
            a = parents[int(rng.integers(len(parents)))]
            b = parents[int(rng.integers(len(parents)))]
            cut = int(rng.integers(1, n)) if n > 1 else 1  # a cut between fields, not inside the dims
            children.append(repair(a[:cut] + b[cut:]))
        for c in children:
            score(c)
        if log is not None:
            log(gen, max(cache.values()))
    best = max(cache, key=lambda c: (cache[c], tuple(-x for x in c)))
    return best, cache[best]


@register(OptEmbedConfig)
def build(tables: list[EmbeddingBagConfig], config: OptEmbedConfig, ctx: BuildContext) -> OptEmbedCollection:
    if config.budget is not None:
        config.budget.validate(tables)
    if not config.alpha >= 0 or not config.threshold_lr >= 0:
        raise MethodConfigError("optembed: alpha and threshold_lr must be non-negative")
    if config.generations < 0 or config.parents < 1 or not 0 <= config.mutation_prob <= 1:
        raise MethodConfigError("optembed: generations >= 0, parents >= 1 and mutation_prob in [0, 1] are required")
    return OptEmbedCollection(tables, config, ctx)
