"""The training half of FBGEMM's ``zero_collision_hash``, for CPU tensors.

FBGEMM's CPU kernel of ``torch.ops.fbgemm.zero_collision_hash`` is inference-only:
it answers lookups (``readonly=True``) and refuses inserts ("Expected readonly to be
true"), in every release up to the newest source. TorchRec's MPZCH module
(``HashZchManagedCollisionModule``) calls that op for every training batch, so on
the CPU it cannot train. This module is the insert path on the CPU, with the
semantics of FBGEMM's CUDA kernel:

- an id's home slot is ``murmur_hash3_2x64(id, 0, 0) % size`` (FBGEMM's hash, taken
  from FBGEMM's own lookup), and it probes up to ``max_probe`` slots from there, circularly;
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

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import torch

EMPTY = -1  # FBGEMM's marker of an empty slot (identities and metadata)


def home_slots(
    ids: torch.Tensor, identities: torch.Tensor, sizes: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Each id's first probe: ``offset + murmur_hash3_2x64(id, 0, 0) % size``, FBGEMM's.

    Computed by FBGEMM's own CPU lookup with one probe, which answers every id with its
    home slot (its own slot there, or the fallback: the home slot again).
    """
    out, _ = torch.ops.fbgemm.zero_collision_hash(
        input=ids, identities=identities, max_probe=1, circular_probe=True, readonly=True,
        local_sizes=sizes, offsets=offsets,
    )  # fmt: skip
    return out


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
    the evicted slots; the arguments are those of ``fbgemm::zero_collision_hash``.

    In NumPy on the tensors' memory: a batch's few hundred ids per table make each
    operation small, where NumPy's per-call cost is a fraction of torch's.
    """
    n = input.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    table = identities.detach().view(-1).numpy()  # writes go to the identities
    ids, first, inverse = np.unique(input.numpy(), return_index=True, return_inverse=True)
    size = np.full(ids.size, table.size) if local_sizes is None else local_sizes.numpy()[first]
    offset = np.zeros(ids.size, dtype=np.int64) if offsets is None else offsets.numpy()[first]
    t = torch.from_numpy
    home = home_slots(t(ids), identities, t(size), t(offset)).numpy() - offset

    wraps_once = max_probe <= size.min()  # then home + probe < 2 size: no modulo needed

    def span(rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """The slots at probes [lo, hi) of the ids ``rows``."""
        at = home[rows, None] + np.arange(lo, hi)
        n = size[rows, None]
        at = np.where(at >= n, at - n, at) if wraps_once else at % n
        return at + offset[rows, None]

    meta = metadata.view(-1).numpy() if metadata is not None else None
    evicting = meta is not None and (eviction_threshold > 0 or eviction_policy > 0)
    value = np.zeros(ids.size, dtype=np.int32)
    if meta is not None and input_metadata is not None:
        value = np.full(ids.size, np.iinfo(np.int32).min, dtype=np.int32)
        np.maximum.at(value, inverse, input_metadata.numpy().astype(np.int32))

    # Ids already in: an id never sits past an empty slot of its window (slots are only
    # ever taken or replaced), so the scan of an id stops at its own slot or an empty one,
    # a few probes in for most; the window is read in two parts.
    slot = np.full(ids.size, EMPTY, dtype=np.int64)
    scanning, absent, lo, width = np.arange(ids.size), [], 0, 8
    while scanning.size and lo < max_probe:
        hi = min(lo + width, max_probe)
        at = span(scanning, lo, hi)
        held = table[at]
        present = held == ids[scanning, None]
        hit = present.any(1)
        slot[scanning[hit]] = at[hit, present[hit].argmax(1)]
        ended = ~hit & (held == EMPTY).any(1)
        absent.append(scanning[ended])
        scanning = scanning[~hit & ~ended]
        lo, width = hi, max_probe  # the first few probes, then the rest of the window
    absent.append(scanning)  # whole windows of others
    found = slot != EMPTY
    if meta is not None:
        meta[slot[found]] = np.maximum(meta[slot[found]], value[found])

    # without eviction an id whose whole window is taken by others has nowhere to go
    pending = np.concatenate(absent if evicting else absent[:-1])
    live = np.arange(pending.size)
    window = span(pending, 0, max_probe) if pending.size else None  # rows follow ``live``
    evicted: list[np.ndarray] = []
    while live.size:
        assert window is not None
        at_all = window[live]
        held = table[at_all]
        free = held == EMPTY
        stale = np.zeros_like(free)
        if evicting:
            assert meta is not None
            age = meta[at_all]
            stale = (age < eviction_threshold) & (age < value[pending[live], None])
        if evicting and eviction_policy == 1:  # LRU: the first empty slot, else the oldest expired
            oldest = np.where(stale, age, np.iinfo(age.dtype).max).argmin(1)
            pick = np.where(free.any(1), free.argmax(1), oldest)
            ok = free.any(1) | stale.any(1)
        else:  # the first slot that is empty or expired
            usable = free | stale
            pick, ok = usable.argmax(1), usable.any(1)
        live, pick = live[ok], pick[ok]
        if not live.size:
            break
        want = window[live, pick]
        who = pending[live]
        # a slot wanted by several goes to the id that comes first in the batch
        order = np.lexsort((first[who], want))
        won = np.zeros(want.size, dtype=bool)
        won[order[np.r_[True, want[order][1:] != want[order][:-1]]]] = True
        winners, at = who[won], want[won]
        evicted.append(at[table[at] != EMPTY])
        table[at] = ids[winners]
        slot[winners] = at
        if meta is not None:  # read now: not expired for the ids still probing
            meta[at] = np.maximum(meta[at], value[winners])
        live = live[~won]

    if not disable_fallback:
        slot = np.where(slot != EMPTY, slot, offset + home)
    evictions = np.unique(np.concatenate(evicted)) if evicted else np.empty(0, dtype=np.int64)
    return t(slot[inverse]), t(evictions)
