"""AutoSrh's selection maths: frequency groups, and which (group, block) entries to keep.

Pure functions of counts, scores and byte counts (no module state), used by
``compression.methods.autosrh`` (Kong et al., "AutoSrh", TKDE 2022):

- ``frequency_groups``: the ids of a field ranked by train count (ties by id) and cut
  into G groups of consecutive ranks of geometrically growing size (1 : 2 : 4 : ...),
  the most frequent ids the smallest group;
- ``table_segments``: the deployed segments (``compression.segments``) of a field whose
  groups keep given blocks of dims;
- ``choose_entries``: under a byte target, the entries of least score pruned until the
  deployed form fits, the pruned ones that still fit given back (highest score first),
  then the bytes left given to the first r ids of one group for one block more, so the
  total lands within ``BUDGET_TOLERANCE`` of the target; without one, the entries scoring
  at least ``threshold`` times their field's best. Every field keeps its best block of
  its most frequent group.

Example::

    rank, starts = frequency_groups(counts, rows=1000, groups=4)   # starts: [0, 66, 199, 465]
    segments = choose_entries(tables, scores, {"t": starts}, set(), TableFormat(), target=50_000)
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression.budget import BUDGET_TOLERANCE, BudgetError
from compression.deployed import TableFormat
from compression.segments import Segment, pack_unit, segment_bytes

Entry = tuple[int, int]  # (group, block)


def frequency_groups(counts: np.ndarray, rows: int, groups: int) -> tuple[np.ndarray, list[int]]:
    """(rank of every id by descending count, ties by id; the first rank of each group),
    groups of geometrically growing size, the most frequent the smallest."""
    c = np.zeros(rows, dtype=np.float64)
    k = min(rows, len(counts))
    c[:k] = np.asarray(counts, dtype=np.float64)[:k]
    order = np.argsort(-c, kind="stable")
    rank = np.empty(rows, dtype=np.int64)
    rank[order] = np.arange(rows)
    g = max(1, min(groups, rows))
    w = 2.0 ** np.arange(g)
    sizes = np.maximum(1, np.floor(rows * w / w.sum())).astype(np.int64)
    sizes[-1] = rows - sizes[:-1].sum()
    while sizes[-1] < 1:  # tiny tables: take rows back from the largest earlier group
        j = int(np.argmax(sizes[:-1]))
        sizes[j] -= 1
        sizes[-1] += 1
    return rank, [0, *np.cumsum(sizes)[:-1].tolist()]


def table_segments(rows: int, starts: list[int], kept: np.ndarray, unit: int,
                   split: Optional[tuple[int, int, int]] = None) -> list[Segment]:
    """Segments of a field whose group g keeps the blocks ``kept[g]``; ``split`` (g, block,
    r): the first r ids of group g keep that block too."""
    stops = [*starts[1:], rows]
    out = []
    for g, (a, b) in enumerate(zip(starts, stops)):
        dims = tuple(c for blk in np.flatnonzero(kept[g]) for c in range(int(blk) * unit, (int(blk) + 1) * unit))
        if split is not None and split[0] == g and 0 < split[2] < b - a:
            more = tuple(sorted(set(dims) | set(range(split[1] * unit, (split[1] + 1) * unit))))
            out += [Segment(a, a + split[2], more), Segment(a + split[2], b, dims)]
        else:
            out.append(Segment(a, b, dims))
    return out


def choose_entries(
    tables: list[EmbeddingBagConfig],
    scores: dict[str, np.ndarray],
    starts: dict[str, list[int]],
    remapped: set[str],
    fmt: TableFormat,
    target: Optional[int],
    threshold: float = 0.0,
) -> dict[str, list[Segment]]:
    """Each field's segments: the entries (group, block) kept by score, under ``target``
    bytes pruned least-score first, then topped up (see the module docstring)."""
    unit = pack_unit(fmt)
    by = {t.name: t for t in tables}
    kept = {t: np.ones_like(s, dtype=bool) for t, s in scores.items()}
    must = {t: (0, int(np.argmax(s[0]))) for t, s in scores.items()}
    split: dict[str, Optional[tuple[int, int, int]]] = {t: None for t in scores}

    def cost(t: str) -> int:
        segs = table_segments(by[t].num_embeddings, starts[t], kept[t], unit, split[t])
        return segment_bytes([by[t]], {t: segs}, remapped & {t}, fmt) - fmt.collection([by[t]])

    def segments() -> dict[str, list[Segment]]:
        return {t: table_segments(by[t].num_embeddings, starts[t], kept[t], unit, split[t]) for t in scores}

    if target is None:
        for t, s in scores.items():
            kept[t] = s >= threshold * s.max()
            kept[t][must[t]] = True
        return segments()
    fixed = fmt.collection(tables)
    costs = {t: cost(t) for t in scores}
    entries = sorted(((float(s[g, b]), t, g, b) for t, s in scores.items() for g in range(s.shape[0]) for b in range(s.shape[1])))
    removed = []
    for score, t, g, b in entries:
        if fixed + sum(costs.values()) <= target:
            break
        if (g, b) == must[t]:
            continue
        kept[t][g, b] = False
        costs[t] = cost(t)
        removed.append((score, t, g, b))
    if fixed + sum(costs.values()) > target:  # pragma: no cover - refused when built
        raise BudgetError(f"autosrh cannot reach {target} bytes with one block per field")
    removed.sort(reverse=True)
    back = []
    for e in removed:  # give back what still fits, highest score first
        _, t, g, b = e
        kept[t][g, b] = True
        new = cost(t)
        if fixed + sum(costs.values()) - costs[t] + new <= target:
            costs[t] = new
            back.append(e)
        else:
            kept[t][g, b] = False
    removed = [e for e in removed if e not in back]
    best: Optional[tuple[int, str, tuple[int, int, int]]] = None
    for _, t, g, b in removed:  # the bytes left: the first r ids of one group get one block more
        rows = (starts[t][g + 1] if g + 1 < len(starts[t]) else by[t].num_embeddings) - starts[t][g]
        room = target - fixed - sum(costs.values()) + costs[t]
        lo, hi = 0, rows - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            split[t] = (g, b, mid)
            lo, hi = (mid, hi) if cost(t) <= room else (lo, mid - 1)
        split[t] = (g, b, lo) if lo else None
        total = fixed + sum(costs.values()) - costs[t] + cost(t)
        split[t] = None
        if lo and (best is None or total > best[0]):
            best = (total, t, (g, b, lo))
        if best is not None and best[0] >= (1 - BUDGET_TOLERANCE / 5) * target:
            break
    if best is not None and best[0] > fixed + sum(costs.values()):
        split[best[1]] = best[2]
        costs[best[1]] = cost(best[1])
    total = fixed + sum(costs.values())
    if total < (1 - BUDGET_TOLERANCE) * target:
        raise BudgetError(f"autosrh cannot land within {BUDGET_TOLERANCE:.0%} of {target} bytes: with every entry that "
                          f"fits it holds {total} bytes")  # fmt: skip
    return segments()
