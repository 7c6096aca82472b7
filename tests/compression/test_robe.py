import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, BudgetError, MethodConfigError, compress, memory_report
from compression.methods.robe import RobeConfig

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=5000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=8, num_embeddings=300, feature_names=["tags"], pooling=PoolingType.MEAN),
]


def kjt(big, tags, tag_lengths):
    return KeyedJaggedTensor(keys=["big", "tags"], values=torch.tensor(big + tags),
                             lengths=torch.tensor([1] * len(big) + tag_lengths))  # fmt: skip


def reference(m, feature, ids, z):
    """e(x)[i] = A[(g·h(t, x, i // Z) + i mod Z) mod S], A the flat array (S values)."""
    flat = m.ebc.embedding_bags["robe_array"].weight.reshape(-1)
    s, g, d = flat.numel(), m.align, 8
    fns = m._fns[m.feature_names.index(feature)]
    i = torch.arange(d)
    start = m.hasher(torch.tensor(ids).unsqueeze(-1), m.num_rows, which=torch.tensor(fns))  # [n, chunks]
    at = torch.remainder(g * start[:, i // z] + i % z, s)
    return flat[at]


@pytest.mark.parametrize("align, chunk", [(4, None), (1, 2), (4, 4)])
def test_each_chunk_reads_z_consecutive_values_at_its_hashed_offset(align, chunk):
    m = compress(TABLES, RobeConfig(budget=Budget(ratio=50), align=align, chunk=chunk), seed=3)
    z = chunk or 8
    big, tags, lengths = [0, 17, 4999, -5], [1, 2, 3, 299, 4], [2, 0, 3, 0]
    out = m(kjt(big, tags, lengths)).to_dict()
    torch.testing.assert_close(out["big"], reference(m, "big", big, z))
    rows = reference(m, "tags", tags, z)
    torch.testing.assert_close(out["tags"], torch.stack([rows[:2].mean(0), torch.zeros(8), rows[2:].mean(0), torch.zeros(8)]))
    bytes_ = memory_report(m).bytes
    assert 0.95 * Budget(ratio=50).target_bytes(TABLES) <= bytes_ <= Budget(ratio=50).target_bytes(TABLES)


def test_windows_wrap_round_the_array_end():
    m = compress(TABLES, RobeConfig(budget=None, rows=8, align=1))  # the smallest array: one chunk
    w = m.ebc.embedding_bags["robe_array"].weight.reshape(-1)
    starts = m.hasher(torch.arange(10), 8, which=m._fns[0][0])
    x = int(torch.nonzero(starts)[0])  # an id whose window starts past 0, so it wraps
    out = m(kjt([x], [], [0])).to_dict()["big"][0]
    torch.testing.assert_close(out, w[(starts[x] + torch.arange(8)) % 8])


def test_one_array_for_every_table_and_its_gradient():
    m = compress(TABLES, RobeConfig(budget=Budget(ratio=100)))
    (w,) = m.table_parameters()
    assert w.shape == (m.num_rows, 4) and m.sharding_constraints()["robe_array"].sharding_types == ["row_wise"]
    m(kjt([1, 2], [3], [1, 0])).values().sum().backward()
    assert 0 < int((w.grad != 0).any(1).sum()) <= 3 * 2  # at most 2 rows per id (offsets on a grid of 4)


def test_refusals_in_one_line():
    with pytest.raises(MethodConfigError, match="chunk Z=3 must divide table 't_big''s dim 8"):
        compress(TABLES, RobeConfig(chunk=3, align=1))
    with pytest.raises(BudgetError, match="the smallest it can hold these tables in is"):
        compress(TABLES, RobeConfig(budget=Budget(bytes=40)))


@pytest.mark.parametrize("kwargs, key", [
    ({"budget": None, "rows": 0}, "robe.rows: must be >= 1, got 0"),
    ({"chunk": 0}, "robe.chunk: must be >= 1, got 0"),
    ({"align": 0}, "robe.align: must be >= 1, got 0"),
    ({"chunk": 2}, "robe.chunk and robe.align: chunk Z=2 must be a multiple of align=4"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        RobeConfig(**kwargs)
    assert str(e.value) == key
