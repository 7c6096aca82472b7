"""``pooled_lookup``: TorchRec's plain collection read whole by ``bags_cpu.cpp``, or row by row
where every bag holds one id or none, the same KeyedTensor and gradients as ``ebc(features)``;
everything else left to ``ebc``."""

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
    and a feature may have no id at all: ``bags_cpu.cpp``'s one call each way where it is
    built, else the torch ops."""
    used = _kernel_used(monkeypatch, on)
    ebc, kjt = _ebc(), _kjt(lengths)
    assert bags._one_hot(ebc, kjt)
    want, got = ebc(kjt), pooled_lookup(ebc, kjt)
    assert used == [on]
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


def _same_as_torchrec(ebc, kjt, got, want, exact: bool) -> None:
    """Outputs (``exact``: bit for bit) and every table's gradient (those that need one) as
    TorchRec's, to float rounding (a mean's scaling rounds otherwise than TorchRec's)."""
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    if exact:
        assert torch.equal(got.values(), want.values())
    else:
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(want.values())
    params = [p for p in ebc.parameters() if p.requires_grad]
    for e, x in zip(torch.autograd.grad(want.values(), params, g), torch.autograd.grad(got.values(), params, g)):
        torch.testing.assert_close(x, e, rtol=1e-5, atol=1e-5)


def test_bags_of_several_ids_pooled_by_sum_and_mean_give_torchrecs_output_and_gradients(monkeypatch):
    """Bags of 0 to 3 ids, repeated ids, the shared table's mean pooling: the kernel's."""
    used = _kernel_used(monkeypatch, True)
    g = torch.Generator().manual_seed(1)
    ebc, kjt = _ebc(), _kjt(torch.randint(0, 4, (4 * 32,), generator=g).tolist())
    _same_as_torchrec(ebc, kjt, pooled_lookup(ebc, kjt), ebc(kjt), exact=False)
    assert used == [True]


def test_without_the_kernel_a_bag_of_two_ids_goes_to_torchrecs_collection(monkeypatch):
    used = _kernel_used(monkeypatch, False)
    ebc, kjt = _ebc(), _kjt([1] * 15 + [2])
    assert not bags._one_hot(ebc, kjt)
    monkeypatch.setattr(bags, "_by_row", lambda *a: pytest.fail("read by row"))
    assert torch.equal(pooled_lookup(ebc, kjt).values(), ebc(kjt).values())
    assert used == [False]


@pytest.mark.parametrize("learned", [False, True], ids=["fixed weights", "weights that learn"])
def test_weighted_ids_pooled_by_sum(monkeypatch, learned):
    """Per-sample weights (sum pooling): the kernel's where they need no gradient, else
    TorchRec's collection, whose gradient reaches them."""
    used = _kernel_used(monkeypatch, True)
    monkeypatch.setattr(bags, "_by_row", lambda *a: pytest.fail("read by row"))
    torch.manual_seed(0)
    weighted = EmbeddingBagCollection(tables=[TABLES[0], TABLES[2]], is_weighted=True)
    kjt = _kjt([1, 2, 0, 3] * 4)
    w = torch.rand(kjt.values().numel(), requires_grad=learned)
    kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w)
    _same_as_torchrec(weighted, kjt, pooled_lookup(weighted, kjt), weighted(kjt), exact=True)
    assert used == [not learned]
    if learned:
        pooled_lookup(weighted, kjt).values().sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0


def test_other_collections_go_to_the_collection(monkeypatch):
    monkeypatch.setattr(bags, "_by_row", lambda *a: pytest.fail("read by row"))
    monkeypatch.setattr(bags, "_by_kernel", lambda *a: pytest.fail("read by the kernel"))

    class Subclass(EmbeddingBagCollection):  # a sharded, fused or quantized module is another type
        pass

    torch.manual_seed(0)
    other = Subclass(tables=TABLES)
    assert torch.equal(pooled_lookup(other, _kjt([1] * 16)).values(), other(_kjt([1] * 16)).values())


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_pool_gives_one_hot_bags_their_rows_and_scatters_the_rest(pooling):
    def scattered(rows, lengths, batch):  # the bags by their definition
        out = torch.zeros(batch, rows.shape[1]).index_add(0, bags.bag_index(lengths, rows.shape[0]), rows)
        return out / lengths.clamp(min=1).unsqueeze(1) if pooling == PoolingType.MEAN else out

    for lengths in ([1, 1, 1, 1], [2, 0, 1, 1], [1, 1, 1], [0, 3, 1, 0]):
        lengths = torch.tensor(lengths)
        rows = torch.randn(int(lengths.sum()), 3, requires_grad=True)
        out = bags.pool(rows, lengths, 4 if lengths.numel() == 4 else 3, pooling)
        want = scattered(rows, lengths, out.shape[0])
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        grad, rows.grad = rows.grad, None
        (want * torch.arange(want.numel()).view_as(want)).sum().backward()
        torch.testing.assert_close(grad, rows.grad, rtol=0, atol=0)
    one_hot = torch.randn(4, 3)
    assert bags.pool(one_hot, torch.ones(4, dtype=torch.int64), 4, pooling) is one_hot  # no scatter
