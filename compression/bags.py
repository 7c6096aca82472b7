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
    """Bags of ``rows`` (one per id, in bag order) pooled by sum or mean: [batch, dim]."""
    out = torch.zeros(batch, rows.shape[1], device=rows.device, dtype=rows.dtype)
    out = out.index_add(0, bag_index(lengths, rows.shape[0]), rows)
    if pooling == PoolingType.MEAN:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def pooled_lookup(ebc: nn.Module, features: KeyedJaggedTensor) -> KeyedTensor:
    """``ebc(features)``, the same KeyedTensor, with one-hot features looked up by row.

    Where every bag of ``features`` holds one id or none (Criteo's, Avazu's and most CTR
    fields; a method's split of a field into blocks), sum and mean pooling are that id's
    row, or zeros, so each table is read with ``F.embedding``: an index_select forward and,
    backward, one pass adding the gradient rows into the table's gradient (``index_add_``
    from ``GATHER_FROM`` ids a lookup; rows of empty bags placed by ``index_copy``).
    ``nn.EmbeddingBag`` (what TorchRec's unsharded collection calls once per feature) sorts
    the ids and builds offsets both ways, about twice the time for 26 tables of 512 ids.
    Anything else goes to ``ebc`` itself: a sharded, fused or quantized collection (not
    TorchRec's plain ``EmbeddingBagCollection``), weighted ids, bags of several ids, a
    variable batch per feature, and tracing.

    Example::

        kt = pooled_lookup(self.ebc, features)     # instead of self.ebc(features)
    """
    if type(ebc) is EmbeddingBagCollection and _one_hot(ebc, features):
        return _by_row(ebc, features)
    return ebc(features)


def _one_hot(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor) -> bool:
    """Whether ``pooled_lookup`` can read ``features`` row by row (its docstring)."""
    if (
        ebc.is_weighted()
        or features.variable_stride_per_key()
        or features.inverse_indices_or_none() is not None
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    ):
        return False
    lengths = features.lengths()
    return lengths.numel() == len(features.keys()) * features.stride() and bool((lengths <= 1).all())


def kernel() -> Any:
    """``bags_cpu.cpp`` (None where it cannot be built, or kernels are off)."""
    return native.load(Path(__file__).with_name("bags_cpu.cpp"), "one-hot lookups run feature by feature as torch ops")


class _OneHot(torch.autograd.Function):
    """Every feature's one id a sample looked up in its table, into the pooled output's
    layout, in one call each way (``bags_cpu.cpp``)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, batch: int, pos: list[int], table: list[int],  # type: ignore[override]
                *weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(values)
        ctx.meta = (batch, pos, table, weights)
        return kernel().onehot_gather(values, batch, pos, table, list(weights))  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        (values,) = ctx.saved_tensors
        batch, pos, table, weights = ctx.meta
        need = list(ctx.needs_input_grad[4:])
        grads = kernel().onehot_scatter(grad.contiguous(), values, batch, pos, table, list(weights), need)
        return (None, None, None, None, *grads)


def _by_kernel(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
    """The pooled output of features whose every bag holds one id, by ``_OneHot``; None where
    the kernel or the tensors do not fit it (then the lookups run as torch ops)."""
    keys, batch = features.keys(), features.stride()
    values = features.values()
    weights = [bag.weight for bag in ebc.embedding_bags.values()]
    if (
        values.numel() != len(keys) * batch
        or values.dtype != torch.int64
        or values.device.type != "cpu"
        or any(w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() for w in weights)
        or kernel() is None
    ):
        return None
    where = {k: i for i, k in enumerate(keys)}
    pos = [where[name] for names in ebc._feature_names for name in names]
    table = [t for t, names in enumerate(ebc._feature_names) for _ in names]
    return _OneHot.apply(values.contiguous(), batch, pos, table, *weights)  # type: ignore[no-any-return]


def _by_row(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor) -> KeyedTensor:
    pooled_all = _by_kernel(ebc, features)
    if pooled_all is not None:
        return KeyedTensor(keys=ebc._embedding_names, values=pooled_all, length_per_key=ebc._lengths_per_embedding)
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
