"""The MLP block's hidden layer after its linear layer, ``BatchNorm1d -> ReLU -> Dropout``,
as one autograd function on the CPU in training.

Eager torch runs those three as separate kernels, each a pass over the ``[B, width]``
activations, and keeps a float mask for dropout's backward. On two cores those passes run
at the memory's pace, not the GEMMs': in a BARS DeepFM step (batch 4096, three 400-wide
layers) they were a third of the time outside the GEMMs. Here:

- dropout's scale ``s`` is folded into batch norm's affine weight and bias (``relu(s z) =
  s relu(z)`` for ``s > 0``), so torch's own ``native_batch_norm`` writes the scaled output;
- ReLU and the mask are applied in place on that output;
- backward needs only the input and the output: ``y > 0`` exactly where the ReLU passed and
  the mask kept, so the gradient reaching batch norm is ``threshold_backward(g, y, 0)``, and
  torch's own ``native_batch_norm_backward`` (with the scaled weight) does the rest; the
  weight's and bias's gradients are scaled back by ``s``.

The linear layer before it runs without its bias (``batch_norm_relu_dropout``): batch norm
in training takes the batch's mean away, so the bias only enters the running mean, and its
gradient is an exact zero.

The result is eager torch's to float rounding, with the same mask for the same generator
state (``dropout_bits``, shared with ``layers.Dropout``); running statistics and
``num_batches_tracked`` are updated as ``nn.BatchNorm1d`` updates them. Eval, CUDA, tracing
and batch norm without affine parameters take the modules one by one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn


def dropout_bits(shape: torch.Size) -> torch.Tensor:
    """16 random bits an element (int16, ``shape``), drawn from a PCG64 generator seeded by
    one draw from torch's default generator, so ``torch.manual_seed`` fixes them.

    PCG64 makes 64 bits in about half the time torch's CPU generator does (0.6 against
    1.1 ms for 4096 x 400 elements' worth)."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.PCG64(seed).random_raw(-(-n // 4))
    return torch.from_numpy(words.view(np.int16)[:n]).view(shape)


def dropout_cut(p: float) -> int:
    """Dropped elements are those whose 16 bits, as a number in [0, 65536), fall below
    this: ``p`` rounded to a multiple of 2^-16 (the bits are int16, so the comparison is
    ``bits < cut - 32768``)."""
    return round(p * 65536)


class _BatchNormReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        momentum: float,
        eps: float,
        cut: int,
        shift: Optional[torch.Tensor],
    ) -> torch.Tensor:
        scale = 65536 / (65536 - cut)
        w = weight * scale
        out, mean, invstd = torch.native_batch_norm(
            x, w, bias * scale, running_mean, running_var, True, momentum, eps
        )
        if shift is not None and running_mean is not None:  # the mean of x + shift
            running_mean.add_(shift.detach(), alpha=momentum)
        out.clamp_min_(0)
        if cut:
            out.mul_(dropout_bits(out.shape) >= cut - 32768)
        ctx.save_for_backward(x, out, w, mean, invstd)
        ctx.scale, ctx.eps = scale, eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, y, w, mean, invstd = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, y, 0)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x, w, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
        )
        s = ctx.scale
        shift = None
        if ctx.needs_input_grad[8]:  # its exact gradient: zero
            shift = torch.zeros(x.shape[1], dtype=grad.dtype)
        return gx, None if gw is None else gw * s, None if gb is None else gb * s, *[None] * 5, shift


def batch_norm_relu_dropout(
    x: torch.Tensor, bn: nn.BatchNorm1d, p: float, shift: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``dropout(relu(bn(x + shift)), p)`` in training, as one function (``p`` may be 0).

    ``shift`` is the bias of the linear layer before batch norm. Batch norm in training
    takes the batch's mean away, so the bias changes neither the output nor any gradient
    but its own, which is zero: the linear layer runs without it (saving a pass that
    writes the bias into every row), the running mean, which eval uses, adds it, and its
    gradient is an exact zero (so that every parameter still gets one, as DDP expects).
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average, as nn.BatchNorm1d
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _BatchNormReluDropout.apply(  # type: ignore[no-any-return]
        x,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        momentum,
        bn.eps,
        dropout_cut(p),
        shift,
    )


def fusable(x: torch.Tensor, bn: nn.Module, after_relu: Sequence[nn.Module]) -> bool:
    """Whether ``bn -> ReLU -> [Dropout]`` on ``x`` can take the fused function
    (``after_relu``: the layers after the ReLU; a dropout that drops everything cannot)."""
    nxt = after_relu[0] if len(after_relu) else None
    return (
        type(bn) is nn.BatchNorm1d
        and not (isinstance(nxt, nn.Dropout) and nxt.training and dropout_cut(nxt.p) >= 65536)
        and bn.training
        and bn.affine
        and x.dim() == 2
        and x.device.type == "cpu"
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )
