"""Quantization-aware training of embedding rows with a learned per-row step (LSQ).

Esser et al., "Learned Step Size Quantization" (ICLR 2020); for embeddings, Li et
al., "Adaptive Low-Precision Training for Embeddings in CTR Prediction" (ALPT, AAAI
2023), who learn a step size per row and report lossless int8 on Criteo and Avazu.

The grid is fbgemm's row-wise integer format, so the trained grid *is* the deployed
table: a row w (dim d) of b bits (L = 2^b - 1 levels above zero) reads

    q = clamp(round((w - bias) / scale), 0, L),    ŵ = q · scale + bias

with ``scale`` and ``bias`` rounded to fp16, as fbgemm stores them. In every forward
(training and evaluation) the looked-up rows are ŵ; after training the ``quantize``
stage writes q, scale and bias into TorchRec's quantized EBC directly (no
re-quantization from min/max), so the integer model's lookups are the fake-quantized
ones: q·scale is exact in fp32 (an 8-bit integer times an 11-bit mantissa), leaving
the one rounding of "+ bias" that both do alike; only pooled sums may differ in order.

The learned step. With lo, hi the row's min and max, c = (hi + lo)/2, h = (hi - lo)/2
and a learned α > 0 per row (init 1):

    scale = 2αh / L,    bias = c - αh

so α = 1 is fbgemm's post-training min-max grid and α < 1 clips the row's extremes
for a finer step (what int4/int2 gain from). The step is learned relative to the row's
range rather than absolutely because the rows are trained by row-wise Adagrad, whose
first update moves a row by about the sparse learning rate (0.05) while TorchRec
initialises a 1M-row table within ±0.001: an absolute step would clip almost every
row for thousands of its updates. The gradient is LSQ's: a straight-through round
(d round(v)/dv = 1), so dŵ/dscale = round(v) - v inside the grid and q at its ends,
clipped values pass no gradient to w, and the row's min and max get theirs through
c and h. α is a dense parameter (Adam): an α of a row absent from a batch has zero
gradient and drifts only by Adam's decaying momentum (under ~10 steps of the dense
learning rate), which a relative clip ratio near 1 tolerates.

Stochastic rounding (optional, training only): round(v) = floor(v + u), u ~ U[0, 1),
unbiased; evaluation and conversion round to nearest (half to even, as ``lrintf``).

Every arithmetic step is an elementwise IEEE operation (no exp/log), so the grid a
row gets in a batch of 6 lookups and in the whole-table conversion is bit-identical.

Example::

    module = compress(tables, NoCompression(quantization=Quantization("int4", aware=True)))
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class _RoundSTE(torch.autograd.Function):
    """round(v) (or floor(v + noise)) forward, identity backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        return torch.round(v) if noise is None else torch.floor(v + noise)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class _HalfSTE(torch.autograd.Function):
    """Round to the nearest fp16 value (kept in fp32) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.half().float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def grid(w: torch.Tensor, alpha: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, bias), fp16 values held in fp32, of rows ``w`` [n, d] and α [n]."""
    hi, lo = w.amax(dim=1), w.amin(dim=1)
    half = (hi - lo) / 2 * alpha
    scale = _HalfSTE.apply(half * 2 / levels)
    bias = _HalfSTE.apply((hi + lo) / 2 - half)
    # a constant row (or a step below fp16's range): any scale reads it as its bias
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, bias


def codes(
    w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, levels: int, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """q in [0, levels] (float, straight-through) of rows ``w`` on the grid (scale, bias)."""
    v = (w - bias.unsqueeze(1)) / scale.unsqueeze(1)
    return torch.clamp(_RoundSTE.apply(v, noise), 0, levels)


def fake_quantize(
    w: torch.Tensor, alpha: torch.Tensor, levels: int, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """ŵ = q·scale + bias: rows ``w`` as the integer table will read them."""
    scale, bias = grid(w, alpha, levels)
    return codes(w, scale, bias, levels, noise) * scale.unsqueeze(1) + bias.unsqueeze(1)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [n, d] (0..2^bits-1) as fbgemm's bytes [n, d·bits/8]: value j in the bits
    ``(j mod per_byte)·bits`` upward of byte ``j // per_byte``."""
    q = q.to(torch.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return q
    q = q.view(q.shape[0], -1, per_byte)
    out = torch.zeros(q.shape[:2], dtype=torch.uint8, device=q.device)
    for j in range(per_byte):
        out |= q[:, :, j] << (j * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack``: codes [n, dim] (int64) of fbgemm's packed bytes."""
    per_byte = 8 // bits
    packed = packed.to(torch.int64)
    if per_byte == 1:
        return packed[:, :dim]
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], -1)[:, :dim]


class FakeQuantEmbeddingBagCollection(EmbeddingBagCollection):
    """A TorchRec EBC whose rows are read fake-quantized on a learned per-row grid.

    It takes over the rows (``embedding_bags``) of ``ebc``, so their parameters,
    their optimizer (row-wise Adagrad, via ``table_parameters()``) and their
    ``state_dict`` keys are unchanged; α lives in ``row_step`` (dense, Adam).

    Args:
        ebc: the TorchRec EBC (fp32 rows) to train quantization-aware.
        bits: 8, 4 or 2.
        stochastic: stochastic rounding while training.
    """

    def __init__(self, ebc: EmbeddingBagCollection, bits: int, stochastic: bool = False) -> None:
        tables = [copy.copy(t) for t in ebc.embedding_bag_configs()]
        super().__init__(tables=tables, is_weighted=ebc.is_weighted(), device=torch.device("meta"))
        self.embedding_bags = ebc.embedding_bags
        self._device = ebc._device
        self.bits, self.levels, self.stochastic = bits, 2**bits - 1, stochastic
        self.row_step = nn.ParameterDict(
            {
                t.name: nn.Parameter(torch.ones(t.num_embeddings, device=self.embedding_bags[t.name].weight.device))
                for t in tables
            }
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        feature_dict = features.to_dict()
        pooled: list[torch.Tensor] = []
        for config in self._embedding_bag_configs:
            weight = self.embedding_bags[config.name].weight
            alpha = self.row_step[config.name]
            mode = "mean" if config.pooling == PoolingType.MEAN else "sum"
            for name in config.feature_names:
                f = feature_dict[name]
                ids = f.values()
                w = weight.index_select(0, ids)
                noise = torch.rand_like(w) if self.stochastic and self.training else None
                rows = fake_quantize(w, alpha.index_select(0, ids), self.levels, noise)
                pooled.append(
                    F.embedding_bag(
                        torch.arange(ids.numel(), device=ids.device),
                        rows,
                        f.offsets(),
                        mode=mode,
                        per_sample_weights=f.weights() if self._is_weighted else None,
                        include_last_offset=True,
                    )
                )
        return KeyedTensor(
            keys=self._embedding_names,
            values=torch.cat(pooled, dim=1),
            length_per_key=self._lengths_per_embedding,
        )

    @torch.no_grad()
    def integer_rows(self, table: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [rows, dim] int64, scale [rows], bias [rows]) of ``table``'s learned grid."""
        w = self.embedding_bags[table].weight
        scale, bias = grid(w, self.row_step[table], self.levels)
        return codes(w, scale, bias, self.levels).to(torch.int64), scale, bias

    @torch.no_grad()
    def integer_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per table, fbgemm's (packed codes, fp16 scale + bias as 4 bytes) of the learned grid."""
        out = {}
        for config in self._embedding_bag_configs:
            q, scale, bias = self.integer_rows(config.name)
            out[config.name] = (pack(q, self.bits), torch.stack([scale.half(), bias.half()], dim=1).view(torch.uint8))
        return out
