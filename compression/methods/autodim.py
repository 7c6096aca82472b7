"""AutoDim (Zhao et al., "AutoDim: Field-aware Embedding Dimension Search in Recommender
Systems", WWW 2021): a dim per field chosen by a differentiable search, then retrained.

1. ``search``: field (table) t of output dim D has candidate dims c_1 < ... < c_K
   (``candidates`` below D, and D). The candidates share one TorchRec table of dim D
   (the paper's weight-sharing variant: candidate k reads the first c_k columns), each
   with its own bias-free linear map W_k: R^{c_k} -> R^D and batch norm BN_k:

       e_t = sum_k p_{t,k} BN_k(W_k x[:c_k]),   p_t = softmax((alpha_t + g) / tau)

   g Gumbel noise while training (none at evaluation), tau annealed per step as
   max(tau_min, tau0 · exp(-anneal · step)). The weights and alpha are updated together
   on the training data (a first-order simplification of the paper's bi-level
   train/validation alternation), alpha on its own Adam (``extra_optimizers``).
2. ``select``: each field takes argmax_k alpha_{t,k}. Under a ``budget`` (the deployed
   bytes, quantized when the config quantizes): while over it, the field whose step to
   its next smaller candidate loses the least probability per byte saved steps down;
   while under, the field whose next larger candidate gains the most probability per
   byte added steps up if it fits; then the bytes left go to the first r ids of fields
   (most probable larger dims first): ids [0, r) at d + u, the rest at d (u = 1, or the
   values a byte packs at int4/int2), so the total lands within 5% of the budget.
   The module becomes its deployed form here, re-initialised (``retrain_from="scratch"``,
   the paper's) or carrying the searched weights of the chosen candidate.
3. ``retrain``: the mixed-dim tables are trained (``retrain_epochs``).

Deployed: per field one TorchRec table at its dim d_t (two when the first r ids hold
one dim more: ``compression.segments``) and a linear map W_t x + b_t: R^{d_t} -> R^D, so
the model sees every feature at D (the benchmark's retrain embedding, a table and a
linear layer). No batch norm is deployed: BN's outputs have unit variance per dim, tens of
times the tables' scale, and a model that multiplies embeddings (DeepFM's FM term) then
saturates (MovieLens-100K, DeepFM, 2x: test AUC 0.70, logloss 0.89 with BN_t deployed);
a warm deploy folds the searched BN_k, at its running statistics, into W_t and b_t. The
budget counts exactly those tensors (``deployed_bytes``); it is refused at build when
every field at its smallest candidate does not fit, naming the smallest ratio.

Sharded (TorchRec DMP): the search's table shards row-wise like any table, and its
forward at evaluation equals one process's; a training step is DDP's, not one process's
on the whole batch (Gumbel noise is drawn on each rank, each BN_k normalises its rank's
batch), as for any model with batch norm (``tests/training/test_distributed.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import pooled_lookup
from compression.base import CompressedEmbeddingBagCollection
from compression.budget import BUDGET_TOLERANCE, Budget, BudgetError
from compression.config_checks import bounded, one_of
from compression.deployed import TableFormat, deployed_bytes
from compression.formats import FP32_BYTES
from compression.idmap import inner_table
from compression.quantization import refuse_aware
from compression.segments import Segment, SegmentTables, pack_unit, segment_bytes
from compression.sizing import BudgetedConfig, Reach, build_sized
from compression.stages import Stage, StageContext

# where the retrain stage starts: the paper's re-initialised tables, or the searched weights
RETRAIN_FROM = ("scratch", "search")


@dataclass
class AutoDimConfig(BudgetedConfig):
    """AutoDim. ``budget: null`` is the paper's setting (each field's argmax dim); a budget
    bounds the deployed module (its quantized tables when the config quantizes)."""

    method: ClassVar[str] = "autodim"
    unbudgeted: ClassVar[Optional[str]] = "each field's argmax dim"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"alpha_lr": (3e-3, 1e-2, 3e-2)}
    sized_by_stages: ClassVar[bool] = True
    budget: Optional[Budget] = None
    # candidate dims below each table's dim (the table's own dim is always a candidate)
    candidates: list[int] = bounded(ge=1, each=True, default_factory=lambda: [2, 4, 8, 16])
    # epochs of each stage (None: the trainer's own number)
    search_epochs: Optional[int] = 2
    retrain_epochs: Optional[int] = 3
    retrain_from: str = one_of("scratch", *RETRAIN_FROM)
    alpha_lr: float = bounded(0.01, gt=0)
    # Gumbel-softmax temperature: tau0 · exp(-anneal · step), at least tau_min
    tau0: float = bounded(1.0, gt=0)
    tau_min: float = bounded(0.1, gt=0)
    anneal: float = bounded(0.005, ge=0)

    def check(self) -> None:
        if not self.candidates:
            raise MethodConfigError("autodim.candidates: must hold at least one dim, got []")
        if self.tau_min > self.tau0:
            raise MethodConfigError(f"autodim.tau_min and autodim.tau0: the temperature's floor must be <= its start, "
                                    f"got {self.tau_min} > {self.tau0}")  # fmt: skip

    @classmethod
    def contract_examples(cls) -> list[AutoDimConfig]:
        return [cls(), cls(budget=Budget(ratio=2))]


# a field's deployed form: (dim d, dim of its first r ids, r); r = 0: every id at d
Choice = tuple[int, int, int]


def field_segments(rows: int, choice: Choice) -> tuple[list[Segment], int]:
    """Segments and width of a field of ``rows`` ids deployed as ``choice``."""
    d, hi, r = choice
    if r == 0 or hi == d:
        return [Segment(0, rows, tuple(range(d)))], d
    return [Segment(0, r, tuple(range(hi))), Segment(r, rows, tuple(range(d)))], hi


def field_bytes(t: EmbeddingBagConfig, choice: Choice, fmt: TableFormat) -> int:
    """Bytes of one field's deployed form beside the collection's own: its segment
    tables and indices, and the fp32 linear map to D (weight and bias)."""
    segs, width = field_segments(t.num_embeddings, choice)
    body = segment_bytes([t], {t.name: segs}, set(), fmt) - fmt.collection([t])
    return body + FP32_BYTES * (width + 1) * t.embedding_dim


def choose_dims(
    tables: list[EmbeddingBagConfig],
    probs: dict[str, list[float]],
    cands: dict[str, list[int]],
    fmt: TableFormat,
    target: Optional[int],
) -> dict[str, Choice]:
    """Each field's argmax candidate; under ``target`` bytes, stepped down by the least
    probability lost per byte saved, up by the most gained per byte added, then the last
    bytes given to the first ids of fields (see the module docstring)."""
    by = {t.name: t for t in tables}
    idx = {t: max(range(len(p)), key=lambda k: (p[k], -k)) for t, p in probs.items()}
    whole = {t: (cands[t][k], cands[t][k], 0) for t, k in idx.items()}
    if target is None:
        return whole
    fixed = fmt.collection(tables)
    cost = {t: field_bytes(by[t], c, fmt) for t, c in whole.items()}

    def at(t: str, k: int) -> int:
        return field_bytes(by[t], (cands[t][k], cands[t][k], 0), fmt)

    def total() -> int:
        return fixed + sum(cost.values())

    while total() > target:
        down = [((probs[t][k] - probs[t][k - 1]) / max(cost[t] - at(t, k - 1), 1), t) for t, k in idx.items() if k > 0]
        if not down:
            raise BudgetError(f"autodim cannot reach {target} bytes: every field is at its smallest candidate")
        _, t = min(down)
        idx[t] -= 1
        cost[t] = at(t, idx[t])
    while True:
        up = [((probs[t][k + 1] - probs[t][k]) / max(at(t, k + 1) - cost[t], 1), t) for t, k in idx.items()
              if k + 1 < len(cands[t]) and total() - cost[t] + at(t, k + 1) <= target]  # fmt: skip
        if not up:
            break
        _, t = max(up)
        idx[t] += 1
        cost[t] = at(t, idx[t])
    chosen = {t: (cands[t][k], cands[t][k], 0) for t, k in idx.items()}
    # the last bytes: the first r ids of a field at its next candidate, likeliest fields first
    for t in sorted(idx, key=lambda t: -sum(probs[t][idx[t] + 1:])):
        d, n = chosen[t][0], by[t].num_embeddings
        if idx[t] + 1 == len(cands[t]) or n < 2:
            continue
        hi = cands[t][idx[t] + 1]
        room = target - total() + cost[t]
        lo_r, hi_r = 0, n - 1
        while lo_r < hi_r:  # the most ids that fit (bytes grow with r)
            mid = (lo_r + hi_r + 1) // 2
            lo_r, hi_r = (mid, hi_r) if field_bytes(by[t], (d, hi, mid), fmt) <= room else (lo_r, mid - 1)
        if lo_r > 0:
            chosen[t] = (d, hi, lo_r)
            cost[t] = field_bytes(by[t], chosen[t], fmt)
    if total() < (1 - BUDGET_TOLERANCE) * target:
        raise BudgetError(f"autodim cannot land within {BUDGET_TOLERANCE:.0%} of {target} bytes: with every field at its "
                          f"largest dim that fits it holds {total()} bytes")  # fmt: skip
    return chosen


class DeployedDims(nn.Module):
    """Per field its segment tables and W_t x + b_t: R^{width} -> R^D."""

    def __init__(self, tables: list[EmbeddingBagConfig], chosen: dict[str, Choice], device: torch.device,
                 table_device: torch.device) -> None:
        super().__init__()
        segs, widths = {}, {}
        for t in tables:
            segs[t.name], widths[t.name] = field_segments(t.num_embeddings, chosen[t.name])
        self.tables = SegmentTables(tables, segs, widths, {}, device, table_device)
        maps = {t.name: nn.Linear(widths[t.name], t.embedding_dim, device=device) for t in tables}
        for m in maps.values():  # no offset to start from: a random bias of up to 1/sqrt(width)
            nn.init.zeros_(m.bias)  # dwarfs the tables' rows and swamps DeepFM's FM term
        self.proj = nn.ModuleDict(maps)
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        self._mean = {t.name for t in tables if t.pooling == PoolingType.MEAN}

    def forward(self, features: KeyedJaggedTensor, names: list[str]) -> list[torch.Tensor]:
        x = self.tables(features)
        lengths = features.to_dict() if self._mean else {}
        out = []
        for f in names:
            t = self._table_of[f]
            y = x[f]
            if t in self._mean:
                y = y / lengths[f].lengths().clamp(min=1).unsqueeze(1).to(y.dtype)
            out.append(self.proj[t](y))
        return out


class AutoDimCollection(CompressedEmbeddingBagCollection):
    """The AutoDim supernet (``search``), then after ``select`` its deployed form."""

    def __init__(self, tables: list[EmbeddingBagConfig], config: AutoDimConfig, ctx: BuildContext) -> None:
        super().__init__(tables, config=ctx.config)
        self.config, self.seed = config, ctx.seed
        self.fmt = config.table_format(ctx.device)
        self.names = [t.name for t in tables]
        self.cands = {t.name: sorted({c for c in config.candidates if c < t.embedding_dim} | {t.embedding_dim}) for t in tables}
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        self.ebc: Optional[EmbeddingBagCollection] = EmbeddingBagCollection(
            tables=[inner_table(t) for t in tables], device=ctx.table_device)
        dims = {t.name: t.embedding_dim for t in tables}
        self.proj: Optional[nn.ModuleDict] = nn.ModuleDict({
            t: nn.ModuleList([nn.Linear(c, dims[t], bias=False, device=ctx.device) for c in cs]) for t, cs in self.cands.items()
        })
        self.bn: Optional[nn.ModuleDict] = nn.ModuleDict({
            t: nn.ModuleList([nn.BatchNorm1d(dims[t], device=ctx.device) for _ in cs]) for t, cs in self.cands.items()
        })
        self.alpha: Optional[nn.ParameterDict] = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(len(cs), device=ctx.device)) for t, cs in self.cands.items()})
        self.register_buffer("search_steps", torch.zeros((), dtype=torch.int64, device=ctx.device))
        self.deployed: Optional[DeployedDims] = None
        self.chosen: dict[str, Choice] = {}

    # -- search --------------------------------------------------------------------------
    def temperature(self) -> float:
        c = self.config
        return max(c.tau_min, c.tau0 * math.exp(-c.anneal * int(self.search_steps)))

    def probabilities(self) -> dict[str, list[float]]:
        """softmax(alpha_t) per field, over its candidates (what ``select`` ranks by)."""
        assert self.alpha is not None
        return {t: torch.softmax(a.detach().float(), 0).tolist() for t, a in self.alpha.items()}

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        if self.deployed is not None:
            out = self.deployed(features, self.feature_names)
        else:
            assert self.ebc is not None and self.proj is not None and self.bn is not None and self.alpha is not None
            pooled = pooled_lookup(self.ebc, features).to_dict()
            tau = self.temperature()
            if self.training:
                self.search_steps += 1
            weights = {t: F.gumbel_softmax(a, tau=tau) if self.training else torch.softmax(a / tau, 0)
                       for t, a in self.alpha.items()}  # fmt: skip
            out = []
            for f in self.feature_names:
                t, x = self._table_of[f], pooled[f]
                w = weights[t]
                out.append(sum(w[k] * self.bn[t][k](self.proj[t][k](x[:, :c])) for k, c in enumerate(self.cands[t])))  # type: ignore[index]
        return KeyedTensor(keys=self.feature_names, length_per_key=[o.shape[1] for o in out], values=torch.cat(out, dim=1))

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        if self.alpha is None:
            return []
        return [torch.optim.Adam(list(self.alpha.values()), lr=self.config.alpha_lr)]

    def training_metrics(self) -> dict[str, float]:
        """Each field's candidate probabilities and the temperature (search progress)."""
        if self.alpha is None:
            return {}
        out = {"tau": self.temperature()}
        for t, p in self.probabilities().items():
            out.update({f"p.{t}.d{c}": v for c, v in zip(self.cands[t], p)})
        return out

    def stages(self) -> list[Stage]:
        c = self.config
        return [
            Stage("search", run=self._run_search, params={"candidates": ",".join(map(str, c.candidates)), "alpha_lr": c.alpha_lr,
                                                          "tau0": c.tau0, "tau_min": c.tau_min, "anneal": c.anneal},
                  at_budget=False),
            Stage("select", run=self._run_select, params={"retrain_from": c.retrain_from}, checkpoint=False),
            Stage("retrain", run=lambda ctx: ctx.fit(self.config.retrain_epochs), params={"epochs": c.retrain_epochs}),
        ]  # fmt: skip

    def _run_search(self, ctx: StageContext) -> dict[str, float]:
        metrics = ctx.fit(self.config.search_epochs)
        progress = self.training_metrics()
        ctx.log(progress, step=int(self.search_steps))
        return {**metrics, **progress}

    def _run_select(self, ctx: StageContext) -> dict[str, float]:
        probs = self.probabilities()
        self.deploy(choose_dims(self.source_tables(), probs, self.cands, self.fmt, self.target_bytes()),
                    warm=self.config.retrain_from == "search")  # fmt: skip
        ctx.model.to(ctx.device)
        ctx.log_params(self.describe())
        held = deployed_bytes(self, self.fmt)
        return {"embedding_bytes": float(held), **{f"dim.{t}": float(c[0]) for t, c in self.chosen.items()}}

    # -- the deployed form --------------------------------------------------------------------
    @torch.no_grad()
    def deploy(self, chosen: dict[str, Choice], warm: bool = False) -> None:
        """Become the deployed form of ``chosen`` (in place): re-initialised, seeded, or
        (``warm``) holding the searched table columns of each field's candidate and its
        projection with its BN folded in at the running statistics, the same map in
        evaluation (a field whose first ids got a wider dim keeps zeros in those columns)."""
        assert self.ebc is not None and self.proj is not None and self.bn is not None
        tables = self.source_tables()
        weight = {t.name: self.ebc.embedding_bags[t.name].weight for t in tables}
        dense = next(iter(self.alpha.values())).device if self.alpha is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            module = DeployedDims(tables, chosen, dense, weight[tables[0].name].device)
        if warm:
            for t in tables:
                d, hi, r = chosen[t.name]
                k = self.cands[t.name].index(d)
                w = weight[t.name]
                segs, _ = field_segments(t.num_embeddings, chosen[t.name])
                for i, s in enumerate(segs):
                    module.tables.table(t.name, i).copy_(w[s.start : s.stop, : len(s.dims)])
                bn = self.bn[t.name][k]  # type: ignore[index]
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # BN_k(z) = scale * z + shift
                proj = module.proj[t.name]
                proj.weight.zero_()  # type: ignore[operator]
                proj.weight[:, :d].copy_(scale.unsqueeze(1) * self.proj[t.name][k].weight)  # type: ignore[index]
                proj.bias.copy_(bn.bias - scale * bn.running_mean)  # type: ignore[operator]
        self.deployed, self.chosen = module, dict(chosen)
        self.ebc = self.proj = self.bn = self.alpha = None
        del self.search_steps
        held = deployed_bytes(self, self.fmt)
        planned = self.planned_bytes()
        if held != planned:  # pragma: no cover - bytes are counted, not guessed
            raise AssertionError(f"autodim: planned {planned} bytes but the deployed module holds {held}")

    def planned_bytes(self) -> int:
        tables = self.source_tables()
        return self.fmt.collection(tables) + sum(field_bytes(t, self.chosen[t.name], self.fmt) for t in tables)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.config.budget_label()}
        for t, (d, hi, r) in self.chosen.items():
            out[f"{t}.dim"] = d
            if r:
                out[f"{t}.first_ids_dim"], out[f"{t}.first_ids"] = hi, r
        if self.chosen:
            out["planned_bytes"], out["planned_precision"] = self.planned_bytes(), self.fmt.precision
        return out


def _check(config: AutoDimConfig, tables: list[EmbeddingBagConfig], ctx: BuildContext) -> None:
    refuse_aware(config.quantization, "autodim", "the select stage replaces the tables it would train")
    fmt = config.table_format(ctx.device)
    unit = pack_unit(fmt)
    for t in tables:
        odd = [c for c in config.candidates if c < t.embedding_dim and c % unit]
        if odd:
            raise MethodConfigError(f"autodim: {fmt.precision} packs {unit} values per byte, but candidates {odd} of table "
                                    f"'{t.name}' are not multiples of {unit}")  # fmt: skip


def _reach(config: AutoDimConfig, tables: list[EmbeddingBagConfig], fmt: TableFormat) -> Reach:
    least = {t.name: min([c for c in config.candidates if c < t.embedding_dim] + [t.embedding_dim]) for t in tables}
    smallest = fmt.collection(tables) + sum(field_bytes(t, (least[t.name], least[t.name], 0), fmt) for t in tables)
    largest = fmt.collection(tables) + sum(field_bytes(t, (t.embedding_dim, t.embedding_dim, 0), fmt) for t in tables)
    return Reach(smallest, "every field at its smallest candidate", largest)


@register(AutoDimConfig)
def build(tables: list[EmbeddingBagConfig], config: AutoDimConfig, ctx: BuildContext) -> AutoDimCollection:
    return build_sized(tables, config, ctx, check=lambda: _check(config, tables, ctx),
                       search=lambda fmt: _reach(config, tables, fmt),
                       unplanned=lambda: AutoDimCollection(tables, config, ctx))  # fmt: skip
