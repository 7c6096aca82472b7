"""The managed-collision kernel (``mc_cpu.cpp``) against TorchRec's ``ManagedCollisionCollection``
forward: the same remapped ids, evictions, LFU counts, history and step counts, step after step."""

import copy

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.mc_modules import LFU_EvictionPolicy, ManagedCollisionCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression.methods.managed_collision import SteadyMCH, kernel, mcc_forward

# a table of two features, and slot counts small enough that the stream keeps evicting
TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=40, feature_names=["a1", "a2"]),
    EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=97, feature_names=["b"]),
    EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=2, feature_names=["c"]),
]
KEYS = ["x", "b", "a2", "c", "a1"]  # another order than the MCC's, and a key it does not map


def collection(interval: int) -> ManagedCollisionCollection:
    modules = {t.name: SteadyMCH(zch_size=t.num_embeddings, device=torch.device("cpu"),
                                 eviction_policy=LFU_EvictionPolicy(), eviction_interval=interval, name=t.name)
               for t in TABLES}  # fmt: skip
    return ManagedCollisionCollection(modules, TABLES)


def batch(g: torch.Generator, step: int, size: int) -> KeyedJaggedTensor:
    """Power-law ids whose hot set moves every 40 steps; bags of 0 to 2 ids."""
    lengths = torch.randint(0, 3, (len(KEYS) * size,), generator=g, dtype=torch.int32)
    n = int(lengths.sum())
    ids = (torch.empty(n).exponential_(generator=g) ** 3 * 5).long() + (step // 40) * 1000
    return KeyedJaggedTensor(keys=KEYS, values=ids, lengths=lengths)


def state(mcc: ManagedCollisionCollection) -> list:
    out = []
    for name, m in mcc._managed_collision_modules.items():
        off = m._current_history_buffer_offset
        out.append((name, m._current_iter, m._last_eviction_iter, off, m._history_accumulator[:off].tolist()))
        out.extend((name, k, v.tolist()) for k, v in m.state_dict().items())
    return out


@pytest.mark.parametrize("interval", [1, 3])
def test_the_kernel_computes_what_torchrec_computes(interval):
    if kernel() is None:
        pytest.skip("no C++ compiler: the kernel is not built here")
    ours = collection(interval)
    theirs = copy.deepcopy(ours)
    torchrec_calls = []
    ours.register_forward_pre_hook(lambda *_: torchrec_calls.append(1))
    g = torch.Generator().manual_seed(interval)
    evictions = 0
    for step in range(240):
        training = step % 50 < 45  # some steps in eval: a remap without a profile
        ours.train(training), theirs.train(training)
        # the batch size varies, so TorchRec's history (sized by the first batch) overflows
        features = batch(g, step, 16 + (step * 7) % 24)
        got, want = mcc_forward(ours, features), theirs(features)
        assert got.keys() == want.keys(), step
        assert torch.equal(got.values(), want.values()) and torch.equal(got.lengths(), want.lengths()), step
        evicted = ours.evict(), theirs.evict()
        assert evicted[0].keys() == evicted[1].keys()
        for t, slots in evicted[1].items():
            assert (slots is None) == (evicted[0][t] is None) and (slots is None or torch.equal(slots, evicted[0][t]))
            evictions += slots is not None
        assert state(ours) == state(theirs), step
    assert evictions > 20  # the stream evicted: both kinds of eviction step were met
    assert len(torchrec_calls) == 1  # only the first step, which sizes TorchRec's history buffers


def test_a_batch_the_kernel_does_not_take_goes_to_torchrec():
    if kernel() is None:
        pytest.skip("no C++ compiler: the kernel is not built here")
    ours = collection(1)
    theirs = copy.deepcopy(ours)
    calls = []
    ours.register_forward_pre_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        features = batch(g, step, 8)
        if step == 2:  # weighted ids
            features = KeyedJaggedTensor(keys=KEYS, values=features.values(), lengths=features.lengths(),
                                         weights=torch.ones(features.values().numel()))  # fmt: skip
        got, want = mcc_forward(ours, features), theirs(features)
        assert torch.equal(got.values(), want.values())
    assert len(calls) == 2  # the first step and the weighted one
    assert state(ours) == state(theirs)
    # kernels off: TorchRec's forward, every step
    features = batch(g, 3, 8)
    assert torch.equal(mcc_forward(ours, features, use_kernel=False).values(), theirs(features).values())
    assert len(calls) == 3
