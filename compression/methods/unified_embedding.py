"""Unified Embedding: feature multiplexing (Coleman et al., "Unified Embedding:
Battle-Tested Feature Representations for Web-Scale ML Systems", NeurIPS 2023).

Many features share one table of M rows and chunk dim d. Table t (its features)
takes c_t chunks; chunk j of an id x is row ``h_{t,j}(x) mod M`` of the shared table,
``h_{t,j}`` its own seeded universal hash (``compression.hashing``: one coefficient
set per (t, j)), and the c_t chunk vectors are concatenated:

    e_f(x) = [ E[h_{t,0}(x)] | E[h_{t,1}(x)] | ... | E[h_{t,c_t-1}(x)] ]   (dim c_t·d)

Multi-hot bags pool each chunk (sum/mean per chunk, then concatenation).

Inside: each (feature f, chunk j) is a virtual feature ``f#j`` whose values are f's
ids hashed by h_{t,j} and whose bags are f's (``remap``: one permute of the input KJT,
one hash over all values, per-chunk parameters expanded by ``KeyParams``). A physical
table's virtual features are then stacked into one key of the TorchRec
``EmbeddingBagCollection`` with ``depth·B`` bags (``stacked``), so every table is one
pooled lookup with one gradient (the unsharded EBC would otherwise give each chunk a
dense gradient the size of the shared table); the combine step puts each feature's
chunks side by side in source order.

- Chunks per table (``chunk_rule``): ``uniform`` (``chunks`` each, default dim / d,
  so the output keeps the source dim), ``cardinality`` (the same total number of
  chunks, shared in proportion to log(1 + vocabulary), clipped to [1, max_chunks]),
  ``explicit`` (``feature_chunks``: feature -> c; features not named take the uniform
  count). Output dims then differ per feature.
- DLRM needs one output dim for every feature. ``uniform_output: true`` (the experiment
  job sets it when the model needs one dim) forces the chunk rule to uniform, logs a
  warning, and ``describe()['chunk_rule']`` says so; without it ``DLRMConfig.build``
  refuses a module with several dims. Models never look at the method.
- ``num_tables`` T: the chunks of a group go round-robin to T shared tables of M rows
  each (as TensorFlow Recommenders' implementation does for placement), so TorchRec
  can shard them table-wise or row-wise (a group with fewer chunks uses fewer tables).
- ``groups``: each group of tables has its own shared table(s): ``all`` (plain
  Unified Embedding), ``single`` (each table alone: the hashing trick when c = 1),
  ``cardinality`` (``n_groups`` groups of about equal size by vocabulary) or
  ``explicit`` (``group_features``: lists of feature names).
- Sizing (``compression.sizing`` with ``units`` = groups): the budget picks M per
  group, a group's share proportional to its uncompressed bytes; a group whose plain
  form fits its share stays exact (one table in which chunk j of table t has its own
  block of N rows: in-range ids keep their row, others are hashed into the block by
  h_{t,j}), as in the hashing trick.

The rules above (chunk dim, chunks per table, groups, a group's bytes) are solved, before
anything is built, by ``compression.ue_layout``; this module builds what they give.

Ids: any int64 is hashed (negative or beyond the declared vocabulary included); an
exact group folds ids outside ``[0, N)`` into their block with ``h_{t,j}``.

Example::

    ebc = compress(tables, UnifiedEmbeddingConfig(budget=Budget(ratio=100), chunk_dim=8,
                                                  chunk_rule="cardinality", num_tables=2))
    ebc.describe()   # {'all.rows': ..., 'chunks': 'C1:1,C2:3,...', 'chunk_dim': 8, ...}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, MethodConfigError, register
from compression.bags import pooled_lookup
from compression.budget import Budget
from compression.config_checks import bounded, one_of
from compression.hashing import UniversalHash
from compression.idmap import (
    IdMappedCollection,
    KeyParams,
    in_order,
    in_range,
    inner_table,
    with_values,
)
from compression.sizing import BudgetedConfig, Plan, build_sized
from compression.ue_layout import Layout, layout

NAME = "unified_embedding"
CHUNK_RULES = ("uniform", "cardinality", "explicit")
GROUPINGS = ("all", "single", "cardinality", "explicit")


@dataclass
class UnifiedEmbeddingConfig(BudgetedConfig):
    """Feature multiplexing: ``budget`` (or ``rows``) sizes the shared tables."""

    method: ClassVar[str] = NAME
    takes_raw_ids: ClassVar[bool] = True  # every id goes through the hash (exact tables: in-range ids only)
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    # what `make advise` tunes of this method on a user's data (beside the rows' learning rate and L2)
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"num_tables": (1, 2)}
    # rows M of every shared table, instead of a budget (set budget: null)
    rows: Optional[int] = None
    # d, the dim of one chunk; None: the source dim / chunks
    chunk_dim: Optional[int] = bounded(None, ge=1)
    # chunks per feature under the uniform rule (the mean under cardinality); None: dim / chunk_dim
    chunks: Optional[int] = bounded(None, ge=1)
    # uniform | cardinality | explicit
    chunk_rule: str = one_of("uniform", *CHUNK_RULES)
    # cardinality rule: at most this many chunks per feature
    max_chunks: int = bounded(4, ge=1)
    # explicit rule: feature -> chunks (features not named take the uniform count)
    feature_chunks: dict[str, int] = field(default_factory=dict)
    # refuse a rule that gives features different output dims (DLRM)
    uniform_output: bool = False
    # shared tables per group, chunks dealt round-robin
    num_tables: int = bounded(1, ge=1)
    # all | single | cardinality | explicit
    groups: str = one_of("all", *GROUPINGS)
    # groups=cardinality: how many groups
    n_groups: int = bounded(2, ge=1)
    # groups=explicit: lists of feature names
    group_features: list[list[str]] = field(default_factory=list)

    def check(self) -> None:
        if self.feature_chunks and self.chunk_rule != "explicit":
            raise MethodConfigError(f"{NAME}.feature_chunks and {NAME}.chunk_rule: feature_chunks is only read "
                                    f"with chunk_rule=explicit (chunk_rule is '{self.chunk_rule}')")  # fmt: skip
        if self.group_features and self.groups != "explicit":
            raise MethodConfigError(f"{NAME}.group_features and {NAME}.groups: group_features is only read with "
                                    f"groups=explicit (groups is '{self.groups}')")  # fmt: skip

    def explicit_sizes(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def with_uniform_output(self) -> UnifiedEmbeddingConfig:
        return dataclasses.replace(self, uniform_output=True)

    @classmethod
    def contract_examples(cls) -> list[UnifiedEmbeddingConfig]:
        return [
            cls(),
            cls(chunk_dim=4, chunk_rule="cardinality", num_tables=2),
            cls(chunk_dim=4, chunk_rule="explicit", feature_chunks={"big": 3, "small": 1}),
            cls(chunk_dim=2, num_tables=3, budget=Budget(ratio=4, scope="table")),
            cls(groups="cardinality", n_groups=2, chunk_dim=4),
            cls(groups="explicit", group_features=[["big", "tags"], ["small"]], chunks=2),
            cls(groups="single", budget=None, rows=50),
        ]


class UnifiedEmbeddingBagCollection(IdMappedCollection):
    """Shared TorchRec tables behind per-(table, chunk) salted hashes; chunks concatenated."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, lay: Layout, ctx: BuildContext) -> None:
        d, chunks = lay.d, lay.chunks
        super().__init__(tables, plan, knob="rows", output_dims={t.name: chunks[t.name] * d for t in tables},
                         config=ctx.config)
        self.layout = lay
        first_hash, h = {}, 0
        for t in tables:  # hash (t, j) is first_hash[t] + j, whatever the grouping
            first_hash[t.name], h = h, h + chunks[t.name]
        info: dict[str, tuple[int, int, int]] = {}  # virtual feature -> (rows, hash, base)
        inner: list[tuple[EmbeddingBagConfig, list[str]]] = []  # table, its virtual features
        for name, group in lay.groups:
            m = plan.sizes[name]
            if m is None:  # exact: chunk j of table t is its own block of N rows of one table
                base, feats = 0, []
                for t in group:
                    for f in t.feature_names:
                        feats += [f"{f}#{j}" for j in range(chunks[t.name])]
                    for j in range(chunks[t.name]):
                        info.update({f"{f}#{j}": (t.num_embeddings, first_hash[t.name] + j, base) for f in t.feature_names})
                        base += t.num_embeddings
                inner.append((inner_table(group[0], f"exact_{name}", base, d, [f"exact_{name}"]), feats))
                continue
            n = lay.tables_in(group)
            slot = {(t.name, j): k % n for k, (t, j) in enumerate((t, j) for t in group for j in range(chunks[t.name]))}
            members: list[list[str]] = [[] for _ in range(n)]
            for t in group:
                for f in t.feature_names:
                    for j in range(chunks[t.name]):
                        members[slot[t.name, j]].append(f"{f}#{j}")
                        info[f"{f}#{j}"] = (m, first_hash[t.name] + j, -1)
            names = [f"shared_{name}_{k}" for k in range(n)]
            inner += [(inner_table(group[0], names[k], m, d, [names[k]]), members[k]) for k in range(n)]
        # one key per physical table, named after it, whose bags are (virtual feature, sample)
        self.ebc = EmbeddingBagCollection(tables=[c for c, _ in inner], device=ctx.table_device)
        self.hasher = UniversalHash(h, seed=ctx.seed, device=ctx.device)
        self._virtual = [v for _, vs in inner for v in vs]  # table by table
        self._source_of = [self.feature_names.index(v.rsplit("#", 1)[0]) for v in self._virtual]
        self._any_exact = bool(plan.exact)
        self.params = KeyParams(
            self._virtual,
            {k: [info[v][i] for v in self._virtual] for i, k in enumerate(("rows", "hash", "base"))},
            device=ctx.device,
        )
        self._table_keys = [c.name for c, _ in inner]
        self._stack = [len(vs) for _, vs in inner]
        self._depth = max(self._stack)  # bags per sample of every physical table (shorter ones padded)
        place = {v: (s, k) for k, (_, vs) in enumerate(inner) for s, v in enumerate(vs)}
        self._padded = None if min(self._stack) == self._depth else [place[v][1] * self._depth + place[v][0] for v in self._virtual]
        # output blocks come (slot s, table k); the module's order is each feature's chunks in turn
        src = {f: t for t in tables for f in t.feature_names}
        wanted = [f"{f}#{j}" for f in self.feature_names for j in range(chunks[src[f].name])]
        blocks = [place[v] for v in wanted]
        self._blocks = None if blocks == [(s, 0) for s in range(len(blocks))] else blocks
        self._cache: dict[Any, Any] = {}

    def _index(self, key: Any, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _permutation(self, features: KeyedJaggedTensor) -> tuple[list[int], torch.Tensor] | None:
        """Index of each virtual feature's source key in ``features`` (None: already in place)."""
        keys, device = features.keys(), features.values().device

        def make() -> tuple[list[int], torch.Tensor] | None:
            at = {k: i for i, k in enumerate(keys)}
            missing = [f for f in self.feature_names if f not in at]
            if missing:
                raise KeyError(f"{NAME}: features {missing} are missing from the input (keys: {keys})")
            idx = [at[self.feature_names[s]] for s in self._source_of]
            return None if idx == list(range(len(keys))) else (idx, torch.tensor(idx, dtype=torch.int32, device=device))

        return self._index(("perm", tuple(keys), device), make)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Keys ``f#j`` (table by table): f's ids hashed by h_{t,j} into their table, f's bags."""
        perm = self._permutation(features)
        kv = features if perm is None else features.permute(*perm)
        raw = KeyedJaggedTensor(
            keys=self._virtual, values=kv.values(), lengths=kv.lengths(),
            stride=kv.stride(), length_per_key=kv.length_per_key(),
        )  # fmt: skip
        p = self.params.expand(raw)
        ids = raw.values()
        rows = self.hasher(ids, p["rows"], which=p["hash"])
        if self._any_exact:  # base >= 0: the id's block in an exact table; in-range ids keep their row
            exact = p["base"] >= 0
            rows = torch.where(exact, p["base"] + torch.where(in_range(ids, p["rows"]), ids, rows), rows)
        return with_values(raw, rows)

    def stacked(self, virtual: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """One key per physical table whose ``depth·B`` bags are its virtual features' bags
        one after another: the table pools them in one lookup (one gradient, not one per
        chunk), padded with empty bags where a table serves fewer virtual features."""
        lengths, lpk, b = virtual.lengths(), virtual.length_per_key(), virtual.stride()
        per_table, at = [], 0
        for n in self._stack:
            per_table.append(sum(lpk[at : at + n]))
            at += n
        if self._padded is not None:
            slots = self._index(("pad", lengths.device), lambda: torch.tensor(self._padded, device=lengths.device))
            full = lengths.new_zeros(len(self._stack) * self._depth, b)
            lengths = full.index_copy_(0, slots, lengths.view(-1, b))
        return KeyedJaggedTensor(
            keys=self._table_keys, values=virtual.values(), lengths=lengths.view(-1),
            stride=b * self._depth, length_per_key=per_table,
        )  # fmt: skip

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        b = features.stride()
        out = in_order(pooled_lookup(self.ebc, self.stacked(self.remap(features))), self._table_keys)  # [depth·B, tables·d]
        if self._blocks is None:  # bag (s, b) of table 0 is chunk s of sample b
            return self.keyed(out.view(self._depth, b, -1).transpose(0, 1).reshape(b, -1))
        slot, table = self._index(("blocks", out.device), lambda: torch.tensor(self._blocks, device=out.device).unbind(1))
        out = out.view(self._depth, b, len(self._stack), -1).permute(1, 0, 2, 3)[:, slot, table]
        return self.keyed(out.reshape(b, -1))

    def sharding_constraints(self) -> dict[str, Any]:
        """Shared tables row-wise: every feature of the group reads them, so their rows
        (and lookups) are spread over all ranks rather than loading one."""
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import ShardingType

        rw = [ShardingType.ROW_WISE.value]
        return {c.name: ParameterConstraints(sharding_types=rw)
                for c in self.ebc.embedding_bag_configs() if c.name.startswith("shared_")}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        features = {name: [f for t in g for f in t.feature_names] for name, g in self.layout.groups}
        out = self.plan.describe("rows", features)
        out["chunk_dim"] = self.layout.d
        out["chunk_rule"] = self.layout.rule
        out["chunks"] = ",".join(f"{f}:{self.layout.chunks[t.name]}" for t in self.source_tables() for f in t.feature_names)
        out["groups"] = "|".join(f"{name}={'+'.join(fs)}" for name, fs in features.items())
        out["hash_functions"] = self.hasher.num_hashes
        for c in self.ebc.embedding_bag_configs():
            out[f"table.{c.name}.rows"] = c.num_embeddings
        return out


@register(UnifiedEmbeddingConfig)
def build(
    tables: list[EmbeddingBagConfig], config: UnifiedEmbeddingConfig, ctx: BuildContext
) -> UnifiedEmbeddingBagCollection:
    lay = layout(tables, config)
    virtual = sum(lay.chunks[t.name] * len(t.feature_names) for t in tables)
    hashes = UniversalHash.nbytes(sum(lay.chunks.values())) + KeyParams.nbytes(3, virtual)
    return build_sized(
        tables, config, ctx,
        costs=lambda fmt: [lay.cost(name, group, fmt) for name, group in lay.groups],
        fixed=lambda fmt: hashes + fmt.collection(tables),
        units={name: [t.name for t in group] for name, group in lay.groups},
        construct=lambda plan: UnifiedEmbeddingBagCollection(tables, plan, lay, ctx),
    )  # fmt: skip
