"""The MLP block's fused ``BatchNorm1d -> ReLU -> Dropout`` (``recsys.models.fused``)
against the same modules run one by one by eager torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recsys.models.fused import _BatchNormReluDropout
from recsys.models.layers import MLPBlock


def _one_by_one(block: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    for layer in block:
        x = layer(x)
    return x


def _nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f.name() not in seen:
            seen.add(f.name())
            todo.extend(g for g, _ in f.next_functions)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_block_is_eager_torch(dropout, momentum):
    torch.manual_seed(0)
    fused = MLPBlock(12, [32, 24], output_dim=1, batch_norm=True, dropout=dropout)
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = momentum
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    eager = copy.deepcopy(fused)
    for step in range(3):  # running statistics carried over steps
        x = torch.randn(257, 12)
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)
        yf = fused(xf)
        torch.manual_seed(step)
        ye = _one_by_one(eager, xe)
        assert "_BatchNormReluDropoutBackward" in _nodes(yf)
        assert "_BatchNormReluDropoutBackward" not in _nodes(ye)
        torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5)
        (yf * torch.linspace(-1, 1, 257).unsqueeze(1)).sum().backward()
        (ye * torch.linspace(-1, 1, 257).unsqueeze(1)).sum().backward()
        torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-4, atol=1e-5)
    before_bn = {f"{i}.bias" for i in range(len(fused) - 1) if isinstance(fused[i + 1], nn.BatchNorm1d)}
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        if name in before_bn:  # no effect in training: eager's gradient is zero up to rounding
            weight_grad = dict(eager.named_parameters())[name.replace("bias", "weight")].grad
            assert not a.grad.any() and b.grad.abs().max() < 1e-4 * weight_grad.abs().max()
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(fused.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)
    fused.eval(), eager.eval()
    x = torch.randn(9, 12)
    torch.testing.assert_close(fused(x), _one_by_one(eager, x))
    assert "_BatchNormReluDropoutBackward" not in _nodes(fused(x.requires_grad_()))


@pytest.mark.parametrize("cut", [0, 13107])
def test_fused_gradient_is_the_derivative(cut):
    """torch's numerical gradient check, in float64, the mask fixed by the seed."""
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        torch.manual_seed(1)
        return _BatchNormReluDropout.apply(x, w, b, None, None, 0.1, 1e-5, cut, None)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_fused_block_takes_the_eager_path_where_it_cannot():
    torch.manual_seed(0)
    block = MLPBlock(4, [8], batch_norm=True, dropout=0.3)
    block[1] = nn.BatchNorm1d(8, affine=False)
    assert "_BatchNormReluDropoutBackward" not in _nodes(block(torch.randn(5, 4, requires_grad=True)))
    block = MLPBlock(4, [8], batch_norm=True, dropout=0.3)
    block[3].eval()  # dropout off, batch norm still training: the fused path without a mask
    torch.manual_seed(0)
    y = block(torch.randn(5, 4))
    eager = copy.deepcopy(block)
    eager[1].num_batches_tracked.zero_()
    eager[1].running_mean.zero_(), eager[1].running_var.fill_(1)
    torch.manual_seed(0)
    torch.testing.assert_close(y, _one_by_one(eager, torch.randn(5, 4)))
