"""DCN-V2 (Wang et al., WWW 2021): a cross network and a deep network over
``x0 = [dense features, every feature's embedding]``, stacked (cross, then deep) or
parallel (both on ``x0``, concatenated), then one linear output.

Cross layer ``l`` (Eq. 1 of the paper): ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``,
TorchRec's ``CrossNet``; with ``low_rank = r``, ``W_l = U_l V_l`` (Eq. 2,
``LowRankCrossNet``). The deep network is FuxiCTR's MLP block (batch norm and dropout
optional). Dense features are concatenated as they are, or, with
``dense_as_fields``, embedded as fields (``x_j * u_j``, FuxiCTR's numeric features).
Features may have different embedding dims. BARS's DCNv2: parallel, 4 cross layers,
[400, 400, 400], batch norm, dropout 0.4 (Frappe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.config_checks import bounded, one_of
from recsys.models.base import ModelConfig, concat_features, feature_dims
from recsys.models.layers import DenseFields, MLPBlock, init_dense

STRUCTURES = ("stacked", "parallel")


class DCNv2(nn.Module):
    """DCN-V2 taking its embedding module as a constructor argument.

    Args:
        embedding_bag_collection: any ``EmbeddingBagCollectionInterface``.
        dense_in_features: number of dense features (0 is allowed).
        cross_layers: number of cross layers.
        low_rank: rank of the cross layers' weight factorisation (None: full rank).
        deep_layers: hidden sizes of the deep network.
        structure: "stacked" (cross then deep) or "parallel" (both, concatenated).
        batch_norm, dropout: the deep network's hidden layers.
        dense_as_fields: embed each dense feature as a field of ``dense_dim``.
        dense_dim: the dense fields' dim (default: the first feature's embedding dim).

    Example::

        model = DCNv2(ebc, dense_in_features=13)
        logits = model(batch.dense_features, batch.sparse_features)  # [B, 1]
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollectionInterface,
        dense_in_features: int,
        cross_layers: int = 3,
        low_rank: Optional[int] = None,
        deep_layers: tuple[int, ...] | list[int] = (256, 128),
        structure: str = "stacked",
        batch_norm: bool = False,
        dropout: float = 0.0,
        dense_as_fields: bool = False,
        dense_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"DCNv2 structure must be one of {STRUCTURES}, got '{structure}'")
        if not deep_layers:
            raise ValueError("DCNv2 needs at least one deep layer")
        self.embedding_bag_collection = embedding_bag_collection
        dims = feature_dims(embedding_bag_collection)
        self._features = [f for f, _ in dims]
        self.dense_fields = (
            DenseFields(dense_in_features, dense_dim or dims[0][1]) if dense_as_fields and dense_in_features else None
        )
        dense_width = dense_in_features * (dense_dim or dims[0][1]) if self.dense_fields else dense_in_features
        in_dim = dense_width + sum(d for _, d in dims)
        self.cross: nn.Module = (
            LowRankCrossNet(in_dim, cross_layers, low_rank) if low_rank else CrossNet(in_dim, cross_layers)
        )
        self.deep = MLPBlock(in_dim, list(deep_layers), batch_norm=batch_norm, dropout=dropout)
        self.structure = structure
        head_in = deep_layers[-1] if structure == "stacked" else in_dim + deep_layers[-1]
        self.head = nn.Linear(head_in, 1)
        init_dense(self.deep)  # (the cross kernels: TorchRec's own Xavier-normal init)
        init_dense(self.head)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        emb = concat_features(self.embedding_bag_collection(sparse_features), self._features)
        if self.dense_fields is not None:
            dense_features = self.dense_fields(dense_features).flatten(start_dim=1)
        x0 = torch.cat([dense_features, emb], dim=1) if dense_features.shape[1] else emb
        if self.structure == "stacked":
            h = self.deep(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.head(h)


@dataclass
class DCNv2Config(ModelConfig):
    name: str = "dcnv2"
    cross_layers: int = bounded(3, ge=0)
    low_rank: Optional[int] = bounded(None, ge=1)
    deep_layers: list[int] = bounded(ge=1, each=True, default_factory=lambda: [256, 128])
    structure: str = one_of("stacked", *STRUCTURES)
    batch_norm: bool = False
    dropout: float = bounded(0.0, ge=0, lt=1)
    dense_as_fields: bool = False

    def build(self, embedding_module: EmbeddingBagCollectionInterface, dense_in_features: int) -> nn.Module:
        return DCNv2(
            embedding_module,
            dense_in_features,
            cross_layers=self.cross_layers,
            low_rank=self.low_rank,
            deep_layers=self.deep_layers,
            structure=self.structure,
            batch_norm=self.batch_norm,
            dropout=self.dropout,
            dense_as_fields=self.dense_as_fields,
            dense_dim=self.embedding_dim,
        )
