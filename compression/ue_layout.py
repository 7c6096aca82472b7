"""Unified Embedding's layout solver: which tables share which chunks, and how many.

Pure functions of the source tables and a ``UnifiedEmbeddingConfig`` (no module state),
used by ``compression.methods.unified_embedding`` before anything is built (Coleman et
al., "Unified Embedding", NeurIPS 2023: feature multiplexing):

- the chunk dim d (``chunk_dim``, or the tables' common dim / ``chunks``);
- the chunks c_t of every table t by the chunk rule: ``uniform`` (dim / d each),
  ``cardinality`` (the uniform total shared in proportion to log(1 + N_t), clipped to
  [1, max_chunks], largest remainders first) or ``explicit`` (``feature_chunks``);
  ``uniform_output`` forces the uniform rule when the others give several output dims;
- the groups of tables that share their table(s) (``all``, ``single``, ``cardinality``:
  about equal sizes by vocabulary, ``explicit``: ``group_features``);
- a group's bytes (``Layout.cost``) for ``compression.sizing``: T shared tables of M
  rows of d values, or, exact, one block of N_t rows per chunk of every table t.

A config the tables cannot take is refused with a ``MethodConfigError`` naming the field.

Example::

    lay = layout(tables, UnifiedEmbeddingConfig(chunk_dim=4, chunk_rule="cardinality"))
    lay.chunks                  # source table -> its chunks c_t
    lay.cost(name, group, fmt)  # a group's FieldCost, for compression.sizing
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.api import MethodConfigError
from compression.deployed import TableFormat
from compression.sizing import FieldCost

if TYPE_CHECKING:
    from compression.methods.unified_embedding import UnifiedEmbeddingConfig

log = logging.getLogger(__name__)


def _fail(config: UnifiedEmbeddingConfig, msg: str) -> MethodConfigError:
    return MethodConfigError(f"{config.method}: {msg}")


@dataclass
class Layout:
    """What the config makes of the tables: chunk dim, chunks per table, groups."""

    d: int
    chunks: dict[str, int]  # source table -> c_t
    groups: list[tuple[str, list[EmbeddingBagConfig]]]
    num_tables: int
    # the rule actually applied ("uniform (forced: uniform_output)" when DLRM forced it)
    rule: str = "uniform"

    def tables_in(self, group: list[EmbeddingBagConfig]) -> int:
        return min(self.num_tables, sum(self.chunks[t.name] for t in group))

    def cost(self, name: str, group: list[EmbeddingBagConfig], fmt: TableFormat) -> FieldCost:
        """Bytes of a group: T shared tables of M rows of d values; exact: one table of
        N_t rows per chunk of every table t. Each table is read through one stacked key."""
        n = self.tables_in(group)
        plain_rows = sum(t.num_embeddings * self.chunks[t.name] for t in group)
        return FieldCost(name, fmt.table(plain_rows, self.d), 1, max(1, plain_rows // n), lambda m: n * fmt.table(m, self.d))


def _chunk_dim(tables: list[EmbeddingBagConfig], config: UnifiedEmbeddingConfig) -> int:
    if config.chunk_dim is not None:
        return config.chunk_dim
    dim, c = math.gcd(*(t.embedding_dim for t in tables)), config.chunks or 1
    if dim % c:
        raise _fail(config, f"the embedding dim {dim} is not divisible by chunks={c}; set chunk_dim")
    return dim // c


def _uniform(t: EmbeddingBagConfig, d: int, config: UnifiedEmbeddingConfig) -> int:
    if config.chunks is not None:
        return config.chunks
    if t.embedding_dim % d:
        raise _fail(
            config,
            f"chunk_dim {d} does not divide the dim {t.embedding_dim} of table '{t.name}' "
            f"(uniform rule: dim / chunk_dim chunks); pick a divisor or set chunks",
        )
    return t.embedding_dim // d


def _by_cardinality(tables: list[EmbeddingBagConfig], total: int, top: int) -> list[int]:
    """``total`` chunks shared in proportion to log(1 + N), in [1, top], largest remainders first."""
    w = np.log1p([t.num_embeddings for t in tables])
    raw = total * w / w.sum()
    c = np.clip(np.floor(raw), 1, top).astype(np.int64)
    while c.sum() < total and (c < top).any():
        c[np.argmax(np.where(c < top, raw - c, -np.inf))] += 1
    while c.sum() > total and (c > 1).any():
        c[np.argmax(np.where(c > 1, c - raw, -np.inf))] -= 1
    return c.tolist()


def _chunk_counts(tables: list[EmbeddingBagConfig], config: UnifiedEmbeddingConfig, d: int) -> dict[str, int]:
    rule = config.chunk_rule
    if rule == "uniform":
        return {t.name: _uniform(t, d, config) for t in tables}
    if rule == "cardinality":
        total = sum(_uniform(t, d, config) for t in tables)
        if len(tables) > 1 and not len(tables) < total < len(tables) * config.max_chunks:
            raise _fail(
                config,
                f"chunk_rule=cardinality shares the uniform total of {total} chunks over {len(tables)} tables "
                f"within [1, max_chunks={config.max_chunks}] each, which leaves nothing to vary: set chunks=2 "
                f"(chunk_dim = dim/2, 2 chunks per feature on average) or a larger max_chunks",
            )
        return dict(zip([t.name for t in tables], _by_cardinality(tables, total, config.max_chunks)))
    table_of = {f: t for t in tables for f in t.feature_names}
    out: dict[str, int] = {}
    for f, c in config.feature_chunks.items():
        if f not in table_of:
            raise _fail(config, f"feature_chunks names unknown feature '{f}'; features: {', '.join(table_of)}")
        if c < 1:
            raise _fail(config, f"feature_chunks['{f}'] must be >= 1, got {c}")
        t = table_of[f].name
        if out.setdefault(t, c) != c:
            raise _fail(config, f"the features of table '{t}' share its chunks; feature_chunks gives them {out[t]} and {c}")
    return {t.name: out[t.name] if t.name in out else _uniform(t, d, config) for t in tables}


def _groups(tables: list[EmbeddingBagConfig], config: UnifiedEmbeddingConfig) -> list[tuple[str, list[EmbeddingBagConfig]]]:
    kind = config.groups
    if kind == "all":
        return [("all", list(tables))]
    if kind == "single":
        return [(t.name, [t]) for t in tables]
    if kind == "cardinality":
        by_size = sorted(tables, key=lambda t: t.num_embeddings)  # stable: ties keep source order
        parts = np.array_split(np.arange(len(tables)), min(config.n_groups, len(tables)))
        return [(f"g{i}", [by_size[j] for j in p]) for i, p in enumerate(parts)]
    table_of = {f: t for t in tables for f in t.feature_names}
    group_of: dict[str, int] = {}
    for i, names in enumerate(config.group_features):
        if not names:
            raise _fail(config, f"group_features[{i}] is empty")
        for f in names:
            if f not in table_of:
                raise _fail(config, f"group_features names unknown feature '{f}'; features: {', '.join(table_of)}")
            if f in group_of:
                raise _fail(config, f"feature '{f}' is in two groups (group_features[{group_of[f]}] and [{i}])")
            group_of[f] = i
    missing = [f for f in table_of if f not in group_of]
    if missing:
        raise _fail(config, f"groups=explicit: features in no group: {', '.join(missing)}")
    for t in tables:
        if len({group_of[f] for f in t.feature_names}) > 1:
            raise _fail(config, f"the features of table '{t.name}' share its vocabulary and must be in one group")
    groups = [(f"g{i}", [t for t in tables if group_of[t.feature_names[0]] == i]) for i in range(len(config.group_features))]
    return [g for g in groups if g[1]]


def layout(tables: list[EmbeddingBagConfig], config: UnifiedEmbeddingConfig) -> Layout:
    """Check the config against the tables; a ``MethodConfigError`` names what is wrong
    (the checks of the config alone ran when it was made: its fields' bounds, ``check``)."""
    d = _chunk_dim(tables, config)
    chunks = _chunk_counts(tables, config, d)
    dims = sorted({c * d for c in chunks.values()})
    rule = config.chunk_rule
    if config.uniform_output and len(dims) > 1:
        # one output dim for every feature (DLRM): the chunk rule is forced to uniform
        chunks = {t.name: _uniform(t, d, config) for t in tables}
        rule = "uniform (forced: uniform_output)"
        log.warning(
            "unified_embedding: chunk_rule=%s gives output dims %s but the model needs one dim; "
            "chunks forced to uniform", config.chunk_rule, dims,
        )
        if len({c * d for c in chunks.values()}) > 1:
            raise _fail(
                config,
                f"uniform_output=true needs one output dim, but the tables' dims differ "
                f"({sorted({t.embedding_dim for t in tables})}); give every table one dim",
            )
    groups = _groups(tables, config)
    for name, group in groups:
        if len({t.pooling for t in group}) > 1:
            raise _fail(config, f"group '{name}' mixes poolings {sorted(str(t.pooling) for t in group)}; one table pools one way")
    return Layout(d, chunks, groups, config.num_tables, rule)
