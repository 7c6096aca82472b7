"""What each rank holds, counted from its tensors by ``compression.memory`` (the one counter)."""

from __future__ import annotations

from torch import nn

from compression.memory import held_bytes
from recsys.training.distributed.wrapping import Sharded


def rank_bytes(sharded: Sharded, module: nn.Module, prefix: str) -> dict[str, int]:
    """Bytes this rank holds: its table shards (and replicated tables), everything else
    of the compressed module (hashes, remap buffers, projections), and the tables'
    optimizer state; counted from the tensors (``compression.memory.held_bytes``), not
    from the plan.

    ``prefix``: the compressed module's name inside the model (e.g. ``embedding_bag_collection``).
    """
    state = sharded.dmp.state_dict()
    tables = {k for k in state if k.startswith(prefix + ".") and k.endswith(".weight")
              and any(seg in k for seg in (".embedding_bags.", ".embeddings."))}  # fmt: skip
    table_bytes = held_bytes((k, state[k]) for k in sorted(tables))
    inside = tuple(t.rsplit(".weight", 1)[0] for t in tables)
    other = held_bytes((k, v) for k, v in list(module.named_parameters()) + list(module.named_buffers())
                       if not f"{prefix}.{k}".startswith(inside))  # fmt: skip
    optimizer = held_bytes(
        (f"{key}.{k}", v)
        for key, value in sharded.dmp.fused_optimizer.state_dict()["state"].items()
        for k, v in (value.items() if isinstance(value, dict) else [("", value)])
    )
    return {"table_bytes": table_bytes, "other_bytes": other, "optimizer_bytes": optimizer,
            "total_bytes": table_bytes + other + optimizer}  # fmt: skip
