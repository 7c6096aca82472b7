"""DCN-V2 (Wang et al., WWW 2021): cross network and deep network over
[dense features, every feature's embedding], built from TorchRec's ``CrossNet`` /
``LowRankCrossNet`` and ``MLP``. Features may have different embedding dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.models.base import ModelConfig, concat_features, feature_dims

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
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"DCNv2 structure must be one of {STRUCTURES}, got '{structure}'")
        self.embedding_bag_collection = embedding_bag_collection
        dims = feature_dims(embedding_bag_collection)
        self._features = [f for f, _ in dims]
        in_dim = dense_in_features + sum(d for _, d in dims)
        self.cross: nn.Module = (
            LowRankCrossNet(in_dim, cross_layers, low_rank) if low_rank else CrossNet(in_dim, cross_layers)
        )
        self.deep = MLP(in_dim, list(deep_layers))
        self.structure = structure
        head_in = deep_layers[-1] if structure == "stacked" else in_dim + deep_layers[-1]
        self.head = nn.Linear(head_in, 1)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        emb = concat_features(self.embedding_bag_collection(sparse_features), self._features)
        x0 = torch.cat([dense_features, emb], dim=1)
        if self.structure == "stacked":
            h = self.deep(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.head(h)


@dataclass
class DCNv2Config(ModelConfig):
    name: str = "dcnv2"
    cross_layers: int = 3
    low_rank: Optional[int] = None
    deep_layers: list[int] = field(default_factory=lambda: [256, 128])
    structure: str = "stacked"

    def build(self, embedding_module: EmbeddingBagCollectionInterface, dense_in_features: int) -> nn.Module:
        return DCNv2(
            embedding_module,
            dense_in_features,
            cross_layers=self.cross_layers,
            low_rank=self.low_rank,
            deep_layers=self.deep_layers,
            structure=self.structure,
        )
