"""Differentiable product quantization (DPQ, Chen et al., ICML 2020) and its frequency-aware
variant MGQE (Kang et al., WWW 2020): per-table codebooks and per-id codes.

A table of N ids at dim d is cut into D subspaces of s = d/D dims. Each subspace j has
K centroids V_j (a codebook of D·K rows of s dims, TorchRec's table ``<t>__codebook``),
and each id x has D codes c_j(x) in [0, K); its embedding is the concatenation of
V_j[c_j(x)] (DPQ §2, eq. 1). Codes take log2 K bits each, stored packed.

Training (the paper's DPQ-VQ variant, §2.2, eqs. 4-5 and its VQ regulariser): each id
keeps a continuous query row q(x) (a TorchRec ``EmbeddingCollection`` of the full N x d,
trained by the sparse optimizer); c_j(x) = argmin_k ||q_j(x) - V_j[k]||²; the forward
gives V_j[c_j] with the straight-through gradient to q (h = q + sg(V_c - q)), and the
centroids learn from ``regularization()``: mean (V_c - sg(q))² + beta · mean (sg(V_c) - q)²
(the authors' reference sets alpha = 1 on the first term). The training-time module
therefore holds the whole query table plus the codebooks (fp32, dense parameters
trained by the dense optimizer): more than the uncompressed table, counted as such by
``memory_report`` until the ``pack`` stage. (DPQ-SX, the softmax variant, needs the
same query table and a second key codebook; it is not built here.)

Deployed (after ``pack``; ``compression.dpq_codes``): per table the codes, packed
LSB-first into one uint8 array of ceil(N·D·log2 K / 8) bytes, and the codebook as a
TorchRec ``EmbeddingBagCollection`` table (so post-training quantization applies to it,
and pooling is TorchRec's: an id's D codes become D lookups, one per subspace feature
``<f>__s<j>``, whose pooled outputs concatenate to the feature's d dims). That is all it
holds; ``memory_report`` counts exactly those tensors, and the budget is met by them.

MGQE (``MGQEConfig``, Kang et al. §3.2): the ``hot_fraction`` most frequent ids of a table
(train counts) may use all K centroids, the others only the first K / ``cold_divisor``.
Stored as the low log2(K/cold_divisor) bits of every id's codes in the packed array,
a sorted int32 list of the hot ids (4 bytes each), and the hot ids' remaining high bits
packed beside it: code = low + high · (K/cold_divisor).

The budget picks (D, K) per table among D dividing d and K in {2, 4, ..., 256} (K at
most N), by the deployed bytes; tables that fit their share stay exact (their full
table is the deployed form). DPQ cannot go below N·log2 2 bits a table: at d=16 about
500x, so 1000x is refused with the smallest reachable ratio.

Schedule: ``train`` (the trainer's loop), ``pack`` (query rows -> codes, the query table
dropped), optionally ``finetune`` (the codebooks with fixed codes).

Example::

    ebc = compress(tables, DPQConfig(budget=Budget(ratio=100)))
    ...train...; ebc.pack()          # the trainer's ``pack`` stage does this
    memory_report(ebc).bytes         # packed codes + codebooks
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import collections_by_dim, pool, unpooled
from compression.base import CompressedEmbeddingBagCollection
from compression.config_checks import bounded
from compression.counts import table_counts
from compression.deployed import TableFormat
from compression.dpq_codes import (
    MAX_CENTROIDS,
    PackedCodes,
    Shape,
    pack_codes,
    shape_bytes,
    shapes_for,
)
from compression.memory import memory_report
from compression.quantization import as_quantization, refuse_aware
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized
from compression.stages import Stage, compact_then_finetune

PACK_CHUNK = 1 << 16  # query rows coded at a time by ``pack``


@dataclass
class DPQConfig(BudgetedConfig):
    """DPQ-VQ. ``budget`` picks (subspaces D, centroids K) per table; or give both (budget: null).

    ``beta``: weight of the commitment term pulling query rows to their centroids.
    ``finetune_epochs``: after ``pack``, train the codebooks (codes fixed) this long.
    """

    method: ClassVar[str] = "dpq"
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"beta": (0.1, 0.25)}
    sized_by_stages: ClassVar[bool] = True
    subspaces: Optional[int] = None
    centroids: Optional[int] = None
    beta: float = bounded(0.25, ge=0)
    finetune_epochs: int = bounded(0, ge=0)

    def check(self) -> None:
        # neither given: the builder's check_exclusive says a budget or explicit sizes are needed
        if self.budget is None and (self.subspaces is None) != (self.centroids is None):
            raise MethodConfigError(f"{self.method}.subspaces and {self.method}.centroids: explicit sizes need both "
                                    f"(or a budget), got {self.subspaces}, {self.centroids}")  # fmt: skip

    def explicit_sizes(self) -> dict[str, Any]:
        return {"subspaces": self.subspaces, "centroids": self.centroids}

    def tiers(self) -> tuple[float, int]:
        """(share of ids that are hot, divisor of K for the others); DPQ: one tier."""
        return 0.0, 1


@dataclass
class MGQEConfig(DPQConfig):
    """MGQE: DPQ where the ``hot_fraction`` most frequent ids use all K centroids and the
    rest the first K / ``cold_divisor`` (needs the train counts)."""

    method: ClassVar[str] = "mgqe"
    hot_fraction: float = bounded(0.1, ge=0, lt=1)
    cold_divisor: int = bounded(4, ge=1)

    def check(self) -> None:
        super().check()
        if self.cold_divisor & (self.cold_divisor - 1):
            raise MethodConfigError(f"{self.method}.cold_divisor: must be a power of two, got {self.cold_divisor}")

    def tiers(self) -> tuple[float, int]:
        return self.hot_fraction, self.cold_divisor


# -- sizing --------------------------------------------------------------------------------
def _cost(t: EmbeddingBagConfig, shapes: list[tuple[int, Shape]], fmt: TableFormat) -> FieldCost:
    full = fmt.table(t.num_embeddings, t.embedding_dim, len(t.feature_names))
    return FieldCost(t.name, full, 0, len(shapes) - 1, lambda i: shapes[i][0])


# -- the module ----------------------------------------------------------------------------
class DPQEmbeddingBagCollection(CompressedEmbeddingBagCollection):
    """DPQ-VQ's training form (query tables, codebooks) and, after ``pack()``, its deployed
    form (``PackedCodes``). Tables the plan keeps exact are plain tables in both."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, shapes: Mapping[str, Optional[Shape]],
                 hot_ids: Mapping[str, np.ndarray], config: DPQConfig, ctx: BuildContext) -> None:  # fmt: skip
        super().__init__(tables, config=ctx.config)
        self.config, self.plan, self.shapes = config, plan, dict(shapes)
        self._tables = {t.name: t for t in tables}
        self._table_of = {f: t for t in tables for f in t.feature_names}
        self.ec: nn.ModuleDict | None = collections_by_dim([unpooled(t, keep_init=True) for t in tables], ctx.table_device)
        init = {c.name: c.init_fn for ec in self.ec.values() for c in ec.embedding_configs()}  # type: ignore[operator]
        books = {}
        for t in tables:
            s = shapes[t.name]
            if s is None:
                continue
            sample = torch.empty(s.centroids, t.embedding_dim)
            init[t.name](sample)  # centroids drawn as rows are: each subspace's K from K rows
            sub = t.embedding_dim // s.subspaces
            books[t.name] = nn.Parameter(sample.view(s.centroids, s.subspaces, sub).transpose(0, 1).reshape(-1, sub)
                                         .contiguous().to(ctx.device))  # fmt: skip
        self.codebooks: nn.ParameterDict | None = nn.ParameterDict(books)
        for t in tables:  # hot ids (MGQE), sorted, where the codes are
            self.register_buffer(f"hot_{t.name}", torch.from_numpy(hot_ids.get(t.name, np.zeros(0, np.int32))).to(
                torch.int32).to(ctx.device))  # fmt: skip
        self.packed: PackedCodes | None = None
        self._reg: torch.Tensor | None = None

    # -- training form -------------------------------------------------------------------
    def query_table(self, name: str) -> torch.Tensor:
        assert self.ec is not None, "packed: the query tables are gone"
        return self.ec[f"d{self._tables[name].embedding_dim}"].embeddings[name].weight  # type: ignore[index,union-attr]

    def table_parameters(self) -> list[nn.Parameter]:
        if self.packed is not None:
            return super().table_parameters()
        assert self.ec is not None
        return list(self.ec.parameters())

    def _hot(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        hot: torch.Tensor = getattr(self, f"hot_{name}")
        if not hot.numel():
            return torch.zeros_like(ids, dtype=torch.bool)
        at = torch.searchsorted(hot, ids.to(torch.int32)).clamp(max=hot.numel() - 1)
        return hot[at] == ids

    def assign(self, name: str, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The [n, D] codes of query ``rows`` (of ``ids``): the nearest centroid per subspace
        (eq. 4), cold ids choosing among the first ``cold_centroids`` only (MGQE)."""
        s = self.shapes[name]
        assert s is not None and self.codebooks is not None
        D, K = s.subspaces, s.centroids
        with torch.no_grad():
            q = rows.detach().view(len(rows), D, -1)
            c = self.codebooks[name].detach().view(D, K, -1)
            dist = c.pow(2).sum(-1).unsqueeze(0) - 2 * torch.einsum("nds,dks->ndk", q, c)
            if s.cold_centroids < K:
                cold = ~self._hot(name, ids)
                dist[:, :, s.cold_centroids :] += torch.where(cold, math.inf, 0.0).view(-1, 1, 1)
            return dist.argmin(-1)

    def _quantize(self, name: str, rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.shapes[name]
        assert s is not None and self.codebooks is not None
        D, K = s.subspaces, s.centroids
        codes = self.assign(name, rows, ids)
        q = rows.view(len(rows), D, -1)
        v = self.codebooks[name].view(D, K, -1)[torch.arange(D, device=rows.device), codes]  # [n, D, s]
        out = q + (v - q).detach()  # straight-through: the forward is V_c, the gradient reaches q
        reg = None
        if self.training and len(rows):
            reg = (v - q.detach()).pow(2).mean() + self.config.beta * (v.detach() - q).pow(2).mean()
        return out.reshape(len(rows), -1), reg

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        if self.packed is not None:
            return self.packed(features)
        assert self.ec is not None
        lookups = {f: jt for ec in self.ec.values() for f, jt in ec(features).items()}
        ids = features.to_dict()
        batch = features.stride()
        pooled, reg = [], None
        for f in self.feature_names:
            t, jt = self._table_of[f], lookups[f]
            e = jt.values()
            if self.shapes[t.name] is not None:
                e, r = self._quantize(t.name, e, ids[f].values())
                reg = r if reg is None or r is None else reg + r
            lengths = jt.lengths()
            bag = pool(e, lengths, batch, t.pooling)
            pooled.append(bag)
        self._reg = reg if self.training else None
        dims = [p.shape[1] for p in pooled]
        return KeyedTensor(keys=self.feature_names, length_per_key=dims, values=torch.cat(pooled, dim=1))

    def regularization(self) -> torch.Tensor | None:
        return self._reg if self.training and self.packed is None else None

    # -- schedule ---------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return compact_then_finetune("pack", self.pack, lambda: memory_report(self).bytes, self.config.finetune_epochs)

    @torch.no_grad()
    def pack(self) -> None:
        """Replace the query tables by each id's packed codes and the codebooks by a TorchRec
        collection (in place): the deployed form."""
        if self.packed is not None:
            return
        assert self.codebooks is not None
        tables = list(self._tables.values())
        device = getattr(self, f"hot_{tables[0].name}").device
        packed = PackedCodes(tables, self.shapes, device, self.query_table(tables[0].name).device)
        for t in tables:
            s, w = self.shapes[t.name], self.query_table(t.name)
            inner = packed.ebc.embedding_bags[t.name if s is None else f"{t.name}__codebook"].weight
            if s is None:
                inner.copy_(w)
                continue
            inner.copy_(self.codebooks[t.name])
            codes = torch.cat([self.assign(t.name, w[i : i + PACK_CHUNK], torch.arange(i, min(i + PACK_CHUNK, len(w)), device=w.device))
                               for i in range(0, len(w), PACK_CHUNK)])  # fmt: skip
            hot: torch.Tensor = getattr(self, f"hot_{t.name}")
            getattr(packed, f"codes_{t.name}").copy_(pack_codes(codes % s.cold_centroids, s.cold_bits))
            getattr(packed, f"hot_{t.name}").copy_(hot)
            if hot.numel():
                high = codes[hot.long()] // s.cold_centroids
                getattr(packed, f"high_{t.name}").copy_(pack_codes(high, s.bits - s.cold_bits))
        for t in tables:
            delattr(self, f"hot_{t.name}")
        self.packed, self.ec, self.codebooks = packed, None, None

    def describe(self) -> dict[str, Any]:
        out = self.plan.describe("shape", {t.name: t.feature_names for t in self.source_tables()})
        for name, s in self.shapes.items():
            out[f"{name}.shape"] = "exact" if s is None else f"D{s.subspaces}xK{s.centroids}"
            if s is not None:
                out.update({f"{name}.subspaces": s.subspaces, f"{name}.centroids": s.centroids})
                if s.hot:
                    out.update({f"{name}.cold_centroids": s.cold_centroids, f"{name}.hot_ids": s.hot})
        return out


# -- build ---------------------------------------------------------------------------------
@register(DPQConfig)
@register(MGQEConfig)
def build(tables: list[EmbeddingBagConfig], config: DPQConfig, ctx: BuildContext) -> DPQEmbeddingBagCollection:
    method = config.method
    hot_fraction, divisor = config.tiers()
    options: dict[str, list[tuple[int, Shape]]] = {}  # per table: (bytes, shape), smallest first

    def costs(fmt: TableFormat) -> list[FieldCost]:
        q = as_quantization(config.quantization)  # values per byte of the quantized codebooks (1: none)
        per_byte = 1 if q is None or q.bits >= 8 else 8 // q.bits
        for t in tables:
            options[t.name] = sorted(((shape_bytes(t, s, fmt), s) for s in shapes_for(t, hot_fraction, divisor, per_byte)),
                                     key=lambda x: (x[0], x[1].subspaces, x[1].centroids))  # fmt: skip
        return [_cost(t, options[t.name], fmt) for t in tables]

    def explicit() -> dict[str, int]:  # the option of each table holding the shape asked for
        index = {}
        for t in tables:
            found = [i for i, (_, s) in enumerate(options[t.name]) if (s.subspaces, s.centroids) == (config.subspaces, config.centroids)]
            if not found:
                raise MethodConfigError(
                    f"{method}: table '{t.name}' (dim {t.embedding_dim}, {t.num_embeddings} ids) cannot take "
                    f"{config.subspaces} subspaces x {config.centroids} centroids: subspaces must divide the dim and "
                    f"centroids be a power of two from 2 to min({MAX_CENTROIDS}, ids)"
                )
            index[t.name] = found[0]
        return index

    def shapes(plan: Plan) -> dict[str, Shape | None]:
        return {t.name: None if plan.sizes[t.name] is None else options[t.name][plan.sizes[t.name]][1] for t in tables}  # type: ignore[index]

    def construct(plan: Plan) -> DPQEmbeddingBagCollection:
        chosen = shapes(plan)
        hot_ids = {}
        for t in tables:
            s = chosen[t.name]
            if s is not None and s.hot:
                counts = table_counts(t, ctx.counts, method)
                hot_ids[t.name] = np.sort(np.argsort(-counts, kind="stable")[: s.hot]).astype(np.int32)
        return DPQEmbeddingBagCollection(tables, plan, chosen, hot_ids, config, ctx)

    return build_sized(
        tables, config, ctx,
        check=lambda: refuse_aware(config.quantization, method, "the codebooks become TorchRec tables only at the pack stage"),
        costs=costs,
        fixed=lambda fmt: fmt.collection(tables),
        sizes=explicit,
        construct=construct,
        deployed=lambda module, plan: PackedCodes(tables, shapes(plan), torch.device("meta"), torch.device("meta")),
    )  # fmt: skip
