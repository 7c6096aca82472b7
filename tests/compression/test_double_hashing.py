import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, compress
from compression.methods.double_hashing import DoubleHashingConfig

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=6, num_embeddings=5000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=6, num_embeddings=4, feature_names=["tiny"]),
]


def kjt(big, tiny, big_lengths=None):
    big_lengths = big_lengths or [1] * len(big)
    return KeyedJaggedTensor(
        keys=["big", "tiny"], values=torch.tensor(big + tiny), lengths=torch.tensor(big_lengths + [1] * len(tiny))
    )


def build(**kw):
    m = compress(TABLES, DoubleHashingConfig(budget=Budget(ratio=10), **kw), seed=4)
    m.eval()
    return m


IDS = [3, 4999, -7, 2**45]
TINY = [0, 3, 1, 2]


def test_sum_shared_adds_the_k_hashed_rows():
    m = build(num_hashes=3)
    rows = m.describe()["t_big.rows_per_hash"]
    w = m.ebc.embedding_bags["t_big"].weight
    h = m.hasher(torch.tensor(IDS), rows)  # [4, 3]
    out = m(kjt(IDS, TINY)).to_dict()
    torch.testing.assert_close(out["big"], w[h].sum(1))
    assert m.describe()["uncompressed_fields"] == "tiny"
    torch.testing.assert_close(out["tiny"], m.ebc.embedding_bags["t_tiny"].weight[TINY])


def test_sum_separate_uses_disjoint_blocks():
    m = build(tables="separate")
    rows = m.describe()["t_big.rows_per_hash"]
    assert m.ebc.embedding_bags["t_big"].weight.shape == (2 * rows, 6)
    inner = m.remap(kjt(IDS, TINY))
    big = inner.to_dict()["big"].values().view(-1, 2)
    assert ((big[:, 0] >= 0) & (big[:, 0] < rows)).all() and ((big[:, 1] >= rows) & (big[:, 1] < 2 * rows)).all()


@pytest.mark.parametrize("tables", ["shared", "separate"])
def test_concat_puts_the_parts_side_by_side(tables):
    m = build(combine="concat", tables=tables, num_hashes=3)
    rows = m.describe()["t_big.rows_per_hash"]
    h = m.hasher(torch.tensor(IDS), rows)
    parts = []
    for j in range(3):
        w = m.ebc.embedding_bags["t_big" if tables == "shared" else f"t_big__{j}"].weight
        assert w.shape == (rows, 2)
        parts.append(w[h[:, j]])
    out = m(kjt(IDS, TINY)).to_dict()
    assert out["big"].shape == (4, 6) and out["tiny"].shape == (4, 6)
    torch.testing.assert_close(out["big"], torch.cat(parts, dim=1))


def test_multi_hot_bags_pool_the_sum_of_every_ids_rows():
    m = build()
    bag = m(kjt([5, 6, 7, 8], [0, 1], big_lengths=[3, 1])).to_dict()["big"]
    single = m(kjt([5, 6, 7, 8], [0, 1, 2, 3])).to_dict()["big"]
    torch.testing.assert_close(bag[0], single[:3].sum(0))
    torch.testing.assert_close(bag[1], single[3])


def test_concat_needs_a_divisible_dim():
    with pytest.raises(MethodConfigError, match="dim 6 of table 't_big' is not divisible by num_hashes=4"):
        compress(TABLES, DoubleHashingConfig(combine="concat", num_hashes=4))


@pytest.mark.parametrize("kwargs, key", [
    ({"num_hashes": 0}, "double_hashing.num_hashes: must be >= 1, got 0"),
    ({"combine": "max"}, "double_hashing.combine: must be one of sum, concat, got 'max'"),
    ({"tables": "many"}, "double_hashing.tables: must be one of shared, separate, got 'many'"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        DoubleHashingConfig(**kwargs)
    assert str(e.value) == key


def test_bytes_per_row_of_m():
    for kw, per_m in [({}, 24), ({"tables": "separate"}, 48), ({"combine": "concat"}, 12)]:
        m = compress(TABLES, DoubleHashingConfig(budget=None, rows=100, **kw))
        held = sum(p.numel() * 4 for p in m.ebc.parameters())
        assert held == 100 * per_m + 4 * 6 * 4, kw
