"""Per-feature id transforms (compression.idmap) and how every method treats bad ids."""

import dataclasses

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import IdOutOfRangeError, compress
from compression.hashing import UniversalHash
from compression.idmap import KeyParams, column_order, fold, with_values


def test_key_params_expand_per_id_in_any_key_order():
    p = KeyParams(["a", "b"], {"rows": [10, 20], "flag": [1, 0]})
    x = KeyedJaggedTensor(keys=["b", "zzz", "a"], values=torch.arange(6), lengths=torch.tensor([2, 0, 1, 0, 1, 2]))
    got = p.expand(x)
    assert got["rows"].tolist() == [20, 20, 1, 10, 10, 10]  # unknown key: the default 1
    assert got["flag"].tolist() == [0, 0, 1, 1, 1, 1]
    assert p.per_key(x)["rows"].tolist() == [20, 1, 10]
    assert p.table.numel() * 8 == KeyParams.nbytes(2, 2)
    assert "table" not in p.state_dict()  # derived from the config, not saved


def test_fold_and_with_values():
    h = UniversalHash(1, seed=0)
    ids = torch.tensor([0, 4, 5, -1, 2**40])
    out = fold(ids, torch.full_like(ids, 5), h)
    assert out[:2].tolist() == [0, 4] and ((out >= 0) & (out < 5)).all()
    x = KeyedJaggedTensor(keys=["a", "b"], values=torch.arange(4), lengths=torch.tensor([1, 1, 2, 0]))
    y = with_values(x, torch.arange(8) * 10, keys=["a_q", "b_q", "a_r", "b_r"], repeat=2)
    assert y.to_dict()["b_r"].values().tolist() == [60, 70] and y.stride() == 2


def test_column_order():
    assert column_order([("a", 2), ("b", 1)], [("a", 2), ("b", 1)]) is None
    assert column_order([("b", 1), ("a", 2)], [("a", 2), ("b", 1)]) == [1, 2, 0]


TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=5000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_small", embedding_dim=8, num_embeddings=7, feature_names=["small"]),
]
COUNTS = {"big": np.arange(5000)[::-1].copy(), "small": np.arange(7)[::-1].copy()}
BAD = [-1, -(2**63), 5000, 2**31, 2**62, 2**63 - 1]


# methods whose training rows are all exact: they refuse ids outside the table
# product quantization's sizes come in coarse steps that 10x of these small tables falls
# between: these id tests give it explicit sizes instead of a budget
EXPLICIT = {"dpq": {"subspaces": 2, "centroids": 4}, "mgqe": {"subspaces": 2, "centroids": 4}}


def _for_these_tables(config):
    name = type(config).method
    return dataclasses.replace(config, budget=None, **EXPLICIT[name]) if name in EXPLICIT else config


@pytest.mark.parametrize("name", [n for n in compression.registered_methods() if n != "none"])
def test_negative_and_too_large_ids(name):
    """Hashing methods hash such ids (documented in each module); methods whose rows
    are all exact refuse them naming the feature."""
    m = compress(TABLES, _for_these_tables(compression.config_class(name)()), counts=COUNTS)
    x = KeyedJaggedTensor(
        keys=["big", "small"], values=torch.tensor(BAD + [7, -3, 0, 1, 2**40, 6]), lengths=torch.ones(12, dtype=torch.int32)
    )
    if m.validates_ids:  # declared by the module: its rows are exact
        with pytest.raises(IdOutOfRangeError, match="feature 'big': id -9223372036854775808"):
            m(x)
        return
    for mode in (m.train, m.eval):
        mode()
        out = m(x).values()
        assert out.shape == (6, 16) and torch.isfinite(out).all()


SHARED = [
    EmbeddingBagConfig(name="t_pair", embedding_dim=8, num_embeddings=3000, feature_names=["left", "right"]),
    EmbeddingBagConfig(name="t_one", embedding_dim=4, num_embeddings=40, feature_names=["one"]),
]
SHARED_COUNTS = {"left": np.arange(3000)[::-1].copy(), "right": np.ones(3000), "one": np.ones(40)}


def shared_examples():
    out = []
    for name, cls in sorted(compression.registered_methods().items()):
        for i, config in enumerate(cls.contract_examples() if hasattr(cls, "contract_examples") else [cls()]):
            out.append(pytest.param(config, id=f"{name}-{i}"))
    return out


@pytest.mark.parametrize("config", shared_examples())
def test_a_table_shared_by_two_features(config):
    """Two features reading one table see the same rows: same ids, same output, in
    whatever key order the KJT comes."""
    if getattr(config, "dims", None):
        config.dims = {"t_pair": 3}
    # examples written for the contract's features, renamed to these
    if getattr(config, "feature_chunks", None):
        config.feature_chunks = {"left": 2}
    if getattr(config, "group_features", None):
        config.group_features = [["left", "right"], ["one"]]
    m = compress(SHARED, _for_these_tables(config), counts=SHARED_COUNTS, seed=0)
    m.eval()
    ids = [0, 17, 2999, 1500, 3]
    x = KeyedJaggedTensor(
        keys=["right", "one", "left"], values=torch.tensor(ids + [1, 2, 3, 39, 0] + ids), lengths=torch.ones(15, dtype=torch.int32)
    )
    out = m(x)
    assert out.keys() == ["left", "right", "one"]
    d = out.to_dict()
    # the declared output dims (the source dims, or a multi-probe method's c_f * d)
    dims = m.output_dims()
    assert d["left"].shape == (5, dims["left"]) and d["one"].shape == (5, dims["one"])
    assert dims["left"] == dims["right"]
    torch.testing.assert_close(d["left"], d["right"])
