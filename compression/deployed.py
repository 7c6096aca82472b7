"""The bytes a module holds as deployed: its tables in fp32, or as fbgemm's quantized rows.

A method trains fp32 TorchRec tables; with ``quantization`` its ``quantize`` stage
swaps every TorchRec ``EmbeddingBagCollection`` inside for TorchRec's quantized one
(one fbgemm inference TBE per pooling). A budget plans the bytes of either form
through a ``TableFormat``: ``table()`` is a physical table's bytes (rows by
``compression.formats``, and for a quantized table the TBE's metadata per feature
that reads it), ``collection()`` what a collection holds beside its tables (a
quantized one: each TBE's fixed metadata). The TBE's metadata is counted once from a
TorchRec quantized collection built on the ``meta`` device, as ``memory_report``
counts it, not written down from fbgemm's source.

``deployed_bytes(module, fmt)`` counts what ``module`` will hold once quantized to
``fmt``, without quantizing it: every tensor outside its TorchRec collections as it
is, and each collection as the quantized collection of the same tables, built on
``meta`` (no rows allocated or computed).

Example::

    fmt = TableFormat("int4")
    fmt.table(1000, 16)          # 12 bytes a row, the block padded to 128, + TBE metadata
    deployed_bytes(module, fmt)  # == memory_report(quantize_(module, Quantization("int4"))).bytes
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from functools import cache

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from compression.formats import table_bytes
from compression.memory import tbe_attributes, tensor_bytes
from compression.quantization import DATA_TYPES, inner_collections

_META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class TableFormat:
    """How the tables a budget sizes are held: ``fp32`` (training, no quantization) or a
    quantized precision with its row alignment (what the deployed module holds).

    Example::

        TableFormat()                      # fp32: table() is 4·rows·dim
        TableFormat("int8", alignment=16)  # fbgemm's int8 rows on CUDA
    """

    precision: str = "fp32"
    alignment: int = 1

    @property
    def quantized(self) -> bool:
        return self.precision != "fp32"

    def table(self, rows: int, dim: int, features: int = 1) -> int:
        """Bytes of one physical table of ``rows`` x ``dim`` that ``features`` features read."""
        held = table_bytes(rows, dim, self.precision, self.alignment)
        return held + (tbe_overhead()[1] * features if self.quantized else 0)

    def collection(self, tables: Iterable[EmbeddingBagConfig]) -> int:
        """Bytes a collection of ``tables`` holds beside them (quantized: a TBE per pooling)."""
        if not self.quantized:
            return 0
        return tbe_overhead()[0] * len({t.pooling for t in tables})


def quantized_meta(tables: Iterable[EmbeddingBagConfig], fmt: TableFormat) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized collection of ``tables`` in ``fmt``, on ``meta``: its shapes and
    metadata are those of the deployed one, and it holds no rows."""
    configs = [dataclasses.replace(copy.copy(t), data_type=DATA_TYPES[fmt.precision]) for t in tables]
    return QuantEmbeddingBagCollection(
        configs, is_weighted=False, device=_META, register_tbes=True, row_alignment=fmt.alignment
    )


def _held(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor ``memory_report`` counts in ``module``, named under ``prefix``."""
    return (
        [(f"param:{prefix}{n}", p) for n, p in module.named_parameters()]
        + [(f"buffer:{prefix}{n}", b) for n, b in module.named_buffers()]
        + [(f"{k}@{prefix}", v) for k, v in tbe_attributes(module)]
    )


@cache
def tbe_overhead() -> tuple[int, int]:
    """(bytes per TBE, bytes per feature) of fbgemm's inference TBE beside its rows:
    offsets, row counts, types and cache state, counted on two meta collections."""
    held = []
    for features in (1, 2):
        t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=4, feature_names=[f"f{i}" for i in range(features)])
        fmt = TableFormat("int8")
        held.append(sum(tensor_bytes(_held(quantized_meta([t], fmt), "")).values()) - table_bytes(4, 8, "int8"))
    per_feature = held[1] - held[0]
    return held[0] - per_feature, per_feature


def deployed_bytes(module: nn.Module, fmt: TableFormat) -> int:
    """Bytes ``module`` holds once its TorchRec collections are quantized to ``fmt`` (as
    ``memory_report`` counts them); fp32: ``memory_report``'s bytes as it is."""
    names = {id(m): n for n, m in module.named_modules()}
    collections = [ebc for _, _, ebc in inner_collections(module)] if fmt.quantized else []
    inside = tuple(names[id(ebc)] + "." for ebc in collections)
    tensors = [(n, t) for n, t in _held(module, "") if not n.split(":", 1)[-1].startswith(inside)]
    for ebc in collections:
        tensors += _held(quantized_meta(ebc.embedding_bag_configs(), fmt), f"{names[id(ebc)]}.")
    return sum(tensor_bytes(tensors).values())


class MetaForm(nn.Module):
    """A staged method's budgeted form on ``meta`` (what ``build_sized`` counts and checks
    the quantization against, for a method that reaches that form in a stage): its TorchRec
    ``tables``, the other ``tensors`` it will hold (name -> shape, dtype) and the modules
    it keeps as they are (``keep``: its id parameters). Nothing is allocated.

    Example::

        MetaForm(merged_tables, {"remap": ((n,), torch.int32)}, {"params": module.params})
    """

    def __init__(self, tables: Iterable[EmbeddingBagConfig], tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 keep: Mapping[str, nn.Module] | None = None) -> None:  # fmt: skip
        super().__init__()
        tables = list(tables)
        self.ebc = EmbeddingBagCollection(tables=tables, device=_META) if tables else None
        for name, (shape, dtype) in tensors.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=_META))
        for name, module in (keep or {}).items():
            self.add_module(name, module)
