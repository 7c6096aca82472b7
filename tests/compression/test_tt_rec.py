import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, Quantization, compress, memory_report
from compression.methods.tt_rec import TTRecConfig, factor3, rank_pairs, ranks

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=16, num_embeddings=5000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=16, num_embeddings=300, feature_names=["tags"], pooling=PoolingType.MEAN),
]


def test_factorisations_cover_the_rows_and_split_the_dim():
    for n in (1, 7, 300, 5000, 43605, 10**7):
        m = factor3(n, exact=False)
        assert m[0] * m[1] * m[2] >= n and max(m) - min(m) <= max(2, round(0.05 * n ** (1 / 3)))
    assert factor3(16, exact=True) == (2, 2, 4) and factor3(7, exact=True) == (1, 1, 7)
    pairs = rank_pairs(5000, 16)
    assert pairs[0][1:] == (1, 1) and [v for v, *_ in pairs] == sorted(v for v, *_ in pairs)
    assert all(max(a, b) <= 3 * min(a, b) and v < 5000 * 16 for v, a, b in pairs)


def test_rows_are_the_tensor_train_product_pooled_per_bag():
    m = compress(TABLES, TTRecConfig(budget=Budget(ratio=20)), seed=1)
    assert m.describe()["uncompressed_fields"] == ""
    w = {c.name: e.weight for ec in m.ec.values() for c, e in zip(ec.embedding_configs(), ec.embeddings.values())}
    (r1, r2) = ranks(TABLES[0], m.plan.sizes["t_big"])
    g1, g2, g3 = (w[f"t_big__c{k}"] for k in (1, 2, 3))
    n1, n2, n3 = 2, 2, 4
    full = torch.einsum("ija,kalb,mbn->ikmjln", g1.view(-1, n1, r1), g2.view(-1, r1, n2, r2), g3.view(-1, r2, n3))
    full = full.reshape(-1, 16)  # row i1·m2·m3 + i2·m3 + i3
    big, tags, lengths = [0, 17, 4999, 2500], [1, 2, 3], [2, 0, 1, 0]
    x = KeyedJaggedTensor(keys=["big", "tags"], values=torch.tensor(big + tags), lengths=torch.tensor([1] * 4 + lengths))
    out = m(x).to_dict()
    torch.testing.assert_close(out["big"], full[big], rtol=1e-5, atol=1e-7)
    rows = m.rows(x)["tags"]
    torch.testing.assert_close(out["tags"], torch.stack([rows[:2].mean(0), torch.zeros(16), rows[2], torch.zeros(16)]))
    assert memory_report(m).bytes == 32 + 4 * sum(p.numel() for p in m.ec.parameters())
    assert all(c.sharding_types == ["data_parallel"] for c in m.sharding_constraints().values())


def test_explicit_rank_and_quantization_refused_in_one_line():
    m = compress(TABLES, TTRecConfig(budget=None, rank=3))
    assert m.describe()["t_big.ranks"] == "3x3"
    with pytest.raises(MethodConfigError, match="^tt_rec: quantization does not apply"):
        compress(TABLES, TTRecConfig(quantization=Quantization("int8")))


@pytest.mark.parametrize("kwargs, key", [
    ({"budget": None, "rank": 0}, "tt_rec.rank: must be >= 1, got 0"),
    ({"budget": None, "rank": -2}, "tt_rec.rank: must be >= 1, got -2"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        TTRecConfig(**kwargs)
    assert str(e.value) == key
