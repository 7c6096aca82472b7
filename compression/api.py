"""The registry and ``compress``: a method's config type is its identity.

As torchao's ``quantize_(model, Config())`` finds its handler by ``type(config)``,
``compress(tables, config)`` finds the builder registered for ``type(config)``.
Registering a second builder for the same type, or a second type under the same
method name, is refused.

Example::

    from torchrec import EmbeddingBagConfig
    from compression import compress, NoCompression

    tables = [EmbeddingBagConfig(name="t_user", embedding_dim=16,
                                 num_embeddings=1000, feature_names=["user"])]
    ebc = compress(tables, NoCompression())
    model = torchrec.models.dlrm.DLRM(embedding_bag_collection=ebc, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.base import CompressedEmbeddingBagCollection


@dataclass
class CompressionConfig:
    """Base of every method's config dataclass; ``method`` is its registered name."""

    method: ClassVar[str] = ""


@dataclass
class BuildContext:
    """What a builder may use beyond the tables: data statistics, device, seed.

    ``counts`` maps a feature name to the train frequency of each of its ids (the
    processed dataset's ``counts.parquet``), for frequency-aware methods.
    """

    counts: Mapping[str, np.ndarray] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


C = TypeVar("C", bound=CompressionConfig)
Builder = Callable[[list[EmbeddingBagConfig], Any, BuildContext], CompressedEmbeddingBagCollection]

_BUILDERS: dict[type, Builder] = {}
_BY_NAME: dict[str, type] = {}


class MethodConfigError(ValueError):
    """A method's config that cannot work with these tables (the message says why)."""


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register(config_cls: type[C]) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(tables, config, ctx)`` for ``config_cls``."""
    name = getattr(config_cls, "method", "")
    if not name:
        raise ValueError(f"{config_cls.__name__} needs a non-empty ClassVar 'method' name")

    def deco(builder: Builder) -> Builder:
        if config_cls in _BUILDERS:
            raise ValueError(f"a builder for {config_cls.__name__} is already registered")
        if name in _BY_NAME:
            raise ValueError(
                f"method name '{name}' is already taken by {_BY_NAME[name].__name__}"
            )
        _BUILDERS[config_cls] = builder
        _BY_NAME[name] = config_cls
        return builder

    return deco


def registered_methods() -> dict[str, type]:
    """Method name -> config class, for every registered method."""
    return dict(_BY_NAME)


def config_class(name: str) -> type:
    """The config class registered under ``name``; a clear error for an unknown one."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown compression method '{name}'; registered: {', '.join(sorted(_BY_NAME))}"
        ) from None


def compress(
    tables: Sequence[EmbeddingBagConfig],
    config: CompressionConfig,
    *,
    counts: Mapping[str, np.ndarray] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> CompressedEmbeddingBagCollection:
    """Build the compressed module for ``tables`` that ``config`` describes.

    The result implements TorchRec's ``EmbeddingBagCollectionInterface`` (KJT in,
    KeyedTensor out) and is made of TorchRec tables, so any TorchRec model takes it
    and ``DistributedModelParallel`` shards it.

    Args:
        tables: the uncompressed tables, one ``EmbeddingBagConfig`` per table.
        config: a registered method's config, e.g. ``NoCompression()``.
        counts: per-feature id frequencies (frequency-aware methods read them).
        device: where the tables are allocated (default CPU).
        seed: seeds the method's hashes and initialisation.
    """
    builder = _BUILDERS.get(type(config))
    if builder is None:
        raise UnknownMethodError(
            f"{type(config).__name__} is not a registered compression config; "
            f"registered: {', '.join(c.__name__ for c in _BUILDERS)}"
        )
    tables = list(tables)
    if not tables:
        raise ValueError("compress() needs at least one EmbeddingBagConfig")
    ctx = BuildContext(
        counts=counts if counts is not None else {},
        device=torch.device(device) if device is not None else torch.device("cpu"),
        seed=seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = builder(tables, config, ctx)
    module.compression_config = config  # type: ignore[assignment]
    return module
