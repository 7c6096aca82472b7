"""A seeded universal hash family on int64 ids (Carter–Wegman over p = 2^31 - 1).

Used by every hashing method (hashing trick, double hashing, the frequency hybrid's
shared rows, folding out-of-range ids) and later by Unified Embedding. Integer ops
only: never Python's ``hash()`` (salted per process), never float division.

The maths. Let p = 2^31 - 1 (a Mersenne prime). Any int64 id x, negative included, is
written by Euclidean division as

    x = q·p + r,   r = x mod p in [0, p),   q = floor(x / p) in [-2^32 - 3, 2^32 + 2],

then q is shifted to u = q + 2^33 in [0, 2^34) and split into bits u = l2·2^30 + l1
(l1 < 2^30, l2 < 16). x -> (r, l1, l2) is injective and every limb is < p, so distinct
ids are distinct vectors of F_p^3. Function j of the family is

    h_j(x) = ((a0·r + a1·l1 + a2·l2 + b) mod p) mod M

with a0 in [1, p) and a1, a2, b in [0, p) drawn by ``numpy.random.default_rng`` from
the seed. Properties:

- universal: for ids x != y the inner value g = (a·v + b) mod p collides with
  probability at most 1/(p - 1) over the draw (a linear form over F_p^3), and g(x) is
  uniform on F_p because b is, so after ``mod M`` a pair collides with probability
  about 1/M (at most 1/M + 2/p).
- no collisions below p: for 0 <= x < p = 2^31 - 1 the limbs l1, l2 are constants, so
  g(x) = (a0·x + const) mod p is a bijection of [0, p) (a0 != 0). Distinct ids in
  [0, 2^31 - 1) collide only through the final ``mod M``.
- no overflow: a0·r < 2^62, a1·l1 < 2^61, a2·l2 < 2^35 and b < 2^31, so the sum before
  ``mod p`` stays below 2^63.
- deterministic: the coefficients depend only on (seed, stream), in any process; they
  are a registered buffer (saved in the state_dict, counted in the module's bytes).

On the CPU, where ``hash_cpu.cpp`` is built, one C++ pass computes the same integers for
ids of any contiguous shape with an int modulus or one per id (``_by_kernel``); anything
else (another device, broadcast moduli, tracing) takes the torch ops.

Example::

    h = UniversalHash(num_hashes=2, seed=0)
    rows = h(ids, 1000)                 # [*ids.shape, 2], every value in [0, 1000)
    rows0 = h(ids, 1000, which=0)       # [*ids.shape], the first function only
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PRIME = 2**31 - 1
_SHIFT = 2**33  # makes q = floor(x / p) non-negative for every int64 x
_LOW_BITS = 2**30 - 1
_SOURCE = Path(__file__).with_name("hash_cpu.cpp")


def kernel() -> Any:
    """``hash_cpu.cpp`` (None where it cannot be built, or kernels are off)."""
    from compression import native  # (here: this file also loads alone, without the package)

    return native.load(_SOURCE, "universal hashes run as torch ops")


def _tracing() -> bool:  # (compression.base's; this file also loads alone, without the package)
    return torch.jit.is_scripting() or torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


class UniversalHash(nn.Module):
    """``num_hashes`` independent functions of the family, drawn from ``(seed, stream)``.

    Args:
        num_hashes: how many independent functions (double hashing uses k of them).
        seed: non-negative seed; the same seed gives the same functions in any process.
        stream: separates independent families drawn from one seed (e.g. a method's
            own hashes and the hash that folds out-of-range ids).
    """

    coeffs: torch.Tensor

    def __init__(self, num_hashes: int = 1, seed: int = 0, stream: int = 0, device: torch.device | None = None) -> None:
        super().__init__()
        if num_hashes < 1:
            raise ValueError(f"UniversalHash needs at least one function, got num_hashes={num_hashes}")
        if seed < 0 or stream < 0:
            raise ValueError(f"hash seed and stream must be non-negative, got seed={seed}, stream={stream}")
        rng = np.random.default_rng([seed, stream])
        a0 = rng.integers(1, PRIME, size=(num_hashes, 1))
        rest = rng.integers(0, PRIME, size=(num_hashes, 3))
        coeffs = torch.from_numpy(np.concatenate([a0, rest], axis=1).astype(np.int64))
        # columns: a0, a1, a2, b
        self.register_buffer("coeffs", coeffs.to(device) if device is not None else coeffs)

    @staticmethod
    def nbytes(num_hashes: int = 1) -> int:
        """Bytes of the coefficient buffer, for a method's sizing before the module exists."""
        return 4 * 8 * num_hashes

    @property
    def num_hashes(self) -> int:
        return self.coeffs.shape[0]

    def forward(
        self, ids: torch.Tensor, m: int | torch.Tensor, which: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hash int64 ``ids`` into ``[0, m)``.

        Args:
            ids: int64 tensor of any shape, any values.
            m: number of buckets, 1 <= m <= 2^31 - 1: an int or an int64 tensor that
                broadcasts against the result (per-id moduli with ``which=None``:
                pass ``m[..., None]``).
            which: None for every function (result ``[*ids.shape, num_hashes]``), an
                int for one function, or an int64 tensor of function indices that
                broadcasts against ``ids`` (e.g. one function per feature).
        """
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        out = self._by_kernel(ids, m, which)
        if out is not None:
            return out
        r = torch.remainder(ids, PRIME)
        u = torch.div(ids, PRIME, rounding_mode="floor") + _SHIFT
        l1 = torch.bitwise_and(u, _LOW_BITS)
        l2 = torch.bitwise_right_shift(u, 30)
        if which is None:
            c = self.coeffs.t()  # [4, H]: broadcasts over a trailing hash dim
            r, l1, l2 = r.unsqueeze(-1), l1.unsqueeze(-1), l2.unsqueeze(-1)
        elif isinstance(which, int):
            c = self.coeffs[which]
        else:
            c = self.coeffs[which].movedim(-1, 0)
        g = torch.remainder(c[0] * r + c[1] * l1 + c[2] * l2 + c[3], PRIME)
        return torch.remainder(g, m)

    def _by_kernel(
        self, ids: torch.Tensor, m: int | torch.Tensor, which: int | torch.Tensor | None
    ) -> torch.Tensor | None:
        """``forward`` by ``hash_cpu.cpp``, or None where it does not take the call: a tensor
        not on the CPU or not contiguous, moduli that broadcast other than one per id, a
        function index or modulus out of range (the torch ops then say so), tracing."""
        if ids.device.type != "cpu" or not ids.is_contiguous() or _tracing():
            return None
        k = kernel()
        if k is None:
            return None
        per_id_m: torch.Tensor | None = None
        if isinstance(m, torch.Tensor):
            per_id_shape = ids.shape if which is not None else (*ids.shape, 1)
            if m.dtype != torch.int64:
                return None
            if m.numel() == 1 and m.dim() <= ids.dim():
                m = int(m)
            elif m.shape == per_id_shape:
                per_id_m, m = m, 0
            else:
                return None
        per_id_which: torch.Tensor | None = None
        if isinstance(which, torch.Tensor):
            if which.dtype != torch.int64:
                return None
            if which.numel() == 1 and which.dim() <= ids.dim():
                which = int(which)
            elif which.shape == ids.shape:
                per_id_which, which = which, 0
            else:
                return None
        if isinstance(which, int) and not 0 <= which < 2**63 or not 0 <= m < 2**63:
            return None  # (a negative index or modulus: the torch ops' meaning, or their error)
        out = k.universal_hash(ids, self.coeffs, -1 if which is None else which, per_id_which, m, per_id_m)
        return out
