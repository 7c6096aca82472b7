"""The uncompressed baseline: a plain TorchRec ``EmbeddingBagCollection``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, CompressionConfig, register
from compression.bags import pooled_lookup
from compression.base import CompressedEmbeddingBagCollection


@dataclass
class NoCompression(CompressionConfig):
    """No compression: every table full size in fp32 (the baseline every ratio is against).

    Example::

        ebc = compress(tables, NoCompression())
    """

    method: ClassVar[str] = "none"
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections


class UncompressedEmbeddingBagCollection(CompressedEmbeddingBagCollection):
    """The source tables as one TorchRec ``EmbeddingBagCollection``."""

    def __init__(self, tables: list[EmbeddingBagConfig], ctx: BuildContext) -> None:
        super().__init__(tables, config=ctx.config)
        self.ebc = EmbeddingBagCollection(tables=tables, device=ctx.table_device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.check_ids(features)
        return pooled_lookup(self.ebc, features)


@register(NoCompression)
def build(tables: list[EmbeddingBagConfig], config: NoCompression, ctx: BuildContext) -> UncompressedEmbeddingBagCollection:
    return UncompressedEmbeddingBagCollection(tables, ctx)
