"""Evaluation: exact AUC (torchmetrics) and logloss over a whole split, and whether a
model has learned anything at all (``not_learned``).

A constant predictor scores AUC 0.5 and, at best, the logloss of the split's base rate;
a model no better than that on the split it is judged on has learned nothing, whatever
its bytes, and is never reported as an answer.

Example::

    m = evaluate(model, val_loader, torch.device("cpu"))
    not_learned(m)        # None, or one line saying why the model counts as failed
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
    """AUC, logloss, mean prediction, row and positive counts of logits against 0/1 labels,
    and ``base_logloss``: the logloss of predicting the split's own click rate for every
    row (the best any constant predictor can do on it)."""
    auc = float(binary_auroc(torch.sigmoid(logits), labels.long())) if labels.min() != labels.max() else float("nan")
    rate = float(labels.float().mean())
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else 0.0
    return {
        "auc": auc,
        "logloss": float(F.binary_cross_entropy_with_logits(logits, labels)),
        "mean_prediction": float(torch.sigmoid(logits).mean()),
        "rows": float(len(labels)),
        "positives": float(labels.sum()),
        "base_logloss": base,
    }


# how many standard errors of a constant predictor's AUC a model must clear
AUC_NOISE_SIGMAS = 3.0


def auc_noise(rows: float, positives: float) -> float:
    """Standard error of the AUC of a model that knows nothing (Mann-Whitney's null:
    sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)))."""
    neg = rows - positives
    if positives <= 0 or neg <= 0:
        return math.inf
    return math.sqrt((positives + neg + 1) / (12 * positives * neg))


def not_learned(metrics: Mapping[str, float], prefix: str = "") -> str | None:
    """Why the model whose metrics these are has learned nothing, or None if it has.

    Failed: AUC missing or within ``AUC_NOISE_SIGMAS`` standard errors of 0.5 (the noise
    of a constant predictor on that many rows), or logloss no better than the split's
    base rate's. ``prefix``: the metrics' names carry it (``final_val_``, ``test_``)."""
    get = lambda k: float(metrics.get(prefix + k, math.nan))  # noqa: E731
    auc, logloss, base = get("auc"), get("logloss"), get("base_logloss")
    if auc != auc:  # NaN
        return "no AUC (a split of one class, or a run that did not finish)"
    rows, pos = get("rows"), get("positives")
    noise = AUC_NOISE_SIGMAS * auc_noise(rows, pos) if rows == rows and pos == pos else 0.0
    if abs(auc - 0.5) <= noise:
        return f"AUC {auc:.4f} is within noise of 0.5, ±{noise:.4f} on {int(rows):,} rows"
    if base == base and logloss == logloss and logloss >= base:
        return f"logloss {logloss:.4f} is no better than predicting the base rate ({base:.4f})"
    return None


def evaluate(
    model: nn.Module, loader: BatchLoader, device: torch.device, max_batches: int | None = None
) -> dict[str, float]:
    return binary_metrics(*predict(model, loader, device, max_batches))
