"""DeepFM (Guo et al., IJCAI 2017), as the paper and FuxiCTR define it:

    y = b + sum_f w_f(x_f) + FM(v_1 .. v_F) + MLP([v_1; ...; v_F])

with ``w_f(x)`` a per-id first-order weight (a dim-1 embedding per feature), ``v_f``
the field embeddings, FM the field-wise factorisation machine
``0.5 * sum_k [(sum_f v_fk)^2 - sum_f v_fk^2]`` and the MLP over the concatenated
field embeddings (FuxiCTR's ``MLP_Block``: batch norm and dropout optional).

Where the first-order weights live: each field's table is one column wider than the
FM dim (``DeepFMConfig.table_dim() = embedding_dim + 1``) and column 0 of every
feature's pooled embedding is its first-order weight. So the weights are embedding
rows inside the compressed module: compressed by the same method as the vectors
(an id that shares a row, or loses it to pruning, shares or loses its weight with it)
and counted in its exact bytes. A second dim-1 table per field would do the same
sums for the uncompressed model (Adam and L2 are element-wise), but would give the
methods tables that several of them cannot size (dim 1 is not divisible by QR's
concat halves, double hashing's parts or Unified Embedding's chunks).

Dense features: concatenated into the MLP with a linear first-order term, or, with
``dense_as_fields``, embedded as fields (``x_j * u_j``, FuxiCTR's numeric features)
that join the FM and the MLP. Features whose dims differ are projected to ``fm_dim``
for the FM term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.config_checks import bounded
from recsys.models.base import ModelConfig, concat_features, feature_dims
from recsys.models.layers import DenseFields, MLPBlock, fm_interaction, init_dense


class DeepFM(nn.Module):
    """DeepFM taking its embedding module as a constructor argument.

    Args:
        embedding_bag_collection: any ``EmbeddingBagCollectionInterface``.
        dense_in_features: number of dense features (0 is allowed).
        deep_layers: hidden sizes of the MLP (its output layer of 1 is added).
        fm_dim: FM dim; None uses the features' vector dim when they all share one.
        first_order: column 0 of each feature's embedding is its first-order weight
            (tables of ``DeepFMConfig.table_dim()``); False: no first-order term.
        batch_norm, dropout: the MLP's hidden layers.
        dense_as_fields: embed dense features as FM fields instead of concatenating them.

    Example::

        model = DeepFM(ebc, dense_in_features=13)
        logits = model(batch.dense_features, batch.sparse_features)  # [B, 1]
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollectionInterface,
        dense_in_features: int,
        deep_layers: tuple[int, ...] | list[int] = (400, 400, 400),
        fm_dim: Optional[int] = None,
        first_order: bool = True,
        batch_norm: bool = False,
        dropout: float = 0.0,
        dense_as_fields: bool = False,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        dims = feature_dims(embedding_bag_collection)
        self._features = [f for f, _ in dims]
        self._offset = 1 if first_order else 0
        vec = [(f, d - self._offset) for f, d in dims]
        if any(d < 1 for _, d in vec):
            raise ValueError(
                f"DeepFM with first_order needs tables at least 2 wide (column 0 is the weight); "
                f"got dims {sorted({d for _, d in dims})}"
            )
        distinct = {d for _, d in vec}
        if fm_dim is None:
            if len(distinct) != 1:
                raise ValueError(
                    f"DeepFM: features have vector dims {sorted(distinct)}; set fm_dim to project them to one"
                )
            fm_dim = next(iter(distinct))
        self._uniform = len({d for _, d in dims}) == 1
        self._widths = [d for _, d in dims]
        # project only the features whose vector dim differs from the FM dim
        self.projections = nn.ModuleDict({f: nn.Linear(d, fm_dim, bias=False) for f, d in vec if d != fm_dim})
        self.dense_fields = (
            DenseFields(dense_in_features, fm_dim, first_order=first_order)
            if dense_as_fields and dense_in_features
            else None
        )
        self.dense_linear = (
            nn.Linear(dense_in_features, 1, bias=False)
            if dense_in_features and self.dense_fields is None and first_order
            else None
        )
        mlp_in = sum(d for _, d in vec) + (
            dense_in_features * fm_dim if self.dense_fields is not None else dense_in_features
        )
        self.bias = nn.Parameter(torch.zeros(1)) if first_order else None
        self.mlp = MLPBlock(mlp_in, list(deep_layers), output_dim=1, batch_norm=batch_norm, dropout=dropout)
        # the dense layers only: the embedding module's own layers are its method's
        for m in (self.mlp, self.projections, self.dense_linear):
            if m is not None:
                init_dense(m)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        emb = concat_features(self.embedding_bag_collection(sparse_features), self._features)
        b, k = emb.shape[0], self._offset
        vec_parts: list[torch.Tensor] | tuple[torch.Tensor, ...]
        if self._uniform:  # one view, no per-feature split
            per = emb.view(b, len(self._features), self._widths[0])
            vecs = per[:, :, k:]
            weights = per[:, :, 0] if k else None
            flat = vecs.reshape(b, -1)
            vec_parts = vecs.unbind(dim=1) if self.projections else ()
        else:
            parts = torch.split(emb, self._widths, dim=1)
            weights = torch.stack([p[:, 0] for p in parts], dim=1) if k else None
            vec_parts = [p[:, k:] for p in parts]
            flat = torch.cat(vec_parts, dim=1)
        if vec_parts:
            v = torch.stack(
                [self.projections[f](e) if f in self.projections else e for f, e in zip(self._features, vec_parts)],
                dim=1,
            )  # [B, F, fm_dim]
        else:
            v = vecs
        if self.dense_fields is not None:
            dense_v = self.dense_fields(dense_features)  # [B, n_dense, fm_dim]
            v = torch.cat([v, dense_v], dim=1)
            mlp_in = torch.cat([flat, dense_v.reshape(b, -1)], dim=1)
        else:
            mlp_in = torch.cat([flat, dense_features], dim=1) if dense_features.shape[1] else flat
        out = fm_interaction(v) + self.mlp(mlp_in)
        if weights is not None:
            out = out + weights.sum(dim=1, keepdim=True) + self.bias
            if self.dense_fields is not None:
                out = out + self.dense_fields.first_order_term(dense_features)
            elif self.dense_linear is not None:
                out = out + self.dense_linear(dense_features)
        return out


@dataclass
class DeepFMConfig(ModelConfig):
    """DeepFM's settings; ``embedding_dim`` is the FM dim (the tables are one wider when
    ``first_order``). BARS's DeepFM: dim 10, [400, 400, 400], batch norm, dropout 0.2."""

    name: str = "deepfm"
    deep_layers: list[int] = bounded(ge=1, each=True, default_factory=lambda: [400, 400, 400])
    fm_dim: Optional[int] = bounded(None, ge=1)
    first_order: bool = True
    batch_norm: bool = False
    dropout: float = bounded(0.0, ge=0, lt=1)
    dense_as_fields: bool = False

    def table_dim(self) -> int:
        return self.embedding_dim + (1 if self.first_order else 0)

    def build(self, embedding_module: EmbeddingBagCollectionInterface, dense_in_features: int) -> nn.Module:
        return DeepFM(
            embedding_module,
            dense_in_features,
            deep_layers=self.deep_layers,
            fm_dim=self.fm_dim,
            first_order=self.first_order,
            batch_norm=self.batch_norm,
            dropout=self.dropout,
            dense_as_fields=self.dense_as_fields,
        )
