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
    size = torch.zeros_like(ids).scatter_(0, inverse, local_sizes)
    offset = torch.zeros_like(ids).scatter_(0, inverse, offsets)
    home = home_slots(ids, identities, size, offset) - offset

    def span(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The slots at probes [lo, hi) of the ids ``rows``."""
        return offset[rows, None] + (home[rows, None] + torch.arange(lo, hi)) % size[rows, None]

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

    # Ids already in: an id never sits past an empty slot of its window (slots are only
    # ever taken or replaced), so the scan of an id stops at its own slot or an empty one,
    # a few probes in for most; the window is read in growing chunks.
    slot = torch.full_like(ids, EMPTY)
    scanning, absent, lo, width = torch.arange(ids.numel()), [], 0, 4
    while scanning.numel() and lo < max_probe:
        hi = min(lo + width, max_probe)
        at = span(scanning, lo, hi)
        held = table[at]
        present = held == ids[scanning, None]
        hit = present.any(1)
        slot[scanning[hit]] = at[hit, present[hit].int().argmax(1)]
        ended = ~hit & (held == EMPTY).any(1)
        absent.append(scanning[ended])
        scanning = scanning[~hit & ~ended]
        lo, width = hi, width * 4
    absent.append(scanning)  # whole windows of others
    found = slot != EMPTY
    if meta is not None:
        assert value is not None
        meta[slot[found]] = torch.maximum(meta[slot[found]], value[found])
    pending = torch.cat(absent)
    window = span(pending, 0, max_probe)  # [pending, max_probe]; rows follow ``live``
    live = torch.arange(pending.numel())
    first = torch.full((ids.numel(),), n, dtype=torch.int64).scatter_reduce_(
        0, inverse, torch.arange(n), "amin"
    )
    evicted: list[torch.Tensor] = []
    while live.numel():
        at_all = window[live]
        held = table[at_all]
        free = held == EMPTY
        stale = torch.zeros_like(free)
        if evicting:
            assert meta is not None and value is not None
            age = meta[at_all]
            stale = (age < eviction_threshold) & (age < value[pending[live], None])
        if evicting and eviction_policy == 1:  # LRU: the first empty slot, else the oldest expired
            oldest = torch.where(stale, age, torch.iinfo(age.dtype).max).argmin(1)
            pick = torch.where(free.any(1), free.int().argmax(1), oldest)
            ok = free.any(1) | stale.any(1)
        else:  # the first slot that is empty or expired
            usable = free | stale
            pick, ok = usable.int().argmax(1), usable.any(1)
        live, pick = live[ok], pick[ok]
        if not live.numel():
            break
        want = window[live, pick]
        who = pending[live]
        # a slot wanted by several goes to the id that comes first in the batch
        wanted, which = torch.unique(want, return_inverse=True)
        best = torch.full((wanted.numel(),), n, dtype=torch.int64).scatter_reduce_(
            0, which, first[who], "amin"
        )
        won = first[who] == best[which]
        winners, at = who[won], want[won]
        replaced = table[at] != EMPTY
        evicted.append(at[replaced])
        table[at] = ids[winners]
        slot[winners] = at
        if meta is not None:  # read now: not expired for the ids still probing
            assert value is not None
            meta[at] = torch.maximum(meta[at], value[winners])
        live = live[~won]

    got = slot != EMPTY
    if disable_fallback:
        out = slot
    else:
        out = torch.where(got, slot, offset + home)
    evictions = torch.unique(torch.cat(evicted)) if evicted else torch.empty(0, dtype=torch.int64)
    return out[inverse], evictions
