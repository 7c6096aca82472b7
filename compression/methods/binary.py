"""Binary codes: each row a sum of k scaled sign vectors, k chosen by the budget.

Recurrent binarization as in BEBR (Gan et al., KDD'23, "Binary Embedding-based Retrieval
at Tencent"): a row ``v`` becomes ``sum_i a_i·b_i`` with ``b_i = sign(r_i)`` and
``a_i = mean|r_i|``, where ``r_0 = v`` and ``r_{i+1} = r_i - a_i·b_i``: each code fits
the residual the ones before it left, so the number of codes a row keeps (bits per dim)
is a dial. This is the closed-form variant (sign and the L2-optimal scale of each step),
not BEBR's learned residual MLPs.

- Training: latent fp32 rows in TorchRec ``EmbeddingCollection``s (unpooled lookups); a
  lookup reads the row's k-code reconstruction, and the gradient passes straight
  through to the latent row (straight-through estimator). The scales are rounded to
  fp16 as they will be stored, so validation during training sees the deployed values.
- ``pack`` (a stage after training): each row's k codes are stored packed, 1 bit per code
  element (uint8, ``ceil(dim/8)`` bytes a code), with k fp16 scales; the latent rows go.
  A packed row of dim 16 and k codes holds ``k·(2 + 2)`` bytes against 64 in fp32:
  16x at one code, 8x at two.
- Budget: per table the knob runs through "one code, m rows" (m < ids: below one code a
  row, the ids are hashed into m rows, as the hashing trick does), then "two codes" on
  rows from half the ids to all of them, "three codes" from two thirds ..., up to
  ``max_codes`` on every id's own row: the bytes rise a row's codes at a time
  (``rows_and_codes``). ``compression.sizing`` picks it so the packed module lands within
  [0.95, 1.0] of the budget, and a table whose fp32 form fits its share stays an exact
  fp32 table.
- Quantization: the tables kept exact become fbgemm's quantized rows in the ``quantize``
  stage (after ``pack``), and the budget counts them so (``budget_precision``); the codes
  are already 1 bit an element. Quantization-aware training is refused.
- Sharding: refused (the pack stage rewrites every row of a table on one rank).

Example::

    ebc = compress(tables, BinaryConfig(budget=Budget(ratio=20)))   # 2 codes where ids fit, else hashed
    ebc.pack()                                                       # the deployed form
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
from compression.bags import collections_by_dim, pool, pooled_lookup, unpooled
from compression.budget import Budget
from compression.config_checks import bounded
from compression.deployed import MetaForm, TableFormat
from compression.hashing import UniversalHash
from compression.idmap import IdMappedCollection, KeyParams, in_range, inner_table, with_values
from compression.memory import memory_report
from compression.quantization import refuse_aware
from compression.sizing import BudgetedConfig, FieldCost, Plan, build_sized
from compression.stages import Stage, compact_then_finetune

MAX_CODES = 8
SCALE_BYTES = 2  # one fp16 scale per code per row


@dataclass
class BinaryConfig(BudgetedConfig):
    """Binary codes. ``budget`` chooses each table's codes (and hashed rows below one code);
    or give ``codes`` (budget: null): that many codes for every table, every id its row."""

    method: ClassVar[str] = "binary"
    sized_by_stages: ClassVar[bool] = True
    codes: Optional[int] = bounded(None, ge=1, le=MAX_CODES)
    # the most codes the budget gives a table (above it, the table is better kept in fp32)
    max_codes: int = bounded(4, ge=1, le=MAX_CODES)

    def explicit_sizes(self) -> dict[str, Any]:
        return {"codes": self.codes}

    def check(self) -> None:
        if self.codes is not None and self.codes > self.max_codes:
            raise MethodConfigError(f"binary.codes and binary.max_codes: codes {self.codes} is above max_codes "
                                    f"{self.max_codes}")  # fmt: skip

    @classmethod
    def contract_examples(cls) -> list[BinaryConfig]:
        return [cls(), cls(budget=Budget(ratio=100)), cls(budget=None, codes=2)]


def code_bytes(rows: int, codes: int, dim: int) -> int:
    """Bytes of ``rows`` packed rows of ``codes`` codes of ``dim`` bits, with their fp16 scales."""
    return rows * codes * (math.ceil(dim / 8) + SCALE_BYTES)


def knob_range(ids: int, max_codes: int) -> int:
    """The largest knob of a table of ``ids`` ids (see ``rows_and_codes``)."""
    return ids + sum(ids - (k - 1) * ids // k for k in range(2, max_codes + 1))


def rows_and_codes(knob: int, ids: int) -> tuple[int, int]:
    """The knob's (rows, codes), in increasing bytes: up to ``ids``, one code in ``knob``
    rows (hashed below ``ids``); then for k = 2, 3 ...: k codes in the rows from just above
    ``(k-1)/k`` of the ids up to all of them (k codes on fewer rows than k - 1 codes on all
    would hold less), so the bytes rise in steps of one row's codes, never of a whole table's."""
    if knob <= ids:
        return knob, 1
    rest, k = knob - ids, 2
    while True:
        low = (k - 1) * ids // k  # k codes on more than this many rows hold more than k - 1 on all
        if rest <= ids - low:
            return low + rest, k
        rest, k = rest - (ids - low), k + 1


def binarize(v: torch.Tensor, codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``v`` [n, d] as ``codes`` sign vectors [n, k, d] (±1) and their scales [n, k]
    (fp16-rounded, as stored), each code fitting the residual of the ones before."""
    r, signs, scales = v, [], []
    for _ in range(codes):
        b = torch.where(r >= 0, 1.0, -1.0).to(v.dtype)
        a = r.abs().mean(dim=1).half().to(v.dtype)
        signs.append(b)
        scales.append(a)
        r = r - a.unsqueeze(1) * b
    return torch.stack(signs, 1), torch.stack(scales, 1)


def reconstruct(signs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (signs * scales.unsqueeze(2)).sum(1)


def pack_bits(signs: torch.Tensor) -> torch.Tensor:
    """±1 [n, k, d] as uint8 [n, k, ceil(d/8)]: element j is bit j % 8 of byte j // 8."""
    n, k, d = signs.shape
    nb = math.ceil(d / 8)
    bits = torch.zeros(n, k, nb * 8, dtype=torch.uint8, device=signs.device)
    bits[..., :d] = (signs > 0).to(torch.uint8)
    weights = (1 << torch.arange(8, device=signs.device)).to(torch.uint8)
    return (bits.view(n, k, nb, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 [n, k, nb] back to ±1 floats [n, k, dim]."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    b = (bits.unsqueeze(-1) >> shifts) & 1
    return b.flatten(-2)[..., :dim].to(torch.float32) * 2 - 1


class BinaryCodesCollection(IdMappedCollection):
    """Exact tables in a TorchRec EBC; the others as latent rows (training) or packed codes
    (after ``pack``), ids hashed where a table holds fewer rows than ids."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, config: BinaryConfig, ctx: BuildContext) -> None:
        super().__init__(tables, plan, knob="knob", config=ctx.config)
        self.config = config
        self.shape: dict[str, tuple[int, int]] = {}  # table -> (rows, codes) of the coded tables
        for t in tables:
            if plan.sizes[t.name] is not None:
                self.shape[t.name] = rows_and_codes(int(plan.sizes[t.name]), t.num_embeddings)  # type: ignore[arg-type]
        self._tables = {t.name: t for t in tables}
        self._table_of = {f: t.name for t in tables for f in t.feature_names}
        exact = [inner_table(t) for t in tables if t.name not in self.shape]
        self.ebc = EmbeddingBagCollection(tables=exact, device=ctx.table_device) if exact else None
        coded = [unpooled(inner_table(t, rows=self.shape[t.name][0])) for t in tables if t.name in self.shape]
        self.ec: Optional[nn.ModuleDict] = collections_by_dim(coded, ctx.table_device) if coded else None
        self.packed = False
        self.hasher = UniversalHash(1, seed=ctx.seed, device=ctx.device)
        rows = {f: self.shape.get(t.name, (t.num_embeddings, 0))[0] for t in tables for f in t.feature_names}
        own = {f: int(rows[f] == self._tables[self._table_of[f]].num_embeddings) for f in rows}
        self.params = KeyParams(self.feature_names, {"rows": [rows[f] for f in self.feature_names],
                                                     "own": [own[f] for f in self.feature_names]}, device=ctx.device)  # fmt: skip

    def table_parameters(self) -> list[nn.Parameter]:
        """The exact tables' rows and, until ``pack``, the coded tables' latent rows."""
        held = [m for m in (self.ebc, self.ec) if m is not None]
        return [p for m in held for p in m.parameters()]

    def sharding_refusal(self) -> str | None:
        return "binary: the pack stage rewrites every row of a table into its codes, which a sharded table does not hold on one rank"

    def stages(self) -> list[Stage]:
        return compact_then_finetune("pack", self.pack, lambda: memory_report(self).bytes)

    def rows(self, features: KeyedJaggedTensor) -> torch.Tensor:
        p = self.params.expand(features)
        ids = features.values()
        return torch.where((p["own"] != 0) & in_range(ids, p["rows"]), ids, self.hasher(ids, p["rows"], which=0))

    def _coded(self, name: str, jt_values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What a lookup of coded table ``name`` reads: the rows' reconstruction from their codes."""
        if self.packed:
            bits, scales = getattr(self, f"bits_{name}"), getattr(self, f"scales_{name}")
            return reconstruct(unpack_bits(bits[ids], self._tables[name].embedding_dim), scales[ids].float())
        q = reconstruct(*binarize(jt_values.detach(), self.shape[name][1]))
        return jt_values + (q - jt_values).detach()  # straight through to the latent rows

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        mapped = with_values(features, self.rows(features))
        exact = pooled_lookup(self.ebc, mapped).to_dict() if self.ebc is not None else {}
        lookups = {f: jt for ec in self.ec.values() for f, jt in ec(mapped).items()} if self.ec is not None else {}
        batch = features.stride()
        out = []
        for f in self.feature_names:
            if f in exact:
                out.append(exact[f])
                continue
            name = self._table_of[f]
            jt = mapped[f]
            values = lookups[f].values() if not self.packed else jt.values()
            out.append(pool(self._coded(name, values, jt.values()), jt.lengths(), batch, self._tables[name].pooling))
        return self.keyed(torch.cat(out, dim=1))

    @torch.no_grad()
    def pack(self) -> None:
        """The deployed form, in place: every coded table's rows as packed codes and fp16 scales."""
        if self.packed:
            return
        assert self.ec is not None
        for name, (_, k) in self.shape.items():
            t = self._tables[name]
            weight = self.ec[f"d{t.embedding_dim}"].embeddings[name].weight  # type: ignore[index,union-attr]
            signs, scales = binarize(weight.detach().float(), k)
            self.register_buffer(f"bits_{name}", pack_bits(signs))
            self.register_buffer(f"scales_{name}", scales.half())
        self.ec = None
        self.packed = True

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        for name, (rows, k) in self.shape.items():
            out[f"{name}.rows"], out[f"{name}.codes"] = rows, k
        return out


def _packed_form(tables: list[EmbeddingBagConfig], plan: Plan, module: BinaryCodesCollection) -> MetaForm:
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, (rows, k) in module.shape.items():
        nb = math.ceil(module._tables[name].embedding_dim / 8)
        tensors[f"bits_{name}"] = ((rows, k, nb), torch.uint8)
        tensors[f"scales_{name}"] = ((rows, k), torch.float16)
    exact = [inner_table(t) for t in tables if t.name not in module.shape]
    return MetaForm(exact, tensors, {"params": module.params, "hasher": module.hasher})


def _cost(t: EmbeddingBagConfig, fmt: TableFormat, max_codes: int) -> FieldCost:
    n, d, f = t.num_embeddings, t.embedding_dim, len(t.feature_names)
    return FieldCost(t.name, fmt.table(n, d, f), 1, knob_range(n, max_codes), lambda v: code_bytes(*rows_and_codes(v, n), d))


@register(BinaryConfig)
def build(tables: list[EmbeddingBagConfig], config: BinaryConfig, ctx: BuildContext) -> BinaryCodesCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        check=lambda: refuse_aware(config.quantization, config.method, "the pack stage replaces the tables it would train"),
        costs=lambda fmt: [_cost(t, fmt, config.max_codes) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(1) + KeyParams.nbytes(2, n_features) + fmt.collection(tables),
        # the quantized collection's metadata only where a table stays exact
        settle=lambda fmt, plan: UniversalHash.nbytes(1) + KeyParams.nbytes(2, n_features)
        + fmt.collection([t for t in tables if plan.sizes[t.name] is None]),
        sizes=lambda: {t.name: knob_range(t.num_embeddings, int(config.codes or 1)) for t in tables},
        construct=lambda plan: BinaryCodesCollection(tables, plan, config, ctx),
        deployed=lambda module, plan: _packed_form(tables, plan, module),
    )  # fmt: skip
