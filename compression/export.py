"""A deployable artifact: a trained (compressed, quantized) model through ``torch.export``.

The exported program takes plain tensors, not a KJT, so that it is called the same
way from anywhere (a server, AOTInductor, another process)::

    logits = program(dense [B, n_dense] float32, values [nnz] int64, lengths [F·B] int32)

``values``/``lengths`` are the KJT's, keys in the exported order (``keys`` in the
artifact's metadata; ``inputs(batch)`` flattens a batch). Batch size and id count are
dynamic (B >= 2: torch.export specialises a size of 1; repeat a lone row). It is
exported non-strict (the id transforms run as Python over fake tensors; their
data-dependent branches and checks are skipped while tracing, see
``compression.base._tracing``), with fbgemm's TBE script objects (``AtomicCounter``,
``TensorQueue``) given TorchRec's fake classes. It lives in ``compression`` rather
than with the models because what makes exporting hard (the id transforms, fbgemm's
quantized kernels) is compression's; the model is only wrapped.

Example::

    result = export_model(model, batch, Path("model.pt2"))
    result.bytes_on_disk
    program = load_exported(result.path)
    logits = program(*inputs(batch))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torchrec.datasets.utils import Batch
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

METHOD = "torch.export"


@dataclass
class ExportResult:
    """Where the artifact is, its size on disk, how it was made, its input keys."""

    path: Path
    bytes_on_disk: int
    method: str
    keys: list[str]


class InferenceModule(nn.Module):
    """``model(dense, KJT)`` behind plain tensors: (dense, values, lengths) -> logits."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(dense, KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths))


def inputs(batch: Batch | tuple[torch.Tensor, KeyedJaggedTensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) of a batch, as the exported program takes them."""
    dense, kjt = (batch.dense_features, batch.sparse_features) if isinstance(batch, Batch) else batch
    return dense, kjt.values(), kjt.lengths()


def _fake_fbgemm_classes() -> None:
    """TorchRec's fake classes of fbgemm's TBE script objects (once per process)."""
    from torch._library.fake_class_registry import has_fake_class
    from torchrec.pt2.utils import register_fake_classes

    if not has_fake_class("__torch__.torch.classes.fbgemm.AtomicCounter"):
        register_fake_classes()


def _detach_weight_views(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Take the ``embedding_bags`` off TorchRec's quantized EBCs (restored after).

    They are views of the TBE's weight storage, kept for ``state_dict``; the lookup
    reads the storage itself, which the program holds as a constant. Left on, each
    view would be saved as a copy of the whole storage.
    """
    taken = []
    for m in model.modules():
        if isinstance(m, QuantEmbeddingBagCollection):
            taken.append((m, m.embedding_bags))
            m.embedding_bags = nn.ModuleDict()
    return taken


def export_model(
    model: nn.Module, example_batch: Batch | tuple[torch.Tensor, KeyedJaggedTensor], path: str | Path
) -> ExportResult:
    """Export ``model`` (eval mode, its current weights) to ``path`` with ``torch.export``.

    ``example_batch`` fixes the feature keys and dtypes; sizes stay dynamic. The file
    is written to a temporary sibling and renamed, so a failed export leaves nothing.
    """
    path = Path(path)
    dense, kjt = (
        (example_batch.dense_features, example_batch.sparse_features)
        if isinstance(example_batch, Batch)
        else example_batch
    )
    if dense.shape[0] < 2:
        raise ValueError("export_model needs an example batch of at least 2 rows (torch.export specialises 1)")
    _fake_fbgemm_classes()
    keys = list(kjt.keys())
    wrapper = InferenceModule(model, keys)
    was_training = model.training
    wrapper.eval()
    batch, ids = Dim("batch", min=2), Dim("ids", min=1)
    views = _detach_weight_views(model)
    try:
        with torch.no_grad():
            program = torch.export.export(
                wrapper,
                inputs((dense, kjt)),
                dynamic_shapes=({0: batch}, {0: ids}, {0: len(keys) * batch}),
                strict=False,
            )
    finally:
        for qebc, bags in views:
            qebc.embedding_bags = bags
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        torch.export.save(program, f, extra_files={"embcomp.json": json.dumps({"keys": keys})})
    tmp.replace(path)
    return ExportResult(path=path, bytes_on_disk=path.stat().st_size, method=METHOD, keys=keys)


def load_exported(path: str | Path) -> Any:
    """The exported program at ``path`` as a callable module ``(dense, values, lengths)``."""
    import fbgemm_gpu  # noqa: F401  (registers the fbgemm ops the program calls)

    _fake_fbgemm_classes()
    return torch.export.load(Path(path)).module()
