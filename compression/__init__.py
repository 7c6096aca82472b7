"""embcomp.compression: one interface over every embedding compression method.

``compress(tables, config)`` returns a TorchRec ``EmbeddingBagCollectionInterface``
(KJT in, KeyedTensor out) built from real TorchRec tables.
"""

import sys

if sys.version_info >= (3, 14):  # pragma: no cover - guarded by requires-python too
    raise ImportError(
        "embcomp needs Python < 3.14: Python 3.14's standard library has its own "
        "'compression' package, which shadows this one"
    )

from compression import methods  # noqa: E402,F401  (registers every method)
from compression.api import (  # noqa: E402
    BuildContext,
    CompressionConfig,
    MethodConfigError,
    UnknownMethodError,
    compress,
    config_class,
    register,
    registered_methods,
)
from compression.base import CompressedEmbeddingBagCollection, IdOutOfRangeError, Stage  # noqa: E402
from compression.budget import Budget, BudgetError  # noqa: E402
from compression.memory import (  # noqa: E402
    MemoryReport,
    memory_report,
    optimizer_state_bytes,
    uncompressed_bytes,
)
from compression.methods.none import NoCompression  # noqa: E402
from compression.quantization import Quantization, quantize_  # noqa: E402
from compression.sizing import BudgetedConfig  # noqa: E402

__all__ = [
    "Budget",
    "BudgetError",
    "BudgetedConfig",
    "BuildContext",
    "CompressedEmbeddingBagCollection",
    "CompressionConfig",
    "IdOutOfRangeError",
    "MemoryReport",
    "MethodConfigError",
    "NoCompression",
    "Quantization",
    "Stage",
    "UnknownMethodError",
    "compress",
    "config_class",
    "memory_report",
    "optimizer_state_bytes",
    "quantize_",
    "register",
    "registered_methods",
    "uncompressed_bytes",
]
