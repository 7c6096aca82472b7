"""TT-Rec: tensor-train embedding tables (Yin, Acun, Wu and Liu, "TT-Rec: Tensor Train
Decomposition for Deep Learning Recommendation Model Embeddings", MLSys 2021).

A table W of N rows and dim D is held as three tensor-train cores. N is factored as
N <= m1·m2·m3 and D = n1·n2·n3 (both as even as the numbers allow), and with TT ranks
(r0 = r3 = 1, r1, r2) the cores are G1 [m1, n1, r1], G2 [m2, r1, n2, r2] and
G3 [m3, r2, n3]. Row x, written x = i1·m2·m3 + i2·m3 + i3, is (the paper's Eq. 2, the
TT format of Oseledets 2011)

    W[x, (j1, j2, j3)] = sum_{a, b} G1[i1, j1, a] · G2[i2, a, j2, b] · G3[i3, b, j3],

computed on the fly per id: two batched matrix products in pure PyTorch, on the CPU
as anywhere. FBGEMM's TT-Rec kernels (``TTEmbeddingBag``) are CUDA-only and not used.
The paper's optional cache of the most frequent rows is not implemented (every row
is computed from the cores), so no cache bytes are held or counted.

Inside: core k of a table is a TorchRec table of m_k rows whose row i_k is the slice
G_k[i_k] flattened (n1·r, r·n2·r, r·n3 values), in TorchRec ``EmbeddingCollection``s
(one per row width: TorchRec wants one dim per collection); the id transform writes
each id as (i1, i2, i3), the collections return the slices per id, the contraction
above makes the row, and the rows are pooled per bag (SUM or MEAN) after it (the
product does not commute with pooling).

- Size: the budget picks the ranks per table (``compression.sizing``): the knob is a
  step s through the rank pairs (r1, r2) sorted by the values they hold (m1·n1·r1 +
  m2·n2·r1·r2 + m3·n3·r2), r1 and r2 within a factor 3 of each other and at most
  ``MAX_RANK``; unequal pairs lie between the paper's equal ranks, so a budget is met
  within 5% on small tables too. ``rank: r`` (no budget) is the paper's r1 = r2 = r.
  The factorisations are not budget knobs: the most even ones hold the fewest values
  at a given rank. A table whose plain form fits its share stays exact, a plain
  table looked up per id.
- Init: every core N(0, σ) with σ = (s² / (r1·r2))^(1/6), so that a row's values have the
  spread s of TorchRec's default init for N rows (uniform in ±sqrt(1/N): s² = 1/(3N)),
  as the paper's Gaussian core init matches the variance of the full table's.
- Sharding: the cores are small (about N^(1/3) rows) and every id reads all three, so
  they are replicated (data-parallel, ``sharding_constraints``; their dims, e.g. 2·17,
  are rarely the multiple of 4 FBGEMM's fused kernels need for any other plan); exact
  tables are left to the planner. Known failure: TorchRec's data-parallel sharded
  ``EmbeddingCollection`` returns rows split by the wrong feature's lengths here, so
  the sharded equality test is an expected failure for tt_rec
  (``tests/training/test_distributed.py``).
- Quantization is refused (one ``MethodConfigError`` line): ``quantize`` swaps
  TorchRec ``EmbeddingBagCollection``s, and the cores are per-id
  ``EmbeddingCollection``s whose products, not rows, make the embedding.

Ids: any int64; ids outside ``[0, N)`` are first hashed into it (``compression.hashing``).

Example::

    ebc = compress(tables, TTRecConfig(budget=Budget(ratio=100)))
    ebc.describe()["t_user.ranks"], ebc.describe()["t_user.shape"]   # 'r1xr2', 'm1xm2xm3:n1xn2xn3'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import collections_by_dim, pool
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import IdMappedCollection, fold
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized


@dataclass
class TTRecConfig(BudgetedConfig):
    """Tensor-train tables. ``budget`` picks each table's TT rank; or give ``rank`` (budget: null)."""

    method: ClassVar[str] = "tt_rec"
    # TT rank of every table, instead of a budget
    rank: Optional[int] = bounded(None, ge=1)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def contract_examples(cls) -> list[TTRecConfig]:
        # 8x: at 10x the shared-table test's two tiny tables land at 94.7% of the budget
        return [cls(budget=Budget(ratio=8))]


def factor3(n: int, exact: bool) -> tuple[int, int, int]:
    """Three factors of n as even as possible: their product is n (``exact``) or the
    smallest product >= n of near-equal factors (rows: m1·m2·m3 >= N)."""
    if not exact:
        a = max(1, round(n ** (1 / 3)))
        while a**3 < n and (a + 1) ** 3 <= n:
            a += 1
        b = max(1, math.isqrt(-(-n // a) - 1) + 1)
        c = -(-n // (a * b))
        return tuple(sorted((a, b, c), reverse=True))  # type: ignore[return-value]
    best = (n, 1, 1)
    for a in range(1, n + 1):
        if n % a:
            continue
        for b in range(a, n // a + 1):
            if (n // a) % b:
                continue
            c = n // (a * b)
            if c >= b and c - a < best[0] - best[2]:
                best = (c, b, a)
    return best[2], best[1], best[0]


def shape(t: EmbeddingBagConfig) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((m1, m2, m3), (n1, n2, n3)) of table ``t``."""
    return factor3(t.num_embeddings, exact=False), factor3(t.embedding_dim, exact=True)


MAX_RANK = 128  # the largest TT rank a budget may pick
SPREAD = 3  # and r1, r2 within this factor of each other


@cache
def rank_pairs(rows: int, dim: int) -> tuple[tuple[int, int, int], ...]:
    """(values held, r1, r2) of every rank pair the budget may pick for a table, by
    values: r1, r2 <= ``MAX_RANK`` within a factor ``SPREAD`` of each other, fewer values than the
    plain table (and (1, 1) always)."""
    (m1, m2, m3), (n1, n2, n3) = factor3(rows, exact=False), factor3(dim, exact=True)
    found = []
    for r1 in range(1, MAX_RANK + 1):
        for r2 in range(max(1, -(-r1 // SPREAD)), min(MAX_RANK, SPREAD * r1) + 1):
            v = m1 * n1 * r1 + m2 * n2 * r1 * r2 + m3 * n3 * r2
            if v < rows * dim or r1 == r2 == 1:
                found.append((v, -min(r1, r2), r1, r2))
    found.sort()
    return tuple((v, r1, r2) for v, _, r1, r2 in found)


def ranks(t: EmbeddingBagConfig, step: int) -> tuple[int, int]:
    """(r1, r2) of size step s (1-based) of table ``t``: the s-th smallest rank pair."""
    _, r1, r2 = rank_pairs(t.num_embeddings, t.embedding_dim)[step - 1]
    return r1, r2


def step_of(t: EmbeddingBagConfig, rank: int) -> int:
    """The size step of ranks (rank, rank); beyond the pairs a budget may pick: past the last."""
    pairs = rank_pairs(t.num_embeddings, t.embedding_dim)
    return next((i + 1 for i, (_, a, b) in enumerate(pairs) if a == b == rank), len(pairs) + 1)


def core_widths(t: EmbeddingBagConfig, r1: int, r2: int) -> tuple[int, int, int]:
    _, (n1, n2, n3) = shape(t)
    return n1 * r1, r1 * n2 * r2, r2 * n3


def _cost(t: EmbeddingBagConfig, fmt: TableFormat) -> FieldCost:
    pairs = rank_pairs(t.num_embeddings, t.embedding_dim)
    return FieldCost(t.name, 4 * t.num_embeddings * t.embedding_dim, 1, len(pairs), lambda s: 4 * pairs[s - 1][0])


class TTRecEmbeddingBagCollection(IdMappedCollection):
    """Three TT cores per compressed table (TorchRec tables read per id), contracted per id."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="step", config=ctx.config)
        by_dim: dict[int, list[EmbeddingConfig]] = {}
        self._cores: dict[str, list[str]] = {}  # feature -> its keys (3 cores, or itself when exact)
        for t in tables:
            step = plan.sizes[t.name]
            if step is None:  # the source's init, else TorchRec's default for its rows
                bound = math.sqrt(1 / t.num_embeddings)
                parts = [("", t.num_embeddings, t.embedding_dim, t.init_fn or partial(nn.init.uniform_, a=-bound, b=bound))]
            else:
                r1, r2 = ranks(t, step)
                sigma = (1 / (3 * t.num_embeddings) / (r1 * r2)) ** (1 / 6)
                init = partial(nn.init.normal_, std=sigma)
                parts = [(f"__c{k + 1}", m, w, init) for k, (m, w) in enumerate(zip(shape(t)[0], core_widths(t, r1, r2)))]
            for suffix, rows, width, init_fn in parts:
                by_dim.setdefault(width, []).append(EmbeddingConfig(
                    name=t.name + suffix, embedding_dim=width, num_embeddings=rows,
                    feature_names=[f + suffix for f in t.feature_names], init_fn=init_fn,
                ))  # fmt: skip
            for f in t.feature_names:
                self._cores[f] = [f + s for s, *_ in parts]
        self.ec = collections_by_dim([c for _, cs in sorted(by_dim.items()) for c in cs], ctx.table_device)
        # each collection's keys, in its order (kept: a sharded collection has no configs)
        self._ec_keys = {f"d{d}": [k for c in cs for k in c.feature_names] for d, cs in sorted(by_dim.items())}
        self.hasher = UniversalHash(1, seed=ctx.seed, device=ctx.device)
        table_of = {f: t for t in tables for f in t.feature_names}
        self._tables = [table_of[f] for f in self.feature_names]
        self._ranks = [None if plan.sizes[t.name] is None else ranks(t, plan.sizes[t.name]) for t in self._tables]  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        out = super().describe()  # "<table>.step": the size step s of rank_pairs()
        for t in self.source_tables():
            (m1, m2, m3), (n1, n2, n3) = shape(t)
            step = self.plan.sizes[t.name]
            out[f"{t.name}.ranks"] = "exact" if step is None else "x".join(map(str, ranks(t, step)))
            out[f"{t.name}.shape"] = f"{m1}x{m2}x{m3}:{n1}x{n2}x{n3}"
        return out

    def table_parameters(self) -> list[nn.Parameter]:
        return list(self.ec.parameters())

    def sharding_refusal(self) -> str | None:
        # measured (tests/training/test_distributed.py): the cores' only plan, data-parallel,
        # gives wrong rows, so a sharded run is refused rather than trained wrong
        return ("tt_rec cannot be sharded: TorchRec's data-parallel sharded EmbeddingCollection splits the cores' per-id rows by "
                "the wrong feature's lengths, and the cores' dims allow no other plan")

    def sharding_constraints(self) -> dict[str, Any]:
        """Cores replicated (data-parallel): about N^(1/3) rows each, all read by every id."""
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import ShardingType

        dp = [ShardingType.DATA_PARALLEL.value]
        return {c.name: ParameterConstraints(sharding_types=dp)
                for ec in self.ec.values() for c in ec.embedding_configs() if "__c" in c.name}  # type: ignore[operator]  # fmt: skip

    def _inner(self, features: KeyedJaggedTensor) -> tuple[dict[str, KeyedJaggedTensor], list[torch.Tensor]]:
        """Each collection's input (its own keys only, in its order: TorchRec's sharded
        collections take no other): per feature its TT indices, or its ids when exact."""
        d = features.to_dict()
        per_key: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ids_per_f = []
        for f, t, r in zip(self.feature_names, self._tables, self._ranks):
            jt = d[f]
            ids = fold(jt.values(), torch.full_like(jt.values(), t.num_embeddings), self.hasher)
            if r is None:
                parts = [ids]
            else:
                (_, m2, m3), _ = shape(t)
                i1 = torch.div(ids, m2 * m3, rounding_mode="floor")
                rest = ids - i1 * (m2 * m3)
                i2 = torch.div(rest, m3, rounding_mode="floor")
                parts = [i1, i2, rest - i2 * m3]
            per_key.update({k: (v, jt.lengths()) for k, v in zip(self._cores[f], parts)})
            ids_per_f.append(ids)
        inputs = {}
        for name, keys in self._ec_keys.items():
            inputs[name] = KeyedJaggedTensor(
                keys=keys, values=torch.cat([per_key[k][0] for k in keys]),
                lengths=torch.cat([per_key[k][1] for k in keys]), stride=features.stride(),
            )  # fmt: skip
        return inputs, ids_per_f

    def rows(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Every id's row (``[ids of f, dim]``) per feature, before pooling."""
        inputs, ids = self._inner(features)
        slices = {k: jt.values() for name, ec in self.ec.items() for k, jt in ec(inputs[name]).items()}
        out = {}
        for f, t, r, x in zip(self.feature_names, self._tables, self._ranks, ids):
            if r is None:
                out[f] = slices[f]
                continue
            _, (n1, n2, n3) = shape(t)
            (r1, r2), (c1, c2, c3) = r, (slices[k] for k in self._cores[f])
            n = x.numel()
            left = torch.bmm(c1.view(n, n1, r1), c2.view(n, r1, n2 * r2)).view(n, n1 * n2, r2)
            out[f] = torch.bmm(left, c3.view(n, r2, n3)).reshape(n, t.embedding_dim)
        return out

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        rows = self.rows(features)
        d = features.to_dict()
        b = features.stride()
        pooled = []
        for f, t in zip(self.feature_names, self._tables):
            lengths = d[f].lengths().long()
            p = pool(rows[f], lengths, b, t.pooling)
            pooled.append(p)
        return self.keyed(torch.cat(pooled, dim=1))


def _check(config: TTRecConfig) -> None:
    if config.quantization is not None:
        raise MethodConfigError(
            "tt_rec: quantization does not apply: the TT cores are per-id TorchRec EmbeddingCollections "
            "whose products make the rows, and quantize swaps EmbeddingBagCollections; leave quantization unset"
        )


@register(TTRecConfig)
def build(tables: list[EmbeddingBagConfig], config: TTRecConfig, ctx: BuildContext) -> TTRecEmbeddingBagCollection:
    return build_sized(
        tables, config, ctx,
        check=lambda: _check(config),
        sizes=lambda: {t.name: step_of(t, int(config.rank or 0)) for t in tables},
        costs=lambda fmt: [_cost(t, fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(1),
        construct=lambda plan: TTRecEmbeddingBagCollection(tables, plan, ctx),
    )  # fmt: skip
