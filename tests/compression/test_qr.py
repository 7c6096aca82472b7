import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, compress
from compression.methods.qr import QRConfig, quotient_remainder

N = 5000
TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=4, num_embeddings=N, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=4, num_embeddings=300, feature_names=["tags"]),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=4, num_embeddings=3, feature_names=["tiny"]),
]


def kjt(big, tags, tag_lengths, tiny):
    lengths = [1] * len(big) + tag_lengths + [1] * len(tiny)
    return KeyedJaggedTensor(keys=["big", "tags", "tiny"], values=torch.tensor(big + tags + tiny), lengths=torch.tensor(lengths))


def build(**kw):
    kw.setdefault("budget", Budget(ratio=10))
    m = compress(TABLES, QRConfig(**kw), seed=2)
    m.eval()
    return m


def test_distinct_ids_give_distinct_pairs_in_range():
    m = build()
    c = m.describe()["t_big.collisions"]
    assert c * c >= N  # the budget picks c on the side where bytes grow with c
    ids = torch.arange(N)
    q, r = m.indices(KeyedJaggedTensor(keys=["big"], values=ids, lengths=torch.ones(N, dtype=torch.int32)))
    assert ((q >= 0) & (q < -(-N // c))).all() and ((r >= 0) & (r < c)).all()
    assert torch.unique(q * c + r).numel() == N and torch.equal(q * c + r, ids)
    assert m.ebc.embedding_bags["t_big__q"].weight.shape[0] == -(-N // c)
    assert m.ebc.embedding_bags["t_big__r"].weight.shape[0] == c


def test_integer_division_stays_exact_above_2_24():
    ids = torch.tensor([2**24 + 1, 2**24 + 3, 2**53 + 1, 2**62 + 12345, 2**63 - 1])
    c = 7
    q, r = quotient_remainder(ids, c)
    assert [a * c + b for a, b in zip(q.tolist(), r.tolist())] == ids.tolist()
    assert q.tolist() == [x // c for x in ids.tolist()] and r.tolist() == [x % c for x in ids.tolist()]
    # float division, as dlrm's reference did, loses these
    assert (ids.double() / c).floor().long().tolist() != q.tolist()


def test_out_of_range_ids_are_hashed_into_the_table_first():
    m = build()
    c = m.describe()["t_big.collisions"]
    bad = [-1, N, 2**40, -(2**62)]
    q, r = m.indices(KeyedJaggedTensor(keys=["big"], values=torch.tensor(bad), lengths=torch.ones(4, dtype=torch.int32)))
    folded = m.hasher(torch.tensor(bad), N, which=0)
    assert torch.equal(q * c + r, folded)
    assert torch.isfinite(m(kjt(bad, [], [0] * 4, [5, -1, 0, 2])).values()).all()


def reference(m, combine, big, tags, tag_lengths, tiny):
    """Per id: Q[q] (op) R[r], pooled by sum; exact tables: their row."""
    x = kjt(big, tags, tag_lengths, tiny)
    q, r = m.indices(x)
    w = {name: bag.weight for name, bag in m.ebc.embedding_bags.items()}
    spans = {"big": (0, len(big)), "tags": (len(big), len(big) + len(tags)), "tiny": (len(big) + len(tags), len(q))}

    def per_id(feature, table):
        a, b = spans[feature]
        if f"{table}__r" not in w:
            return w[table][q[a:b]]
        eq, er = w[f"{table}__q"][q[a:b]], w[f"{table}__r"][r[a:b]]
        return {"mult": eq * er, "add": eq + er, "concat": torch.cat([eq, er], dim=1)}[combine]

    tag_rows = per_id("tags", "t_tags")
    starts = torch.tensor([0] + tag_lengths).cumsum(0)
    tags_pooled = torch.stack([tag_rows[starts[i] : starts[i + 1]].sum(0) for i in range(len(tag_lengths))])
    return {"big": per_id("big", "t_big"), "tags": tags_pooled, "tiny": per_id("tiny", "t_tiny")}


@pytest.mark.parametrize("combine", ["mult", "add", "concat"])
@pytest.mark.parametrize("multi_hot", [False, True])
def test_combines_per_id_then_pools(combine, multi_hot):
    m = build(combine=combine)
    assert m.describe()["uncompressed_fields"] == "tiny"
    big, tiny = [0, 17, 4999, 2500], [0, 2, 1, 1]
    tags, lengths = ([1, 2, 3, 299, 4, 5], [3, 0, 1, 2]) if multi_hot else ([1, 2, 299, 4], [1, 1, 1, 1])
    out = m(kjt(big, tags, lengths, tiny)).to_dict()
    ref = reference(m, combine, big, tags, lengths, tiny)
    for key in ("big", "tags", "tiny"):
        torch.testing.assert_close(out[key], ref[key])


def test_mult_with_mean_pooling_averages_the_per_id_products():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=1000, feature_names=["f"], pooling=PoolingType.MEAN)]
    m = compress(tables, QRConfig(budget=None, collisions=40))
    x = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 500, 999, 7]), lengths=torch.tensor([3, 0, 1]))
    q, r = m.indices(x)
    rows = m.ebc.embedding_bags["t__q"].weight[q] * m.ebc.embedding_bags["t__r"].weight[r]
    out = m(x).values()
    torch.testing.assert_close(out[0], rows[:3].mean(0))
    torch.testing.assert_close(out[1], torch.zeros(4))
    torch.testing.assert_close(out[2], rows[3])


def test_gradients_reach_both_tables_on_multi_hot_bags():
    m = build()
    m.train()
    m(kjt([1, 2, 3, 4], [1, 2, 3], [2, 0, 0, 1], [0, 1, 2, 0])).values().sum().backward()
    for name in ("t_tags__q", "t_tags__r", "t_big__q", "t_big__r"):
        assert m.ebc.embedding_bags[name].weight.grad.abs().sum() > 0


def test_bad_configs():
    with pytest.raises(ValueError, match="dim 5 of table 't' is odd"):
        compress([EmbeddingBagConfig(name="t", embedding_dim=5, num_embeddings=100, feature_names=["f"])], QRConfig(combine="concat"))
    with pytest.raises(ValueError, match="either a budget or collisions"):
        compress(TABLES, QRConfig(collisions=10))


@pytest.mark.parametrize("kwargs, key", [
    ({"combine": "max"}, "qr.combine: must be one of mult, add, concat, got 'max'"),
    ({"budget": None, "collisions": 0}, "qr.collisions: must be >= 1, got 0"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        QRConfig(**kwargs)
    assert str(e.value) == key
