"""Building blocks the CTR models share: the MLP block, numeric fields, initialisation.

``MLPBlock`` is FuxiCTR's ``MLP_Block`` layout (Linear -> BatchNorm -> ReLU -> Dropout
per hidden layer, then an optional output layer), the block of every BARS model.
``DenseFields`` embeds each numeric feature as a learned vector scaled by its value,
as FuxiCTR embeds a ``numeric`` feature, so dense features take part in FM and cross
interactions as fields. ``init_dense`` is FuxiCTR's ``reset_parameters`` for the
dense layers (Xavier-normal weights, zero biases); it never touches the embedding
module, whose tables each compression method initialises itself.

Example::

    mlp = MLPBlock(64, [400, 400, 400], output_dim=1, batch_norm=True, dropout=0.2)
    init_dense(mlp)
    logits = mlp(torch.randn(8, 64))          # [8, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from recsys.models.fused import (
    FULL_CUT,
    batch_norm_relu_dropout,
    dropout_cut,
    dropout_keep,
    fusable,
)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (each element kept with probability 1 - p and scaled by the inverse of
    that; identity in eval) with its mask from a 32-bit draw an element.

    On the CPU torch's dropout draws its mask with a Bernoulli kernel, a uniform float an
    element: 3.3 ms for 4096 x 400. Here an element's draw is a hash of its index keyed by
    one draw from torch's generator (``fused.dropout_keep``; 0.2 ms with the C++ kernel,
    4 ms in NumPy where it is not built, the same mask either way, and the fused layer's).
    The keep probability is 1 - p with p rounded to a multiple of 2^-32, and the scale is
    its exact inverse, so the output's mean is the input's. Seeded by ``torch.manual_seed``
    as torch's own. On CUDA torch's fused kernel is used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.is_cuda:
            return super().forward(x)
        cut = dropout_cut(self.p)
        if cut >= FULL_CUT:
            return x * 0.0
        keep = dropout_keep(x.shape, cut).to(x.dtype).mul_(FULL_CUT / (FULL_CUT - cut))
        return x * keep


class MLPBlock(nn.Sequential):
    """Hidden layers ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]``, then an optional
    ``Linear(hidden[-1], output_dim)``.

    Args:
        in_features: input width.
        hidden: hidden layer widths (may be empty: then only the output layer).
        output_dim: width of a final linear layer (None: end at the last hidden layer).
        batch_norm: batch norm after each hidden linear layer.
        dropout: dropout probability after each hidden layer's activation (0: none).

    Example::

        MLPBlock(32, [64, 16], batch_norm=True, dropout=0.1)(torch.randn(4, 32)).shape  # [4, 16]
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        output_dim: Optional[int] = None,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = h
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        super().__init__(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layers in turn; in CPU training each ``Linear -> BatchNorm1d -> ReLU ->
        [Dropout]`` is the linear layer's product and one autograd function
        (``recsys.models.fused``): the same result in fewer passes."""
        layers = list(self)
        i = 0
        while i < len(layers):
            if (
                type(layers[i]) is nn.Linear
                and i + 2 < len(layers)
                and type(layers[i + 2]) is nn.ReLU
                and fusable(x, layers[i + 1], layers[i + 3 :])
            ):
                nxt = layers[i + 3] if i + 3 < len(layers) else None
                dropout = isinstance(nxt, Dropout) and nxt.training
                linear: nn.Linear = layers[i]  # type: ignore[assignment]
                h = F.linear(x, linear.weight)
                x = batch_norm_relu_dropout(h, layers[i + 1], nxt.p if dropout else 0.0, linear.bias)  # type: ignore[union-attr, arg-type]
                i += 4 if dropout else 3
            else:
                x = layers[i](x)
                i += 1
        return x


class DenseFields(nn.Module):
    """Numeric features as fields: feature ``j`` becomes ``x_j * u_j`` (``u_j`` learned).

    ``forward(x [B, n])`` gives ``[B, n, dim]``; with ``first_order`` it also holds the
    per-feature weights ``w_j`` of the linear term, ``first_order_term(x) = x @ w``.
    These are dense parameters (one vector per feature, not per id), trained with the
    rest of the network; they are not embedding rows and are not in any budget.
    """

    def __init__(self, n_features: int, dim: int, first_order: bool = False) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(n_features, dim))
        self.weights = nn.Parameter(torch.empty(n_features)) if first_order else None
        # FuxiCTR embeds a numeric feature with a Linear(1, dim) (its LR term: Linear(1, 1))
        # under Xavier-normal initialisation: std sqrt(2 / (1 + dim))
        nn.init.normal_(self.vectors, std=(2.0 / (1 + dim)) ** 0.5)
        if self.weights is not None:
            nn.init.normal_(self.weights, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2) * self.vectors

    def first_order_term(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("DenseFields was built without first-order weights")
        return x @ self.weights.unsqueeze(1)


def init_dense(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every ``nn.Linear`` inside ``module``
    (FuxiCTR's default initialisation of the dense layers)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """Field-wise FM term of ``v [B, F, k]``: 0.5 * sum_k [(sum_f v)^2 - sum_f v^2] -> [B, 1].

    Equal to the sum over pairs of fields of their dot products.
    """
    return 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1, keepdim=True)
