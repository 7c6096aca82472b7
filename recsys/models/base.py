"""What every CTR model shares: it takes its embedding module as an argument.

A model never knows which compression method produced its embedding module; it
only sees TorchRec's ``EmbeddingBagCollectionInterface`` (KJT in, KeyedTensor out)
and each feature's output dim from ``embedding_bag_configs()``.
Every model's ``forward(dense_features, sparse_features)`` returns logits ``[B, 1]``.

What a model asks of the tables it is given is said by its config, before the
module is built: ``table_dim()`` (DeepFM keeps each id's first-order weight in an
extra column) and ``needs_uniform_dims()`` (DLRM's dot interaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedTensor

from compression.config_checks import bounded


@dataclass
class ModelConfig:
    """Base of every model config (a Hydra ``model/*.yaml`` file)."""

    name: str = "model"
    embedding_dim: int = bounded(16, ge=1)
    # the embedding rows' initial values: N(0, std^2) (FuxiCTR: 1e-4); None keeps
    # TorchRec's default (uniform in +-sqrt(1/rows)). Every method's tables get it.
    embedding_init_std: Optional[float] = bounded(None, gt=0)

    def build(self, embedding_module: EmbeddingBagCollectionInterface, dense_in_features: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")

    def table_dim(self) -> int:
        """Width of each field's embedding table (what ``embedding_tables`` is given)."""
        return self.embedding_dim

    def needs_uniform_dims(self) -> bool:
        """Whether every feature must come out of the embedding module at one dim."""
        return False


def feature_dims(embedding_module: EmbeddingBagCollectionInterface) -> list[tuple[str, int]]:
    """(feature, output dim) in the order the module's configs list them."""
    return [
        (f, c.embedding_dim) for c in embedding_module.embedding_bag_configs() for f in c.feature_names
    ]


def concat_features(kt: KeyedTensor, names: list[str]) -> torch.Tensor:
    """The pooled embeddings of ``names``, concatenated in that order: ``[B, sum dims]``."""
    if kt.keys() == names:
        return kt.values()
    d = kt.to_dict()
    return torch.cat([d[n] for n in names], dim=1)
