import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.mc_modules import ManagedCollisionCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, compress, memory_report
from compression.methods.managed_collision import kernel
from compression.methods.mpzch import MpzchConfig, slot_module, zch_bytes, zch_forward
from compression.zch_cpu import home_slots, zero_collision_hash_insert

TABLES = [
    EmbeddingBagConfig(
        name="t_big", embedding_dim=4, num_embeddings=100_000, feature_names=["big"]
    ),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=4, num_embeddings=6, feature_names=["tiny"]),
]


def kjt(big) -> KeyedJaggedTensor:
    tiny = [0] * len(big)
    return KeyedJaggedTensor(
        keys=["big", "tiny"],
        values=torch.tensor(big + tiny),
        lengths=torch.ones(2 * len(big), dtype=torch.int32),
    )


@pytest.fixture(params=["kernel", "torchrec"])
def remap_by(request, monkeypatch):
    """Each test of a collection without eviction twice: its remap through the kernel, and
    through TorchRec's modules as a machine without a compiler runs it."""
    if request.param == "torchrec":
        monkeypatch.setattr("compression.methods.mpzch.kernel", lambda: None)
    elif kernel() is None:
        pytest.skip("no C++ compiler: the kernel is not built here")
    return request.param


def build(zch_size=8, **kw):
    return compress(TABLES, MpzchConfig(budget=None, zch_size=zch_size, **kw), seed=0)


def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(h):
    h = (h ^ (h >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
    h = (h ^ (h >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def murmur_home(ids, size):
    """MurmurHash3 x64 (one 16-byte block: the id and 0, seed 0) mod ``size``, in NumPy:
    the home slot FBGEMM's kernels give an id (written here from the hash's definition)."""
    k1 = ids.numpy().astype(np.int64).view(np.uint64)
    c1, c2 = np.uint64(0x87C37B91114253D5), np.uint64(0x4CF5AD432745937F)
    with np.errstate(over="ignore"):
        h1 = _rotl(_rotl(k1 * c1, 31) * c2, 27)  # seed 0: h1 = h2 = 0; y = 0 leaves h2 alone
        h1 = h1 * np.uint64(5) + np.uint64(0x52DCE729)
        h2 = h1 * np.uint64(5) + np.uint64(0x38495AB5)  # h2 = rotl(0 ^ k2(0), 31) + h1 = h1
        h1, h2 = h1 ^ np.uint64(16), h2 ^ np.uint64(16)
        h1 = h1 + h2
        h2 = h2 + h1
        h1, h2 = _fmix(h1), _fmix(h2)
        h1 = h1 + h2
        h2 = h2 + h1
    return torch.from_numpy(((h1 ^ h2) % np.uint64(size)).astype(np.int64))


def fbgemm_lookup(ids, identities, max_probe):
    """FBGEMM's own CPU kernel (lookup only)."""
    out, _ = torch.ops.fbgemm.zero_collision_hash(
        input=ids, identities=identities, max_probe=max_probe, circular_probe=True, readonly=True
    )
    return out


def test_home_slot_is_fbgemms_hash():
    # on an empty table FBGEMM's lookup misses every probe and returns the home slot
    ids = torch.cat([torch.randint(-(2**62), 2**62, (3000,)), torch.tensor([0, 1, -2, 2**63 - 1])])
    for size in (1, 7, 1000, 2**20 + 3):
        empty = torch.full((size, 1), -1, dtype=torch.int64)
        assert torch.equal(murmur_home(ids, size), fbgemm_lookup(ids, empty, 2))
        sizes, zero = torch.full_like(ids, size), torch.zeros_like(ids)
        assert torch.equal(home_slots(ids, empty, sizes, zero), murmur_home(ids, size))


@pytest.mark.parametrize("policy", [None, 0, 1])  # no eviction, TTL, LRU
@pytest.mark.parametrize("size,probe", [(64, 8), (64, 1), (300, 128)])
def test_inserts_are_collision_free_and_found_by_fbgemm(size, probe, policy):
    table = torch.full((size, 1), -1, dtype=torch.int64)
    ids = torch.randint(0, 10**12, (200,))
    batch = torch.cat([ids, ids[:50]])  # repeated ids in one batch
    meta = None if policy is None else torch.full((size, 1), -1, dtype=torch.int32)
    now = None if policy is None else torch.full_like(batch, 5, dtype=torch.int32)
    args = (
        (meta, now, -1, 0) if policy is None else (meta, now, 5, policy)
    )  # ids of one batch never expire
    out, evicted = zero_collision_hash_insert(batch, table, probe, None, None, *args, False)
    assert evicted.numel() == 0
    assert torch.equal(out[200:], out[:50])  # an id reads one slot
    slot = out[:200]
    won = table.view(-1)[slot] == ids
    assert won.any()
    assert torch.equal(
        torch.unique(table[table != -1]).sort().values, torch.unique(ids[won]).sort().values
    )
    assert len(set(slot[won].tolist())) == int(won.sum())  # no two winners share a slot
    home = murmur_home(ids, size)
    assert (((slot - home) % size) < probe)[won].all()  # within the window
    assert torch.equal(slot[~won], home[~won])  # the others fall back to their home slot
    for i in (~won).nonzero().flatten().tolist():  # ...because their whole window was taken
        window = (home[i] + torch.arange(probe)) % size
        assert (table.view(-1)[window] != -1).all()
    assert torch.equal(fbgemm_lookup(ids, table, probe)[won], slot[won])
    # a second batch of the same ids changes nothing
    again, _ = zero_collision_hash_insert(
        ids, table.clone(), probe, None, None, None, None, -1, 0, False
    )
    assert torch.equal(again[won], slot[won])


def test_first_in_batch_wins_a_contested_slot():
    size = 16
    ids = torch.arange(1, 400)
    home = murmur_home(ids, size)
    a, b = ids[home == 5][:2].tolist()  # two ids with one home slot
    table = torch.full((size, 1), -1, dtype=torch.int64)
    out, _ = zero_collision_hash_insert(
        torch.tensor([b, a]), table, 4, None, None, None, None, -1, 0, False
    )
    assert out.tolist() == [5, 6]  # b came first: it keeps the home slot, a probes on


def test_ttl_eviction_in_training_steps_redraws_rows():
    m = build(zch_size=4, max_probe=4, eviction="ttl", ttl_steps=2)
    m.train()
    old = [1, 2, 3, 4]
    m(kjt(old))
    first = m.slot_of("big", torch.tensor(old)).tolist()
    assert sorted(first) == [0, 1, 2, 3]
    weight = m.mc_tables.embedding_bags["t_big"].weight
    rows = weight.detach().clone()
    m(kjt([1]))  # step 2: id 1 read again
    m(kjt([1]))  # step 3
    m(kjt([9]))  # step 4: 2, 3, 4 unread since step 1 (more than 2 steps): 9 may take one
    nine = m.slot_of("big", torch.tensor([9])).item()
    assert nine in first[1:]  # not id 1's slot, read at step 3
    assert m.slot_of("big", torch.tensor([1])).item() == first[0]
    assert not torch.equal(weight[nine].detach(), rows[nine])  # the evicted row was re-drawn
    assert torch.equal(weight[first[0]].detach(), rows[first[0]])
    # the step clock is state: saved and loaded
    state = m.state_dict()
    assert (
        int(state["mc_ebc._managed_collision_collection._managed_collision_modules.t_big._steps"])
        == 4
    )
    m2 = build(zch_size=4, max_probe=4, eviction="ttl", ttl_steps=2)
    m2.load_state_dict(state)
    m2.eval()
    assert torch.equal(
        m2.slot_of("big", torch.tensor(old + [9])), m.slot_of("big", torch.tensor(old + [9]))
    )


def test_lru_takes_the_least_recently_read_expired_slot():
    size = 4
    table = torch.full((size, 1), -1, dtype=torch.int64)
    meta = torch.full((size, 1), -1, dtype=torch.int32)
    ids = torch.arange(10, 14)
    times = torch.tensor([5, 3, 7, 4], dtype=torch.int32)
    for i, t in zip(ids.tolist(), times.tolist()):
        zero_collision_hash_insert(
            torch.tensor([i]),
            table,
            size,
            None,
            None,
            meta,
            torch.tensor([t], dtype=torch.int32),
            0,
            1,
            False,
        )
    oldest = int(table.view(-1)[meta.view(-1).argmin()])
    assert oldest == 11
    new = torch.tensor([99])
    out, evicted = zero_collision_hash_insert(
        new, table, size, None, None, meta, torch.tensor([20], dtype=torch.int32), 6, 1, False
    )
    assert evicted.tolist() == out.tolist() and table.view(-1)[out].tolist() == [99]
    assert 11 not in table.view(-1).tolist()  # the oldest (read at 3) went, not the first expired
    # TTL (policy 0) takes the first expired slot of the window instead
    table2 = table.clone()
    meta2 = meta.clone()
    h = int(murmur_home(torch.tensor([77]), size))
    first_expired = next((h + p) % size for p in range(size) if meta2.view(-1)[(h + p) % size] < 6)
    out2, _ = zero_collision_hash_insert(
        torch.tensor([77]),
        table2,
        size,
        None,
        None,
        meta2,
        torch.tensor([20], dtype=torch.int32),
        6,
        0,
        False,
    )
    assert out2.item() == first_expired


def test_without_eviction_a_full_window_shares_the_home_row(remap_by):
    m = build(zch_size=3, max_probe=3, eviction="none")
    m.train()
    m(kjt([1, 2, 3]))
    m(kjt([4]))  # no free slot: 4 reads its home slot's row
    home = murmur_home(torch.tensor([4]), 3).item()
    assert m.slot_of("big", torch.tensor([4])).item() == home
    assert sorted(m.slot_of("big", torch.tensor([1, 2, 3])).tolist()) == [0, 1, 2]


def test_eval_never_inserts_and_matches_training_slots(remap_by):
    m = build(zch_size=16)
    m.train()
    seen = [11, -5, 2**40, 99_999, -1]
    m(kjt(seen))
    slots = m.slot_of("big", torch.tensor(seen))
    assert len(set(slots[:4].tolist())) == 4
    assert slots[4].item() == m.slot_of("big", torch.tensor([-2])).item()  # -1 reads as -2
    m.eval()
    before = m.state_dict()
    out = m(kjt(seen)).to_dict()["big"]
    torch.testing.assert_close(out[:4], m.mc_tables.embedding_bags["t_big"].weight[slots[:4]])
    m(kjt([123, 456]))  # unseen in eval: looked up, not inserted
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_bytes_are_counted_from_the_tensors():
    m = compress(TABLES, MpzchConfig(budget=Budget(ratio=20), eviction="lru"), seed=0)
    report = memory_report(m)
    per_slot, per_table = zch_bytes("lru")
    assert per_slot == 8 + 4  # int64 identity and int32 time of last read
    assert zch_bytes("none")[0] == 8
    z = m.mc_tables.embedding_bags["t_big"].weight.shape[0]
    table_bytes = (z + 6) * 4 * 4
    assert (
        report.bytes
        == table_bytes
        + z * per_slot
        + per_table
        + m.hasher.coeffs.numel() * 8
        + m.params.table.numel() * 8
    )
    assert 0.95 * report.uncompressed_bytes / 20 <= report.bytes <= report.uncompressed_bytes / 20


def test_a_full_table_only_looks_up_until_a_load_empties_it(remap_by):
    m = build(zch_size=3, max_probe=3, eviction="none")
    m.train()
    empty = {k: v.clone() for k, v in m.state_dict().items()}
    m(kjt([1, 2, 3]))
    m(kjt([4, 1]))  # full: FBGEMM's lookup, 4 at its home slot's row
    home = murmur_home(torch.tensor([4]), 3).item()
    assert m.slot_of("big", torch.tensor([4, 1])).tolist() == [home, m.slot_of("big", torch.tensor([1])).item()]
    table = m.mcc._managed_collision_modules["t_big"]._hash_zch_identities
    assert sorted(table.view(-1).tolist()) == [1, 2, 3]
    m.load_state_dict(empty)
    m(kjt([4]))
    assert table.view(-1)[m.slot_of("big", torch.tensor([4]))].tolist() == [4]  # placed again


# The MPZCH kernel (``mc_cpu.cpp``'s ``zch_remap``) against TorchRec's forward of the same
# modules: a table of two features, one of fewer slots than its window
KERNEL_TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=40, feature_names=["a1", "a2"]),
    EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=97, feature_names=["b"]),
    EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=3, feature_names=["c"]),
]
KERNEL_KEYS = ["x", "b", "a2", "c", "a1"]  # another order than the MCC's, and a key it does not map


def zch_collection(**kw) -> ManagedCollisionCollection:
    config = MpzchConfig(**kw)
    modules = {t.name: slot_module(t.num_embeddings, config, torch.device("cpu"), t.name) for t in KERNEL_TABLES}
    return ManagedCollisionCollection(modules, KERNEL_TABLES)


def zch_batch(g: torch.Generator, step: int, size: int) -> KeyedJaggedTensor:
    """Power-law ids (-1 among them) whose hot set moves every 30 steps; bags of 0 to 2 ids."""
    lengths = torch.randint(0, 3, (len(KERNEL_KEYS) * size,), generator=g, dtype=torch.int32)
    ids = (torch.empty(int(lengths.sum())).exponential_(generator=g) ** 3 * 5).long() + (step // 30) * 1000 - 1
    return KeyedJaggedTensor(keys=KERNEL_KEYS, values=ids, lengths=lengths)


def zch_state(mcc: ManagedCollisionCollection) -> list:
    return [(k, v.tolist()) for k, v in mcc.state_dict().items()]


def needs_kernel() -> None:
    if kernel() is None:
        pytest.skip("no C++ compiler: the kernel is not built here")


def evicted(mcc: ManagedCollisionCollection) -> dict:
    return {k: None if v is None else v.tolist() for k, v in mcc.evict().items()}


@pytest.mark.parametrize("probe,eviction", [(128, "none"), (4, "none"), (4, "ttl"), (4, "lru"), (128, "lru")])
def test_the_kernel_remaps_inserts_and_evicts_as_torchrec(probe, eviction):
    needs_kernel()
    ours = zch_collection(max_probe=probe, eviction=eviction, ttl_steps=3)
    theirs = zch_collection(max_probe=probe, eviction=eviction, ttl_steps=3)  # (a copy's clock would read ours)
    torchrec_calls: list[int] = []
    ours.register_forward_pre_hook(lambda *_: torchrec_calls.append(1))
    g = torch.Generator().manual_seed(probe)
    filled, evictions = set(), 0
    for step in range(120):
        training = step % 25 < 20  # some steps in eval: lookups only
        ours.train(training), theirs.train(training)
        features = zch_batch(g, step, 8 + step % 13)
        got, want = zch_forward(ours, features), theirs(features)
        assert got.keys() == want.keys(), step
        assert torch.equal(got.values(), want.values()) and torch.equal(got.lengths(), want.lengths()), step
        assert zch_state(ours) == zch_state(theirs), step
        for m, other in zip(ours._managed_collision_modules.values(), theirs._managed_collision_modules.values()):
            assert (m._hash_zch_metadata is None) == (eviction == "none"), step
            assert eviction == "none" or torch.equal(m._hash_zch_metadata, other._hash_zch_metadata), step
        slots = evicted(ours)
        assert slots == evicted(theirs), step
        evictions += sum(bool(v) for v in slots.values())
        filled |= {n for n, m in ours._managed_collision_modules.items() if (m._hash_zch_identities != -1).all()}
    assert torchrec_calls == []
    # without eviction every table filled up on the way (inserts and full windows met); with it,
    # expired slots were taken
    assert filled == {"a", "b", "c"} if eviction == "none" else evictions > 20
    assert eviction != "none" or evictions == 0
    assert int(ours._managed_collision_modules["a"]._steps) == 100  # training steps only


def test_the_kernel_gives_a_contested_slot_as_torchrec_does():
    """Ids p and q share a home slot and r's home is the next one: p takes the home, q loses it
    to p and, in the next round, also the slot r took in the first round."""
    needs_kernel()
    size = KERNEL_TABLES[1].num_embeddings
    ids = torch.arange(1, 5000)
    home = murmur_home(ids, size)
    h = next(s for s in range(size - 1) if (home == s).sum() >= 2 and (home == s + 1).any())
    p, q = ids[home == h][:2].tolist()
    r = ids[home == h + 1][0].item()
    ours, theirs = zch_collection(), zch_collection()
    lengths = torch.tensor([0, 0, 0, 1, 1, 1] + [0] * 9, dtype=torch.int32)  # three bags a key, ids in b's only
    features = KeyedJaggedTensor(keys=["x", "b", "a2", "c", "a1"], values=torch.tensor([p, q, r]), lengths=lengths)
    got = zch_forward(ours, features)
    assert got.values().tolist() == [h, h + 2, h + 1] == theirs(features).values().tolist()


def test_the_kernel_leaves_weighted_ids_to_torchrec():
    needs_kernel()
    ours = zch_collection(max_probe=4, eviction="lru", ttl_steps=2)
    theirs = zch_collection(max_probe=4, eviction="lru", ttl_steps=2)
    calls: list[int] = []
    ours.register_forward_pre_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        features = zch_batch(g, step, 8)
        if step in (4, 9):  # weighted ids, in training and in eval
            ours.train(step == 4), theirs.train(step == 4)
            features = KeyedJaggedTensor(keys=KERNEL_KEYS, values=features.values(), lengths=features.lengths(),
                                         weights=torch.ones(features.values().numel()))  # fmt: skip
        assert torch.equal(zch_forward(ours, features).values(), theirs(features).values()), step
        assert zch_state(ours) == zch_state(theirs) and evicted(ours) == evicted(theirs), step
        ours.train(), theirs.train()
    assert len(calls) == 2
    features = zch_batch(g, 12, 8)  # kernels off: TorchRec's forward
    assert torch.equal(zch_forward(ours, features, use_kernel=False).values(), theirs(features).values())
    assert len(calls) == 3


def test_the_collection_remaps_through_the_kernel_and_its_rows_learn():
    needs_kernel()
    m = build(zch_size=8)
    m.train()
    calls: list[int] = []
    m.mcc.register_forward_pre_hook(lambda *_: calls.append(1))
    out = m(kjt([5, 6, 7]))
    out.values().sum().backward()
    assert calls == []
    slots = m.slot_of("big", torch.tensor([5, 6, 7]))
    grad = m.mc_tables.embedding_bags["t_big"].weight.grad
    assert len(set(slots.tolist())) == 3 and (grad[slots] != 0).all()
