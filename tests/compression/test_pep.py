"""PEP: the soft threshold, budgets met exactly by the sparse tables (bytes from their
tensors), CSR and COO, the sparse lookup equal to the masked model, refusals, and the
schedule reaching the budget's sparsity in a real training loop."""

from __future__ import annotations

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
from compression.methods.pep import PEPConfig
from compression.sparse import SCALE_BYTES, column_bytes, stored_bytes
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2Config
from recsys.training import Trainer, TrainerConfig
from tests.stages import EpochsByStage, user_item_tags

# dims 4 and 64: at 10x the narrow table keeps under one element a row (COO), the wide one
# several (CSR); the mean-pooled multi-hot table checks pooling
TABLES = [
    EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=20000, feature_names=["user"]),
    EmbeddingBagConfig(name="t_item", embedding_dim=64, num_embeddings=3000, feature_names=["item"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=16, num_embeddings=300, feature_names=["tags"],
                       pooling=PoolingType.MEAN),
]  # fmt: skip
FULL = sum(t.num_embeddings * t.embedding_dim * 4 for t in TABLES)


def kjt(seed: int = 0, batch: int = 32) -> KeyedJaggedTensor:
    return user_item_tags(TABLES, seed, batch)


def held(module) -> int:
    """Independent count: every parameter and buffer by numel times element size."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_soft_threshold_is_sign_relu_of_magnitude_minus_sigmoid():
    m = compress(TABLES, PEPConfig(budget=None, threshold_init=0.0))  # g(0) = 0.5
    v = torch.tensor([[-1.0, -0.4, 0.2, 0.75]])
    assert m.transform(0, v).tolist() == [[-0.5, 0.0, 0.0, 0.25]]
    with torch.no_grad():
        m.weight(1).fill_(1.0)  # above g(s): its elements pass, and so does the gradient to s
    m.train()
    m(kjt()).values().pow(2).sum().backward()
    assert m.thresholds.grad[1].item() < 0  # raising s would shrink the squared output
    assert m.thresholds.grad is not None and m.thresholds.grad.abs().sum() > 0  # s learns


@pytest.mark.parametrize("ratio", [4, 10, 100, 1000])
def test_budget_is_met_by_the_sparse_tables_counted_from_their_tensors(ratio):
    m = compress(TABLES, PEPConfig(budget=Budget(ratio=ratio)), seed=1)
    planned = m.describe()["planned_bytes"]
    assert memory_report(m).bytes > FULL / ratio  # full tables and masks while training
    m.compact()
    report = memory_report(m)
    assert report.bytes == held(m) == planned
    assert 0.95 * FULL / ratio <= report.bytes <= FULL / ratio
    for t in TABLES:  # each table is exactly its layout's arrays, index overhead included
        part = m.compact_module.tables[t.name]
        nnz = part.values.numel() if part.layout != "dense" else t.num_embeddings * t.embedding_dim
        by_tensor = sum(b for k, b in report.by_tensor.items() if f".tables.{t.name}." in k)
        assert by_tensor == stored_bytes(part.layout, t.num_embeddings, t.embedding_dim, nnz)
        assert nnz == (t.num_embeddings * t.embedding_dim if m.describe()[f"{t.name}.kept"] == "exact"
                       else m.describe()[f"{t.name}.kept"])  # fmt: skip


def test_both_sparse_layouts_and_dense_are_chosen_by_their_bytes():
    m = compress(TABLES, PEPConfig(budget=Budget(ratio=10)))
    # the small table's dense form fits its share of the budget: it stays whole, dense
    assert m.layouts() == {"t_user": "coo", "t_item": "csr", "t_tags": "dense"}
    m.compact()
    user, item = m.compact_module.tables["t_user"], m.compact_module.tables["t_item"]
    assert user.rows.dtype == torch.int32 and user.cols.dtype == torch.uint8 and not hasattr(user, "rowptr")
    assert item.rowptr.shape == (3001,) and item.rowptr.dtype == torch.int32 and item.cols.dtype == torch.uint8
    k = item.values.numel()
    assert stored_bytes("csr", 3000, 64, k) < stored_bytes("coo", 3000, 64, k) < stored_bytes("dense", 3000, 64, k)
    assert column_bytes(256) == 1 and column_bytes(257) == 2 and column_bytes(40000) == 4
    assert m.compact_module.tables["t_tags"].values.shape == (300, 16)


@pytest.mark.parametrize("config", [PEPConfig(budget=Budget(ratio=10)), PEPConfig(budget=None, target_sparsity=0.3),
                                    PEPConfig(budget=None, threshold_init=-1.0, granularity="dim")])  # fmt: skip
def test_sparse_lookup_equals_the_masked_model(config):
    m = compress(TABLES, config, seed=2)
    m.train()
    opt = torch.optim.SGD(m.table_parameters(), lr=0.5)
    for step in range(3):  # move the rows (and prune, under a plan) before the cut
        m(kjt(seed=10 + step)).values().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    m.fix_masks()
    m.eval()
    x = kjt(seed=3, batch=64)
    masked = m(x).values()
    m.compact()
    torch.testing.assert_close(m(x).values(), masked, rtol=0, atol=0)
    if config.budget is None and config.target_sparsity is None:  # thresholds alone: the zeros V' made
        assert m.kept_fraction()["kept_fraction"] < 1.0


def test_int8_values_meet_the_deployed_budget_and_stay_close():
    config = PEPConfig(budget=Budget(ratio=10), quantization=Quantization("int8"))
    m = compress(TABLES, config)
    assert [s.name for s in m.schedule()] == ["prune", "retrain", "compact", "quantize"]
    m.compact()
    m.eval()
    x = kjt(seed=4)
    fp32 = m(x).values()
    assert memory_report(m).bytes > FULL / 10  # sized for int8 values: more of them
    m.quantize_values("int8")
    report = memory_report(m)
    assert 0.95 * FULL / 10 <= report.bytes <= FULL / 10 and report.bytes == m.describe()["planned_bytes"] == held(m)
    assert sum(b for k, b in report.by_tensor.items() if k.endswith(".scale")) == SCALE_BYTES * len(TABLES)
    assert (m(x).values() - fp32).norm() < 0.01 * fp32.norm()


@pytest.mark.parametrize("config, words", [
    (PEPConfig(budget=Budget(ratio=1e6)), r"^pep cannot reach 1e\+06x .* a ratio of [0-9.e+]+x$"),
    (PEPConfig(quantization=Quantization("int4")), "^pep: quantization int4 does not compose"),
    (PEPConfig(quantization=Quantization("int8", aware=True)), "^pep: quantization int8-qat does not compose"),
])  # fmt: skip
def test_refusals_are_one_line(config, words):
    with pytest.raises((BudgetError, MethodConfigError), match=words) as err:
        compress(TABLES, config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, key", [
    ({"granularity": "row"}, "pep.granularity: must be one of table, dim, got 'row'"),
    ({"retrain_epochs": -1}, "pep.retrain_epochs: must be >= 0, got -1"),
    ({"budget": None, "target_sparsity": 1.0}, "pep.target_sparsity: must be < 1, got 1.0"),
    ({"budget": None, "target_sparsity": -0.5}, "pep.target_sparsity: must be >= 0, got -0.5"),
    ({"prune_ramp": 1.5}, "pep.prune_ramp: must be <= 1, got 1.5"),
    ({"prune_ramp": -0.1}, "pep.prune_ramp: must be >= 0, got -0.1"),
    ({"prune_every": 0}, "pep.prune_every: must be >= 1, got 0"),
    ({"target_sparsity": 0.5}, "pep.budget and pep.target_sparsity: set either a budget or target_sparsity, not both"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        PEPConfig(**kwargs)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_sharding_is_refused_in_one_line():
    reason = compress(TABLES, PEPConfig()).sharding_refusal()
    assert reason is not None and reason.startswith("pep: ") and "\n" not in reason


def test_the_schedule_reaches_the_budget_in_a_training_loop(tiny_dataset):
    """prune (thresholds train from -15, the floor ramps the kept count down), the exact cut,
    retrain with the mask fixed, compact: the budget's sparsity and bytes, AUC logged per epoch."""
    torch.manual_seed(0)
    tables = embedding_tables(tiny_dataset.schema, 8)
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    cfg = TrainerConfig(epochs=2, batch_size=128, device="cpu", progress="off", log_every_steps=0, patience=5)
    module = compress(tables, PEPConfig(budget=Budget(ratio=4), prune_every=2, retrain_epochs=1), seed=0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(tiny_dataset.schema.dense))
    loaders = [BatchLoader(tiny_dataset, s, 128, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    epochs = EpochsByStage()
    before = module.thresholds.detach().clone()
    result = Trainer(cfg, callbacks=[epochs]).run(model, module, *loaders)
    assert list(result.stages) == ["prune", "retrain", "compact"]
    pruning = [m for s, m in epochs.seen if s == "prune"]
    assert len(pruning) == 2 and all("val_auc" in m and "kept_fraction" in m for m in pruning)
    assert pruning[0]["kept_fraction"] > pruning[-1]["kept_fraction"]
    planned = [module.plan.sizes[t.name] for t in tables]
    numel = sum(t.num_embeddings * t.embedding_dim for t in tables)
    kept = sum(k if k is not None else t.num_embeddings * t.embedding_dim for k, t in zip(planned, tables))
    assert result.stages["retrain"]["kept_fraction"] <= kept / numel  # zeros among the kept may appear
    assert result.stages["prune"]["val_auc"] > 0.5
    # compacting is exact: the sparse tables compute what the retrained masked model did
    assert result.stages["compact"]["val_auc"] == pytest.approx(result.stages["retrain"]["val_auc"], abs=1e-6)
    # validation while pruning sees the cut the stage ends with: the best epoch's AUC is the cut's
    assert result.stages["prune"]["cut_val_auc"] == pytest.approx(result.stages["prune"]["val_auc"], abs=1e-6)
    assert 0.95 * full / 4 <= memory_report(module).bytes <= full / 4
    assert result.stages["compact"]["embedding_bytes"] == memory_report(module).bytes
    # s trained, but on 38 steps g(s) stays far below the rows' magnitudes (the stall the
    # floor is for): the budget's sparsity came from the floor and the cut
    g = result.stages["prune"]["threshold.t_u"]
    assert g != pytest.approx(torch.sigmoid(before[0]).item(), rel=1e-3) and g < 1e-3


def test_int8_sparse_tables_export_and_reload_with_equal_predictions(tmp_path):
    """The deployed form (CSR, COO and dense tables, int8 values) through torch.export:
    the reloaded program predicts what the module does, at other batch sizes too."""
    from compression.export import export_model, inputs, load_exported
    from recsys.models import DCNv2

    module = compress(TABLES, PEPConfig(budget=Budget(ratio=10), quantization=Quantization("int8")), seed=0)
    module.compact()
    module.quantize_values("int8")
    assert set(module.layouts().values()) == {"coo", "csr", "dense"}
    torch.manual_seed(0)
    net = DCNv2(module, dense_in_features=4, deep_layers=[16], cross_layers=1).eval()

    def batch(size: int, seed: int):
        return torch.randn(size, 4, generator=torch.Generator().manual_seed(seed)), kjt(seed=seed, batch=size)

    program = load_exported(export_model(net, batch(6, 0), tmp_path / "pep.pt2").path)
    with torch.no_grad():
        for size, seed in ((9, 1), (64, 2)):
            b = batch(size, seed)
            torch.testing.assert_close(program(*inputs(b)), net(*b), rtol=1e-6, atol=1e-6)
