"""AutoSrh (Kong et al., "AutoSrh: An Embedding Dimensionality Search Framework for Tabular
Data Prediction", TKDE 2022): dims per frequency group of each field, by a soft selection
layer, pruned to a budget, then retrained.

Groups: the ids of field (table) t are ranked by train count (``BuildContext.counts``,
summed over the table's features; ties by id) and cut into G groups of consecutive ranks
of geometrically growing size (1 : 2 : 4 : ...), so the most frequent ids form the
smallest group. A group's ids may keep a different set of the D dims.

1. ``search``: a learnable alpha_{t,g} in R^D (init 1) scales every id x of group g:
   e(x) = alpha_{t,g(x)} ⊙ v(x), v one TorchRec table of the full D; pooled, that is
   sum_g alpha_{t,g} ⊙ (sum of v over the bag's ids in g), so each group is a key of the
   one table and the product follows the pooling. The loss adds l1 · sum |alpha| (the
   paper's sparsity penalty); alpha trains on its own plain SGD (``extra_optimizers``).
2. ``select``: an entry (t, g, block of u dims; u = 1, or what a byte packs at int4/int2)
   scores the mean over its dims d of |alpha_{t,g,d}| · RMS_{x in g} v_{x,d}, what the
   entry adds to the outputs. (|alpha| alone, the paper's criterion, is arbitrary up to
   the rescaling alpha·v = (alpha/c)·(c·v), which the table's own optimiser is free to
   make: on MovieLens-100K it kept 8 dims for the rarest quarter of the items and 1 for
   the most frequent ones.) Under a ``budget`` (the deployed bytes, quantized
   when the config quantizes) the entries of least score are pruned until the deployed
   form fits, so a frequent group, whose alpha the task keeps up, keeps more dims than a
   rare one; pruned entries that still fit are given back (highest score first), and the
   bytes left go to the first r ids of one group for one more block, so the total lands
   within 5% of the budget. Every field keeps at least its best block of its most frequent
   group. Without a budget the entries scoring at least ``prune_threshold`` times their
   field's best entry are kept. The
   module becomes its deployed form here, re-initialised (``retrain_from="scratch"``) or
   holding the searched rows times alpha (``"search"``: the searched model with the
   pruned entries at zero, exactly).
3. ``retrain``: the deployed tables with their dims fixed are trained.

Deployed (``compression.segments``): per (field, group) a TorchRec table of only the
group's ids at its kept dims, scattered back to their positions in D (zero elsewhere);
the id -> rank remap is an int32 per id (4 bytes, counted), or nothing when the ids are
already in frequency order (rank = id, as this project's processed data numbers them).
A sorted list of ids per group would take the same 4 bytes an id, so the remap it is.

The groups and the selection (step 2's pruning and top-up) are pure functions, in
``compression.autosrh_select``; this module is the search form and its stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.autosrh_select import choose_entries, frequency_groups, table_segments
from compression.bags import pooled_lookup
from compression.base import CompressedEmbeddingBagCollection
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.counts import table_counts
from compression.deployed import TableFormat, deployed_bytes
from compression.idmap import inner_table
from compression.quantization import refuse_aware
from compression.segments import (
    Segment,
    SegmentTables,
    pack_unit,
    route,
    segment_bytes,
    segment_key,
)
from compression.sizing import BudgetedConfig, Reach, build_sized
from compression.stages import Stage, StageContext

# where the retrain stage starts: re-initialised tables, or the searched weights
RETRAIN_FROM = ("scratch", "search")


@dataclass
class AutoSrhConfig(BudgetedConfig):
    """AutoSrh. ``budget``: the deployed bytes; ``budget: null`` keeps the entries whose
    score is at least ``prune_threshold`` times its field's best."""

    method: ClassVar[str] = "autosrh"
    unbudgeted: ClassVar[Optional[str]] = "prune_threshold on the searched scores"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"l1": (3e-3, 1e-2, 3e-2)}
    sized_by_stages: ClassVar[bool] = True
    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=4))
    groups: int = bounded(4, ge=1)
    l1: float = bounded(0.01, ge=0)
    # plain SGD: the L1 term then drifts alpha down at l1 · lr a step, against a task
    # gradient that grows with how often the group is looked up (Adam's normalised steps
    # would drift every alpha alike)
    alpha_lr: float = bounded(0.1, gt=0)
    prune_threshold: float = 0.05
    # epochs of each stage (None: the trainer's own number)
    search_epochs: Optional[int] = 2
    retrain_epochs: Optional[int] = 3
    retrain_from: str = one_of("scratch", *RETRAIN_FROM)

    @classmethod
    def contract_examples(cls) -> list[AutoSrhConfig]:
        return [cls(), cls(budget=None)]


class AutoSrhCollection(CompressedEmbeddingBagCollection):
    """The AutoSrh search form (one full table per field, a key per group, alpha), then
    after ``select`` its deployed form (``SegmentTables``)."""

    def __init__(self, tables: list[EmbeddingBagConfig], config: AutoSrhConfig, ctx: BuildContext,
                 groups: dict[str, tuple[np.ndarray, list[int]]]) -> None:
        super().__init__(tables, config=ctx.config)
        self.config, self.seed = config, ctx.seed
        self.fmt = config.table_format(ctx.device)
        self.unit = pack_unit(self.fmt)
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        self.starts = {t: s for t, (_, s) in groups.items()}
        self.remapped = {t for t, (r, _) in groups.items() if not np.array_equal(r, np.arange(len(r)))}
        self._mean = {t.name for t in tables if t.pooling == PoolingType.MEAN}
        for t, (rank, starts) in groups.items():
            if t in self.remapped:
                self.register_buffer(f"rank__{t}", torch.as_tensor(rank, dtype=torch.int32, device=ctx.device), persistent=False)
            self.register_buffer(f"starts__{t}", torch.tensor(starts, dtype=torch.int64, device=ctx.device), persistent=False)
        self.ebc: Optional[EmbeddingBagCollection] = EmbeddingBagCollection(tables=[
            inner_table(t, features=[segment_key(f, g) for f in t.feature_names for g in range(len(self.starts[t.name]))])
            for t in tables
        ], device=ctx.table_device)  # fmt: skip
        for c in self.ebc.embedding_bag_configs():  # SUM per group; MEAN divides by the whole bag's length
            assert c.pooling in (PoolingType.SUM, PoolingType.MEAN)
        self.alpha: Optional[nn.ParameterDict] = nn.ParameterDict({
            t.name: nn.Parameter(torch.ones(len(self.starts[t.name]), t.embedding_dim, device=ctx.device)) for t in tables
        })
        self.deployed: Optional[SegmentTables] = None

    def _order(self) -> list[tuple[str, torch.Tensor | None, torch.Tensor]]:
        return [(f, getattr(self, f"rank__{self._table_of[f]}") if self._table_of[f] in self.remapped else None,
                 getattr(self, f"starts__{self._table_of[f]}")) for f in self.feature_names]  # fmt: skip

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        if self.deployed is not None:
            x = self.deployed(features)
            out = [x[f] for f in self.feature_names]
        else:
            assert self.ebc is not None and self.alpha is not None
            kjt = route(features, self._order(), local=False)
            pooled = pooled_lookup(self.ebc, kjt).to_dict()
            out = []
            for f in self.feature_names:
                t = self._table_of[f]
                a = self.alpha[t]
                out.append(sum(pooled[segment_key(f, g)] * a[g] for g in range(a.shape[0])))  # type: ignore[misc]
        if self._mean:
            d = features.to_dict()
            out = [o / d[f].lengths().clamp(min=1).unsqueeze(1).to(o.dtype) if self._table_of[f] in self._mean else o
                   for f, o in zip(self.feature_names, out)]  # fmt: skip
        return KeyedTensor(keys=self.feature_names, length_per_key=[o.shape[1] for o in out], values=torch.cat(out, dim=1))

    # -- search --------------------------------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        if self.alpha is None or not self.training:
            return None
        return self.config.l1 * sum(a.abs().sum() for a in self.alpha.values())  # type: ignore[return-value]

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        if self.alpha is None:
            return []
        return [torch.optim.SGD(list(self.alpha.values()), lr=self.config.alpha_lr)]

    @torch.no_grad()
    def scores(self) -> dict[str, np.ndarray]:
        """Per (group, block of ``unit`` dims) of every field, the mean over its dims of
        |alpha_{g,d}| · RMS_{x in g} v_{x,d}: what the entry adds to the outputs, whatever
        the split of scale between alpha and the rows (see the module docstring)."""
        assert self.alpha is not None and self.ebc is not None
        out = {}
        for t, a in self.alpha.items():
            w = self.ebc.embedding_bags[t].weight.detach().float().cpu()
            rank = getattr(self, f"rank__{t}").to(torch.int64).cpu() if t in self.remapped else torch.arange(len(w))
            group = torch.bucketize(rank, torch.tensor(self.starts[t][1:], dtype=torch.int64), right=True)
            sq = torch.zeros(a.shape[0], w.shape[1]).index_add_(0, group, w * w)
            rms = (sq / torch.bincount(group, minlength=a.shape[0]).clamp(min=1).unsqueeze(1)).sqrt()
            score = a.detach().abs().float().cpu() * rms
            out[t] = score.reshape(a.shape[0], -1, self.unit).mean(-1).numpy()
        return out

    def training_metrics(self) -> dict[str, float]:
        """mean |alpha| per (field, group) at each search epoch end (search progress)."""
        if self.alpha is None:
            return {}
        return {f"alpha.{t}.g{g}": float(s[g].mean()) for t, s in self.scores().items() for g in range(s.shape[0])}

    def stages(self) -> list[Stage]:
        c = self.config
        return [
            Stage("search", run=self._run_search, params={"groups": c.groups, "l1": c.l1, "alpha_lr": c.alpha_lr},
                  at_budget=False),
            Stage("select", run=self._run_select, params={"retrain_from": c.retrain_from}, checkpoint=False),
            Stage("retrain", run=lambda ctx: ctx.fit(self.config.retrain_epochs), params={"epochs": c.retrain_epochs}),
        ]

    def _run_search(self, ctx: StageContext) -> dict[str, float]:
        metrics = ctx.fit(self.config.search_epochs)
        progress = self.training_metrics()
        ctx.log(progress, step=0)
        return {**metrics, **progress}

    def _run_select(self, ctx: StageContext) -> dict[str, float]:
        segs = choose_entries(self.source_tables(), self.scores(), self.starts, self.remapped, self.fmt, self.target_bytes(),
                              self.config.prune_threshold)  # fmt: skip
        self.deploy(segs, warm=self.config.retrain_from == "search")
        ctx.model.to(ctx.device)
        ctx.log_params(self.describe())
        return {"embedding_bytes": float(deployed_bytes(self, self.fmt))}

    # -- the deployed form --------------------------------------------------------------------
    @torch.no_grad()
    def deploy(self, segments: dict[str, list[Segment]], warm: bool = False) -> None:
        """Become the deployed form holding ``segments`` (in place): re-initialised, seeded,
        or (``warm``) each segment's rows times its group's alpha at its kept dims."""
        assert self.ebc is not None and self.alpha is not None
        tables = self.source_tables()
        weight = {t.name: self.ebc.embedding_bags[t.name].weight for t in tables}
        dense = self.starts__device()
        ranks = {t.name: getattr(self, f"rank__{t.name}") if t.name in self.remapped else None for t in tables}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            module = SegmentTables(tables, segments, {t.name: t.embedding_dim for t in tables}, ranks, dense,
                                   weight[tables[0].name].device)  # fmt: skip
        if warm:
            for t in tables:
                w, a = weight[t.name], self.alpha[t.name]
                rank = ranks[t.name]
                ids = torch.argsort(rank.to(torch.int64)) if rank is not None else torch.arange(t.num_embeddings)
                groups = torch.tensor(self.starts[t.name][1:], dtype=torch.int64)
                for i, s in enumerate(segments[t.name]):
                    if not s.dims:
                        continue
                    g = int(torch.bucketize(torch.tensor(s.start), groups, right=True))
                    cols = torch.tensor(s.dims, dtype=torch.int64)
                    rows = w[ids[s.start : s.stop].to(w.device)][:, cols.to(w.device)]
                    module.table(t.name, i).copy_(rows * a[g, cols.to(a.device)].to(w.device))
        self.deployed = module
        self.ebc = self.alpha = None
        for t in tables:  # the search's routing buffers: the deployed tables hold their own
            if t.name in self.remapped:
                delattr(self, f"rank__{t.name}")
            delattr(self, f"starts__{t.name}")
        held, planned = deployed_bytes(self, self.fmt), segment_bytes(tables, segments, self.remapped, self.fmt)
        if held != planned:  # pragma: no cover - bytes are counted, not guessed
            raise AssertionError(f"autosrh: planned {planned} bytes but the deployed module holds {held}")

    def starts__device(self) -> torch.device:
        return getattr(self, f"starts__{self.source_tables()[0].name}").device

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.config.budget_label(), "groups": self.config.groups}
        if self.deployed is None:
            return out
        for t, segs in self.deployed.segments.items():
            for i, s in enumerate(segs):
                out[f"{t}.s{i}"] = f"ranks {s.start}-{s.stop - 1}: {len(s.dims)} dims"
        out["planned_bytes"] = segment_bytes(self.source_tables(), self.deployed.segments, self.remapped, self.fmt)
        out["planned_precision"] = self.fmt.precision
        return out


def _check(config: AutoSrhConfig, tables: list[EmbeddingBagConfig], ctx: BuildContext) -> None:
    refuse_aware(config.quantization, "autosrh", "the select stage replaces the tables it would train")
    fmt = config.table_format(ctx.device)
    unit = pack_unit(fmt)
    for t in tables:
        if t.embedding_dim % unit:
            raise MethodConfigError(f"autosrh: {fmt.precision} packs {unit} values per byte, but table '{t.name}' has dim "
                                    f"{t.embedding_dim}")  # fmt: skip
        missing = [f for f in t.feature_names if f not in ctx.counts]
        if missing:
            raise MethodConfigError(f"autosrh groups ids by train frequency: it needs the counts of feature(s) {missing}")


@register(AutoSrhConfig)
def build(tables: list[EmbeddingBagConfig], config: AutoSrhConfig, ctx: BuildContext) -> AutoSrhCollection:
    groups: dict[str, Any] = {}

    def grouped() -> dict[str, Any]:  # ids by train frequency, once the counts are checked
        if not groups:
            groups.update({t.name: frequency_groups(table_counts(t, ctx.counts, config.method), t.num_embeddings,
                                                    config.groups) for t in tables})  # fmt: skip
        return groups

    def reach(fmt: TableFormat) -> Reach:
        g, unit = grouped(), pack_unit(fmt)
        remapped = {t for t, (r, _) in g.items() if not np.array_equal(r, np.arange(len(r)))}
        least = {}
        for t in tables:
            kept = np.zeros((len(g[t.name][1]), t.embedding_dim // unit), dtype=bool)
            kept[0, 0] = True
            least[t.name] = table_segments(t.num_embeddings, g[t.name][1], kept, unit)
        return Reach(segment_bytes(tables, least, remapped, fmt), "one block of dims per field")

    return build_sized(tables, config, ctx, check=lambda: _check(config, tables, ctx), search=reach,
                       unplanned=lambda: AutoSrhCollection(tables, config, ctx, grouped()))  # fmt: skip
