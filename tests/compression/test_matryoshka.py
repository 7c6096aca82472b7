"""Matryoshka tables (compression.methods.matryoshka): prefix training, the deploy step."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import (
    Budget,
    BudgetError,
    MethodConfigError,
    Quantization,
    compress,
    memory_report,
)
from compression.methods.matryoshka import MatryoshkaConfig

DIM = 16
TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=DIM, num_embeddings=1000, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=DIM, num_embeddings=1000, feature_names=["b"]),
    EmbeddingBagConfig(name="t_c", embedding_dim=8, num_embeddings=50, feature_names=["c", "c2"]),
]


def kjt(batch: int = 64, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (4 * batch,), generator=g)
    cards = [1000, 1000, 50, 50]
    values = torch.cat([torch.randint(0, c, (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=g)
                        for i, c in enumerate(cards)])  # fmt: skip
    return KeyedJaggedTensor(keys=["a", "b", "c", "c2"], values=values, lengths=lengths)


def test_training_reads_a_random_prefix_of_each_field_evaluation_the_whole_row():
    m = compress(TABLES, MatryoshkaConfig(budget=Budget(ratio=4)), seed=0)
    features = kjt()
    m.eval()
    whole = m(features).to_dict()
    m.train()
    torch.manual_seed(0)
    cut = m(features).to_dict()
    for f, rungs in (("a", {1, 2, 4, 8, 16}), ("c", {1, 2, 4, 8})):
        nonzero = (whole[f] != 0).all(dim=1)  # bags with ids
        kept = (cut[f][nonzero] != 0).sum(dim=1)
        assert set(kept.tolist()) == rungs  # every rung drawn, and only rungs
        width = kept.unsqueeze(1)
        cols = torch.arange(whole[f].shape[1]).unsqueeze(0)
        torch.testing.assert_close(cut[f][nonzero], torch.where(cols < width, whole[f][nonzero], 0.0))


def test_the_deployed_prefixes_give_what_evaluation_with_the_cut_gave_and_hold_its_bytes():
    """A pooled bag's prefix is the pool of its rows' prefixes: the deployed tables of d_f
    columns give exactly the cut evaluation's outputs, and hold the bytes counted for them."""
    m = compress(TABLES, MatryoshkaConfig(budget=Budget(ratio=4)), seed=0)
    m.eval()
    dims = {"t_a": 3, "t_b": 16, "t_c": 2}
    m.prefix = dims
    before = m(kjt()).values()
    m.deploy(dims)
    torch.testing.assert_close(m(kjt()).values(), before, rtol=0, atol=1e-7)
    assert memory_report(m).bytes == m.held_bytes(dims) == 4 * (1000 * 3 + 1000 * 16 + 50 * 2)


def test_the_deploy_step_gives_the_dims_where_cutting_costs_most_and_lands_in_the_window():
    """From the measured losses: the field whose cut costs the most AUC keeps more dims, and
    any budget lands in [0.95, 1.0] of its bytes (several budgets, one set of measurements)."""
    m = compress(TABLES, MatryoshkaConfig(budget=Budget(ratio=4)), seed=0)
    m.losses = {"t_a": {1: 0.10, 2: 0.08, 4: 0.05, 8: 0.02, 16: 0.0},  # costly to cut
                "t_b": {1: 0.002, 2: 0.001, 4: 0.0005, 8: 0.0, 16: 0.0},  # cheap
                "t_c": {1: 0.01, 2: 0.005, 4: 0.001, 8: 0.0}}  # fmt: skip
    for ratio in (2, 4, 8, 14):
        target = Budget(ratio=ratio).target_bytes(TABLES)
        dims, extra = m.deploy_for(target)
        assert 0.95 * target <= m.held_bytes(dims, extra) <= target, ratio
        assert dims["t_a"] > dims["t_b"] or (dims["t_a"] == dims["t_b"] and "t_a" in extra), (ratio, dims)
        assert len(extra) <= 1  # one table's next dim for its first ids takes what whole dims leave
        deployed = m.deployed_copy(dims, extra)
        assert memory_report(deployed).bytes == deployed.describe()["planned_bytes"] == m.held_bytes(dims, extra)
        assert not m.dims  # the copy is deployed, not the module
    with pytest.raises(BudgetError, match=r"^matryoshka cannot reach"):
        compress(TABLES, MatryoshkaConfig(budget=Budget(ratio=20)))  # beyond dim 1 for every field (16x)


def test_an_int4_budget_gives_dims_that_pack_and_refusals_are_one_line():
    m = compress(TABLES, MatryoshkaConfig(budget=Budget(ratio=8), quantization=Quantization("int4")), seed=0)
    m.losses = {t: {d: 1.0 / d for d in r} for t, r in m.rungs.items()}
    dims, extra = m.deploy_for(m.target_bytes())
    assert all(d % 2 == 0 for d in dims.values())
    m.deploy(dims, extra)
    from compression.quantization import quantize_

    quantize_(m, Quantization("int4"))
    assert 0.95 * m.target_bytes() <= memory_report(m).bytes <= m.target_bytes()
    with pytest.raises(MethodConfigError, match=r"^matryoshka: quantization-aware training is refused"):
        compress(TABLES, MatryoshkaConfig(quantization=Quantization("int8", aware=True)))
    with pytest.raises(MethodConfigError, match=r"^matryoshka.ladder\[0\]: must be >= 1, got 0$"):
        MatryoshkaConfig(ladder=[0, 4])


def test_the_first_ids_of_a_table_keep_one_more_dim():
    """``extra``: the first r ids of a table read the next column too (their trained values),
    the others zero there; single ids per bag show it row by row."""
    m = compress(TABLES, MatryoshkaConfig(budget=Budget(ratio=4)), seed=0)
    m.eval()
    ids = torch.arange(0, 1000, 50)
    n = len(ids)
    features = KeyedJaggedTensor(keys=["a", "b", "c", "c2"], values=torch.cat([ids, ids, ids % 50, ids % 50]),
                                 lengths=torch.ones(4 * n, dtype=torch.int64))  # fmt: skip
    whole = m(features).to_dict()["a"]
    m.deploy({"t_a": 3, "t_b": 16, "t_c": 8}, {"t_a": 400})
    got = m(features).to_dict()["a"]
    torch.testing.assert_close(got[:, :3], whole[:, :3])
    torch.testing.assert_close(got[:, 3], torch.where(ids < 400, whole[:, 3], 0.0))
    assert (got[:, 4:] == 0).all()
    assert memory_report(m).bytes == m.held_bytes(m.dims, m.extra) == 4 * (1000 * 3 + 1000 * 16 + 50 * 8 + 401)
