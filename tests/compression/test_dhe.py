import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import (
    Budget,
    BudgetError,
    MethodConfigError,
    Quantization,
    compress,
    memory_report,
)
from compression.methods.dhe import DHEConfig, encode

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=20000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=8, num_embeddings=3000, feature_names=["tags"], pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=8, num_embeddings=3, feature_names=["tiny"]),
]


def test_encodings_follow_their_distribution():
    h = torch.randint(0, 10**6, (4000, 64))
    u = encode(h, 10**6, "uniform")
    assert u.min() >= -1 and u.max() <= 1 and abs(float(u.mean())) < 0.02
    g = encode(h, 10**6, "gaussian")
    assert torch.isfinite(g).all() and abs(float(g.mean())) < 0.02 and abs(float(g.std()) - 1) < 0.02


def test_mlp_of_the_hash_encoding_pooled_per_bag():
    m = compress(TABLES, DHEConfig(num_hashes=64, budget=Budget(ratio=20)), seed=1)
    assert m.describe()["uncompressed_fields"] == "tiny" and set(m.mlps) == {"t_big", "t_tags"}
    target = Budget(ratio=20).target_bytes(TABLES)
    assert 0.95 * target <= memory_report(m).bytes <= target
    big, tags, lengths, tiny = [0, 17, -4, 2**40], [1, 2, 3], [2, 0, 1, 0], [0, 1, 2, 2]
    x = KeyedJaggedTensor(keys=["big", "tags", "tiny"], values=torch.tensor(big + tags + tiny),
                          lengths=torch.tensor([1] * 4 + lengths + [1] * 4))  # fmt: skip
    out = m(x).to_dict()

    def rows(name, ids):
        return m.mlps[name](encode(m.hasher(torch.tensor(ids), 10**6), 10**6, "uniform"))

    torch.testing.assert_close(out["big"], rows("t_big", big))
    r = rows("t_tags", tags)
    torch.testing.assert_close(out["tags"], torch.stack([r[:2].mean(0), torch.zeros(8), r[2], torch.zeros(8)]))
    torch.testing.assert_close(out["tiny"], m.ebc.embedding_bags["t_tiny"].weight[tiny])
    assert m.table_parameters() == [m.ebc.embedding_bags["t_tiny"].weight]  # the MLPs train as dense


def test_meta_builds_the_mlps_on_meta():
    m = compress(TABLES, DHEConfig(num_hashes=64), table_device="meta")
    assert all(p.device.type == "meta" for p in m.mlps.parameters())


def test_refusals_in_one_line():
    with pytest.raises(MethodConfigError, match="^dhe: quantization does not apply"):
        compress(TABLES, DHEConfig(quantization=Quantization("int8")))
    with pytest.raises(MethodConfigError, match=r"^dhe\.num_hashes and dhe\.transform: .* must be even, got 3$"):
        DHEConfig(num_hashes=3, transform="gaussian")
    with pytest.raises(BudgetError, match="cannot reach 100x"):  # 1024 hashes' coefficients alone are 32 KiB
        compress(TABLES, DHEConfig(num_hashes=1024, budget=Budget(ratio=100)))


@pytest.mark.parametrize("kwargs, key", [
    ({"budget": None, "width": 0}, "dhe.width: must be >= 1, got 0"),
    ({"num_hashes": 0}, "dhe.num_hashes: must be >= 1, got 0"),
    ({"buckets": 1}, "dhe.buckets: must be >= 2, got 1"),
    ({"buckets": 2**31}, "dhe.buckets: must be <= 2147483647, got 2147483648"),
    ({"transform": "laplace"}, "dhe.transform: must be one of uniform, gaussian, got 'laplace'"),
    ({"layers": 0}, "dhe.layers: must be >= 1, got 0"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        DHEConfig(**kwargs)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_the_edges_of_the_ranges_are_accepted():
    DHEConfig(buckets=2), DHEConfig(buckets=2**31 - 1), DHEConfig(num_hashes=1), DHEConfig(num_hashes=2, transform="gaussian")
