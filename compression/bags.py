"""The pieces every hand-pooled method shares: TorchRec collections by dim, and bag pooling.

TorchRec's ``EmbeddingCollection`` (unpooled lookups) holds tables of one dim, so a method
that looks rows up unpooled and pools them itself (OptEmbed's masks, PEP's and DeepLight's
element masks, DPQ's codes, TT-Rec's cores) keeps one collection per dim, keyed ``d{dim}``.
``pool`` then sums (or averages) each bag's rows: one ``repeat_interleave`` gives every id
its sample, one ``index_add`` adds it there, an empty bag pools to zeros.

Example::

    ec = collections_by_dim([unpooled(t) for t in tables], device)   # ModuleDict: d8, d16 ...
    jt = ec["d16"](features)["user"]
    pool(jt.values(), jt.lengths(), features.stride(), PoolingType.SUM)   # [batch, 16]
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression import native
from compression.base import _tracing


def unpooled(table: EmbeddingBagConfig, keep_init: bool = False) -> EmbeddingConfig:
    """The unpooled config of ``table`` (same name, rows, dim, features); its ``init_fn``
    only with ``keep_init`` (else TorchRec's default for the rows)."""
    return EmbeddingConfig(name=table.name, embedding_dim=table.embedding_dim, num_embeddings=table.num_embeddings,
                           feature_names=list(table.feature_names),
                           init_fn=table.init_fn if keep_init else None)  # fmt: skip


def collections_by_dim(configs: Iterable[EmbeddingConfig], device: torch.device | None) -> nn.ModuleDict:
    """One ``EmbeddingCollection`` per embedding dim, keyed ``d{dim}`` in increasing dim,
    each holding the configs of that dim in the order given."""
    by_dim: dict[int, list[EmbeddingConfig]] = {}
    for c in configs:
        by_dim.setdefault(c.embedding_dim, []).append(c)
    return nn.ModuleDict({f"d{d}": EmbeddingCollection(tables=cs, device=device) for d, cs in sorted(by_dim.items())})


def bag_index(lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """The bag (sample) of every id of a jagged feature: ``lengths[i]`` times ``i``."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total)


def pool(rows: torch.Tensor, lengths: torch.Tensor, batch: int, pooling: PoolingType) -> torch.Tensor:
    """Bags of ``rows`` (one per id, in bag order) pooled by sum or mean: [batch, dim]. Where
    every bag holds one id, the rows are the bags (returned as they are: the same values and
    gradients, without a scatter each way)."""
    if not _tracing() and rows.shape[0] == batch == lengths.numel() and bool((lengths == 1).all()):
        return rows
    out = torch.zeros(batch, rows.shape[1], device=rows.device, dtype=rows.dtype)
    out = out.index_add(0, bag_index(lengths, rows.shape[0]), rows)
    if pooling == PoolingType.MEAN:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def pooled_lookup(ebc: nn.Module, features: KeyedJaggedTensor) -> KeyedTensor:
    """``ebc(features)``, the same KeyedTensor, for TorchRec's plain collection read whole.

    Where ``bags_cpu.cpp`` is built and every table pools by sum or mean (by sum where the
    ids are weighted, the weights needing no gradient), every feature's bags are pooled into
    the output in one call, and backward every table's gradient is written in one call
    (``_Pooled``); TorchRec's unsharded collection runs an ``nn.EmbeddingBag`` a feature, which
    sorts the ids and builds offsets both ways.

    Otherwise, where every bag holds one id or none (Criteo's, Avazu's and most CTR fields; a
    method's split of a field into blocks), sum and mean pooling are that id's row, or zeros,
    so each table is read with ``F.embedding``: an index_select forward and, backward, one pass
    adding the gradient rows into the table's gradient (``index_add_`` from ``GATHER_FROM``
    ids a lookup; rows of empty bags placed by ``index_copy``).

    Anything else goes to ``ebc`` itself: a sharded, fused or quantized collection (not
    TorchRec's plain ``EmbeddingBagCollection``), another pooling, weights that learn, bags of
    several ids without the kernel, a variable batch per feature, and tracing.

    Example::

        kt = pooled_lookup(self.ebc, features)     # instead of self.ebc(features)
    """
    if type(ebc) is not EmbeddingBagCollection or not _plain(features):
        return ebc(features)
    pooled = _by_kernel(ebc, features)
    if pooled is not None:
        return KeyedTensor(keys=ebc._embedding_names, values=pooled, length_per_key=ebc._lengths_per_embedding)
    if _one_hot(ebc, features):
        return _by_row(ebc, features)
    return ebc(features)


def _plain(features: KeyedJaggedTensor) -> bool:
    """Whether ``features`` may be read by anything but the collection itself: one batch size
    for every key, and not while scripting, compiling or tracing."""
    return not (features.variable_stride_per_key() or features.inverse_indices_or_none() is not None or _tracing())


def _one_hot(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor) -> bool:
    """Whether ``pooled_lookup`` can read ``features`` row by row (its docstring)."""
    if ebc.is_weighted() or not _plain(features):
        return False
    lengths = features.lengths()
    return lengths.numel() == len(features.keys()) * features.stride() and bool((lengths <= 1).all())


_SOURCE = Path(__file__).with_name("bags_cpu.cpp")


def kernel() -> Any:
    """``bags_cpu.cpp`` (None where it cannot be built, or kernels are off)."""
    return native.load(_SOURCE, "pooled lookups run table by table as torch ops")


class _Pooled(torch.autograd.Function):
    """Every feature's bags pooled from its table into the output's layout, in one call each
    way (``bags_cpu.cpp``)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, offsets: torch.Tensor, scale: Optional[torch.Tensor],  # type: ignore[override]
                layout: tuple[int, list[int], list[int], list[bool]], *weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(values, offsets, scale)
        ctx.layout, ctx.weights = layout, weights
        return kernel().bags_forward(values, offsets, scale, *layout, list(weights))  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        values, offsets, scale = ctx.saved_tensors
        need = list(ctx.needs_input_grad[4:])
        grads = kernel().bags_backward(grad.contiguous(), values, offsets, scale, *ctx.layout, list(ctx.weights), need)
        return (None, None, None, None, *grads)


def _layout(ebc: EmbeddingBagCollection, keys: list[str]) -> Optional[tuple[list[int], list[int], list[bool], list[Any]]]:
    """For features keyed ``keys``: each of the collection's features' key position, table and
    whether it pools by mean, and its bags; None where a table pools otherwise, or (weighted)
    by anything but sum. Kept on the collection, a set of keys each."""
    cache = ebc.__dict__.setdefault("_pooled_layouts", {})
    key = tuple(keys)
    if key not in cache:
        bags = list(ebc.embedding_bags.values())
        pooling = [bag.mode for bag in bags]
        where = {k: i for i, k in enumerate(keys)}
        table = [t for t, names in enumerate(ebc._feature_names) for _ in names]
        fits = all(m in ("sum", "mean") for m in pooling) and (not ebc.is_weighted() or set(pooling) <= {"sum"})
        cache[key] = ((
            [where[name] for names in ebc._feature_names for name in names], table, [pooling[t] == "mean" for t in table], bags,
        ) if fits and all(name in where for names in ebc._feature_names for name in names) else None)  # fmt: skip
    return cache[key]  # type: ignore[no-any-return]


def _by_kernel(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
    """The pooled output by ``_Pooled``; None where the kernel or the tensors do not fit it
    (``pooled_lookup``'s docstring)."""
    k = kernel()
    keys, batch = features.keys(), features.stride()
    values, lengths = features.values(), features.lengths()
    layout = _layout(ebc, keys) if k is not None else None
    if layout is None or lengths.numel() != len(keys) * batch or values.dtype != torch.int64 or values.device.type != "cpu":
        return None
    pos, table, mean, bags = layout
    weights = [bag.weight for bag in bags]
    scale = features.weights_or_none() if ebc.is_weighted() else None
    if not k.plain_tables(weights) or (ebc.is_weighted() and (scale is None or scale.requires_grad
                                                              or scale.dtype != torch.float32)):  # fmt: skip
        return None
    offsets = features.offsets().to(torch.int64).contiguous()
    scale = scale.contiguous() if scale is not None else None
    return _Pooled.apply(values.contiguous(), offsets, scale, (batch, pos, table, mean), *weights)  # type: ignore[no-any-return]


def _by_row(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor) -> KeyedTensor:
    keys, batch = features.keys(), features.stride()
    per_key = features.length_per_key()
    values = dict(zip(keys, features.values().split(per_key)))
    present = dict(zip(keys, features.lengths().view(len(keys), batch)))
    pooled = []
    for bag, names in zip(ebc.embedding_bags.values(), ebc._feature_names):
        for name in names:
            rows = _rows(bag.weight, values[name]).float()
            if rows.shape[0] < batch:  # some bags empty: their rows stay zero, as pooled by TorchRec
                rows = rows.new_zeros(batch, rows.shape[1]).index_copy(0, present[name].nonzero().squeeze(1), rows)
            pooled.append(rows)
    return KeyedTensor(
        keys=ebc._embedding_names, values=torch.cat(pooled, dim=1), length_per_key=ebc._lengths_per_embedding
    )


# From this many ids a lookup, rows are read by index_select, whose backward is one
# index_add_: torch's embedding backward scans every id on each thread (two cores: 0.32
# against 0.21 ms for 4,096 ids of 5,000 x 16, 3.1 against 0.66 ms for ROBE's 53,248 ids of 4
# floats; 0.11 against 0.14 ms for 512 ids, measured with the backward call included)
GATHER_FROM = 2048


def _rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]``, with the gradient of ``weight`` as the rows' gradients added up
    (``index_select``'s own backward is one ``index_add_`` into zeros)."""
    if ids.numel() < GATHER_FROM:
        return nn.functional.embedding(ids, weight)
    return weight.index_select(0, ids)
