"""DeepFM (Guo et al., IJCAI 2017): first-order + factorisation machine + deep network.

The deep part is TorchRec's ``DeepFM`` module over an ``MLP``. The FM term is the
classic field-wise one, 0.5 * sum_k [(sum_f v_fk)^2 - sum_f v_fk^2] (TorchRec's
``FactorizationMachine`` instead lets every element interact with every other,
inside a field too). Features with different embedding dims are projected to a
common FM dim. The first-order term is a linear layer over the dense features and
the embeddings, not a second per-id table: a per-id scalar table would sit outside
the compressed module and escape its byte budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torchrec.modules.deepfm import DeepFM as DeepPart
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.models.base import ModelConfig, feature_dims


class DeepFM(nn.Module):
    """DeepFM taking its embedding module as a constructor argument.

    Args:
        embedding_bag_collection: any ``EmbeddingBagCollectionInterface``.
        dense_in_features: number of dense features (0 is allowed).
        deep_layers: hidden sizes of the deep network.
        fm_dim: FM dim; None uses the features' dim when they all share one.

    Example::

        model = DeepFM(ebc, dense_in_features=13)
        logits = model(batch.dense_features, batch.sparse_features)  # [B, 1]
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollectionInterface,
        dense_in_features: int,
        deep_layers: tuple[int, ...] | list[int] = (256, 128),
        fm_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        dims = feature_dims(embedding_bag_collection)
        self._features = [f for f, _ in dims]
        distinct = {d for _, d in dims}
        if fm_dim is None:
            if len(distinct) != 1:
                raise ValueError(
                    f"DeepFM: features have dims {sorted(distinct)}; set fm_dim to project them to one"
                )
            fm_dim = next(iter(distinct))
        # project only the features whose dim differs from the FM dim
        self.projections = nn.ModuleDict(
            {f: nn.Linear(d, fm_dim, bias=False) for f, d in dims if d != fm_dim}
        )
        in_dim = dense_in_features + sum(d for _, d in dims)
        self.linear = nn.Linear(in_dim, 1)
        self.deep = DeepPart(dense_module=nn.Sequential(MLP(in_dim, list(deep_layers)), nn.Linear(deep_layers[-1], 1)))

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        emb = self.embedding_bag_collection(sparse_features).to_dict()
        per_field = [emb[f] for f in self._features]
        flat = torch.cat([dense_features, *per_field], dim=1)
        v = torch.stack(
            [self.projections[f](e) if f in self.projections else e for f, e in zip(self._features, per_field)],
            dim=1,
        )  # [B, F, k]
        fm = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1, keepdim=True)
        return self.linear(flat) + fm + self.deep([flat])


@dataclass
class DeepFMConfig(ModelConfig):
    name: str = "deepfm"
    deep_layers: list[int] = field(default_factory=lambda: [256, 128])
    fm_dim: Optional[int] = None

    def build(self, embedding_module: EmbeddingBagCollectionInterface, dense_in_features: int) -> nn.Module:
        return DeepFM(embedding_module, dense_in_features, deep_layers=self.deep_layers, fm_dim=self.fm_dim)
