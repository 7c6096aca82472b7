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

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, TypeVar

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.base import CompressedEmbeddingBagCollection
from compression.config_checks import check_fields
from compression.errors import MethodConfigError, UnknownMethodError  # noqa: F401  (re-exported)
from compression.quantization import Quantization, as_quantization, prepare, quantize_stage  # noqa: F401  (Quantization re-exported)
from compression.stages import Stage

if TYPE_CHECKING:
    from compression.budget import Budget


@dataclass
class CompressionConfig:
    """Base of every method's config dataclass; ``method`` is its registered name.

    ``quantization`` (every method has it): quantize the method's tables after
    training, or train them quantization-aware (``compression.quantization``). QR at
    10x then int4 is one config::

        QRConfig(budget=Budget(ratio=10), quantization=Quantization("int4"))
        # Hydra: compression=qr compression.budget.ratio=10 +compression.quantization.precision=int4

    It is held as a ``Quantization`` or None; a mapping (what Hydra gives, an empty
    one for none) is turned into one here, so a bad precision or key fails when the
    config is built, before any data is read. (Hydra cannot add keys under a node
    that is None, hence the empty mapping as the default.)
    """

    method: ClassVar[str] = ""
    # True: the module holds its budgeted (deployed) form only after a stage of its schedule
    # (pack, merge, compact, select ...); at build it holds its training form, larger
    sized_by_stages: ClassVar[bool] = False
    # The method's own knobs worth tuning on a user's data: field name -> the values to
    # try (the config's default among them). A search (``make advise``) crosses them with
    # the trainer's (``TrainerConfig.search_space``); sizes a budget sets are not knobs.
    # Small on purpose: each value multiplies the trials. Example (QR)::
    #
    #     search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"combine": ("mult", "add", "concat")}
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # the poolings the method's tables take (TorchRec's PoolingType names), checked against
    # the tables before the method is built, with ``pooling_reason`` in the refusal
    poolings: ClassVar[tuple[str, ...]] = ("SUM", "MEAN")
    pooling_reason: ClassVar[str] = ""
    # True: the method reads an id only through a hash of the whole int64 (the hashing family),
    # so it takes raw ids (any 64-bit value, a dataset's ``ids: raw``) with no vocabulary;
    # False: its rows are the vocabulary's ids (frequency-ranked 0 .. num_embeddings - 1)
    takes_raw_ids: ClassVar[bool] = False
    # True: the module reads its rows only through its plain TorchRec EmbeddingBagCollections
    # (no weight read directly), so training may swap them for TorchRec's fused ones
    # (``trainer.fused_tables``, ``recsys.training.fused``)
    fusable_tables: ClassVar[bool] = False
    quantization: Any = field(default_factory=dict)

    @classmethod
    def raw_id_refusal(cls) -> str | None:
        """Why the method cannot take raw 64-bit ids (None: it can), in one line."""
        if cls.takes_raw_ids:
            return None
        takers = ", ".join(n for n, c in sorted(registered_methods().items()) if getattr(c, "takes_raw_ids", False))
        return (f"{cls.method or 'none'} needs vocabulary ids (its rows are the ids, frequency-ranked), not raw ids; "
                f"the methods that hash raw ids are {takers}")  # fmt: skip

    def __post_init__(self) -> None:
        self.quantization = as_quantization(self.quantization)
        # the values each field declares it accepts (bounded, one_of), then the method's
        # own cross-field checks: a bad value fails here, when the config is made
        check_fields(self, self.method, MethodConfigError)
        self.check()

    def check(self) -> None:
        """Cross-field checks of the method's config (raise ``MethodConfigError`` naming
        the keys); the checks of one field are declared on it. Checks that need the tables
        (their dims, pooling, counts) stay in the builder. Default: none."""

    def post_training_stages(self) -> list[Stage]:
        """Stages every method's schedule ends with when this config asks: ``quantize``
        (the TorchRec tables inside become quantized ones, the same for every method)."""
        return [] if self.quantization is None else [quantize_stage(self.quantization, self.method)]

    @classmethod
    def contract_examples(cls: type[C]) -> list[C]:
        """Configs the registry's contract tests (and the sharded test) build this method
        with; the first is its representative. Default: the config with no arguments."""
        return [cls()]

    def budget_label(self) -> str:
        """The budget as runs and reports name it (``10x``, ``2MiB``), ``none`` without one."""
        return "none"

    def with_budget(self: C, budget: Budget | None) -> C:
        """This config under ``budget`` (a copy); a method that takes no budget ignores it.

        Example::

            HashingConfig().with_budget(Budget(ratio=100)).budget   # Budget(ratio=100)
            NoCompression().with_budget(Budget(ratio=100))          # NoCompression(), unchanged
        """
        return self

    def with_uniform_output(self: C) -> C:
        """This config giving every feature one output dim (what DLRM needs), a copy
        where the method would vary dims; most methods keep each table's dim anyway."""
        return self


@dataclass
class BuildContext:
    """What a builder may use beyond the tables: data statistics, device, seed.

    ``counts`` maps a feature name to the train frequency of each of its ids (the
    processed dataset's ``counts.parquet``), for frequency-aware methods.
    ``table_device`` is where the TorchRec tables are made (default: ``device``);
    ``meta`` builds the module without allocating its tables, for
    ``DistributedModelParallel`` to allocate only each rank's shards.
    """

    counts: Mapping[str, np.ndarray] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    table_device: Optional[torch.device] = None
    # the config being built: every module passes it to its base class's constructor
    config: Optional[CompressionConfig] = None

    def __post_init__(self) -> None:
        if self.table_device is None:
            self.table_device = self.device


C = TypeVar("C", bound=CompressionConfig)
Builder = Callable[[list[EmbeddingBagConfig], Any, BuildContext], CompressedEmbeddingBagCollection]

_BUILDERS: dict[type, Builder] = {}
_BY_NAME: dict[str, type] = {}


@contextmanager
def quiet_logs(level: int = logging.INFO) -> Iterator[None]:
    """No log records at ``level`` or below while TorchRec / FBGEMM modules are built (they
    log their settings line by line, module by module), as it was before afterwards."""
    before = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(before)


def require_fbgemm_cuda(what: str, device: torch.device) -> None:
    """Refuse ``what`` on a CUDA device when fbgemm-gpu is its CPU build.

    TorchRec's KJT permutes, managed collisions, fused TBE kernels and quantized
    tables call FBGEMM operators that the CPU build registers for CPU tensors only;
    on CUDA tensors they fail deep inside a forward. Said here, before anything runs.
    """
    if device.type != "cuda":
        return
    import fbgemm_gpu

    if getattr(fbgemm_gpu, "__variant__", "") == "cpu":
        raise MethodConfigError(
            f"{what} on CUDA needs FBGEMM's CUDA kernels, but this environment has fbgemm-gpu-cpu "
            f"{getattr(fbgemm_gpu, '__version__', '')}; install the CUDA build (make setup DEVICE=cuda) "
            "or train on the CPU (trainer.device=cpu)"
        )


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


def _load_methods() -> None:
    """Import every method (``compression.methods`` registers them): the registry is
    complete whenever it is read, however the package was imported."""
    import compression.methods  # noqa: F401


def registered_methods() -> dict[str, type]:
    """Method name -> config class, for every registered method."""
    _load_methods()
    return dict(_BY_NAME)


def config_class(name: str) -> type:
    """The config class registered under ``name``; a clear error for an unknown one."""
    _load_methods()
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
    table_device: torch.device | str | None = None,
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
        table_device: where the TorchRec tables go (default ``device``); ``"meta"``
            allocates none of them (the sharded path: DMP allocates each rank's shards).
    """
    _load_methods()
    builder = _BUILDERS.get(type(config))
    if builder is None:
        raise UnknownMethodError(
            f"{type(config).__name__} is not a registered compression config; "
            f"registered: {', '.join(c.__name__ for c in _BUILDERS)}"
        )
    tables = list(tables)
    if not tables:
        raise ValueError("compress() needs at least one EmbeddingBagConfig")
    allowed = type(config).poolings
    for t in tables:
        if t.pooling.name not in allowed:
            why = f" ({type(config).pooling_reason})" if type(config).pooling_reason else ""
            raise MethodConfigError(f"{config.method}: table '{t.name}' pools by {t.pooling.name}; it takes "
                                    f"{' or '.join(allowed)} pooling{why}")  # fmt: skip
    # (again: a subclass's own __post_init__ may not call this one)
    config.quantization = as_quantization(config.quantization)
    ctx = BuildContext(
        counts=counts if counts is not None else {},
        device=torch.device(device) if device is not None else torch.device("cpu"),
        seed=seed,
        table_device=torch.device(table_device) if table_device is not None else None,
        config=config,
    )
    if config.quantization is not None:  # before any table is made on the device
        require_fbgemm_cuda(f"{type(config).method} with {config.quantization.precision} tables", ctx.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = builder(tables, config, ctx)
    if module.compression_config is not config:
        raise TypeError(
            f"the {type(config).method} builder made a module without its config: pass "
            "config=ctx.config to CompressedEmbeddingBagCollection.__init__"
        )
    if config.quantization is not None:  # checked now, not after a whole training run
        prepare(module, config.quantization, type(config).method)
    return module
