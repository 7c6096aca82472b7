"""A compact export of pruned rows: per table only the rows kept, at the table's own dim.

Each table becomes a TorchRec table of its kept rows plus one zero row where pruned ids
land, behind a sorted int32 list of kept ids (``torch.searchsorted`` remap, 4 bytes per
kept row); a table that kept every row needs neither and is indexed as it is. Output is
padded with zeros back to each table's full dim, so a model built for the full tables
(DLRM included) takes it unchanged. OptEmbed's ``compact`` stage builds one.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.bags import pooled_lookup


def compact_configs(units: list[str], unit_features: list[list[str]], kept: list[int], dims: list[int],
                    rows: list[int]) -> list[EmbeddingBagConfig]:
    """The compact export's tables: each live unit's kept rows at its dim, and a zero row
    (where pruned ids land) when it pruned any."""
    return [
        EmbeddingBagConfig(name=f"compact_{u}", embedding_dim=d, num_embeddings=k if k == n else k + 1,
                           feature_names=list(fs))
        for u, fs, k, d, n in zip(units, unit_features, kept, dims, rows) if d > 0
    ]



class CompactTables(nn.Module):
    """Kept rows only, at each table's dim, behind a sorted int32 list of kept ids (none
    for a table that kept every row: its ids index it as they are)."""

    def __init__(self, units: list[str], unit_features: list[list[str]], kept: list[torch.Tensor], dims: list[int],
                 full_dims: list[int], feature_order: list[str], device: torch.device, rows: list[int]) -> None:
        super().__init__()
        self.units, self.dims, self.feature_order = units, dims, feature_order
        self._unit_of = {f: i for i, fs in enumerate(unit_features) for f in fs}
        self._full = full_dims
        self.rows = rows
        self.identity = [d > 0 and len(k) == n for k, d, n in zip(kept, dims, rows)]
        configs = compact_configs(units, unit_features, [len(k) for k in kept], dims, rows)
        self.ebc = EmbeddingBagCollection(tables=configs, device=device) if configs else None
        for u, k, d, same in zip(units, kept, dims, self.identity):
            self.register_buffer(f"ids_{u}", (k if d > 0 and not same else k[:0]).to(torch.int32).to(device))

    def kept_count(self, i: int) -> int:
        return self.rows[i] if self.identity[i] else int(getattr(self, f"ids_{self.units[i]}").numel())

    def table(self, i: int) -> torch.Tensor:
        assert self.ebc is not None
        return self.ebc.embedding_bags[f"compact_{self.units[i]}"].weight

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        d = features.to_dict()
        batch = features.stride()
        live = [f for f in self.feature_order if self.dims[self._unit_of[f]] > 0]
        pooled: dict[str, torch.Tensor] = {}
        if live:
            remapped = []
            for f in live:
                ids = d[f].values()
                if self.identity[self._unit_of[f]]:
                    remapped.append(ids)
                    continue
                kept = getattr(self, f"ids_{self.units[self._unit_of[f]]}")
                pos = torch.searchsorted(kept, ids.to(torch.int32)).clamp(max=max(len(kept) - 1, 0))
                hit = (kept[pos] == ids) if len(kept) else torch.zeros_like(ids, dtype=torch.bool)
                remapped.append(torch.where(hit, pos.to(torch.int64), torch.full_like(ids, len(kept))))
            kjt = KeyedJaggedTensor(
                keys=live, values=torch.cat(remapped), lengths=torch.cat([d[f].lengths() for f in live]), stride=batch,
            )
            assert self.ebc is not None
            pooled = pooled_lookup(self.ebc, kjt).to_dict()
        out = []
        for f in self.feature_order:
            i = self._unit_of[f]
            part = pooled[f] if self.dims[i] > 0 else torch.zeros(batch, 0, device=features.values().device)
            out.append(torch.nn.functional.pad(part, (0, self._full[i] - self.dims[i])))
        return KeyedTensor(keys=self.feature_order, length_per_key=[o.shape[1] for o in out], values=torch.cat(out, dim=1))
