"""Unified Embedding (feature multiplexing): salted chunk hashes into shared tables."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import (
    Budget,
    BudgetError,
    MethodConfigError,
    compress,
    memory_report,
    uncompressed_bytes,
)
from compression.methods.hashing import HashingConfig
from compression.methods.unified_embedding import UnifiedEmbeddingConfig as UE
from experiments.config import register_configs
from recsys.models import DLRMConfig
from tests.compression.test_sizing import criteo

DIM = 8
TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=DIM, num_embeddings=100_000, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=DIM, num_embeddings=20_000, feature_names=["b"]),
    EmbeddingBagConfig(name="t_c", embedding_dim=DIM, num_embeddings=30, feature_names=["c"]),
]


def kjt(ids: dict[str, list[int]], lengths: dict[str, list[int]] | None = None) -> KeyedJaggedTensor:
    lengths = lengths or {}
    return KeyedJaggedTensor(
        keys=list(ids),
        values=torch.tensor([i for v in ids.values() for i in v], dtype=torch.int64),
        lengths=torch.tensor([n for k, v in ids.items() for n in lengths.get(k, [1] * len(v))], dtype=torch.int32),
    )


def build(tables=TABLES, **kw) -> torch.nn.Module:
    m = compress(tables, UE(**kw), seed=3)
    m.eval()
    return m


def virtual_rows(m, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    return {k: jt.values() for k, jt in m.remap(features).to_dict().items()}


# -- the hashes --------------------------------------------------------------------------


def test_a_shared_id_lands_on_different_rows_and_collisions_match_the_table_size():
    m = build(budget=None, rows=1000)
    ids = torch.from_numpy(np.random.default_rng(0).choice(10**6, size=3000, replace=False))
    rows = virtual_rows(m, kjt({"a": ids.tolist(), "b": ids.tolist(), "c": [0] * 3000}))
    # the same raw id in features a and b: salted hashes, about 1/M agree by chance
    assert (rows["a#0"] == rows["b#0"]).float().mean() < 0.005
    # one feature's 3000 distinct ids in M = 1000 rows: distinct rows ~ M(1 - (1 - 1/M)^n)
    n, M = 3000, 1000
    assert torch.unique(rows["a#0"]).numel() == pytest.approx(M * (1 - (1 - 1 / M) ** n), rel=0.03)
    # pairs that share a row: about 1/M of all pairs (birthday bound)
    counts = torch.bincount(rows["a#0"], minlength=M).double()
    pair_rate = (counts * (counts - 1) / 2).sum() / (n * (n - 1) / 2)
    assert float(pair_rate) == pytest.approx(1 / M, rel=0.1)


def test_chunks_are_salted_hashes_pooled_per_chunk_then_concatenated():
    m = build(budget=None, rows=500, chunk_dim=4)  # uniform: 2 chunks of 4 per feature
    w = m.ebc.embedding_bags["shared_all_0"].weight
    ids = [7, -3, 2**40, 7]  # a: bag [7, -3], empty bag, bag [2**40, 7]
    out = m(kjt({"a": ids, "b": [1, 2, 3], "c": [0, 1, 2]}, {"a": [2, 0, 2]})).to_dict()["a"]
    x = torch.tensor(ids)
    parts = [w[m.hasher(x, 500, which=j)] for j in range(2)]  # table t_a owns hashes 0 and 1
    want = torch.stack([torch.cat([p[:2].sum(0), p[2:].sum(0)]) for p in parts], 0)  # [chunk, bag]
    expected = torch.stack([torch.cat([want[0, i * 4 : (i + 1) * 4], want[1, i * 4 : (i + 1) * 4]]) for i in range(2)])
    torch.testing.assert_close(out[[0, 2]], expected)
    assert torch.equal(out[1], torch.zeros(8))
    assert not torch.equal(parts[0], parts[1])  # the two chunks hash differently


# -- output dims -------------------------------------------------------------------------


def test_output_dims_follow_the_chunk_rule():
    batch = kjt({"a": [1, 2], "b": [3, 4], "c": [5, 6]})
    uniform = build(chunk_dim=2)
    assert uniform.output_dims() == {"a": 8, "b": 8, "c": 8} and uniform.describe()["chunks"] == "a:4,b:4,c:4"
    card = build(chunk_dim=2, chunk_rule="cardinality", max_chunks=6)
    c = {f: d // 2 for f, d in card.output_dims().items()}
    assert c["a"] >= c["b"] >= c["c"] >= 1 and c["a"] > c["c"] and max(c.values()) <= 6
    assert sum(c.values()) == 12  # the uniform total, shared by log vocabulary
    explicit = build(chunk_dim=4, chunk_rule="explicit", feature_chunks={"a": 3, "c": 1})
    assert explicit.output_dims() == {"a": 12, "b": 8, "c": 4}
    wider = build(chunk_dim=4, chunks=3)  # uniform with both given: 3 chunks of 4, output 12
    assert set(wider.output_dims().values()) == {12}
    for m in (uniform, card, explicit, wider):
        out = m(batch)
        assert {k: v.shape[1] for k, v in out.to_dict().items()} == m.output_dims()
        assert [c.embedding_dim for c in m.embedding_bag_configs()] == [m.output_dims()[f] for f in "abc"]


def test_dlrm_forces_the_uniform_rule_and_says_so(caplog):
    forced = build(chunk_dim=4, chunk_rule="explicit", feature_chunks={"a": 3, "c": 1}, uniform_output=True)
    assert set(forced.output_dims().values()) == {DIM}
    assert forced.describe()["chunk_rule"] == "uniform (forced: uniform_output)"
    assert "chunks forced to uniform" in caplog.text
    # without the flag the module builds, and DLRM refuses it naming the fix
    mixed = build(chunk_dim=4, chunk_rule="cardinality")
    with pytest.raises(ValueError, match="DLRM needs one embedding dim.*uniform-dim method setting"):
        DLRMConfig().build(mixed, dense_in_features=2)
    m = build(chunk_dim=4, uniform_output=True, num_tables=2)
    model = DLRM(embedding_bag_collection=m, dense_in_features=2, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1])
    logits = model(torch.randn(2, 2), kjt({"a": [1, 2], "b": [3, 4], "c": [5, 6]}))
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert DLRMConfig(embedding_dim=DIM).build(m, dense_in_features=2) is not None


# -- degenerate settings -----------------------------------------------------------------


def test_single_groups_with_one_chunk_are_the_hashing_trick():
    hashed = compress(TABLES, HashingConfig(budget=None, rows=50), seed=1)
    ue = compress(TABLES, UE(budget=None, rows=50, groups="single"), seed=2)
    # the same hash (the hashing trick uses one function for every table) and weights
    ue.hasher.coeffs.copy_(hashed.hasher.coeffs[0].expand_as(ue.hasher.coeffs))
    d = ue.describe()
    assert (d["t_a.rows"], d["t_b.rows"], d["t_c.rows"]) == (50, 50, "exact") == tuple(
        hashed.describe()[f"{t}.rows"] for t in ("t_a", "t_b", "t_c")
    )
    # same rows; UE holds 3 hash functions and 3 per-chunk parameters, the hashing trick 1 and 2
    assert memory_report(ue).bytes - memory_report(hashed).bytes == (3 * 32 + 3 * 4 * 8) - (32 + 2 * 4 * 8)
    for t, inner in (("t_a", "shared_t_a_0"), ("t_b", "shared_t_b_0"), ("t_c", "exact_t_c")):
        ue.ebc.embedding_bags[inner].weight.data.copy_(hashed.ebc.embedding_bags[t].weight)
    batch = kjt({"c": [0, 29, 30, -1, 5], "a": [5, 99_999, -7, 2**50, 3], "b": [1, 2, 3, 4, 5]}, {"a": [2, 0, 1, 1, 1]})
    rows = virtual_rows(ue, batch)
    plain = hashed.rows(batch)  # in the batch's key order: c, a, b
    assert torch.equal(torch.cat([rows["c#0"], rows["a#0"], rows["b#0"]]), plain)
    torch.testing.assert_close(ue(batch).values(), hashed(batch).values(), rtol=0, atol=0)


def test_key_order_and_unknown_keys_do_not_matter():
    m = build(chunk_dim=4, num_tables=2)
    ordered = kjt({"a": [1, 2], "b": [3, -4], "c": [5, 6]}, {"b": [2, 0]})
    shuffled = kjt({"x": [9, 9], "c": [5, 6], "b": [3, -4], "a": [1, 2]}, {"b": [2, 0]})
    torch.testing.assert_close(m(shuffled).values(), m(ordered).values(), rtol=0, atol=0)
    with pytest.raises(KeyError, match="features \\['a'\\] are missing"):
        m(kjt({"b": [1], "c": [2]}))


def test_all_in_one_group_is_one_shared_table():
    m = build()
    (table,) = m.ebc.embedding_bag_configs()
    assert table.name == "shared_all_0" and table.embedding_dim == DIM
    assert m.describe()["groups"] == "all=a+b+c" and m.describe()["uncompressed_fields"] == ""
    rows = virtual_rows(m, kjt({"a": [1], "b": [1], "c": [1]}))
    assert all(int(r) < table.num_embeddings for r in rows.values())


def test_grouped_by_cardinality_and_explicit():
    m = build(groups="cardinality", n_groups=2)
    assert m.describe()["groups"] == "g0=c+b|g1=a"
    m = build(groups="explicit", group_features=[["a"], ["b", "c"]], chunk_dim=4)
    names = [c.name for c in m.ebc.embedding_bag_configs()]
    assert names == ["shared_g0_0", "shared_g1_0"]
    out = m(kjt({"a": [1, 2], "b": [3, 4], "c": [5, 6]}))
    assert out.keys() == ["a", "b", "c"] and out.values().shape == (2, 24)


# -- gradients and tables ------------------------------------------------------------------


def test_gradients_reach_only_the_rows_looked_up():
    m = build(chunk_dim=4, chunk_rule="cardinality", budget=Budget(ratio=50))
    m.train()
    batch = kjt({"a": [3, 8, 2**33], "b": [-1, 4], "c": [7]}, {"a": [2, 1, 0], "b": [0, 1, 1], "c": [1, 0, 0]})
    out = m(batch).values()
    (out * torch.randn_like(out)).sum().backward()
    (w,) = m.table_parameters()
    looked_up = torch.unique(m.remap(batch).values())
    touched = torch.nonzero(w.grad.abs().sum(1)).squeeze(1)
    assert torch.equal(touched, looked_up)


def test_several_tables_take_the_chunks_round_robin():
    tables, _ = criteo()
    m = compress(tables[:4], UE(chunk_dim=4, chunk_rule="explicit", feature_chunks={"C1": 3, "C3": 2}, num_tables=3))
    configs = m.ebc.embedding_bag_configs()
    assert [c.name for c in configs] == ["shared_all_0", "shared_all_1", "shared_all_2"]
    assert len({c.num_embeddings for c in configs}) == 1 and len({id(p) for p in m.table_parameters()}) == 3
    # chunks in order C1#0 C1#1 C1#2 C2#0..3 C3#0 C3#1 C4#0..3, dealt to tables 0 1 2 0 1 2 ...
    order = [f"C1#{j}" for j in range(3)] + [f"C2#{j}" for j in range(4)] + ["C3#0", "C3#1"] + [f"C4#{j}" for j in range(4)]
    on = {v: k for k, (s, n) in enumerate(zip(np.cumsum([0, *m._stack[:-1]]), m._stack)) for v in m._virtual[s : s + n]}
    assert [on[v] for v in order] == [i % 3 for i in range(len(order))]
    target = Budget(ratio=10).target_bytes(tables[:4])
    assert 0.95 * target <= memory_report(m).bytes <= target
    out = m(kjt({"C1": [1, 2], "C2": [3, 4], "C3": [5, 6], "C4": [0, 9]})).to_dict()
    assert {k: v.shape[1] for k, v in out.items()} == {"C1": 12, "C2": 16, "C3": 8, "C4": 16}


# -- budgets on the Criteo sample's vocabularies --------------------------------------------

VARIANTS = {
    "uniform": {},
    "cardinality": {"chunk_dim": 8, "chunk_rule": "cardinality"},
    "tables4": {"chunk_dim": 8, "num_tables": 4},
    "grouped4": {"groups": "cardinality", "n_groups": 4},
    "single": {"groups": "single"},
}
# 52 chunk hashes + per-chunk parameters (~3.6 KB) exceed 1000x (2.8 KB); single: 26 hashed tables of >= 1 row
UNREACHABLE = {("cardinality", 1000), ("tables4", 1000), ("single", 1000)}


@pytest.mark.parametrize("scope", ["model", "table"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_budget_bound_on_criteo_sample(variant, scope):
    tables, counts = criteo()
    for ratio in (10, 100, 1000):
        config = UE(budget=Budget(ratio=ratio, scope=scope), **VARIANTS[variant])
        target = config.budget.target_bytes(tables)
        if (variant, ratio) in UNREACHABLE:
            with pytest.raises(BudgetError, match="smallest it can hold") as err:
                compress(tables, config, counts=counts)
            smallest = int(re.search(r"is (\d+) bytes", str(err.value)).group(1))
            config.budget = Budget(bytes=smallest + len(tables))
            assert memory_report(compress(tables, config, counts=counts)).bytes == smallest
            continue
        m = compress(tables, config, counts=counts)
        held = memory_report(m).bytes
        assert 0.95 * target <= held <= target, (ratio, held, target)
        assert m.describe()["planned_bytes"] == held
        assert all(isinstance(v, (int, float, str)) for v in m.describe().values())


def test_group_rows_follow_the_groups_uncompressed_bytes():
    tables, counts = criteo()
    m = compress(tables, UE(budget=Budget(ratio=100), groups="cardinality", n_groups=3), counts=counts)
    d = m.describe()
    groups = {g.split("=")[0]: g.split("=")[1].split("+") for g in d["groups"].split("|")}
    vocab = {t.feature_names[0]: t.num_embeddings for t in tables}
    assert d["g0.rows"] == 1  # the smallest tables' share is below one row: pinned at their smallest form
    rates = [sum(vocab[f] for f in fs) / d[f"{g}.rows"] for g, fs in groups.items() if g != "g0"]
    assert len(rates) == 2 and max(rates) / min(rates) < 1.05  # one compression rate for the others


# -- bad input -----------------------------------------------------------------------------


def test_any_int64_id_is_hashed():
    m = build(budget=None, rows=100)
    batch = kjt({"a": [-1, -(2**63), 2**63 - 1, 100_000], "b": [0, 1, 2, 3], "c": [-5, 30, 31, 10**9]})
    rows = virtual_rows(m, batch)
    assert all(((r >= 0) & (r < 100)).all() for r in rows.values())
    assert torch.isfinite(m(batch).values()).all()


@pytest.mark.parametrize(
    "budget,key",
    [
        (Budget(ratio=0), "unified_embedding.budget.ratio: must be >= 1, got 0"),
        (Budget(ratio=-2), "unified_embedding.budget.ratio: must be >= 1, got -2"),
        (Budget(ratio=0.5), "unified_embedding.budget.ratio: must be >= 1, got 0.5"),
        (Budget(bytes=0), "unified_embedding.budget.bytes: must be >= 1, got 0"),
        (Budget(bytes=-1), "unified_embedding.budget.bytes: must be >= 1, got -1"),
    ],
)
def test_refuses_bad_budgets_when_the_config_is_made(budget, key):
    with pytest.raises(MethodConfigError) as e:
        UE(budget=budget)
    assert str(e.value) == key


def test_refuses_a_budget_larger_than_the_tables():
    with pytest.raises(BudgetError, match="larger than the uncompressed"):
        build(budget=Budget(bytes=10**12))


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"chunk_rule": "explicit", "feature_chunks": {"zz": 2}}, "feature_chunks names unknown feature 'zz'"),
        ({"chunk_rule": "explicit", "feature_chunks": {"a": 0}}, "feature_chunks\\['a'\\] must be >= 1"),
        ({"chunk_dim": 3}, "chunk_dim 3 does not divide the dim 8 of table 't_a'"),
        ({"chunks": 3}, "dim 8 is not divisible by chunks=3"),
        ({"chunk_rule": "cardinality"}, "leaves nothing to vary"),
        ({"groups": "explicit", "group_features": [["a", "zz"], ["b", "c"]]}, "unknown feature 'zz'"),
        ({"groups": "explicit", "group_features": [["a", "b"], ["b", "c"]]}, "feature 'b' is in two groups"),
        ({"groups": "explicit", "group_features": [["a", "b"]]}, "features in no group: c"),
        ({"groups": "explicit", "group_features": [["a", "b", "c"], []]}, "group_features\\[1\\] is empty"),
        ({"budget": None, "rows": 0}, "below the smallest allowed"),
    ],
)
def test_refuses_bad_configs_with_a_clear_message(kw, msg):
    config = UE(**kw)  # the config alone is fine: the tables refuse it
    with pytest.raises(MethodConfigError, match=msg) as e:
        compress(TABLES, config)
    assert str(e.value).startswith("unified_embedding: ") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"chunk_dim": 0}, "unified_embedding.chunk_dim: must be >= 1, got 0"),
        ({"chunks": 0}, "unified_embedding.chunks: must be >= 1, got 0"),
        ({"chunk_rule": "by_size"}, "unified_embedding.chunk_rule: must be one of uniform, cardinality, explicit, got 'by_size'"),
        ({"max_chunks": 0}, "unified_embedding.max_chunks: must be >= 1, got 0"),
        ({"num_tables": 0}, "unified_embedding.num_tables: must be >= 1, got 0"),
        ({"groups": "some"}, "unified_embedding.groups: must be one of all, single, cardinality, explicit, got 'some'"),
        ({"n_groups": 0}, "unified_embedding.n_groups: must be >= 1, got 0"),
        ({"feature_chunks": {"a": 2}}, "unified_embedding.feature_chunks and unified_embedding.chunk_rule: "
                                       "feature_chunks is only read with chunk_rule=explicit (chunk_rule is 'uniform')"),
        ({"group_features": [["a"]]}, "unified_embedding.group_features and unified_embedding.groups: "
                                      "group_features is only read with groups=explicit (groups is 'all')"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_made(kw, key):
    with pytest.raises(MethodConfigError) as e:
        UE(**kw)
    assert str(e.value) == key


def test_budget_and_rows_are_exclusive():
    with pytest.raises(BudgetError, match="either a budget or rows"):
        build(rows=10)


# -- Hydra configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice,fields",
    [
        ("unified_embedding", {}),
        ("unified_embedding_cardinality", {"chunk_dim": 8, "chunk_rule": "cardinality"}),
        ("multiplex_grouped", {"groups": "cardinality", "n_groups": 4}),
    ],
)
def test_yaml_variants_compose(choice, fields):
    register_configs()
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[2] / "experiments" / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"compression={choice}", "model=dlrm", "compression.uniform_output=true"])
    finally:
        GlobalHydra.instance().clear()
    config = OmegaConf.to_object(cfg.compression)
    assert config == UE(uniform_output=True, **fields)
    tables, counts = criteo()
    m = compress(tables, config, counts=counts)
    assert len(set(m.output_dims().values())) == 1  # DLRM's one dim: cardinality is forced to uniform
    if config.chunk_rule == "cardinality":
        assert m.describe()["chunk_rule"] == "uniform (forced: uniform_output)"
    assert uncompressed_bytes(tables) / memory_report(m).bytes >= 10
