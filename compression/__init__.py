"""embcomp.compression: one interface over every embedding compression method.

``compress(tables, config)`` returns a TorchRec ``EmbeddingBagCollectionInterface``
(KJT in, KeyedTensor out) built from real TorchRec tables.

The names below load on first use (PEP 562), so ``compression.errors`` and
``compression.config_checks`` (leaves that import neither torch nor torchrec) are light
to import: the data pipeline raises and checks with them without loading a model.
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 14):  # pragma: no cover - guarded by requires-python too
    raise ImportError(
        "embcomp needs Python < 3.14: Python 3.14's standard library has its own "
        "'compression' package, which shadows this one"
    )

# public name -> the module that defines it
_EXPORTS = {
    "BuildContext": "compression.api",
    "CompressionConfig": "compression.api",
    "compress": "compression.api",
    "config_class": "compression.api",
    "register": "compression.api",
    "registered_methods": "compression.api",
    "CompressedEmbeddingBagCollection": "compression.base",
    "Stage": "compression.stages",
    "Budget": "compression.budget",
    "BudgetError": "compression.errors",
    "ConfigError": "compression.errors",
    "EmbcompError": "compression.errors",
    "IdOutOfRangeError": "compression.errors",
    "MethodConfigError": "compression.errors",
    "UnknownMethodError": "compression.errors",
    "MemoryReport": "compression.memory",
    "memory_report": "compression.memory",
    "optimizer_state_bytes": "compression.memory",
    "uncompressed_bytes": "compression.memory",
    "NoCompression": "compression.methods.none",
    "Quantization": "compression.quantization",
    "quantize_": "compression.quantization",
    "BudgetedConfig": "compression.sizing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'compression' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what a type checker and an IDE see
    from compression.api import (  # noqa: F401
        BuildContext,
        CompressionConfig,
        compress,
        config_class,
        register,
        registered_methods,
    )
    from compression.base import CompressedEmbeddingBagCollection  # noqa: F401
    from compression.budget import Budget  # noqa: F401
    from compression.errors import (  # noqa: F401
        BudgetError,
        ConfigError,
        EmbcompError,
        IdOutOfRangeError,
        MethodConfigError,
        UnknownMethodError,
    )
    from compression.memory import (  # noqa: F401
        MemoryReport,
        memory_report,
        optimizer_state_bytes,
        uncompressed_bytes,
    )
    from compression.methods.none import NoCompression  # noqa: F401
    from compression.quantization import Quantization, quantize_  # noqa: F401
    from compression.sizing import BudgetedConfig  # noqa: F401
