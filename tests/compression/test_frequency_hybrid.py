import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, compress
from compression.methods.frequency_hybrid import FrequencyHybridConfig

N = 2000
TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=N, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=N, feature_names=["b"]),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=8, num_embeddings=5, feature_names=["tiny"]),
]
rng = np.random.default_rng(0)
# counts NOT in id order: the top ids are scattered over the vocabulary
COUNTS = {"a": rng.permutation(N) * 3, "b": rng.permutation(N), "tiny": np.array([5, 4, 3, 2, 1])}


def ids_of(feature: str, ids) -> KeyedJaggedTensor:
    ids = torch.as_tensor(ids)
    other = torch.zeros_like(ids)
    values = {"a": other, "b": other, "tiny": other}
    values[feature] = ids
    return KeyedJaggedTensor(
        keys=["a", "b", "tiny"], values=torch.cat([values["a"], values["b"], values["tiny"]]),
        lengths=torch.ones(3 * len(ids), dtype=torch.int32),
    )


def build(**kw):
    kw.setdefault("budget", Budget(ratio=8))
    m = compress(TABLES, FrequencyHybridConfig(**kw), counts=COUNTS, seed=1)
    m.eval()
    return m


@pytest.mark.parametrize("feature", ["a", "b"])
def test_top_k_ids_keep_their_own_rows(feature):
    m = build()
    d = m.describe()
    k, rows = d[f"t_{feature}.top_k"], d[f"t_{feature}.rows"]
    assert 0 < k < rows < N and k == rows // 2
    top = np.sort(np.argsort(-COUNTS[feature], kind="stable")[:k])
    out = m.rows(ids_of(feature, top))[: k if feature == "a" else 2 * k][-k:]
    assert out.tolist() == list(range(k))  # own rows, no two top ids share one
    rest = np.setdiff1d(np.arange(N), top)
    out = m.rows(ids_of(feature, rest))
    out = out[: len(rest)] if feature == "a" else out[len(rest) : 2 * len(rest)]
    assert ((out >= k) & (out < rows)).all()
    expected = k + m.hasher(torch.from_numpy(rest), rows - k, which=0)
    assert torch.equal(out, expected)


def test_exact_rows_are_the_top_ids_embeddings():
    m = build()
    k = m.describe()["t_a.top_k"]
    top = np.sort(np.argsort(-COUNTS["a"], kind="stable")[:k])
    out = m(ids_of("a", top[:4])).to_dict()["a"]
    torch.testing.assert_close(out, m.ebc.embedding_bags["t_a"].weight[:4])


def test_out_of_range_ids_take_hashed_rows_and_tiny_tables_stay_exact():
    m = build()
    d = m.describe()
    k, rows = d["t_a.top_k"], d["t_a.rows"]
    assert d["uncompressed_fields"] == "tiny"
    bad = [-1, N, 2**50, -(2**63)]
    out = m.rows(ids_of("a", bad))[:4]
    assert ((out >= k) & (out < rows)).all()
    tiny = m.rows(ids_of("tiny", [0, 4, 5, -3]))[8:]
    assert tiny[:2].tolist() == [0, 4] and ((tiny >= 0) & (tiny < 5)).all()


def test_explicit_sizes_and_a_top_k_larger_than_the_vocabulary():
    # documented: a table with fewer ids than top_k (+ hashed_rows) is a plain exact table
    m = build(budget=None, top_k=100, hashed_rows=50)
    d = m.describe()
    assert d["t_a.rows"] == 150 and d["t_a.top_k"] == 100 and d["t_b.top_k"] == 100
    assert d["t_tiny.rows"] == "exact" and "t_tiny.top_k" not in d and d["uncompressed_fields"] == "tiny"
    assert m.ebc.embedding_bags["t_tiny"].weight.shape == (5, 8)
    assert m.rows(ids_of("tiny", [0, 1, 2, 3, 4]))[10:].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(MethodConfigError, match=r"^frequency_hybrid\.hashed_rows: must be >= 1, got 0$"):
        FrequencyHybridConfig(budget=None, top_k=6, hashed_rows=0)


def test_counts_are_required_and_checked():
    with pytest.raises(ValueError, match="needs the train counts of feature 'a'"):
        compress(TABLES, FrequencyHybridConfig())
    with pytest.raises(ValueError, match="one count per id of table 't_tiny', at most 5"):
        compress(TABLES, FrequencyHybridConfig(), counts={**COUNTS, "tiny": np.ones(6)})
    with pytest.raises(MethodConfigError, match=r"^frequency_hybrid\.exact_fraction: must be >= 0 and < 1"):
        FrequencyHybridConfig(exact_fraction=1.0)


@pytest.mark.parametrize("kwargs, key", [
    ({"budget": None, "top_k": -1, "hashed_rows": 5}, "frequency_hybrid.top_k: must be >= 0, got -1"),
    ({"budget": None, "top_k": 5, "hashed_rows": 0}, "frequency_hybrid.hashed_rows: must be >= 1, got 0"),
    ({"exact_fraction": -0.1}, "frequency_hybrid.exact_fraction: must be >= 0 and < 1 under a frequency_hybrid.budget"),
    ({"exact_fraction": 1.0}, "frequency_hybrid.exact_fraction: must be >= 0 and < 1 under a frequency_hybrid.budget"),
    ({"budget": None, "top_k": 5}, "frequency_hybrid.top_k and frequency_hybrid.hashed_rows: explicit sizes need both"),
    ({"budget": None, "hashed_rows": 5}, "frequency_hybrid.top_k and frequency_hybrid.hashed_rows:"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        FrequencyHybridConfig(**kwargs)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_exact_fraction_is_checked_only_under_a_budget():
    # budget: null sizes by top_k and hashed_rows; the fraction is unused, as before
    FrequencyHybridConfig(budget=None, top_k=0, hashed_rows=1, exact_fraction=1.0)


def test_shorter_counts_mean_zero_for_the_tail():
    m = compress(TABLES, FrequencyHybridConfig(), counts={**COUNTS, "a": np.array([0, 0, 9, 0, 7])})
    k = m.describe()["t_a.top_k"]
    # the counted ids 2 and 4 first, then (all counts 0) the smallest ids
    zeros = [i for i in range(N) if i not in (2, 4)][: k - 2]
    assert m.exact_keys[:k].tolist() == sorted([2, 4] + zeros)


class LazyCounts(dict):
    """Counts read only when asked for, as the experiment job passes them."""

    def __missing__(self, key):
        self[key] = COUNTS[key]
        return self[key]

    def __contains__(self, key):
        return key in COUNTS


def test_counts_from_a_lazy_mapping():
    a = compress(TABLES, FrequencyHybridConfig(), counts=LazyCounts(), seed=1)
    b = compress(TABLES, FrequencyHybridConfig(), counts=COUNTS, seed=1)
    assert torch.equal(a.exact_keys, b.exact_keys)
