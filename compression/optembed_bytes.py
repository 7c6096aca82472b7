"""OptEmbed's byte model: what the compact export of an architecture holds.

An architecture is the rows each table keeps and the dim each table gets (0: dropped).
Its export holds, per kept table, the kept rows at the table's dim, plus (where rows were
pruned) a zero row for the pruned ids and the sorted int32 list of kept ids that the
lookup remaps through; a table that keeps every row needs neither. Beside the tables, the
module keeps each table's threshold (fp32), norm scale (fp32) and chosen dim (int64). The
tables are counted in the format the budget means (``compression.deployed.TableFormat``:
fp32, or the quantized tables the module will hold), exactly as ``memory_report`` counts
the built export (tested).

Example::

    export_bytes(TableFormat(), ["t_a"], [["a"]], rows=[1000], kept=[300], dims=[8])
    # (300 + 1) * 8 * 4 + 4 * 300 + collection overhead + 16
"""

from __future__ import annotations

from collections.abc import Sequence

from compression.deployed import TableFormat
from compression.pruned import compact_configs

ID_BYTES = 4  # kept ids are stored as int32
PER_TABLE_BYTES = 4 + 4 + 8  # threshold (fp32), norm scale (fp32), chosen dim (int64)


def export_bytes(
    fmt: TableFormat,
    units: Sequence[str],
    unit_features: Sequence[Sequence[str]],
    rows: Sequence[int],
    kept: Sequence[int],
    dims: Sequence[int],
) -> int:
    """Bytes of the compact export keeping ``kept[i]`` of ``rows[i]`` rows of table
    ``units[i]`` at ``dims[i]``."""
    configs = compact_configs(list(units), [list(f) for f in unit_features], list(kept), list(dims), list(rows))
    total = sum(fmt.table(c.num_embeddings, c.embedding_dim, len(c.feature_names)) for c in configs)
    total += fmt.collection(configs) if configs else 0
    total += ID_BYTES * sum(k for k, n, d in zip(kept, rows, dims) if d > 0 and k < n)
    return total + len(units) * PER_TABLE_BYTES
