"""DeepLight: the cubic schedule, masked weights staying zero, budgets met exactly by the
sparse tables (CSR and COO), the sparse lookup equal to the masked model, int8 values,
refusals, and the schedule reaching its target in a real training loop."""

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
from compression.masked import cubic_keep
from compression.methods.deeplight import DeepLightConfig
from compression.sparse import stored_bytes
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2Config
from recsys.training import Trainer, TrainerConfig
from tests.stages import EpochsByStage, StopAt

TABLES = [
    EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=5000, feature_names=["user"]),
    EmbeddingBagConfig(name="t_item", embedding_dim=32, num_embeddings=2000, feature_names=["item"]),
]
FULL = sum(t.num_embeddings * t.embedding_dim * 4 for t in TABLES)


def kjt(seed: int = 0, batch: int = 64) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, 5000, (batch,), generator=g), torch.randint(0, 2000, (batch,), generator=g)])
    return KeyedJaggedTensor(keys=["user", "item"], values=values, lengths=torch.ones(2 * batch, dtype=torch.int32))


def test_cubic_schedule():
    n, k = 1000, 100
    keeps = [cubic_keep(n, k, t / 10) for t in range(11)]
    assert keeps[0] == n and keeps[-1] == k and keeps == sorted(keeps, reverse=True)
    assert keeps[5] == n - round(900 * (1 - 0.5**3))  # S(t) = S (1 - (1 - t/T)^3)
    assert cubic_keep(n, k, 2.0) == k  # past the ramp: the target


def test_pruning_steps_follow_the_schedule_and_pruned_weights_stay_zero():
    m = compress(TABLES, DeepLightConfig(budget=None, target_sparsity=0.9, prune_every=1), seed=0)
    m._ramp_steps = 4
    opt = torch.optim.SGD(m.table_parameters(), lr=0.5)
    m.train()
    kept = []
    for step in range(6):
        m(kjt(seed=step)).values().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        kept.append([int(m.mask(i).sum()) for i in range(2)])
        for i in range(2):  # masked elements read 0, get no gradient and stay 0 in the table
            assert (m.weight(i)[~m.mask(i)] == 0).all()
    for i, t in enumerate(TABLES):
        n = t.num_embeddings * t.embedding_dim
        k = n - round(0.9 * n)
        assert [s[i] for s in kept] == [cubic_keep(n, k, s / 4) for s in range(6)]


@pytest.mark.parametrize("ratio", [3, 10, 300])
def test_budget_is_met_by_the_sparse_tables_counted_from_their_tensors(ratio):
    m = compress(TABLES, DeepLightConfig(budget=Budget(ratio=ratio)))
    m.compact()
    report = memory_report(m)
    expected = sum(t.numel() * t.element_size() for t in m.buffers())
    assert report.bytes == expected == m.describe()["planned_bytes"]
    assert 0.95 * FULL / ratio <= report.bytes <= FULL / ratio
    layouts = m.layouts()
    for t in TABLES:
        nnz = m.compact_module.tables[t.name].values.numel()
        assert nnz == m.describe()[f"{t.name}.kept"]
        assert layouts[t.name] == min(("csr", "coo"), key=lambda f: stored_bytes(f, t.num_embeddings, t.embedding_dim, nnz))
    if ratio == 3:
        assert set(layouts.values()) == {"csr"}
    if ratio == 300:
        assert set(layouts.values()) == {"coo"}


def test_sparse_lookup_equals_the_masked_model_and_int8_stays_close():
    config = DeepLightConfig(budget=Budget(ratio=10), quantization=Quantization("int8"), finetune_epochs=0)
    m = compress(TABLES, config, seed=1)
    assert [s.name for s in m.schedule()] == ["prune", "compact", "quantize"]
    m.fix_masks()
    m.eval()
    x = kjt(seed=5)
    masked = m(x).values()
    m.compact()
    torch.testing.assert_close(m(x).values(), masked, rtol=0, atol=0)
    m.quantize_values("int8")
    assert 0.95 * FULL / 10 <= memory_report(m).bytes <= FULL / 10
    assert (m(x).values() - masked).norm() < 0.01 * masked.norm()


def test_fp16_values_and_the_fp32_budget_precision():
    config = DeepLightConfig(budget=Budget(ratio=10), quantization=Quantization("fp16"), budget_precision="fp32")
    m = compress(TABLES, config)
    m.compact()
    fp32 = memory_report(m).bytes
    assert 0.95 * FULL / 10 <= fp32 <= FULL / 10  # the budget sized the fp32 values
    m.quantize_values("fp16")
    assert memory_report(m).bytes < fp32


@pytest.mark.parametrize("config, words", [
    (DeepLightConfig(budget=None), "^deeplight: needs a budget or explicit sizes"),
    (DeepLightConfig(budget=Budget(ratio=1e6)), r"^deeplight cannot reach 1e\+06x .* a ratio of [0-9.e+]+x$"),
    (DeepLightConfig(quantization=Quantization("int2")), "^deeplight: quantization int2 does not compose"),
])  # fmt: skip
def test_refusals_are_one_line(config, words):
    with pytest.raises((BudgetError, MethodConfigError), match=words) as err:
        compress(TABLES, config)
    assert "\n" not in str(err.value)
    reason = compress(TABLES, DeepLightConfig()).sharding_refusal()
    assert reason is not None and reason.startswith("deeplight: ") and "\n" not in reason


@pytest.mark.parametrize("kwargs, key", [
    ({"finetune_epochs": -1}, "deeplight.finetune_epochs: must be >= 0, got -1"),
    ({"prune_ramp": 2.0}, "deeplight.prune_ramp: must be <= 1, got 2.0"),
    ({"prune_ramp": -0.5}, "deeplight.prune_ramp: must be >= 0, got -0.5"),
    ({"prune_every": 0}, "deeplight.prune_every: must be >= 1, got 0"),
    ({"budget": None, "target_sparsity": 1.0}, "deeplight.target_sparsity: must be < 1, got 1.0"),
    ({"budget": None, "target_sparsity": -0.1}, "deeplight.target_sparsity: must be >= 0, got -0.1"),
    ({"budget_precision": "int8"}, "deeplight.budget_precision: must be one of deployed, fp32, got 'int8'"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        DeepLightConfig(**kwargs)
    assert str(e.value) == key


def test_the_schedule_reaches_the_target_in_a_training_loop(tiny_dataset):
    torch.manual_seed(0)
    tables = embedding_tables(tiny_dataset.schema, 8)
    numel = sum(t.num_embeddings * t.embedding_dim for t in tables)
    cfg = TrainerConfig(epochs=2, batch_size=128, device="cpu", progress="off", log_every_steps=0, patience=5)
    config = DeepLightConfig(budget=None, target_sparsity=0.8, prune_ramp=0.6, prune_every=3, finetune_epochs=1)
    module = compress(tables, config, seed=0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(tiny_dataset.schema.dense))
    loaders = [BatchLoader(tiny_dataset, s, 128, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    epochs = EpochsByStage()
    result = Trainer(cfg, callbacks=[epochs]).run(model, module, *loaders)
    assert list(result.stages) == ["prune", "finetune", "compact"]
    pruning = [m["kept_fraction"] for s, m in epochs.seen if s == "prune"]
    assert len(pruning) == 2 and pruning == sorted(pruning, reverse=True) and pruning[0] > pruning[-1]
    kept = sum(t.num_embeddings * t.embedding_dim - round(0.8 * t.num_embeddings * t.embedding_dim) for t in tables)
    assert result.stages["prune"]["kept_fraction"] == pytest.approx(kept / numel)
    assert sum(p.values.numel() for p in module.compact_module.tables.values()) == kept
    # compacting is exact: the sparse tables compute what the fine-tuned masked model did
    assert result.stages["compact"]["val_auc"] == pytest.approx(result.stages["finetune"]["val_auc"], abs=1e-6)


def _setup(ds):
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=1, batch_size=128, device="cpu", progress="off", log_every_steps=1, patience=5,
                        checkpoint_every_steps=5)  # fmt: skip
    module = compress(embedding_tables(ds.schema, 8), DeepLightConfig(budget=Budget(ratio=3), prune_every=2), seed=0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, 128 if s == "train" else 512, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    return cfg, module, model, loaders


@pytest.mark.parametrize("stop", [("prune", 7), ("finetune", 7)])
def test_schedule_resumes_after_an_interruption(tiny_dataset, tmp_path, stop):
    """The masks, the pruning step count and the phase are state: a run interrupted in
    either stage resumes to the same model and bytes."""
    cfg, module, model, loaders = _setup(tiny_dataset)
    ref = Trainer(cfg).run(model, module, *loaders)
    ref_bytes = memory_report(module).bytes
    cfg, module, model, loaders = _setup(tiny_dataset)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[StopAt(stop)], checkpoint_dir=tmp_path).run(model, module, *loaders)
    cfg, module, model, loaders = _setup(tiny_dataset)
    resumed = Trainer(cfg, checkpoint_dir=tmp_path).run(model, module, *loaders)
    assert resumed.test == ref.test and memory_report(module).bytes == ref_bytes
