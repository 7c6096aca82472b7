"""CAFE (compression.methods.cafe): the HotSketch promotes ids that turn hot, demotes cold ones."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, compress, memory_report
from compression.methods.cafe import CafeConfig

TABLES = [EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=10_000, feature_names=["big"])]


def stream(hot: range, step: int, batch: int = 256) -> KeyedJaggedTensor:
    """Half the ids from ``hot``, half uniform over the table."""
    g = torch.Generator().manual_seed(step)
    hot_ids = torch.tensor(list(hot))[torch.randint(len(hot), (batch // 2,), generator=g)]
    cold = torch.randint(0, 10_000, (batch // 2,), generator=g)
    return KeyedJaggedTensor(keys=["big"], values=torch.cat([hot_ids, cold]), lengths=torch.ones(batch, dtype=torch.int64))


def exact(m, ids: list[int]) -> torch.Tensor:
    """Whether each id reads an exact slot (rows below K)."""
    k = m.shape["t_big"][0]
    x = KeyedJaggedTensor(keys=["big"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64))
    return m.rows(x) < k


def test_ids_that_turn_hot_are_promoted_and_those_that_cool_are_demoted():
    m = compress(TABLES, CafeConfig(budget=None, rows=500, hot_fraction=0.05, interval=10, decay=0.5), seed=0)
    assert m.shape["t_big"][0] == 25 and memory_report(m).bytes > 4 * 500 * 8  # the sketch is counted
    m.train()
    first, later = range(0, 20), range(5000, 5020)
    for step in range(30):
        m(stream(first, step))
    assert exact(m, list(first)).all()
    assert exact(m, list(range(1000, 1100))).float().mean() < 0.35  # cold ids mostly hashed
    for step in range(30, 90):  # the data drift: other ids are hot now
        m(stream(later, step))
    assert exact(m, list(later)).all()
    assert exact(m, list(first)).sum() <= 5  # 25 slots: the 20 ids hot now, at most 5 of the old
    m.eval()
    before = m.steps.clone(), m.keys.clone()
    m(stream(first, 999))
    assert torch.equal(m.steps, before[0]) and torch.equal(m.keys, before[1])  # evaluation reads only


def test_a_promoted_id_starts_from_the_hashed_row_it_read():
    m = compress(TABLES, CafeConfig(budget=None, rows=500, hot_fraction=0.1, interval=5), seed=0)
    probe = KeyedJaggedTensor(keys=["big"], values=torch.tensor([7]), lengths=torch.ones(1, dtype=torch.int64))
    m.eval()
    before = m(probe).values().clone()
    assert not exact(m, [7]).any()
    m.train()
    for step in range(4):
        m(stream(range(7, 8), step))
    assert not exact(m, [7]).any()  # not before the interval
    m(stream(range(7, 8), 4))
    m.eval()
    assert exact(m, [7]).all()
    torch.testing.assert_close(m(probe).values(), before)


def test_the_budget_counts_the_sketch_and_bad_values_are_refused():
    m = compress(TABLES, CafeConfig(budget=Budget(ratio=20)), seed=0)
    target = Budget(ratio=20).target_bytes(TABLES)
    assert 0.95 * target <= memory_report(m).bytes <= target
    k, rows, buckets = m.shape["t_big"]
    assert buckets * 4 >= 4 * k  # entries_per_hot entries per exact slot
    with pytest.raises(MethodConfigError, match=r"^cafe.hot_fraction: must be < 1, got 1"):
        CafeConfig(hot_fraction=1.0)


KERNEL_TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=5_000, feature_names=["a1", "a2"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=4, num_embeddings=800, feature_names=["b"]),
    EmbeddingBagConfig(name="t_c", embedding_dim=4, num_embeddings=6, feature_names=["c"]),  # stays exact
]


def drifting(g: torch.Generator, step: int) -> KeyedJaggedTensor:
    """Power-law ids (negative ones, -1 among them) whose hot set moves every 20 steps; bags of 0-2 ids."""
    keys = ["c", "b", "a2", "a1"]
    lengths = torch.randint(0, 3, (len(keys) * 32,), generator=g)
    ids = (torch.empty(int(lengths.sum())).exponential_(generator=g) ** 2 * 4).long() + (step // 20) * 300 - 2
    return KeyedJaggedTensor(keys=keys, values=ids, lengths=lengths)


def test_the_sketch_kernel_computes_what_the_torch_ops_compute(monkeypatch):
    from compression.methods import cafe

    k = cafe.hash_kernel()
    if k is None:
        pytest.skip("no C++ compiler: the kernel is not built here")
    config = CafeConfig(budget=None, rows=60, hot_fraction=0.2, entries_per_hot=2, slots=4, interval=3, decay=0.5)
    ours = compress(KERNEL_TABLES, config, seed=0)
    theirs = compress(KERNEL_TABLES, config, seed=0)
    theirs.load_state_dict(ours.state_dict())
    calls = {"sketch_count": 0, "sketch_rows": 0}

    class Counted:
        def __getattr__(self, name):
            calls[name] = calls.get(name, 0) + 1
            return getattr(k, name)

    g = torch.Generator().manual_seed(0)
    for step in range(100):
        training = step % 25 < 20
        ours.train(training), theirs.train(training)
        features = drifting(g, step)
        monkeypatch.setattr(cafe, "hash_kernel", lambda: Counted())
        got = ours(features).values()
        monkeypatch.setattr(cafe, "hash_kernel", lambda: None)
        want = theirs(features).values()
        assert torch.equal(got, want), step
        mine, other = ours.state_dict(), theirs.state_dict()
        assert all(torch.equal(v, other[name]) for name, v in mine.items()), step
    assert calls["sketch_count"] == 80 and calls["sketch_rows"] == 100
    assert (ours.keys >= 0).all() and (ours.slot >= 0).any()  # the sketches filled; ids were promoted
