import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, Quantization, compress, memory_report
from compression.budget import BudgetError
from compression.methods.dedup import DedupConfig, lsh_groups
from compression.quantization import quantize_
from tests.stages import user_item_tags

DIM = 16
TABLES = [
    EmbeddingBagConfig(name="t_user", embedding_dim=DIM, num_embeddings=20000, feature_names=["user"]),
    EmbeddingBagConfig(name="t_item", embedding_dim=DIM, num_embeddings=3000, feature_names=["item"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=DIM, num_embeddings=300, feature_names=["tags"]),
]
FULL = sum(t.num_embeddings * DIM * 4 for t in TABLES)


def kjt(seed: int = 0, batch: int = 32) -> KeyedJaggedTensor:
    return user_item_tags(TABLES, seed, batch)


@pytest.mark.parametrize("groups", [1, 7, 100, 999])
def test_lsh_gives_exactly_the_planned_groups_and_keeps_near_rows_together(groups):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(groups, 8, generator=g)
    rows = centres.repeat(1000 // groups + 1, 1)[:1000] + 1e-4 * torch.randn(1000, 8, generator=g)
    label, bits = lsh_groups(rows, groups, torch.Generator().manual_seed(1))
    assert label.unique().numel() == groups and int(label.max()) == groups - 1
    first = torch.full((groups,), 1000).scatter_reduce(0, label, torch.arange(1000), "amin")
    assert torch.equal(first, first.sort().values)  # numbered by their smallest row
    again, _ = lsh_groups(rows, groups, torch.Generator().manual_seed(1))
    assert torch.equal(label, again)
    assert 0 <= bits <= 62
    same, _ = lsh_groups(torch.zeros(50, 8), 10, torch.Generator().manual_seed(1))  # identical rows still split
    assert same.unique().numel() == 10


def test_merge_meets_the_budget_with_merged_rows_and_the_remap():
    m = compress(TABLES, DedupConfig(budget=Budget(ratio=8)), seed=3)
    assert [s.name for s in m.schedule()] == ["train", "merge", "finetune"]
    assert memory_report(m).bytes > FULL / 8  # the full tables train first
    w = {t.name: m.ebc.embedding_bags[t.name].weight.detach().clone() for t in TABLES}
    m.merge()
    report = memory_report(m)
    assert 0.95 * FULL / 8 <= report.bytes <= FULL / 8 and report.bytes == m.describe()["planned_bytes"]
    compressed = [t for t in TABLES if m.describe()[f"{t.name}.rows"] != "exact"]
    assert compressed and report.by_tensor["buffer:remap"] == 4 * sum(t.num_embeddings for t in compressed)
    off = 0
    for t in compressed:  # each merged row is the mean of the rows mapped to it
        remap = m.remap[off : off + t.num_embeddings].long()
        off += t.num_embeddings
        merged = m.ebc.embedding_bags[t.name].weight
        assert merged.shape[0] == m.describe()[f"{t.name}.rows"] == int(remap.max()) + 1
        row = int(remap[17])
        torch.testing.assert_close(merged[row], w[t.name][remap == row].mean(0))
    x = kjt()
    out = m(x).to_dict()
    remap = m.remap[: TABLES[0].num_embeddings].long()
    torch.testing.assert_close(out["user"], m.ebc.embedding_bags["t_user"].weight[remap[x["user"].values()]])


def test_merged_tables_quantize_to_the_deployed_budget():
    config = DedupConfig(budget=Budget(ratio=5), quantization=Quantization("int8"))
    m = compress(TABLES, config)
    m.merge()
    quantize_(m, config.quantization)
    held = memory_report(m).bytes
    assert 0.95 * FULL / 5 <= held <= FULL / 5 and held == m.describe()["planned_bytes"]
    with pytest.raises(MethodConfigError, match="dedup: quantization-aware training is refused"):
        compress(TABLES, DedupConfig(quantization=Quantization("int8", aware=True)))


@pytest.mark.parametrize("kwargs, key", [
    ({"budget": None, "rows": 0}, "dedup.rows: must be >= 1, got 0"),
    ({"finetune_epochs": -1}, "dedup.finetune_epochs: must be >= 0, got -1"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        DedupConfig(**kwargs)
    assert str(e.value) == key


def test_the_remap_bounds_the_ratio():
    with pytest.raises(BudgetError, match=r"dedup cannot reach 100x .* smallest it can hold"):
        compress(TABLES, DedupConfig(budget=Budget(ratio=100)))
    m = compress(TABLES, DedupConfig(budget=None, rows=50))
    assert all(m.describe()[f"{t.name}.rows"] == 50 for t in TABLES)
