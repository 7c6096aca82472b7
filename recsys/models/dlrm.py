"""DLRM (Naumov et al. 2019): TorchRec's own ``torchrec.models.dlrm.DLRM``.

DLRM's dot interaction needs one embedding dim for every feature, so a method that
gives per-feature dims must be paired with DCNv2 or DeepFM instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from compression.config_checks import bounded
from recsys.models.base import ModelConfig, feature_dims


@dataclass
class DLRMConfig(ModelConfig):
    """Bottom MLP ``dense_arch`` (a final layer of ``embedding_dim`` is appended) and
    top MLP ``over_arch`` (a final layer of 1 is appended)."""

    name: str = "dlrm"
    dense_arch: list[int] = bounded(ge=1, each=True, default_factory=lambda: [64])
    over_arch: list[int] = bounded(ge=1, each=True, default_factory=lambda: [128, 64])

    def needs_uniform_dims(self) -> bool:
        return True  # the dot interaction pairs every feature's embedding with every other's

    def build(self, embedding_module: EmbeddingBagCollectionInterface, dense_in_features: int) -> nn.Module:
        dims = {d for _, d in feature_dims(embedding_module)}
        if len(dims) != 1:
            raise ValueError(
                f"DLRM needs one embedding dim for all features, the embedding module gives "
                f"{sorted(dims)}; use model=dcnv2 or model=deepfm, or a uniform-dim method setting"
            )
        (dim,) = dims
        return DLRM(
            embedding_bag_collection=embedding_module,  # type: ignore[arg-type]
            dense_in_features=dense_in_features,
            dense_arch_layer_sizes=[*self.dense_arch, dim],
            over_arch_layer_sizes=[*self.over_arch, 1],
        )
