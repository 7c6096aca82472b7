"""Vectorised per-feature id transforms on a ``KeyedJaggedTensor``'s values.

A hashing-family method is an id transform in front of TorchRec tables. Its
parameters differ per feature (rows M, collisions c, top-k ...) but the transform
runs once over the whole ``values`` tensor: ``KeyParams`` expands per-feature
integers to one per id with a single ``repeat_interleave`` (no Python loop over
rows or features), and ``with_values`` rebuilds a KJT around the new ids reusing the
input's lengths, so the inner ``EmbeddingBagCollection`` sees the same bags.
``IdMappedCollection`` is the family's base module (its sizing plan, ``describe()``,
the KeyedTensor in source order); ``inner_table`` makes the physical tables.

Example::

    params = KeyParams(["user", "item"], {"rows": [1000, 50]})
    rows = params.expand(kjt)["rows"]          # one int64 per id of kjt.values()
    inner = with_values(kjt, hasher(kjt.values(), rows, which=0))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.base import CompressedEmbeddingBagCollection, _tracing
from compression.hashing import UniversalHash
from compression.sizing import Plan

if TYPE_CHECKING:
    from compression.api import CompressionConfig


class KeyParams(nn.Module):
    """Per-feature int64 parameters, expanded to per-id tensors in one op.

    Held as one non-persistent buffer ``[num_params, num_features + 1]`` (derived
    from the config, so not saved, but counted in the module's bytes); the extra
    column holds ``unknown``'s values for keys of the KJT that are not this module's
    features (no table reads them, as TorchRec's EBC ignores unknown keys).
    """

    table: torch.Tensor

    def __init__(
        self,
        features: Sequence[str],
        params: Mapping[str, Sequence[int]],
        unknown: Mapping[str, int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.names = list(params)
        unknown = dict(unknown or {})
        rows = []
        for name in self.names:
            vals = list(params[name])
            if len(vals) != len(features):
                raise ValueError(f"parameter '{name}' has {len(vals)} values for {len(features)} features")
            rows.append(vals + [unknown.get(name, 1)])
        self.register_buffer("table", torch.tensor(rows, dtype=torch.int64, device=device), persistent=False)
        self._index = {f: i for i, f in enumerate(features)}
        self._perm_cache: dict[tuple[tuple[str, ...], torch.device], torch.Tensor | None] = {}

    def _columns(self, keys: list[str]) -> torch.Tensor:
        cache_key = (tuple(keys), self.table.device)
        if cache_key not in self._perm_cache:
            cols = [self._index.get(k, len(self._index)) for k in keys]
            identity = cols == list(range(len(self._index)))
            self._perm_cache[cache_key] = (
                None if identity else torch.tensor(cols, dtype=torch.int64, device=self.table.device)
            )
        perm = self._perm_cache[cache_key]
        return self.table[:, : len(self._index)] if perm is None else self.table.index_select(1, perm)

    def __contains__(self, feature: object) -> bool:
        return feature in self._index

    @staticmethod
    def nbytes(num_params: int, num_features: int) -> int:
        """Bytes of the buffer, for a method's sizing before the module exists."""
        return 8 * num_params * (num_features + 1)

    def per_key(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Each parameter once per key of ``features``, in its key order."""
        return dict(zip(self.names, self._columns(features.keys()).unbind(0)))

    def expand(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Each parameter repeated once per id of ``features.values()``."""
        cols = self._columns(features.keys())
        lengths = torch.tensor(features.length_per_key(), dtype=torch.int64, device=cols.device)
        per_id = torch.repeat_interleave(cols, lengths, dim=1, output_size=features.values().numel())
        return dict(zip(self.names, per_id.unbind(0)))


def in_range(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """True where ``0 <= id < rows``."""
    return (ids >= 0) & (ids < rows)


def fold(ids: torch.Tensor, rows: torch.Tensor, hasher: UniversalHash) -> torch.Tensor:
    """Ids in ``[0, rows)`` unchanged; any other id (negative, too large) hashed into it."""
    return torch.where(in_range(ids, rows), ids, hasher(ids, rows, which=0))


def with_values(
    features: KeyedJaggedTensor,
    values: torch.Tensor,
    keys: list[str] | None = None,
    repeat: int = 1,
) -> KeyedJaggedTensor:
    """A KJT with new ``values`` and the bags of ``features``.

    ``repeat`` > 1: the key set is repeated (``keys`` names the repeated keys, e.g.
    every feature's quotient key then every feature's remainder key) and ``values``
    holds ``repeat`` blocks, each laid out like ``features.values()``.
    """
    lengths = features.lengths()
    lpk = features.length_per_key()
    if repeat > 1:
        lengths = lengths.repeat(repeat)
        lpk = lpk * repeat
    return KeyedJaggedTensor(
        keys=keys if keys is not None else features.keys(),
        values=values,
        lengths=lengths,
        stride=features.stride(),
        length_per_key=lpk,
    )


def inner_table(
    source: EmbeddingBagConfig,
    name: str | None = None,
    rows: int | None = None,
    dim: int | None = None,
    features: list[str] | None = None,
) -> EmbeddingBagConfig:
    """A physical table behind the transform: the source's pooling and ``init_fn``, new sizes.

    A source table without an ``init_fn`` gives TorchRec's default for the new row
    count (uniform in ``±sqrt(1/rows)``).
    """
    return EmbeddingBagConfig(
        name=name or source.name,
        embedding_dim=dim or source.embedding_dim,
        num_embeddings=rows or source.num_embeddings,
        feature_names=list(features if features is not None else source.feature_names),
        pooling=source.pooling,
        init_fn=source.init_fn,
    )


class IdMappedCollection(CompressedEmbeddingBagCollection):
    """Base of the hashing family: an id transform, TorchRec tables, a combine step.

    Holds the sizing ``plan`` (what ``describe()`` reports) and turns the inner
    tables' pooled output into the module's ``KeyedTensor`` in source order.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        plan: Plan,
        knob: str,
        validate_ids: bool = False,
        output_dims: Mapping[str, int] | None = None,
        config: CompressionConfig | None = None,
    ) -> None:
        super().__init__(tables, output_dims=output_dims, validate_ids=validate_ids, config=config)
        self.plan = plan
        self._knob = knob
        dims = self.output_dims()
        self._dims = [dims[f] for f in self.feature_names]

    def describe(self) -> dict[str, Any]:
        return self.plan.describe(self._knob, {t.name: t.feature_names for t in self.source_tables()})

    def keyed(self, values: torch.Tensor) -> KeyedTensor:
        """The pooled ``[B, sum of dims]`` values (source order) as a KeyedTensor."""
        return KeyedTensor(keys=self.feature_names, length_per_key=self._dims, values=values)


def feature_order(ebc: Any) -> list[str]:
    """The features of a TorchRec EBC in the order its unsharded output lists them."""
    return [f for c in ebc.embedding_bag_configs() for f in c.feature_names]


def in_order(kt: KeyedTensor, keys: Sequence[str]) -> torch.Tensor:
    """The pooled values of ``kt`` with its keys in the order ``keys``.

    An unsharded EBC returns its features in config order; TorchRec's sharded one
    groups them by shard (e.g. table-wise: rank 0's tables first), so a method that
    reads columns by position reads them through this.
    """
    if _tracing() or list(kt.keys()) == list(keys):
        return kt.values()
    d = kt.to_dict()
    return torch.cat([d[k] for k in keys], dim=1)


def column_order(produced: Sequence[tuple[str, int]], wanted: Sequence[tuple[str, int]]) -> list[int] | None:
    """Column indices putting blocks ``produced`` (name, width) into ``wanted``'s order; None if already."""
    start, at = 0, {}
    for name, width in produced:
        at[name] = (start, width)
        start += width
    cols = [c for name, _ in wanted for c in range(at[name][0], at[name][0] + at[name][1])]
    return None if cols == list(range(len(cols))) else cols


def take_columns(out: torch.Tensor, cols: list[int] | None) -> torch.Tensor:
    """``out``'s columns ``cols`` (``column_order``'s answer; None: ``out`` as it is).

    ``index_select``, not ``out[:, cols]``: advanced indexing's backward is an accumulating
    ``index_put_`` that sorts the indices, 0.85 against 0.17 ms forward and backward for a
    512 x 416 batch (2 cores)."""
    if cols is None:
        return out
    return torch.index_select(out, 1, torch.as_tensor(cols, device=out.device))
