import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression import Budget, MethodConfigError, compress, memory_report
from compression.methods.managed_collision import ManagedCollisionConfig, mch_bytes

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=4, num_embeddings=100_000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=4, num_embeddings=6, feature_names=["tiny"]),
]


def kjt(big, tiny=None) -> KeyedJaggedTensor:
    tiny = tiny if tiny is not None else [0] * len(big)
    return KeyedJaggedTensor(keys=["big", "tiny"], values=torch.tensor(big + tiny), lengths=torch.ones(2 * len(big), dtype=torch.int32))


def build(zch_size=8, interval=1):
    return compress(TABLES, ManagedCollisionConfig(budget=None, zch_size=zch_size, eviction_interval=interval), seed=0)


def slots(m, ids):
    return m.slot_of("big", torch.tensor(ids)).tolist()


def test_seen_ids_get_stable_distinct_rows():
    m = build()
    m.train()
    seen = [11, -5, 2**40, 99_999]
    m(kjt(seen))
    first = slots(m, seen)
    assert len(set(first)) == 4 and all(0 <= s < 7 for s in first)  # row 7 is the fallback
    m(kjt(seen))  # seen again: same rows
    assert slots(m, seen) == first
    m.eval()
    out = m(kjt(seen)).to_dict()["big"]
    torch.testing.assert_close(out, m.mc_tables.embedding_bags["t_big"].weight[first])


def test_unseen_ids_read_the_fallback_row_in_eval():
    m = build()
    m.train()
    m(kjt([1, 2, 3]))
    m.eval()
    assert slots(m, [4, 5, -1]) == [7, 7, 7]
    out = m(kjt([4, 5, 1])).to_dict()["big"]
    fallback = m.mc_tables.embedding_bags["t_big"].weight[7]
    torch.testing.assert_close(out[0], fallback)
    torch.testing.assert_close(out[1], fallback)
    assert not torch.equal(out[2], fallback)
    # eval never changes the mapping
    m(kjt([4, 4, 4]))
    assert slots(m, [4]) == [7]


def test_lfu_eviction_remaps_and_reinitialises():
    m = build(zch_size=4)  # 3 slots for ids + the fallback
    m.train()
    m(kjt([1, 2, 3, 1, 2, 1]))  # counts: 1 -> 3, 2 -> 2, 3 -> 1
    before = dict(zip([1, 2, 3], slots(m, [1, 2, 3])))
    assert 7 not in before.values() and sorted(before.values()) == [0, 1, 2]
    weight = m.mc_tables.embedding_bags["t_big"].weight
    old_row = weight[before[3]].detach().clone()
    m(kjt([9, 9, 9, 9, 1, 2]))  # 9 seen 4 times beats 3 (count 1); 1 and 2 keep their rows
    after = dict(zip([1, 2, 3, 9], slots(m, [1, 2, 3, 9])))
    assert after[1] == before[1] and after[2] == before[2]
    assert after[9] == before[3] and after[3] == 3  # 9 took 3's row; 3 now reads the fallback
    assert not torch.equal(weight[after[9]].detach(), old_row)  # the evicted row was re-drawn
    bound = (1 / 4) ** 0.5  # TorchRec's init for a 4-row table
    assert weight[after[9]].abs().max() <= bound


def test_eviction_waits_for_the_interval():
    m = build(interval=2)
    m.train()
    m(kjt([1, 2]))
    assert slots(m, [1, 2]) == [7, 7]  # counted, not yet inserted
    m(kjt([3, 3]))
    got = slots(m, [1, 2, 3])
    assert len(set(got)) == 3 and 7 not in got


def test_budget_counts_the_mc_buffers():
    per_slot, per_table = mch_bytes()
    assert per_slot == 24 and per_table >= 8 * 1025  # three int64 per slot, TorchRec's segment buffer
    m = compress(TABLES, ManagedCollisionConfig(budget=Budget(ratio=10)))
    z = m.describe()["t_big.zch_size"]
    assert m.describe()["t_tiny.zch_size"] == "exact"
    report = memory_report(m)
    table_bytes = (z + 6) * 4 * 4
    assert report.bytes == table_bytes + z * per_slot + per_table + m.hasher.coeffs.numel() * 8 + m.params.table.numel() * 8
    assert 0.95 * report.uncompressed_bytes / 10 <= report.bytes <= report.uncompressed_bytes / 10


def test_returns_a_keyed_tensor_and_folds_exact_tables():
    m = build()
    m.eval()
    out = m(kjt([1, 2], [5, 6]))
    assert isinstance(out, KeyedTensor) and out.keys() == ["big", "tiny"]
    weight = m.exact_ebc.embedding_bags["t_tiny"].weight
    folded = m.hasher(torch.tensor([6]), 6, which=0).item()
    torch.testing.assert_close(out.to_dict()["tiny"][1], weight[folded])


def test_key_order_may_change_between_batches():
    m = build()
    m.train()
    m(kjt([1, 2]))
    swapped = KeyedJaggedTensor(keys=["tiny", "big"], values=torch.tensor([0, 0, 1, 2]), lengths=torch.ones(4, dtype=torch.int32))
    m.eval()
    a, b = m(kjt([1, 2])).to_dict(), m(swapped).to_dict()
    torch.testing.assert_close(a["big"], b["big"])


def test_the_empty_slot_marker_is_not_an_id():
    m = build()
    m.train()
    m(kjt([2**63 - 1, 2**63 - 1]))
    assert slots(m, [2**63 - 2]) == slots(m, [2**63 - 1]) != [7]


def test_bad_configs():
    with pytest.raises(ValueError, match="either a budget or zch_size"):
        compress(TABLES, ManagedCollisionConfig(zch_size=10))


@pytest.mark.parametrize("kwargs, key", [
    ({"eviction_interval": 0}, "managed_collision.eviction_interval: must be >= 1, got 0"),
    ({"budget_precision": "int4"}, "managed_collision.budget_precision: must be one of deployed, fp32, got 'int4'"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        ManagedCollisionConfig(**kwargs)
    assert str(e.value) == key


@pytest.mark.parametrize("zch, interval", [(40, 1), (97, 3), (400, 1)])
def test_the_steady_shortcut_computes_what_torchrec_computes(zch, interval):
    """``SteadyMCH`` against TorchRec's own ``MCHManagedCollisionModule``, built alike and fed
    the same power-law id stream: the same slots for every id and the same buffers (ids,
    slots, LFU counts) after every step, through steps that evict and steps that cannot."""
    from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from compression.methods.managed_collision import SteadyMCH

    def build(cls):
        return cls(zch_size=zch, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(),
                   eviction_interval=interval, name="t")  # fmt: skip

    ours, theirs = build(SteadyMCH), build(MCHManagedCollisionModule)
    ours.train(), theirs.train()
    g = torch.Generator().manual_seed(zch)
    steady = changed = 0
    for step in range(300):
        ids = (torch.empty(64).exponential_(generator=g) ** 3 * 7).long() + (step // 50) * 1000
        features = {"f": JaggedTensor(values=ids, lengths=torch.ones(64, dtype=torch.int32))}
        before = theirs._mch_sorted_raw_ids.clone()
        got, want = ours(dict(features)), theirs(dict(features))
        assert torch.equal(got["f"].values(), want["f"].values()), step
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), (step, name)
        if (step + 1) % interval == 0:
            same = torch.equal(before, theirs._mch_sorted_raw_ids)
            steady, changed = steady + same, changed + (not same)
    assert steady > 50 and changed > 10, (steady, changed)  # both kinds of step were met
