"""The training half of FBGEMM's ``zero_collision_hash``, for CPU tensors.

FBGEMM's CPU kernel of ``torch.ops.fbgemm.zero_collision_hash`` is inference-only:
it answers lookups (``readonly=True``) and refuses inserts ("Expected readonly to be
true"), in every release up to the newest source. TorchRec's MPZCH module
(``HashZchManagedCollisionModule``) calls that op for every training batch, so on
the CPU it cannot train. This module is the insert path on the CPU, with the
semantics of FBGEMM's CUDA kernel:

- an id's home slot is ``murmur_hash3_2x64(id, 0, 0) % size`` (FBGEMM's hash), and
  it probes up to ``max_probe`` slots from there, circularly;
- an id already in its probe window keeps its slot (and never evicts another);
- otherwise it takes the first empty slot, or, with eviction, an expired one:
  policy 0 (TTL) the first slot whose metadata is below the threshold and older
  than the id's, policy 1 (LRU) the oldest such slot of the window;
- an id that finds none falls back to its home slot (it shares that row), or to -1
  with ``disable_fallback``;
- the metadata of every slot an id reads becomes the max of its own and the id's.

The CUDA kernel runs one thread per id with compare-and-swap, so which of two ids
wanting one slot wins is not defined there. Here ids go through their windows in
rounds, one probe position at a time, and a slot wanted by several goes to the id
that occurs first in the batch; the losers go on probing. The result is always one
the CUDA kernel can produce: no two ids share a slot they won, and FBGEMM's CPU
lookup finds every id at the slot it was given (tested against the real kernel).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

EMPTY = -1  # FBGEMM's marker of an empty slot (identities and metadata)

_C1 = np.uint64(0x87C37B91114253D5)
_C2 = np.uint64(0x4CF5AD432745937F)
_F1 = np.uint64(0xFF51AFD7ED558CCD)
_F2 = np.uint64(0xC4CEB9FE1A85EC53)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _F1
    h = h ^ (h >> np.uint64(33))
    h = h * _F2
    return h ^ (h >> np.uint64(33))


def murmur_hash3_2x64(x: torch.Tensor, y: int = 0, seed: int = 0) -> np.ndarray:
    """FBGEMM's ``murmur_hash3_2x64`` of every int64 in ``x``, as uint64."""
    k1 = x.cpu().numpy().astype(np.int64).view(np.uint64)
    h1 = np.full_like(k1, seed)
    h2 = np.full_like(k1, seed)
    with np.errstate(over="ignore"):
        k1 = _rotl(k1 * _C1, 31) * _C2
        h1 = _rotl(h1 ^ k1, 27) + h2
        h1 = h1 * np.uint64(5) + np.uint64(0x52DCE729)
        k2 = _rotl(np.full_like(k1, y) * _C2, 33) * _C1
        h2 = _rotl(h2 ^ k2, 31) + h1
        h2 = h2 * np.uint64(5) + np.uint64(0x38495AB5)
        h1 = h1 ^ np.uint64(16)
        h2 = h2 ^ np.uint64(16)
        h1 = h1 + h2
        h2 = h2 + h1
        h1, h2 = _fmix(h1), _fmix(h2)
        h1 = h1 + h2
        h2 = h2 + h1
    return h1 ^ h2


def home_slots(ids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Each id's first probe, ``hash % size`` (in its own bucket of ``sizes``)."""
    hashed = murmur_hash3_2x64(ids)
    return torch.from_numpy((hashed % sizes.cpu().numpy().astype(np.uint64)).astype(np.int64)).to(
        ids.device
    )


def zero_collision_hash_insert(
    input: torch.Tensor,
    identities: torch.Tensor,
    max_probe: int,
    local_sizes: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    metadata: Optional[torch.Tensor],
    input_metadata: Optional[torch.Tensor],
    eviction_threshold: int,
    eviction_policy: int,
    disable_fallback: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots for ``input`` (inserting the new ids into ``identities`` in place) and
    the evicted slots; the arguments are those of ``fbgemm::zero_collision_hash``."""
    n = input.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    table = identities.view(-1)
    if local_sizes is None:
        local_sizes = torch.full_like(input, table.numel())
    if offsets is None:
        offsets = torch.zeros_like(input)
    ids, inverse = torch.unique(input, return_inverse=True)
    first = torch.full((ids.numel(),), n, dtype=torch.int64).scatter_reduce_(
        0, inverse, torch.arange(n), "amin"
    )
    size = torch.zeros_like(ids).scatter_(0, inverse, local_sizes)
    offset = torch.zeros_like(ids).scatter_(0, inverse, offsets)
    home = home_slots(ids, size)
    steps = torch.arange(max_probe)
    window = offset[:, None] + (home[:, None] + steps) % size[:, None]  # [ids, max_probe]

    meta = metadata.view(-1) if metadata is not None else None
    evicting = meta is not None and (eviction_threshold > 0 or eviction_policy > 0)
    value = None
    if meta is not None:
        value = (
            torch.full_like(ids, -(2**31)).scatter_reduce_(
                0, inverse, input_metadata.long(), "amax"
            )
            if input_metadata is not None
            else torch.zeros_like(ids)
        ).to(meta.dtype)

    slot = torch.full_like(ids, EMPTY)
    present = table[window] == ids[:, None]
    found = present.any(1)
    slot[found] = window[found, present[found].int().argmax(1)]
    if meta is not None:
        assert value is not None
        meta[slot[found]] = torch.maximum(meta[slot[found]], value[found])
    evicted: list[torch.Tensor] = []
    pending = (~found).nonzero().flatten()
    while pending.numel():
        held = table[window[pending]]
        free = held == EMPTY
        stale = torch.zeros_like(free)
        if evicting:
            assert meta is not None and value is not None
            age = meta[window[pending]]
            stale = (age < eviction_threshold) & (age < value[pending, None])
        if evicting and eviction_policy == 1:  # LRU: the first empty slot, else the oldest expired
            oldest = torch.where(stale, age, torch.iinfo(age.dtype).max).argmin(1)
            pick = torch.where(free.any(1), free.int().argmax(1), oldest)
            ok = free.any(1) | stale.any(1)
        else:  # the first slot that is empty or expired
            usable = free | stale
            pick, ok = usable.int().argmax(1), usable.any(1)
        pending, pick = pending[ok], pick[ok]
        if not pending.numel():
            break
        want = window[pending, pick]
        claim = torch.full_like(table, n).scatter_reduce_(0, want, first[pending], "amin")
        won = claim[want] == first[pending]
        winners, at = pending[won], want[won]
        replaced = table[at] != EMPTY
        evicted.append(at[replaced])
        table[at] = ids[winners]
        slot[winners] = at
        if meta is not None:  # read now: not expired for the ids still probing
            assert value is not None
            meta[at] = torch.maximum(meta[at], value[winners])
        pending = pending[~won]

    got = slot != EMPTY
    if disable_fallback:
        out = slot
    else:
        out = torch.where(got, slot, offset + home)
    evictions = torch.unique(torch.cat(evicted)) if evicted else torch.empty(0, dtype=torch.int64)
    return out[inverse], evictions
