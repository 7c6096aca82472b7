"""The MLP block's hidden layer after its linear layer, ``BatchNorm1d -> ReLU -> Dropout``,
as one autograd function on the CPU in training.

Eager torch runs those three as separate kernels, each a pass over the ``[B, width]``
activations (batch norm's statistics and output, ReLU, the mask's draws, compare and
multiply; in backward ReLU's and dropout's masks and batch norm's two), each at the
memory's pace on two cores, not the GEMMs'.

Where a C++ compiler is, ``fused_cpu.cpp`` (built on first use, ``kernel``) makes two
passes each way:

- forward: the batch's column sums, then ``y = relu(s (w xhat + b))`` zeroed where the
  element's dropout draw is below the cut, the draw made in the same pass (``s``, dropout's
  scale, is folded into batch norm's weight and bias: ``relu(s z) = s relu(z)``);
- backward: the masked gradient's column sums, then the input's gradient. It needs only
  the input and the output: ``y > 0`` exactly where the ReLU passed and the mask kept.

Without a compiler the same function runs as torch ops: torch's ``native_batch_norm`` with
the scaled weight, ReLU and the mask in place, and in backward ``threshold_backward`` and
``native_batch_norm_backward``.

The linear layer before it runs without its bias (``batch_norm_relu_dropout``): batch norm
in training takes the batch's mean away, so the bias only enters the running mean, and its
gradient is an exact zero.

The result is eager torch's to float rounding, with the same mask for the same generator
state both ways (``dropout_keep``, shared with ``layers.Dropout``); running statistics and
``num_batches_tracked`` are updated as ``nn.BatchNorm1d`` updates them. Eval, CUDA, tracing,
float64 and batch norm without affine parameters take the modules one by one or torch ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from compression import native

FULL_CUT = 2**32


def dropout_cut(p: float) -> int:
    """Dropped elements are those whose 32-bit draw falls below this: ``p`` rounded to a
    multiple of 2^-32 (``FULL_CUT``: every element dropped)."""
    return round(p * FULL_CUT)


def dropout_seed() -> int:
    """A call's dropout seed: one draw from torch's default generator, so that
    ``torch.manual_seed`` fixes the masks."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _mix32(x: np.ndarray) -> np.ndarray:
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _draws(n: int, seed: int) -> np.ndarray:
    """The 32-bit dropout draws of elements ``0 .. n-1`` for ``seed``: ``draw`` of
    ``fused_cpu.cpp`` in NumPy (two rounds of a 32-bit integer hash of the element's index,
    keyed by the seed's halves), for where the C++ kernel is not built."""
    if n >= FULL_CUT:
        raise ValueError(f"dropout: {n} elements; the draws index at most 2^32 - 1")
    x = np.arange(n, dtype=np.uint32)
    x += np.uint32(seed & 0xFFFFFFFF)
    return _mix32(_mix32(x) ^ np.uint32(seed >> 32))


def dropout_keep(shape: torch.Size, cut: int) -> torch.Tensor:
    """Dropout's mask (bool, ``shape``) for one call: element ``e`` (in row-major order) is
    kept where its draw is at least ``cut``. The same mask as the fused layer's for the same
    generator state, from the C++ kernel where it is built and from NumPy otherwise."""
    n, seed = math.prod(shape), dropout_seed()
    k = kernel()
    if k is not None:
        return k.keep(n, seed, cut).view(shape)  # type: ignore[no-any-return]
    return torch.from_numpy(_draws(n, seed) >= cut).view(shape)


_KERNEL: dict[str, Any] = {}


def kernel() -> Any:
    """The C++ kernel (``fused_cpu.cpp``, built on first use by ``compression.native``), or
    None where it cannot be built (torch ops then do the same work) or where
    ``EMBCOMP_CPU_KERNELS=0``."""
    if "k" not in _KERNEL:
        src = Path(__file__).with_name("fused_cpu.cpp")
        _KERNEL["k"] = native.load(src, "the MLP block's batch norm, ReLU and dropout run as torch ops")
    return _KERNEL["k"]


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
        scale = FULL_CUT / (FULL_CUT - cut)
        k = kernel() if _kernel_takes(x, weight) else None
        ctx.kernel, ctx.scale, ctx.eps = k, scale, eps
        if k is not None:
            x = x.contiguous()
            w = weight.detach().contiguous()
            seed = dropout_seed() if cut else 0
            out, _, invstd, var, mean = k.forward(x, w, bias.detach().contiguous(), eps, scale, cut, seed)  # mean: less x[0]
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum).add_(x[0], alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(var, alpha=momentum)
        else:
            w = weight * scale
            out, mean, invstd = torch.native_batch_norm(x, w, bias * scale, running_mean, running_var, True, momentum, eps)
            out.clamp_min_(0)
            if cut:
                out.mul_(dropout_keep(out.shape, cut))
        if shift is not None and running_mean is not None:  # the mean of x + shift
            running_mean.add_(shift.detach(), alpha=momentum)
        ctx.save_for_backward(x, out, w, mean, invstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, y, w, mean, invstd = ctx.saved_tensors
        s, need = ctx.scale, ctx.needs_input_grad
        if ctx.kernel is not None:
            gx, gw, gb = ctx.kernel.backward(grad.contiguous(), x, y, w, mean, invstd, s)
        else:
            g = torch.ops.aten.threshold_backward(grad, y, 0)
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, x, w, None, None, mean, invstd, True, ctx.eps, list(need[:3])
            )
            gw = None if gw is None else gw * s
            gb = None if gb is None else gb * s
        shift = torch.zeros(x.shape[1], dtype=grad.dtype) if need[8] else None  # its exact gradient
        return (
            gx if need[0] else None,
            gw if need[1] else None,
            gb if need[2] else None,
            *[None] * 5,
            shift,
        )


def _kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype == torch.float32 and x.shape[0] > 1 and x.numel() < FULL_CUT


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
        and not (isinstance(nxt, nn.Dropout) and nxt.training and dropout_cut(nxt.p) >= FULL_CUT)
        and bn.training
        and bn.affine
        and x.dim() == 2
        and x.device.type == "cpu"
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )
