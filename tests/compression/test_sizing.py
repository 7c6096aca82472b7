"""Budget-driven sizing (compression.sizing) and every method's budget bound on the
Criteo sample's real vocabularies."""

from __future__ import annotations

import csv
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from torchrec.modules.embedding_configs import EmbeddingBagConfig

import compression
from compression import Budget, BudgetError, compress, memory_report, uncompressed_bytes
from compression.methods.double_hashing import DoubleHashingConfig
from compression.methods.qr import QRConfig
from compression.sizing import (
    BudgetedConfig,
    FieldCost,
    check_exclusive,
    plan_budget,
    plan_explicit,
)

REPO = Path(__file__).resolve().parents[2]
CRITEO_SAMPLE = REPO / "data" / "criteo-sample" / "train.txt"
DIM = 16
RATIOS = (2, 10, 100, 1000)


@cache
def criteo() -> tuple[list[EmbeddingBagConfig], dict[str, np.ndarray]]:
    """C1..C26 of the sample: distinct non-empty values + 1 (the OOV id 0), dim 16;
    counts per id with ids 1.. by descending frequency (the processed data's order)."""
    seen: list[dict[str, int]] = [{} for _ in range(26)]
    with open(CRITEO_SAMPLE, newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            for j, v in enumerate(row[14:40]):
                if v:
                    seen[j][v] = seen[j].get(v, 0) + 1
    tables = [
        EmbeddingBagConfig(name=f"t_C{j + 1}", embedding_dim=DIM, num_embeddings=len(c) + 1, feature_names=[f"C{j + 1}"])
        for j, c in enumerate(seen)
    ]
    counts = {f"C{j + 1}": np.array([0] + sorted(c.values(), reverse=True)) for j, c in enumerate(seen)}
    return tables, counts


def budget_methods():
    """Every method sized at build time: default configs plus variants whose bytes differ.

    Configs declaring ``sized_by_stages`` hold their budgeted form only after a stage
    (optembed's search, dpq/mgqe's pack, dedup's merge, pep/deeplight/itep's compact,
    autosrh/autodim's select) and are checked in their own tests.
    """
    configs = [cls() for name, cls in sorted(compression.registered_methods().items())
               if name != "none" and not cls.sized_by_stages]  # fmt: skip
    configs += [DoubleHashingConfig(tables="separate"), DoubleHashingConfig(combine="concat"), QRConfig(combine="concat")]
    return configs


def label(c) -> str:
    extra = "-".join(str(getattr(c, k)) for k in ("combine", "tables") if hasattr(c, k))
    return c.method + (f"-{extra}" if extra else "")


# what the Criteo sample (dim 16) cannot reach: the smallest form of these methods is larger
UNREACHABLE = {
    "double_hashing-sum-separate": {1000},  # 2 rows per table at least
    "frequency_hybrid": {1000},  # one hashed row per table plus 6 per-feature parameters
    "managed_collision": {100, 1000},  # ~8 KB of TorchRec buffers per MC table
    "mixed_dim": {100, 1000},  # one dim per row at least: about 1/16 of fp32
    "qr-mult": {100, 1000},
    "qr-add": {100, 1000},
    "qr-concat": {100, 1000},  # about 2·sqrt(N) rows per table at least
    "dhe": {1000},  # 128 hash functions' coefficients (4 KiB) and one MLP per table
    "tt_rec": {1000},  # rank 1: about 3·N^(1/3)·dim^(1/3) values per table at least
    "cafe": {1000},  # one exact slot, one hashed row and one bucket of sketch per table at least
    "mpzch": {1000},  # two slots (rows, identities and read times) and a step clock per table at least
}


@pytest.mark.parametrize("scope", ["model", "table"])
@pytest.mark.parametrize("config", budget_methods(), ids=label)
def test_budget_bound_on_criteo_sample(config, scope):
    tables, counts = criteo()
    full = uncompressed_bytes(tables)
    assert full == 43605 * DIM * 4  # the sample's vocabularies, OOV id included
    for ratio in RATIOS:
        config.budget = Budget(ratio=ratio, scope=scope)
        target = config.budget.target_bytes(tables)
        if ratio in UNREACHABLE.get(label(config), ()):
            with pytest.raises(BudgetError, match="smallest it can hold") as err:
                compress(tables, config, counts=counts)
            smallest = int(re.search(r"is (\d+) bytes", str(err.value)).group(1))
            assert smallest > target
            assert f"{full / smallest:.4g}x" in str(err.value)
            # and that smallest figure is reachable (model-scope targets round each
            # table's share down, losing up to a byte per table)
            config.budget = Budget(bytes=smallest + len(tables))
            held = memory_report(compress(tables, config, counts=counts)).bytes
            assert held == smallest
            continue
        m = compress(tables, config, counts=counts)
        held = memory_report(m).bytes
        assert 0.95 * target <= held <= target, (ratio, held, target)
        assert m.describe()["planned_bytes"] == held
        assert all(isinstance(v, (int, float, str)) for v in m.describe().values())


def test_small_fields_stay_exact_and_are_reported():
    tables, counts = criteo()
    from compression.methods.hashing import HashingConfig

    m = compress(tables, HashingConfig(budget=Budget(ratio=10)), counts=counts)
    d = m.describe()
    exact = d["uncompressed_fields"].split(",")
    # water-filling: the smallest fields keep every row, each within an equal share of
    # what the fields not smaller than it have left (~11-12 KB at 10x: <= 176 rows)
    assert exact == ["C1", "C5", "C6", "C8", "C9", "C14", "C17", "C20", "C22", "C23", "C25"]
    size = {t.feature_names[0]: t.num_embeddings * DIM * 4 for t in tables}
    compressed = sorted(size[f] for f in size if f not in exact)
    assert max(size[f] for f in exact) < compressed[0]
    left = Budget(ratio=10).target_bytes(tables) - sum(size[f] for f in exact)
    assert compressed[0] > left / len(compressed)
    for t in tables:
        rows = d[f"{t.name}.rows"]
        assert rows == "exact" if t.feature_names[0] in exact else rows < t.num_embeddings
    # one compression rate for the compressed fields (rows proportional to vocabulary)
    rates = [t.num_embeddings / d[f"{t.name}.rows"] for t in tables if t.feature_names[0] not in exact]
    assert max(rates) / min(rates) < 1.05


def budgeted_methods():
    """Every method that takes a budget, the staged ones included: a bad budget is refused
    when the module is built, whenever its budgeted form is reached."""
    staged = [cls() for name, cls in sorted(compression.registered_methods().items())
              if cls.sized_by_stages and issubclass(cls, BudgetedConfig)]  # fmt: skip
    return budget_methods() + staged


@pytest.mark.parametrize("config", budgeted_methods(), ids=label)
@pytest.mark.parametrize(
    "budget,msg",
    [
        (Budget(ratio=0), "must be positive"),
        (Budget(ratio=-2), "must be positive"),
        (Budget(bytes=0), "must be positive"),
        (Budget(bytes=-100), "must be positive"),
        (Budget(ratio=0.5), "more memory than the uncompressed"),
        (Budget(bytes=10**12), "larger than the uncompressed"),
    ],
)
def test_every_method_refuses_bad_budgets(config, budget, msg):
    tables, counts = criteo()
    config.budget = budget
    with pytest.raises(BudgetError, match=msg):
        compress(tables[:3], config, counts=counts)


# -- the engine on synthetic costs ---------------------------------------------------------


def rows_cost(t: EmbeddingBagConfig, overhead: int = 0) -> FieldCost:
    per = 4 * t.embedding_dim
    return FieldCost(t.name, per * t.num_embeddings, 1, t.num_embeddings, lambda m: per * m + overhead)


SYN = [
    EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=10, feature_names=["fa"]),
    EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=1000, feature_names=["fb"]),
    EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=3000, feature_names=["fc"]),
]


def test_plan_lands_in_the_window_and_reports_exact_tables():
    plan = plan_budget("x", [rows_cost(t) for t in SYN], Budget(ratio=8), SYN, fixed=40)
    target = Budget(ratio=8).target_bytes(SYN)
    assert 0.95 * target <= plan.total <= target
    assert plan.exact == ["a"] and plan.sizes["b"] < 1000 and plan.sizes["c"] < 3000
    assert plan.describe("rows", {"a": ["fa"], "b": ["fb"], "c": ["fc"]})["uncompressed_fields"] == "fa"


def test_plan_refuses_what_it_cannot_reach_with_the_smallest_figure():
    costs = [rows_cost(t, overhead=200) for t in SYN]
    smallest = 16 + 160 + 2 * (16 + 200)  # fixed, table a exact (its plain form is smaller), b and c at one row
    with pytest.raises(BudgetError, match=f"smallest it can hold these tables in is {smallest} bytes"):
        plan_budget("x", costs, Budget(bytes=smallest - 1), SYN, fixed=16)
    plan = plan_budget("x", costs, Budget(bytes=smallest + 3), SYN, fixed=16)  # +3: per-table rounding
    assert plan.total == smallest and plan.exact == ["a"]


def test_plan_says_when_steps_are_too_coarse():
    table = EmbeddingBagConfig(name="a", embedding_dim=25, num_embeddings=10, feature_names=["fa"])
    coarse = [FieldCost("a", 1000, 1, 2, lambda k: 600 * k)]
    with pytest.raises(BudgetError, match="coarse steps and the closest below is 600 bytes"):
        plan_budget("x", coarse, Budget(bytes=900), [table], fixed=0)


def test_table_scope_shares_each_tables_own_budget():
    budget = Budget(bytes=120, scope="table")  # Budget refuses more than the smallest table
    plan = plan_budget("x", [rows_cost(t) for t in SYN], budget, SYN)
    assert plan.exact == [] and sorted(plan.sizes.values()) == [7, 7, 8]  # 7 rows each, 1 from rounding
    assert 0.95 * 360 <= plan.total <= 360


def test_explicit_sizes_and_exclusivity():
    plan = plan_explicit("x", [rows_cost(t) for t in SYN], {"a": 50, "b": 50, "c": 50}, SYN, fixed=8)
    assert plan.sizes == {"a": None, "b": 50, "c": 50}
    assert plan.total == 8 + 160 + 2 * 50 * 16
    with pytest.raises(ValueError, match="below the smallest"):
        plan_explicit("x", [rows_cost(t) for t in SYN], {"a": 0, "b": 5, "c": 5}, SYN)
    with pytest.raises(ValueError, match="either a budget or rows"):
        check_exclusive("x", Budget(ratio=2), rows=5)
    check_exclusive("x", None, rows=5)


@pytest.mark.parametrize("name", [n for n in compression.registered_methods()
                                  if n != "none" and (REPO / "experiments" / "conf" / "compression" / f"{n}.yaml").exists()])
def test_yaml_matches_the_config_defaults(name):
    """A method's YAML, where it has one (one without composes from its dataclass alone),
    documents the dataclass's defaults and says nothing else."""
    cls = compression.config_class(name)
    text = (REPO / "experiments" / "conf" / "compression" / f"{name}.yaml").read_text()
    assert text.startswith("#")
    raw = yaml.safe_load(text)
    assert raw.pop("defaults") == [f"schema_{name}", "_self_"]
    merged = OmegaConf.merge(OmegaConf.structured(cls), raw)
    assert OmegaConf.to_object(merged) == cls()

