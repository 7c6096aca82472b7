"""``pooled_lookup``: TorchRec's collection read row by row where every bag holds one id,
the same KeyedTensor and gradients as ``ebc(features)``; everything else left to ``ebc``."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import bags
from compression.bags import pooled_lookup

TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=50, feature_names=["a"]),
    EmbeddingBagConfig(name="t_shared", embedding_dim=8, num_embeddings=7, feature_names=["b", "c"],
                       pooling=PoolingType.MEAN),  # fmt: skip
    EmbeddingBagConfig(name="t_d", embedding_dim=3, num_embeddings=20, feature_names=["d"]),
]


def _kjt(lengths: list[int], keys: tuple[str, ...] = ("d", "c", "b", "a"), seed: int = 0) -> KeyedJaggedTensor:
    """Features in another order than the tables list them; ids within every table's rows."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths) // len(keys)
    values = [torch.randint(0, 7, (sum(lengths[k * batch : (k + 1) * batch]),), generator=g) for k in range(len(keys))]
    return KeyedJaggedTensor(keys=list(keys), values=torch.cat(values), lengths=torch.tensor(lengths, dtype=torch.int32))


def _ebc() -> EmbeddingBagCollection:
    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=TABLES)


def _kernel_used(monkeypatch, on: bool) -> list[bool]:
    """Turns ``bags_cpu.cpp`` off (``on`` False) and records, for each lookup by row, whether
    it ran."""
    if not on:
        monkeypatch.setattr(bags, "kernel", lambda: None)
    assert (bags.kernel() is not None) == on, "the kernel did not build"
    used: list[bool] = []
    by_kernel = bags._by_kernel
    monkeypatch.setattr(bags, "_by_kernel", lambda *a: used.append((r := by_kernel(*a)) is not None) or r)
    return used


@pytest.mark.parametrize("on", [True, False], ids=["kernel", "torch ops"])
@pytest.mark.parametrize(
    "lengths",
    [[1] * 64, [1, 0, 1, 1] * 8 + [1] * 16 + [0] * 16, [1] * 4 * bags.GATHER_FROM],
    ids=["one id a bag", "some bags empty", "index_add_ backward"],
)
def test_bags_of_one_id_or_none_give_torchrecs_output_and_gradients(monkeypatch, lengths, on):
    """Repeated ids (7 rows drawn over and over) so gradient rows add up; the shared table's
    two features and its mean pooling included; an empty bag pools to zeros, as TorchRec's,
    and a feature may have no id at all. Every bag full: ``bags_cpu.cpp``'s one call each
    way where it is built, else the torch ops."""
    used = _kernel_used(monkeypatch, on)
    ebc, kjt = _ebc(), _kjt(lengths)
    assert bags._one_hot(ebc, kjt)
    want, got = ebc(kjt), pooled_lookup(ebc, kjt)
    assert used == [on and 0 not in lengths]
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    assert torch.equal(got.values(), want.values())
    g = torch.randn_like(want.values())
    expected = torch.autograd.grad(want.values(), list(ebc.parameters()), g)
    grads = torch.autograd.grad(got.values(), list(ebc.parameters()), g)
    for e, x in zip(expected, grads):
        torch.testing.assert_close(x, e, rtol=1e-5, atol=1e-5)  # sums of hundreds of rows, in another order


def test_the_kernel_leaves_a_frozen_table_without_a_gradient(monkeypatch):
    used = _kernel_used(monkeypatch, True)
    ebc, kjt = _ebc(), _kjt([1] * 64)
    ebc.embedding_bags["t_shared"].weight.requires_grad_(False)
    got, want = pooled_lookup(ebc, kjt), ebc(kjt)
    assert used == [True] and torch.equal(got.values(), want.values())
    got.values().sum().backward()
    grads = [p.grad.clone() for p in ebc.parameters() if p.requires_grad]
    assert ebc.embedding_bags["t_shared"].weight.grad is None
    ebc.zero_grad(set_to_none=True)
    want.values().sum().backward()
    for g, p in zip(grads, [p for p in ebc.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad)


def test_a_bag_of_two_ids_goes_to_torchrecs_collection(monkeypatch):
    ebc, kjt = _ebc(), _kjt([1] * 15 + [2])
    assert not bags._one_hot(ebc, kjt)
    monkeypatch.setattr(bags, "_by_row", lambda *a: pytest.fail("read by row"))
    assert torch.equal(pooled_lookup(ebc, kjt).values(), ebc(kjt).values())


def test_weighted_ids_and_other_collections_go_to_the_collection(monkeypatch):
    monkeypatch.setattr(bags, "_by_row", lambda *a: pytest.fail("read by row"))
    weighted = EmbeddingBagCollection(tables=[TABLES[0], TABLES[2]], is_weighted=True)  # sum pooling only
    kjt = _kjt([1] * 16)
    kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=torch.rand(16))
    assert torch.equal(pooled_lookup(weighted, kjt).values(), weighted(kjt).values())

    class Subclass(EmbeddingBagCollection):  # a sharded, fused or quantized module is another type
        pass

    torch.manual_seed(0)
    other = Subclass(tables=TABLES)
    assert torch.equal(pooled_lookup(other, _kjt([1] * 16)).values(), other(_kjt([1] * 16)).values())
