"""Evaluation: exact AUC (torchmetrics) and logloss over a whole split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from recsys.data.loader import PAD_LABEL, BatchLoader


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: BatchLoader,
    device: torch.device,
    max_batches: int | None = None,
    empty_ok: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every row of ``loader`` (or its first ``max_batches``), on the CPU.

    Padding rows (label ``PAD_LABEL``, a sharded loader's filler) are left out. ``empty_ok``:
    a split with no rows gives empty tensors instead of an error (a rank's share may be empty).
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for i, batch in enumerate(loader.epoch(0)):
            if max_batches is not None and i >= max_batches:
                break
            batch = batch.to(device)
            out = model(batch.dense_features, batch.sparse_features).reshape(-1).float()
            real = batch.labels != PAD_LABEL
            logits.append(out[real].cpu())
            labels.append(batch.labels[real].cpu())
    finally:
        model.train(was_training)
    if not logits:
        if empty_ok:
            return torch.zeros(0), torch.zeros(0)
        raise ValueError(f"split '{loader.split}' of {loader.path} has no rows to evaluate")
    return torch.cat(logits), torch.cat(labels)


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, logloss, mean prediction and row count of logits against 0/1 labels."""
    auc = float(binary_auroc(torch.sigmoid(logits), labels.long())) if labels.min() != labels.max() else float("nan")
    return {
        "auc": auc,
        "logloss": float(F.binary_cross_entropy_with_logits(logits, labels)),
        "mean_prediction": float(torch.sigmoid(logits).mean()),
        "rows": float(len(labels)),
    }


def evaluate(
    model: nn.Module, loader: BatchLoader, device: torch.device, max_batches: int | None = None
) -> dict[str, float]:
    return binary_metrics(*predict(model, loader, device, max_batches))
