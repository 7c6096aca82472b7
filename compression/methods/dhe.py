"""DHE: Deep Hash Embedding (Kang, Cheng, Yao, Chen, Hong, Chi, "Learning to Embed
Categorical Features without Embedding Tables for Recommendation", KDD 2021).

No table: an id x is encoded by k hash functions into a dense vector, and an MLP (the
"decoder", the paper's Sec. 3) maps it to the embedding:

    E'(x) = [h_1(x), ..., h_k(x)],  h_i(x) in [0, m)          (the encoding, Sec. 3.2)
    uniform:  v_i = 2·h_i(x) / (m - 1) - 1                     (in [-1, 1])
    gaussian: Box–Muller on pairs, u = (h + 1) / (m + 1) in (0, 1):
              v_{2i} = sqrt(-2 ln u_{2i})·cos(2π u_{2i+1}), v_{2i+1} = ... ·sin(...)
    e(x) = W_{L} · σ(... σ(W_1 · v + b_1) ...) + b_{L}          (σ = Mish, as the paper)

h_i are the seeded universal hashes of ``compression.hashing`` (k functions shared by
every feature; each table has its own MLP). The paper's defaults are k = 1024 and
m = 10^6 (it finds the two transforms close); k defaults to 128 here, as 1024
functions' coefficients alone are 32 KiB and each width step of an MLP costs 4·k bytes,
too coarse for 10x of small vocabularies (``num_hashes: 1024`` is the paper's). Its batch normalisation between layers is
left out: per-rank batch statistics would make a sharded step differ from one
process's, and every other method here is batch-independent.

- Size: the MLP is the memory. The budget picks each table's hidden width w
  (``compression.sizing``; ``layers`` hidden layers: k·w + (layers - 1)·w² + w·d values
  plus biases); a table whose plain form fits its share stays a plain TorchRec table
  (the small fields), as the other methods keep them. The k functions' coefficients
  (32 bytes each) are fixed bytes, so a very small budget is refused in one line.
- Rows: pooled per bag (SUM or MEAN) after the MLP, which does not commute with it.
- Training: the MLP is dense (``table_parameters()`` lists the plain tables' rows only:
  the MLP trains with the dense optimizer, as the paper trains it with Adam).
- Sharding: the MLPs are plain dense parameters, replicated by DMP's data-parallel
  wrapper (gradients summed over ranks); plain tables are left to the planner.
- ``table_device="meta"`` makes the MLPs on ``meta`` too (DMP then allocates and
  initialises them with ``nn.Linear.reset_parameters``).
- Quantization is refused (one ``MethodConfigError`` line): ``quantize`` turns TorchRec
  tables into quantized ones, and DHE's memory is an MLP.

Ids: any int64 is hashed; plain tables fold ids outside ``[0, N)`` into it by hash.

Example::

    ebc = compress(tables, DHEConfig(budget=Budget(ratio=100)))
    ebc.describe()["t_user.width"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import pool, pooled_lookup
from compression.config_checks import bounded, one_of
from compression.deployed import TableFormat
from compression.hashing import UniversalHash
from compression.idmap import IdMappedCollection, fold, inner_table
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized

TRANSFORMS = ("uniform", "gaussian")


@dataclass
class DHEConfig(BudgetedConfig):
    """Deep Hash Embedding. ``budget`` picks each table's MLP width; or give ``width`` (budget: null)."""

    method: ClassVar[str] = "dhe"
    takes_raw_ids: ClassVar[bool] = True  # every id goes through the hash (exact tables: in-range ids only)
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"layers": (1, 2)}
    # hidden width of every table's MLP, instead of a budget
    width: Optional[int] = bounded(None, ge=1)
    # k hash functions (the encoding's length) and m buckets each (the paper: k = 1024)
    num_hashes: int = bounded(128, ge=1)
    buckets: int = bounded(1_000_000, ge=2, le=2**31 - 1)
    transform: str = one_of("uniform", *TRANSFORMS)
    # hidden layers of the MLP
    layers: int = bounded(2, ge=1)

    def check(self) -> None:
        if self.transform == "gaussian" and self.num_hashes % 2:
            raise MethodConfigError(f"dhe.num_hashes and dhe.transform: the gaussian transform pairs the hashes, so "
                                    f"num_hashes must be even, got {self.num_hashes}")  # fmt: skip

    def explicit_sizes(self) -> dict[str, Any]:
        return {"width": self.width}

    @classmethod
    def contract_examples(cls) -> list[DHEConfig]:
        return [cls(num_hashes=32, transform="gaussian")]


def mlp_values(k: int, w: int, d: int, layers: int) -> int:
    """Parameters of k -> w (-> w)^(layers-1) -> d, biases included."""
    return k * w + w + (layers - 1) * (w * w + w) + w * d + d


def encode(h: torch.Tensor, buckets: int, transform: str) -> torch.Tensor:
    """The dense encoding of hash values ``h`` ([n, k] in [0, m)), float32."""
    if transform == "uniform":
        return h.to(torch.float32) * (2.0 / max(buckets - 1, 1)) - 1.0
    u = (h.to(torch.float64) + 1.0) / (buckets + 1.0)  # (0, 1): the log is finite
    u1, u2 = u[..., 0::2], u[..., 1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)], dim=-1)
    return z.flatten(-2).to(torch.float32)


def decoder(k: int, w: int, d: int, layers: int, device: torch.device | None) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(k, w, device=device), nn.Mish()]
    for _ in range(layers - 1):
        mods += [nn.Linear(w, w, device=device), nn.Mish()]
    return nn.Sequential(*mods, nn.Linear(w, d, device=device))


class DHEEmbeddingBagCollection(IdMappedCollection):
    """An MLP per compressed table over k hashes of each id; small tables stay plain."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, config: DHEConfig, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="width", config=ctx.config)
        self.buckets, self.transform = config.buckets, config.transform
        self.mlps = nn.ModuleDict({
            t.name: decoder(config.num_hashes, w, t.embedding_dim, config.layers, ctx.table_device)
            for t in tables if (w := plan.sizes[t.name]) is not None
        })  # fmt: skip
        plain = [inner_table(t) for t in tables if plan.sizes[t.name] is None]
        self.ebc = EmbeddingBagCollection(tables=plain, device=ctx.table_device) if plain else None
        self.hasher = UniversalHash(config.num_hashes, seed=ctx.seed, device=ctx.device)
        self._table_of = {f: t for t in tables for f in t.feature_names}

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        d = features.to_dict()
        b = features.stride()
        plain = {}
        if self.ebc is not None:
            keys = [f for c in self.ebc.embedding_bag_configs() for f in c.feature_names]
            rows = {c.name: c.num_embeddings for c in self.ebc.embedding_bag_configs()}
            values = [fold(d[f].values(), torch.full_like(d[f].values(), rows[self._table_of[f].name]), self.hasher)
                      for f in keys]  # fmt: skip
            kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat([d[f].lengths() for f in keys]),
                                    stride=b)  # fmt: skip
            plain = pooled_lookup(self.ebc, kjt).to_dict()
        pooled = []
        for f in self.feature_names:
            t = self._table_of[f]
            if t.name not in self.mlps:
                pooled.append(plain[f])
                continue
            ids, lengths = d[f].values(), d[f].lengths().long()
            e = self.mlps[t.name](encode(self.hasher(ids, self.buckets), self.buckets, self.transform))
            pooled.append(pool(e, lengths, b, t.pooling))
        return self.keyed(torch.cat(pooled, dim=1))


def _check(config: DHEConfig, tables: list[EmbeddingBagConfig]) -> None:
    if config.quantization is not None:
        raise MethodConfigError(
            "dhe: quantization does not apply: its memory is an MLP, not TorchRec tables, and quantize "
            "quantizes TorchRec tables; leave quantization unset"
        )


def _cost(t: EmbeddingBagConfig, config: DHEConfig) -> FieldCost:
    full = 4 * t.num_embeddings * t.embedding_dim
    k, d, h = config.num_hashes, t.embedding_dim, config.layers
    return FieldCost(t.name, full, 1, full // (4 * k) + 1, lambda w: 4 * mlp_values(k, w, d, h))


@register(DHEConfig)
def build(tables: list[EmbeddingBagConfig], config: DHEConfig, ctx: BuildContext) -> DHEEmbeddingBagCollection:
    def fixed(fmt: TableFormat) -> int:
        return UniversalHash.nbytes(config.num_hashes)

    return build_sized(
        tables, config, ctx,
        check=lambda: _check(config, tables),
        costs=lambda fmt: [_cost(t, config) for t in tables],
        fixed=fixed,
        construct=lambda plan: DHEEmbeddingBagCollection(tables, plan, config, ctx),
    )  # fmt: skip
