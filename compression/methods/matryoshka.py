"""Nested dims (Matryoshka tables): one training whose row prefixes serve every budget.

A table is trained so that the first d columns of each row are a good embedding for
every d of a ladder (Matryoshka representations, Kusupati et al. NeurIPS'22; nested
dropout, Rippel et al. ICML'14): on each training step every (sample, field) reads its
row cut to a prefix drawn uniformly from the ladder, zero beyond, so the expected loss is
the ladder's loss averaged over the fields' prefixes, for the cost of one forward (the
paper sums a loss per rung: one forward per rung). A pooled bag's prefix is the pool of
its rows' prefixes, so the cut is made after TorchRec's pooled lookup.

Deploy (the ``deploy`` stage, or ``deploy_for`` on the library path): each field's prefix
for a budget, without retraining. The stage measures once, on validation, what cutting
each field alone to each rung costs in AUC; a greedy knapsack then gives each field its
dim (interpolating between rungs) so the tables hold [0.95, 1.0] of the budget, and
the module keeps only those prefixes (a TorchRec table of d_f columns per field, its
output zero-padded to the field's dim: what the model trained on). One dim of a large
table can be a tenth of a budget, so the bytes a whole dim cannot use give the next dim of
the best remaining field to its first ids (the most frequent: ids are numbered by train
frequency), in a second TorchRec table; the rest of its ids read zeros there. Any number of
budgets are deployed from the same measurements (``deploy_ratios``: their validation AUC
and bytes logged by the stage), so a budget sweep costs one training.

Quantization: the deployed tables become fbgemm's quantized rows in the ``quantize``
stage; the budget counts them so, and the dims chosen pack (int4: even dims). QAT and
sharding are refused (the deploy stage replaces the tables).

Example::

    m = compress(tables, MatryoshkaConfig(budget=Budget(ratio=8)))
    ... train ...
    dims, extra = m.deploy_for(Budget(ratio=4).target_bytes(tables))   # another budget, same training
    m.deployed_copy(dims, extra)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, register
from compression.bags import pooled_lookup
from compression.base import CompressedEmbeddingBagCollection
from compression.budget import BUDGET_TOLERANCE, Budget, BudgetError
from compression.config_checks import bounded
from compression.deployed import TableFormat
from compression.errors import MethodConfigError
from compression.idmap import inner_table
from compression.quantization import refuse_aware
from compression.segments import pack_unit
from compression.sizing import BudgetedConfig, Reach, build_sized
from compression.stages import Stage, StageContext


@dataclass
class MatryoshkaConfig(BudgetedConfig):
    """Matryoshka tables. ``budget``: the deployed bytes (each field's prefix chosen for it
    after training); ``budget: null``: the tables deploy whole (the training alone)."""

    method: ClassVar[str] = "matryoshka"
    sized_by_stages: ClassVar[bool] = True
    unbudgeted: ClassVar[Optional[str]] = "every field keeps its whole dim"
    # (at most the tables' dim: a prefix of one column is the smallest form)
    budget: Optional[Budget] = field(default_factory=lambda: Budget(ratio=4))
    # the prefixes trained (a table's own dim is always one); the deploy step chooses any dim,
    # interpolating the cost it measured at these
    ladder: list[int] = bounded(ge=1, each=True, default_factory=lambda: [1, 2, 4, 8])
    # validation batches each measurement of the deploy step reads (None: the whole split)
    deploy_val_batches: Optional[int] = bounded(8, ge=1)
    # further budgets (ratios) deployed from the same training in the deploy stage: their
    # validation AUC and bytes are logged beside the budget's own
    deploy_ratios: list[float] = bounded(ge=1, each=True, default_factory=list)

    def check(self) -> None:
        if self.deploy_ratios and self.quantization is not None:
            raise MethodConfigError(f"matryoshka.deploy_ratios and matryoshka.quantization: the further budgets are "
                                    f"deployed and evaluated in fp32, the budget's own tables in "
                                    f"{self.quantization.precision}; give deploy_ratios without quantization")  # fmt: skip

    @classmethod
    def contract_examples(cls) -> list[MatryoshkaConfig]:
        return [cls(budget=Budget(ratio=4)), cls(budget=None)]


class MatryoshkaCollection(CompressedEmbeddingBagCollection):
    """Full TorchRec tables trained on random prefixes; after ``deploy(dims)``, a table of
    ``dims[t]`` columns per field, zero-padded to its dim."""

    def __init__(self, tables: list[EmbeddingBagConfig], config: MatryoshkaConfig, ctx: BuildContext) -> None:
        super().__init__(tables, config=ctx.config)
        self.config = config
        self.fmt = config.table_format(ctx.device)
        self.ebc = EmbeddingBagCollection(tables=[inner_table(t) for t in tables], device=ctx.table_device)
        self.rungs = {t.name: sorted({d for d in config.ladder if d < t.embedding_dim} | {t.embedding_dim}) for t in tables}
        self._tables = {t.name: t for t in tables}
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        self.prefix: dict[str, int] = {}  # evaluation with these tables cut (the deploy step's measurements)
        self.dims: dict[str, int] = {}  # the deployed dims, once deployed
        self.extra: dict[str, int] = {}  # table -> its first ids that keep one more block of columns
        self.xebc: Optional[EmbeddingBagCollection] = None
        self.losses: dict[str, dict[int, float]] = {}  # table -> rung -> validation AUC lost when cut alone
        # deploy_ratios' forms (tables, dims, extra rows), kept for the test split; a plain dict:
        # not submodules, so neither in the state_dict nor in the bytes
        self.ratio_forms: dict[str, dict[str, Any]] = {}

    def sharding_refusal(self) -> str | None:
        return "matryoshka: the deploy stage replaces every table by its prefix, which a sharded table does not hold on one rank"

    # -- forward ---------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        kt = pooled_lookup(self.ebc, features)
        values = kt.values()
        keys = list(kt.keys())
        widths = kt.length_per_key()
        if self.dims:  # deployed: each field's prefix, zero-padded to its dim
            full = [self._tables[self._table_of[f]].embedding_dim for f in keys]
            parts = list(torch.split(values, widths, dim=1))
            if self.xebc is not None:  # the first ids of a table read one more block
                more = pooled_lookup(self.xebc, self._extra_features(features)).to_dict()
                parts = [torch.cat([p, more[f"{f}__x"]], dim=1) if f"{f}__x" in more else p for f, p in zip(keys, parts)]
            values = torch.cat([nn.functional.pad(p, (0, d - p.shape[1])) for p, d in zip(parts, full)], dim=1)
            widths = full
        elif self.training:
            values = values * self._random_prefixes(keys, widths, values.shape[0], values.device)
        elif self.prefix:
            cut = [self.prefix.get(self._table_of[f], w) for f, w in zip(keys, widths)]
            mask = torch.cat([torch.arange(w, device=values.device) < c for w, c in zip(widths, cut)])
            values = values * mask.to(values.dtype)
        out = KeyedTensor(keys=keys, length_per_key=widths, values=values)
        return out if keys == self.feature_names else KeyedTensor.from_tensor_list(
            self.feature_names, [out[f] for f in self.feature_names])  # fmt: skip

    def _extra_features(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The features of the tables with extra rows, renamed ``<f>__x``, their ids past
        the rows kept sent to the zero row after them."""
        keys, values, lengths = [], [], []
        for name, r in self.extra.items():
            for f in self._tables[name].feature_names:
                jt = features[f]
                keys.append(f"{f}__x")
                values.append(torch.where(jt.values() < r, jt.values(), torch.full_like(jt.values(), r)))
                lengths.append(jt.lengths())
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))

    def _random_prefixes(self, keys: list[str], widths: list[int], batch: int, device: torch.device) -> torch.Tensor:
        """[batch, sum of widths]: 1 on each (sample, field)'s prefix, drawn from its ladder."""
        blocks = []
        for f, w in zip(keys, widths):
            rungs = torch.tensor(self.rungs[self._table_of[f]], device=device)
            d = rungs[torch.randint(len(rungs), (batch,), device=device)]
            blocks.append(torch.arange(w, device=device).unsqueeze(0) < d.unsqueeze(1))
        return torch.cat(blocks, dim=1).to(torch.float32)

    # -- deploy ----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train"), Stage("deploy", run=self.run_deploy, checkpoint=False,
                                      params={"ladder": list(self.config.ladder)})]  # fmt: skip

    def allowed_dims(self, t: EmbeddingBagConfig) -> list[int]:
        unit = pack_unit(self.fmt)
        return [d for d in range(unit, t.embedding_dim + 1, unit)] or [t.embedding_dim]

    def held_bytes(self, dims: dict[str, int], extra: dict[str, int] | None = None) -> int:
        """Bytes the deployed tables hold at ``dims`` (and ``extra``: a table's first ids with
        one more block of columns, and a zero row), in the format the budget counts."""
        tables = list(self._tables.values())
        held = self.fmt.collection(tables) + sum(
            self.fmt.table(t.num_embeddings, dims[t.name], len(t.feature_names)) for t in tables)  # fmt: skip
        if not extra:
            return held
        unit = pack_unit(self.fmt)  # (a collection of its own: its metadata too)
        return held + self.fmt.collection([self._tables[n] for n in extra]) + sum(
            self.fmt.table(r + 1, unit, len(self._tables[n].feature_names)) for n, r in extra.items())  # fmt: skip

    def measure(self, ctx: StageContext) -> dict[str, dict[int, float]]:
        """Validation AUC lost when each table alone is cut to each rung below its dim."""
        batches = self.config.deploy_val_batches
        self.prefix = {}
        base = ctx.evaluate(max_batches=batches)["auc"]
        losses: dict[str, dict[int, float]] = {}
        for name, rungs in self.rungs.items():
            losses[name] = {rungs[-1]: 0.0}
            for d in rungs[:-1]:
                self.prefix = {name: d}
                losses[name][d] = base - ctx.evaluate(max_batches=batches)["auc"]
        self.prefix = {}
        self.losses = losses
        return losses

    def loss_at(self, name: str, d: int) -> float:
        """The measured loss of table ``name`` at dim ``d``, interpolated between rungs
        (never below that of a larger dim: a longer prefix holds the shorter one). A table not
        measured: the share of its columns cut."""
        if name not in self.losses:
            return 1 - d / self._tables[name].embedding_dim
        pts = sorted(self.losses[name].items())
        if d <= pts[0][0]:
            return pts[0][1]
        for (d0, v0), (d1, v1) in zip(pts, pts[1:]):
            if d0 <= d <= d1:
                return v0 + (v1 - v0) * (d - d0) / (d1 - d0)
        return pts[-1][1]

    def deploy_for(self, target: int) -> tuple[dict[str, int], dict[str, int]]:
        """Each table's dim for ``target`` bytes, and the first ids of one table that keep one
        more block of columns: from the smallest allowed dims, the upgrade (one allowed step of
        one table) that buys the most AUC per byte while it fits; then the bytes left give the
        next step of the best table that did not fit to as many of its first (most frequent)
        ids as they hold. A ``BudgetError`` if the smallest dims do not fit, or the result lands
        below [0.95, 1.0] of the target."""
        tables = list(self._tables.values())
        allowed = {t.name: self.allowed_dims(t) for t in tables}
        idx = {t.name: 0 for t in tables}
        dims = {n: allowed[n][0] for n in idx}
        if self.held_bytes(dims) > target:
            raise BudgetError(f"matryoshka cannot reach {target} bytes: every field at dim {min(dims.values())} holds "
                              f"{self.held_bytes(dims)}")  # fmt: skip

        def gain(n: str) -> float:
            up = dict(dims, **{n: allowed[n][idx[n] + 1]})
            return (self.loss_at(n, dims[n]) - self.loss_at(n, up[n])) / max(self.held_bytes(up) - self.held_bytes(dims), 1)

        while True:
            open_ = [n for n in idx if idx[n] + 1 < len(allowed[n])]
            fits = [n for n in open_ if self.held_bytes(dict(dims, **{n: allowed[n][idx[n] + 1]})) <= target]
            if not fits:
                break
            best = max(fits, key=gain)
            idx[best] += 1
            dims[best] = allowed[best][idx[best]]
        extra: dict[str, int] = {}
        if open_:  # a partial step: the best table's next block for its first ids
            best = max(open_, key=gain)
            n_rows = self._tables[best].num_embeddings
            lo, hi = 0, n_rows - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.held_bytes(dims, {best: mid}) <= target else (lo, mid - 1)
            if lo > 0:
                extra = {best: lo}
        held = self.held_bytes(dims, extra)
        if held < (1 - BUDGET_TOLERANCE) * target and open_:
            raise BudgetError(f"matryoshka cannot land within {BUDGET_TOLERANCE:.0%} of {target} bytes: its dims "
                              f"hold {held}")  # fmt: skip
        return dims, extra

    @torch.no_grad()
    def deploy(self, dims: dict[str, int], extra: dict[str, int] | None = None) -> None:
        """Keep each table's first ``dims[t]`` columns, and for the first ``extra[t]`` ids of
        a table the next block too (in place): the deployed form."""
        extra = dict(extra or {})
        old = {t.name: self.ebc.embedding_bags[t.name].weight for t in self._tables.values()}  # type: ignore[index]
        device = next(iter(old.values())).device
        cut = [inner_table(t, dim=dims[t.name]) for t in self._tables.values()]
        ebc = EmbeddingBagCollection(tables=cut, device=device)
        for t in cut:
            ebc.embedding_bags[t.name].weight.copy_(old[t.name][:, : t.embedding_dim])  # type: ignore[index]
        self.xebc = None
        if extra:
            unit = pack_unit(self.fmt)
            more = [inner_table(self._tables[n], name=f"{n}__x", rows=r + 1, dim=unit,
                                features=[f"{f}__x" for f in self._tables[n].feature_names]) for n, r in extra.items()]  # fmt: skip
            self.xebc = EmbeddingBagCollection(tables=more, device=device)
            for n, r in extra.items():
                w = self.xebc.embedding_bags[f"{n}__x"].weight  # type: ignore[index]
                w.zero_()
                w[:r].copy_(old[n][:r, dims[n] : dims[n] + unit])
        self.ebc, self.dims, self.extra, self.prefix = ebc, dict(dims), extra, {}

    def deploy_to_budget(self) -> None:
        """Deploy at the config's budget (whole tables without one), from the losses measured
        (``measure``) or, without them, each table's share of columns cut."""
        target = self.target_bytes()
        if target is None:
            self.deploy({n: t.embedding_dim for n, t in self._tables.items()})
        else:
            self.deploy(*self.deploy_for(target))

    def deployed_copy(self, dims: dict[str, int], extra: dict[str, int] | None = None) -> MatryoshkaCollection:
        """A deployed copy at ``dims`` (and ``extra``), this module untouched (several budgets,
        one training)."""
        other = copy.deepcopy(self)
        other.deploy(dims, extra)
        return other

    def _form(self) -> dict[str, Any]:
        return {"ebc": self.ebc, "dims": self.dims, "extra": self.extra, "xebc": self.xebc}

    @contextmanager
    def _in_form(self, form: dict[str, Any]) -> Iterator[None]:
        """``form`` (a ``_form()`` of another deployment) in place for the block."""
        saved = self._form()
        for k, v in form.items():
            setattr(self, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def alternatives(self) -> dict[str, AbstractContextManager[Any]]:
        """``deploy_ratios``' deployments from this training, each evaluated on test by the job."""
        return {f"deploy.{name}": self._in_form(form) for name, form in self.ratio_forms.items()}

    def run_deploy(self, ctx: StageContext) -> dict[str, float]:
        target = self.target_bytes()
        full = {t.name: t.embedding_dim for t in self._tables.values()}
        self.measure(ctx)
        out: dict[str, float] = {}
        trained = self._form()
        self.ratio_forms = {}
        for r in self.config.deploy_ratios:  # further budgets, the same training
            dims, extra = self.deploy_for(Budget(ratio=r).target_bytes(self.source_tables()))
            with self._in_form(trained):  # (the trained tables back after the block)
                self.deploy(dims, extra)
                self.ratio_forms[f"ratio_{r:g}x"] = self._form()
                out[f"ratio_{r:g}x.val_auc"] = ctx.evaluate()["auc"]
                out[f"ratio_{r:g}x.bytes"] = float(self.held_bytes(dims, extra))
        dims, extra = (full, {}) if target is None else self.deploy_for(target)
        ctx.log_params({**{f"{n}.dim": d for n, d in dims.items()}, **{f"{n}.extra_rows": r for n, r in extra.items()}})
        self.deploy(dims, extra)
        ctx.model.to(ctx.device)
        return {**out, **{f"val_{k}": v for k, v in ctx.evaluate().items()},
                "embedding_bytes": float(self.held_bytes(dims, extra))}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.config.budget_label(), "ladder": ",".join(map(str, self.config.ladder))}
        if self.dims:
            out.update({f"{n}.dim": d for n, d in self.dims.items()})
            out.update({f"{n}.extra_rows": r for n, r in self.extra.items()})
            out["planned_bytes"], out["planned_precision"] = self.held_bytes(self.dims, self.extra), self.fmt.precision
        return out


def _reach(tables: list[EmbeddingBagConfig], fmt: TableFormat) -> Reach:
    unit = pack_unit(fmt)
    smallest = fmt.collection(tables) + sum(fmt.table(t.num_embeddings, min(unit, t.embedding_dim), len(t.feature_names))
                                            for t in tables)  # fmt: skip
    largest = fmt.collection(tables) + sum(fmt.table(t.num_embeddings, t.embedding_dim, len(t.feature_names)) for t in tables)
    return Reach(smallest, f"every field at dim {unit}", largest)


@register(MatryoshkaConfig)
def build(tables: list[EmbeddingBagConfig], config: MatryoshkaConfig, ctx: BuildContext) -> MatryoshkaCollection:
    return build_sized(
        tables, config, ctx,
        check=lambda: refuse_aware(config.quantization, config.method, "the deploy stage replaces the tables it would train"),
        search=lambda fmt: _reach(tables, fmt),
        unplanned=lambda: MatryoshkaCollection(tables, config, ctx),
    )  # fmt: skip
