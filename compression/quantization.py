"""Quantized tables for every method: post-training (PTQ) and quantization-aware (QAT).

A compressed module is an id transform in front of TorchRec tables and a combine
step behind them, so quantizing it means swapping each TorchRec
``EmbeddingBagCollection`` inside for TorchRec's quantized one
(``torchrec.quant.embedding_modules.EmbeddingBagCollection``, fbgemm's
``IntNBitTableBatchedEmbeddingBagsCodegen`` kernels); the transform and the combine
stay as they are. That is why quantization is a field of every method's config
(``CompressionConfig.quantization``), not a method: "QR at 10x then int4" is
``QRConfig(budget=Budget(ratio=10), quantization=Quantization("int4"))``, and the
bytes reported after training are those held after both.

Formats (fbgemm's, per row): ``fp16`` holds ``2·dim`` bytes; ``int8``/``int4``/``int2``
hold ``dim·bits/8`` bytes of codes q in ``[0, 2^bits - 1]`` plus an fp16 scale and an
fp16 bias (4 bytes), a row reading ``q·scale + bias`` (row-wise asymmetric, PTQ takes
bias = row min, scale = row range / (2^bits - 1)). Rows are padded to
``row_alignment`` bytes (default: fbgemm's own, 1 on the CPU and 16 on CUDA; TorchRec
would pad to 16 everywhere) and each table's block of rows to 128 bytes (fbgemm's
cache-line alignment); both paddings are in the bytes ``memory_report`` counts, as are
the TBE's few hundred bytes of metadata (offsets, row counts, types, cache state).

Refused before anything reaches fbgemm: ``bf16`` (TorchRec's quantize path kills the
process with SIGFPE on this stack), ``fp8`` (it raises inside TorchRec), and int4/int2
tables whose dim does not fill whole bytes (e.g. mixed_dim's odd dims: use int8).
Rows whose packed bytes are odd (int8 at an odd dim), which fbgemm's quantizer refuses,
are quantized with their last value repeated, then the extra byte dropped (same grid).

Example::

    module = compress(tables, QRConfig(quantization=Quantization("int4")))
    ...train...                      # the trainer's last stage is ``quantize``
    quantize_(module, Quantization("int8"))   # or by hand, on any trained module
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from compression.base import MethodConfigError
from compression.formats import BITS, SCALE_BIAS_BYTES, TABLE_ALIGNMENT, row_bytes  # noqa: F401  (re-exported)
from compression.formats import table_bytes as _table_bytes
from compression.memory import memory_report
from compression.qat import FakeQuantEmbeddingBagCollection
from compression.stages import Stage, StageContext

# precision -> bits per value (the formats a table can be quantized to: fp32 is none)
PRECISIONS: dict[str, int] = {p: b for p, b in BITS.items() if p != "fp32"}
# every format fbgemm's inference TBE holds (fp32 too, for comparisons: not a precision)
DATA_TYPES = {
    "fp32": DataType.FP32,
    "fp16": DataType.FP16,
    "int8": DataType.INT8,
    "int4": DataType.INT4,
    "int2": DataType.INT2,
}
AWARE_PRECISIONS = ("int8", "int4", "int2")
REFUSED = {
    "bf16": "TorchRec's quantize path kills the whole process with SIGFPE for bf16 on this stack",
    "fp8": "TorchRec's quantize path raises for fp8 on this stack",
    "fp32": "fp32 is the unquantized baseline: leave quantization unset (null)",
}


@dataclass
class Quantization:
    """How a method's tables are quantized (the ``quantization`` field of its config).

    Args:
        precision: ``fp16``, ``int8``, ``int4`` or ``int2`` (row-wise scale and bias).
        aware: quantization-aware training: the rows are fake-quantized in every
            forward with a learned per-row grid (``compression.qat``) and the
            trained grid becomes the integer tables; False: post-training only.
        stochastic_rounding: QAT only: round stochastically (unbiased) while
            training; evaluation and the integer tables round to nearest.
        row_alignment: bytes each row is padded to (None: fbgemm's default for
            the device, 1 on the CPU, 16 on CUDA).

    Example::

        QRConfig(budget=Budget(ratio=10), quantization=Quantization("int4"))
        NoCompression(quantization=Quantization("int4", aware=True))
    """

    precision: str = "int8"
    aware: bool = False
    stochastic_rounding: bool = False
    row_alignment: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``MethodConfigError`` for a refused or unknown precision or option."""
        p = self.precision
        if p in REFUSED:
            raise MethodConfigError(f"quantization precision '{p}' is refused: {REFUSED[p]}; use one of {list(PRECISIONS)}")
        if p not in PRECISIONS:
            raise MethodConfigError(f"quantization precision must be one of {list(PRECISIONS)}, got '{p}'")
        if self.aware and p not in AWARE_PRECISIONS:
            raise MethodConfigError(
                f"quantization-aware training is for {list(AWARE_PRECISIONS)}; {p} needs none (use aware: false)"
            )
        if self.stochastic_rounding and not self.aware:
            raise MethodConfigError("stochastic_rounding applies to quantization-aware training only (set aware: true)")
        if self.row_alignment is not None and (int(self.row_alignment) != self.row_alignment or self.row_alignment < 1):
            raise MethodConfigError(f"row_alignment must be a positive integer or null, got {self.row_alignment}")

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision]

    def label(self) -> str:
        """'int4' for post-training, 'int4-qat' for quantization-aware."""
        return f"{self.precision}-qat" if self.aware else self.precision


def as_quantization(value: Any) -> Quantization | None:
    """``value`` as a ``Quantization``: None or an empty mapping is none, a mapping
    (Hydra's node) its fields; unknown keys are refused with the valid ones."""
    if value is None or isinstance(value, Quantization):
        return value
    if isinstance(value, Mapping):
        if not value:
            return None
        names = [f.name for f in fields(Quantization)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise MethodConfigError(f"quantization has no field(s) {unknown}; its fields are {names}")
        return Quantization(**value)
    raise MethodConfigError(f"quantization must be a mapping like {{precision: int8}} or null, got {value!r}")


def refuse_aware(value: Any, method: str, why: str) -> Quantization | None:
    """``value`` as a ``Quantization``, refusing quantization-aware training in one line for
    a staged method whose tables only exist (or only take their deployed form) after a
    stage: ``why`` says which (e.g. "the merge stage replaces the tables it would train")."""
    q = as_quantization(value)
    if q is not None and q.aware:
        raise MethodConfigError(
            f"{method}: quantization-aware training is refused: {why}; use post-training quantization (aware: false)"
        )
    return q


# -- which tables, and whether they can be quantized ------------------------------------
def inner_collections(module: nn.Module) -> list[tuple[nn.Module, str, EmbeddingBagCollection]]:
    """(parent, attribute, collection) for every TorchRec EBC inside ``module``."""
    found = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, EmbeddingBagCollection):
                found.append((parent, name, child))
    return found


def check_quantizable(module: nn.Module, q: Quantization, method: str = "") -> None:
    """Raise ``MethodConfigError`` (naming the method, table and reason) if ``q``
    cannot be applied to ``module``'s tables."""
    who = f"{method}: " if method else ""
    q.validate()  # again: a field may have been changed since it was built
    collections = inner_collections(module)
    if not collections:
        raise MethodConfigError(
            f"{who}{'quantization-aware training' if q.aware else 'quantization'} needs TorchRec "
            f"EmbeddingBagCollections inside; this module has none"
            + (" (yet: its tables are built by a later stage)" if q.aware else "")
        )
    per_byte = 8 // q.bits if q.bits < 8 else 1
    for _, _, ebc in collections:
        for t in ebc.embedding_bag_configs():
            if t.embedding_dim % per_byte:
                raise MethodConfigError(
                    f"{who}{q.precision} packs {per_byte} values per byte, but table '{t.name}' has dim "
                    f"{t.embedding_dim} (not a multiple of {per_byte}); use int8 or fp16, or dims that pack"
                )
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise MethodConfigError(f"{who}quantized tables pool by SUM or MEAN; table '{t.name}' pools by {t.pooling}")


def prepare(module: nn.Module, q: Quantization, method: str = "") -> None:
    """At build time: check ``q`` fits the module; for QAT, make its tables fake-quantized.

    A module with no TorchRec EBC yet (a schedule that builds its final tables in a
    last stage, e.g. OptEmbed's ``compact``) is checked again by ``quantize``; QAT
    needs the tables now and is refused.
    """
    q.validate()
    if not inner_collections(module) and not q.aware:
        return
    check_quantizable(module, q, method)
    if q.aware:
        for parent, name, ebc in inner_collections(module):
            if not isinstance(ebc, FakeQuantEmbeddingBagCollection):
                setattr(parent, name, FakeQuantEmbeddingBagCollection(ebc, q.bits, q.stochastic_rounding))


# -- post-training quantization ----------------------------------------------------------
def quantize_(module: nn.Module, q: Quantization, method: str = "") -> nn.Module:
    """Swap every TorchRec EBC inside ``module`` for TorchRec's quantized EBC, in place.

    A plain table is quantized by fbgemm (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``,
    as TorchRec's ``from_float`` does); a QAT table is written with its learned grid.
    Returns ``module``, now for inference only.
    """
    check_quantizable(module, q, method)
    for parent, name, ebc in inner_collections(module):
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
        if isinstance(ebc, FakeQuantEmbeddingBagCollection):
            if ebc.bits != q.bits:
                raise MethodConfigError(
                    f"{method or 'module'}: its tables trained quantization-aware at {ebc.bits} bits; "
                    f"they convert to that grid, not to {q.precision}"
                )
            weights = ebc.integer_weights()
        else:
            weights = {t.name: fbgemm_rows(ebc.embedding_bags[t.name].weight, q.precision) for t in ebc.embedding_bag_configs()}
        setattr(parent, name, quantized_collection(ebc, weights, q.precision, q.row_alignment))
    return module


@torch.no_grad()
def fbgemm_rows(weight: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes as uint8 [rows, dim·bits/8], scale+bias as uint8 [rows, 4]) by fbgemm's
    row-wise quantizer (what TorchRec's ``from_float`` calls); fp16: the rows' bytes.

    Rows whose packed bytes are odd, which fbgemm's quantizer refuses, go in with
    their last value repeated (min and max, hence the grid and every code, unchanged)
    and the extra byte is dropped.
    """
    w = weight.detach().float()
    if precision in ("fp32", "fp16"):
        return (w if precision == "fp32" else w.half()).contiguous().view(torch.uint8), None
    bits = PRECISIONS[precision]
    nbytes = w.shape[1] * bits // 8
    if nbytes % 2:
        w = torch.cat([w, w[:, -1:].expand(-1, 8 // bits)], dim=1)
    out = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    return out[:, :nbytes].contiguous(), out[:, -SCALE_BIAS_BYTES:].contiguous()


def quantized_collection(
    ebc: EmbeddingBagCollection,
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
    precision: str,
    alignment: int | None,
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC for ``ebc``'s tables holding ``weights`` (fbgemm's format)."""
    device = _device(ebc)
    tables = []
    for t in ebc.embedding_bag_configs():
        t = copy.copy(t)
        t.data_type = DATA_TYPES[precision]
        tables.append(t)
    return QuantEmbeddingBagCollection(
        tables,
        is_weighted=ebc.is_weighted(),
        device=device,
        output_dtype=torch.float,
        table_name_to_quantized_weights=dict(weights),  # type: ignore[arg-type]
        # the TBE as a registered submodule: its buffers are counted, moved and scripted
        register_tbes=True,
        row_alignment=row_alignment(alignment, device),
    )


def _device(ebc: nn.Module) -> torch.device:
    return next(iter(ebc.parameters())).device


def row_alignment(requested: int | None, device: torch.device) -> int:
    """Bytes a quantized row is padded to: as asked, else fbgemm's default for ``device``."""
    if requested is not None:
        return int(requested)
    return 1 if device.type == "cpu" else 16


# -- bytes (the figures are compression.formats') ----------------------------------------
def table_bytes(table: EmbeddingBagConfig, precision: str, alignment: int = 1) -> int:
    """Bytes of one quantized table: its rows, then padding to fbgemm's 128-byte blocks."""
    return _table_bytes(table.num_embeddings, table.embedding_dim, precision, alignment)


# -- the stage ---------------------------------------------------------------------------
def quantize_stage(q: Quantization, method: str = "") -> Stage:
    """The ``quantize`` stage that ends a schedule after training (what
    ``CompressionConfig.post_training_stages()`` lists); ``method`` names the method in errors."""

    def run(ctx: StageContext) -> dict[str, float]:
        before = memory_report(ctx.module).bytes
        quantize_(ctx.module, q, method)
        after = memory_report(ctx.module)
        metrics = {f"val_{k}": v for k, v in ctx.evaluate().items()}
        metrics.update(embedding_bytes_before=float(before), embedding_bytes=float(after.bytes))
        return metrics

    return Stage("quantize", run=run, params={"precision": q.precision, "aware": q.aware}, checkpoint=False)
