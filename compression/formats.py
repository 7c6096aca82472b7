"""Bytes of embedding rows by format: the one place that knows how wide a row is.

fp32 is a plain TorchRec table (``4·dim`` bytes a row, nothing else). The quantized
formats are fbgemm's inference TBE rows: ``fp16`` holds ``2·dim`` bytes; ``int8``,
``int4`` and ``int2`` hold ``dim·bits/8`` bytes of codes plus an fp16 scale and an fp16
bias (4 bytes); a row is padded to ``alignment`` bytes and a table's block of rows to
fbgemm's 128-byte cache line. A leaf module (no torch), so budgets, sizing, byte
accounting and quantization all read the same figures.

Example::

    row_bytes(16, "fp32")                 # 64
    row_bytes(16, "int4")                 # 8 bytes of codes + 4 of scale/bias = 12
    table_bytes(1000, 16, "int8")         # 20 * 1000 rounded up to 128: 20096
"""

from __future__ import annotations

# bits per value of every format a table can be held in
BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
FP32_BYTES = 4
SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias per row of an integer table
TABLE_ALIGNMENT = 128  # fbgemm aligns each table's rows to a cache line


def row_bytes(dim: int, precision: str = "fp32", alignment: int = 1) -> int:
    """Bytes of one row of ``dim`` values held in ``precision`` (padded to ``alignment``).

    Example::

        row_bytes(16, "int8", alignment=16)   # 16 + 4 = 20, padded to 32
    """
    if precision == "fp32":  # a plain TorchRec table: no scale, no padding
        return FP32_BYTES * dim
    raw = dim * BITS[precision] // 8 + (SCALE_BIAS_BYTES if precision != "fp16" else 0)
    return -(-raw // alignment) * alignment


def table_bytes(rows: int, dim: int, precision: str = "fp32", alignment: int = 1) -> int:
    """Bytes of a table of ``rows`` rows: fp32 rows as they are; quantized rows then
    padding of the table's block to fbgemm's 128 bytes."""
    raw = rows * row_bytes(dim, precision, alignment)
    if precision == "fp32":
        return raw
    return -(-raw // TABLE_ALIGNMENT) * TABLE_ALIGNMENT
