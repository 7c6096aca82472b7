"""The MLP block's fused ``BatchNorm1d -> ReLU -> Dropout`` (``recsys.models.fused``)
against the same modules run one by one by eager torch."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import recsys.models.fused as fused_mod
from recsys.models.fused import FULL_CUT, _BatchNormReluDropout, _draws, dropout_cut, kernel
from recsys.models.layers import MLPBlock


@pytest.fixture(params=["kernel", "torch ops"])
def path(request, monkeypatch):
    """The fused layer with its C++ kernel and, where it is not built, with torch ops."""
    if request.param == "kernel":
        if kernel() is None:
            pytest.skip("the C++ kernel is not built here (test_the_kernel_builds_where_a_compiler_is says why)")
    else:
        monkeypatch.setitem(fused_mod._KERNEL, "k", None)
    return request.param


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
def test_fused_block_is_eager_torch(dropout, momentum, path):
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


@pytest.mark.parametrize("cut", [0, dropout_cut(0.2)])
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


def test_fused_block_takes_the_eager_path_where_it_cannot(path):
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


def test_the_kernel_builds_where_a_compiler_is():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja here: the fused layer runs as torch ops")
    assert kernel() is not None


@pytest.mark.parametrize("n, seed", [(1, 0), (1001, 7), (4096 * 400, 2**62 + 12345)])
def test_numpy_draws_are_the_kernels(n, seed):
    """Dropout's mask is the same with and without the kernel: NumPy's draws are its."""
    k = kernel()
    if k is None:
        pytest.skip("the C++ kernel is not built here")
    for p in (0.0, 0.2, 0.5, 0.9):
        cut = dropout_cut(p)
        np.testing.assert_array_equal(k.keep(n, seed, cut).numpy(), _draws(n, seed) >= cut)
    with pytest.raises(RuntimeError, match="out of"):  # 2^32 would wrap to 0 and keep everything
        k.keep(n, seed, FULL_CUT)
    if n > 10**6:  # and the draws keep 1 - p of the elements, column by column
        kept = torch.from_numpy(_draws(n, seed) >= dropout_cut(0.2)).view(4096, 400).float()
        assert abs(kept.mean().item() - 0.8) < 0.002
        assert (kept.mean(0) - 0.8).abs().max() < 0.04  # 4096 draws a column: 6.4 sigma


def test_kernel_against_float64():
    """The kernel's output, statistics and gradients against batch norm in float64, on a
    column whose mean is 10^4 of its spread (where summing x and x^2 would cancel), and
    the same bits for one thread and two."""
    k = kernel()
    if k is None:
        pytest.skip("the C++ kernel is not built here")
    torch.manual_seed(0)
    x = torch.randn(1000, 37)
    x[:, 0] = x[:, 0] * 0.01 + 100.0
    w, b, g = torch.rand(37) + 0.5, torch.randn(37), torch.randn(1000, 37)
    cut = dropout_cut(0.25)
    s = FULL_CUT / (FULL_CUT - cut)
    y, mean, invstd, var, off = k.forward(x, w, b, 1e-5, s, cut, 99)
    keep = torch.from_numpy(_draws(x.numel(), 99) >= cut).view(x.shape)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    ref = torch.relu(nn.functional.batch_norm(xd, None, None, wd, bd, True, 0.0, 1e-5)) * s * keep
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), x.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(off.double(), x.double().mean(0) - x[0].double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(var.double(), x.double().var(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(invstd.double(), (x.double().var(0, unbiased=False) + 1e-5).rsqrt(), rtol=1e-4, atol=0)
    ref.backward(g.double())
    got = k.backward(g, x, y, w, off, invstd, s)
    for a, r in zip(got, (xd.grad, wd.grad, bd.grad)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = k.forward(x, w, b, 1e-5, s, cut, 99) + k.backward(g, x, y, w, off, invstd, s)
        torch.set_num_threads(2)
        two = k.forward(x, w, b, 1e-5, s, cut, 99) + k.backward(g, x, y, w, off, invstd, s)
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(one, two):
        assert torch.equal(a, b_)


def test_the_kernel_runs_its_blocks_on_torchs_threads():
    """Built without OpenMP, at::parallel_for (inline in torch's headers) runs every block
    on the calling thread: the kernel then took twice its time on two cores."""
    k = kernel()
    if k is None:
        pytest.skip("the C++ kernel is not built here")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert k.workers(64) == n
    finally:
        torch.set_num_threads(threads)


def test_without_a_compiler_the_layer_runs_as_torch_ops(tmp_path):
    """A machine whose C++ compiler is missing: one warning naming why, and training goes
    on through torch ops (a real build attempt, in a process of its own)."""
    code = (
        "import torch\n"
        "from recsys.models.fused import kernel\n"
        "from recsys.models.layers import MLPBlock\n"
        "assert kernel() is None\n"
        "b = MLPBlock(8, [16], batch_norm=True, dropout=0.2)\n"
        "b(torch.randn(32, 8)).sum().backward()\n"
        "print('trained', b[0].weight.grad.abs().sum().item() > 0)\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-c++")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained True" in out.stdout
    warned = [ln for ln in out.stderr.splitlines() if "fused_cpu.cpp did not build" in ln]
    assert len(warned) == 1 and "no-such-c++" in warned[0], out.stderr[-2000:]
