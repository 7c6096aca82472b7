import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import (
    Budget,
    BudgetError,
    IdOutOfRangeError,
    MethodConfigError,
    compress,
    memory_report,
)
from compression.methods.mixed_dim import MixedDimConfig, split

SIZES = {"a": 20_000, "b": 5000, "c": 1000, "d": 50}
TABLES = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=n, feature_names=[f]) for f, n in SIZES.items()]


def kjt(ids: dict[str, list[int]]) -> KeyedJaggedTensor:
    keys = list(SIZES)
    return KeyedJaggedTensor(
        keys=keys, values=torch.tensor([i for k in keys for i in ids[k]]),
        lengths=torch.ones(sum(len(ids[k]) for k in keys), dtype=torch.int32),
    )


def dims(m) -> dict[str, float]:
    """Mean dim per table (scalars / rows), the exact ones at 16."""
    d = m.describe()
    return {f: 16.0 if d[f"t_{f}.scalars"] == "exact" else d[f"t_{f}.scalars"] / SIZES[f] for f in SIZES}


def test_power_rule_gives_large_tables_fewer_dims():
    m = compress(TABLES, MixedDimConfig(budget=Budget(ratio=4), alpha=0.3))
    got = dims(m)
    assert got["a"] < got["b"] < got["c"] <= got["d"] == 16.0
    # d_t proportional to n_t^(-alpha) for the compressed tables
    ratio = got["a"] / got["b"]
    assert ratio == pytest.approx((SIZES["a"] / SIZES["b"]) ** -0.3, rel=0.05)
    flat = compress(TABLES, MixedDimConfig(budget=Budget(ratio=4), alpha=0.0))
    assert dims(flat)["a"] == pytest.approx(dims(flat)["b"], rel=0.05)


def test_lookup_is_projected_rows_in_two_blocks():
    m = compress(TABLES, MixedDimConfig(budget=Budget(ratio=4)), seed=1)
    m.eval()
    s = m.describe()["t_a.scalars"]
    dim, r = split(s, SIZES["a"])
    assert 1 < dim < 16 and 0 < r < SIZES["a"] and m.describe()["t_a.dim"] == dim
    ids = [0, r - 1, r, SIZES["a"] - 1]
    out = m(kjt({"a": ids, "b": [0] * 4, "c": [0] * 4, "d": [1, 2, 3, 49]})).to_dict()
    upper, lower = m.ebc.embedding_bags["t_a"].weight, m.ebc.embedding_bags["t_a__b"].weight
    assert upper.shape == (r, dim) and lower.shape == (SIZES["a"] - r, dim - 1)
    rows = torch.stack([upper[0], upper[r - 1], F.pad(lower[0], (0, 1)), F.pad(lower[-1], (0, 1))])
    torch.testing.assert_close(out["a"], rows @ m.projections["t_a"].weight.t())
    torch.testing.assert_close(out["d"], m.ebc.embedding_bags["t_d"].weight[[1, 2, 3, 49]])
    assert "t_d" not in m.projections


def test_multi_hot_bags_and_gradients():
    m = compress(TABLES, MixedDimConfig(budget=Budget(ratio=4)))
    r = split(m.describe()["t_a.scalars"], SIZES["a"])[1]
    x = KeyedJaggedTensor(
        keys=list(SIZES), values=torch.tensor([0, r + 5, 7, 1, 2, 3, 1]), lengths=torch.tensor([2, 0, 1, 1, 1, 1, 1, 0])
    )
    out = m(x).to_dict()
    one = m(kjt({"a": [0, r + 5], "b": [7, 1], "c": [2, 3], "d": [1, 1]})).to_dict()
    torch.testing.assert_close(out["a"][0], one["a"].sum(0))
    torch.testing.assert_close(out["a"][1], torch.zeros(16))
    out["a"].sum().backward()
    assert m.ebc.embedding_bags["t_a"].weight.grad.abs().sum() > 0
    assert m.ebc.embedding_bags["t_a__b"].weight.grad.abs().sum() > 0
    assert m.projections["t_a"].weight.grad is not None
    # projections are dense parameters, not table rows
    assert all(p is not m.projections["t_a"].weight for p in m.table_parameters())


def test_out_of_range_ids_are_refused():
    m = compress(TABLES, MixedDimConfig())
    with pytest.raises(IdOutOfRangeError, match="feature 'b': id 5000"):
        m(kjt({"a": [0], "b": [5000], "c": [0], "d": [0]}))
    with pytest.raises(IdOutOfRangeError, match="feature 'a': id -1"):
        m(kjt({"a": [-1], "b": [0], "c": [0], "d": [0]}))


def test_bytes_include_the_projections():
    m = compress(TABLES, MixedDimConfig(budget=None, dims={"t_a": 4, "t_b": 8}))
    assert m.describe()["t_a.dim"] == 4 and m.describe()["t_c.scalars"] == "exact"
    rows = 20_000 * 4 + 5000 * 8 + 1000 * 16 + 50 * 16
    proj = 16 * 4 + 16 * 8
    assert memory_report(m).bytes == 4 * (rows + proj) + m.params.table.numel() * 8


def test_popularity_rule_and_bad_configs():
    counts = {f: np.ones(n) * (100 if f == "b" else 1) for f, n in SIZES.items()}
    pop = dims(compress(TABLES, MixedDimConfig(rule="popularity"), counts=counts))
    card = dims(compress(TABLES, MixedDimConfig()))
    assert pop["b"] > card["b"]  # b's rows are read 100x as often: more dims
    with pytest.raises(ValueError, match="needs the train counts"):
        compress(TABLES, MixedDimConfig(rule="popularity"))
    with pytest.raises(ValueError, match="unknown tables"):
        compress(TABLES, MixedDimConfig(budget=None, dims={"t_x": 3}))
    with pytest.raises(ValueError, match="must be in \\[1, 16\\]"):
        compress(TABLES, MixedDimConfig(budget=None, dims={"t_a": 0}))
    with pytest.raises(BudgetError, match="smallest it can hold"):
        compress(TABLES, MixedDimConfig(budget=Budget(ratio=100)))


@pytest.mark.parametrize("kwargs, key", [
    ({"rule": "size"}, "mixed_dim.rule: must be one of cardinality, popularity, got 'size'"),
    # refused when made whether or not a budget would read the rule
    ({"rule": "size", "budget": None, "dims": {"t_a": 3}}, "mixed_dim.rule: must be one of cardinality, popularity"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        MixedDimConfig(**kwargs)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


class LazyCounts(dict):
    """Counts read only when asked for, as the experiment job passes them."""

    def __missing__(self, key):
        self[key] = value = np.ones(SIZES[key]) * (100 if key == "b" else 1)
        return value

    def __contains__(self, key):
        return key in SIZES


def test_popularity_reads_counts_from_a_lazy_mapping():
    got = dims(compress(TABLES, MixedDimConfig(rule="popularity"), counts=LazyCounts()))
    assert got["b"] > dims(compress(TABLES, MixedDimConfig()))["b"]
