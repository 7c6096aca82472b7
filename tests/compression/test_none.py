import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import IdOutOfRangeError, NoCompression, compress, memory_report

TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=4, num_embeddings=3, feature_names=["b"]),
]


def kjt(a, b):
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor(a + b), lengths=torch.ones(len(a) + len(b), dtype=torch.int32)
    )


def test_none_equals_a_plain_torchrec_ebc():
    m = compress(TABLES, NoCompression(), seed=0)
    plain = EmbeddingBagCollection(tables=TABLES)
    plain.load_state_dict(m.ebc.state_dict())
    x = kjt([1, 9], [0, 2])
    torch.testing.assert_close(m(x).values(), plain(x).values())
    assert memory_report(m).bytes == (10 + 3) * 4 * 4
    assert memory_report(m).ratio == 1.0


@pytest.mark.parametrize("a,b,bad", [([1, 10], [0, 1], "feature 'a': id 10"), ([1, 2], [-1, 1], "feature 'b': id -1")])
def test_an_id_outside_its_table_names_the_feature(a, b, bad):
    m = compress(TABLES, NoCompression())
    with pytest.raises(IdOutOfRangeError, match=bad):
        m(kjt(a, b))


def test_each_id_is_checked_against_its_own_features_table_in_any_key_order():
    """Every id is compared with its own table's rows at once: 3 is in ``a``'s 10 rows, not
    in ``b``'s 3; the last row of each passes; the keys in the other order too."""
    m = compress(TABLES, NoCompression())
    m(kjt([9, 3], [2, 0]))
    with pytest.raises(IdOutOfRangeError, match="feature 'b': id 3 "):
        m(kjt([9, 2], [0, 3]))
    swapped = KeyedJaggedTensor.from_lengths_sync(
        keys=["b", "a"], values=torch.tensor([2, 0, 9, 3]), lengths=torch.ones(4, dtype=torch.int32)
    )
    m(swapped)
    with pytest.raises(IdOutOfRangeError, match="feature 'b': id 9 "):
        m(KeyedJaggedTensor.from_lengths_sync(keys=["b", "a"], values=torch.tensor([2, 9, 0, 1]),
                                               lengths=torch.ones(4, dtype=torch.int32)))  # fmt: skip


def test_duplicate_features_or_tables_are_refused():
    with pytest.raises(ValueError, match="unique"):
        compress([TABLES[0], TABLES[0]], NoCompression())
