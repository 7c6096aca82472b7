"""AutoSrh: frequency groups, the budgeted pruning (bytes counted from the tensors, the
remap included), the deployed form against the searched model, the search on a problem
whose answer is known, refusals, int8, export, and its schedule through the trainer."""

from __future__ import annotations

import numpy as np
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
    quantize_,
)
from compression.export import export_model, inputs, load_exported
from compression.methods.autosrh import AutoSrhConfig, choose_entries, frequency_groups
from compression.segments import RANK_BYTES
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2, DCNv2Config
from recsys.training import Callback, Trainer, TrainerConfig
from tests.compression.test_export import TABLES as EXPORT_TABLES
from tests.compression.test_export import batch
from tests.stages import StopAt

D = 8
TABLES = [
    EmbeddingBagConfig(name="t_small", embedding_dim=D, num_embeddings=7, feature_names=["small"]),
    EmbeddingBagConfig(name="t_big", embedding_dim=D, num_embeddings=20000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_mid", embedding_dim=D, num_embeddings=3000, feature_names=["tags"]),
]
# t_mid's ids are not in frequency order (it needs the int32 remap), the others are
COUNTS = {
    "small": np.arange(7, 0, -1) * 10,
    "big": 100_000 // np.arange(1, 20001),
    "tags": np.random.default_rng(0).permutation(3000 // np.arange(1, 3001)),
}


def kjt(batch_size: int = 16, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    tag_len = torch.randint(0, 3, (batch_size,), generator=g)
    values = torch.cat([torch.randint(0, 7, (batch_size,), generator=g), torch.randint(0, 20000, (batch_size,), generator=g),
                        torch.randint(0, 3000, (int(tag_len.sum()),), generator=g)])  # fmt: skip
    lengths = torch.cat([torch.ones(2 * batch_size, dtype=torch.int32), tag_len.int()])
    return KeyedJaggedTensor(keys=["small", "big", "tags"], values=values, lengths=lengths)


def randomise_alpha(m, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in m.alpha.values():
            a.copy_(torch.rand(a.shape, generator=g))


def test_groups_grow_geometrically_from_the_most_frequent_ids():
    counts = np.array([1, 50, 3, 3, 0, 9, 7, 2, 8, 4, 6, 5, 10, 11, 12])
    rank, starts = frequency_groups(counts, 15, 4)
    assert starts == [0, 1, 3, 7]  # sizes 1, 2, 4, 8
    assert rank[1] == 0 and rank[4] == 14 and rank[2] < rank[3]  # ties by id
    assert frequency_groups(np.ones(3), 3, 4)[1] == [0, 1, 2]  # at most one group an id


@pytest.mark.parametrize("ratio", [2, 4, 8, 30])
def test_a_budget_is_met_by_the_deployed_tensors(ratio):
    m = compress(TABLES, AutoSrhConfig(budget=Budget(ratio=ratio)), counts=COUNTS)
    assert m.remapped == {"t_mid"}
    randomise_alpha(m, seed=ratio)
    target = m.target_bytes()
    m.deploy(choose_entries(m.source_tables(), m.scores(), m.starts, m.remapped, m.fmt, target))
    held = memory_report(m).bytes
    counted = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    assert held == counted == m.describe()["planned_bytes"]
    assert 0.95 * target <= held <= target, (held, target)
    assert m.deployed.rank("t_mid").numel() * m.deployed.rank("t_mid").element_size() == RANK_BYTES * 3000
    assert m.deployed.rank("t_big") is None
    assert m(kjt()).values().shape == (16, 3 * D)


def test_deployed_form_equals_the_searched_model_with_the_pruned_dims_at_zero():
    m = compress(TABLES, AutoSrhConfig(budget=None, prune_threshold=0.5, retrain_from="search"), counts=COUNTS, seed=2)
    randomise_alpha(m, seed=4)
    segs = choose_entries(m.source_tables(), m.scores(), m.starts, m.remapped, m.fmt, None, 0.5)
    with torch.no_grad():  # the searched model with the pruned entries at zero
        for t, a in m.alpha.items():
            keep = torch.zeros_like(a)
            for g, seg in enumerate(segs[t]):
                keep[g, list(seg.dims)] = 1.0
            a.mul_(keep)
    ref = m(kjt(seed=5)).values()
    m.deploy(segs, warm=True)
    torch.testing.assert_close(m(kjt(seed=5)).values(), ref, rtol=1e-6, atol=1e-6)
    kept = {t: [len(s.dims) for s in v] for t, v in m.deployed.segments.items()}
    assert kept["t_big"] != [D] * 4 and all(k >= 1 for k in kept["t_big"][:1])


def test_the_search_keeps_more_dims_for_the_frequent_group():
    """One field, Zipf traffic, a label per id: the task keeps up the alpha of the group of
    frequent ids, the L1 penalty takes down that of the rare ones."""
    n = 300
    counts = {"x": 3000 // np.arange(1, n + 1)}
    tables = [EmbeddingBagConfig(name="t_x", embedding_dim=D, num_embeddings=n, feature_names=["x"])]
    m = compress(tables, AutoSrhConfig(budget=Budget(ratio=3), l1=0.03, alpha_lr=0.3), counts=counts, seed=0)
    torch.manual_seed(0)
    label = (torch.rand(n) > 0.5).float()
    head = torch.nn.Linear(D, 1)
    opt = torch.optim.Adam([*m.table_parameters(), *head.parameters()], lr=0.02)
    (alpha_opt,) = m.extra_optimizers()
    p = torch.tensor(counts["x"], dtype=torch.float)
    m.train()
    for step in range(200):
        g = torch.Generator().manual_seed(step)
        ids = torch.multinomial(p, 128, replacement=True, generator=g)
        out = m(KeyedJaggedTensor(keys=["x"], values=ids, lengths=torch.ones(128, dtype=torch.int32)))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(out.values()).squeeze(1), label[ids]) + m.regularization()
        opt.zero_grad(), alpha_opt.zero_grad()
        loss.backward()
        opt.step(), alpha_opt.step()
    s = m.scores()["t_x"].mean(1)
    assert s[0] > s[-1]
    segs = choose_entries(m.source_tables(), m.scores(), m.starts, m.remapped, m.fmt, m.target_bytes())["t_x"]
    assert len(segs[0].dims) > len(segs[-1].dims)


def test_refusals_are_one_line():
    with pytest.raises(BudgetError, match=r"smallest .* ratio of [\d.]+x") as e:
        compress(TABLES, AutoSrhConfig(budget=Budget(ratio=1000)), counts=COUNTS)
    assert "\n" not in str(e.value)
    with pytest.raises(MethodConfigError, match=r"needs the counts of feature\(s\) \['tags'\]"):
        compress(TABLES, AutoSrhConfig(), counts={"small": COUNTS["small"], "big": COUNTS["big"]})
    with pytest.raises(MethodConfigError, match=r"^autosrh\.groups: must be >= 1, got 0$"):
        AutoSrhConfig(groups=0)
    with pytest.raises(MethodConfigError, match="quantization-aware training is refused"):
        compress(TABLES, AutoSrhConfig(quantization=Quantization("int8", aware=True)), counts=COUNTS)


@pytest.mark.parametrize("kwargs, key", [
    ({"groups": 0}, "autosrh.groups: must be >= 1"),
    ({"l1": -0.01}, "autosrh.l1: must be >= 0"),
    ({"alpha_lr": 0.0}, "autosrh.alpha_lr: must be > 0"),
    ({"retrain_from": "warm"}, "autosrh.retrain_from: must be one of scratch, search"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        AutoSrhConfig(**kwargs)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_budget_counts_the_quantized_deployed_tables(precision):
    q = Quantization(precision)
    m = compress(TABLES, AutoSrhConfig(budget=Budget(ratio=6), quantization=q), counts=COUNTS)
    randomise_alpha(m)
    target = m.target_bytes()
    m.deploy(choose_entries(m.source_tables(), m.scores(), m.starts, m.remapped, m.fmt, target))
    assert all(len(s.dims) % m.unit == 0 for v in m.deployed.segments.values() for s in v)
    before = m(kjt(seed=2)).values()
    assert memory_report(m).bytes > target  # fp32 rows until quantized
    quantize_(m, q)
    held = memory_report(m).bytes
    assert 0.95 * target <= held <= target and held == m.describe()["planned_bytes"]
    if precision == "int8":
        torch.testing.assert_close(m(kjt(seed=2)).values(), before, rtol=0.02, atol=0.02)


def test_the_deployed_form_exports(tmp_path):
    counts = {t.feature_names[0]: np.random.default_rng(1).permutation(t.num_embeddings) for t in EXPORT_TABLES}
    q = Quantization("int8")
    module = compress(EXPORT_TABLES, AutoSrhConfig(budget=Budget(ratio=6), quantization=q), counts=counts)
    randomise_alpha(module)
    module.deploy(choose_entries(module.source_tables(), module.scores(), module.starts, module.remapped, module.fmt,
                                 module.target_bytes()))  # fmt: skip
    torch.manual_seed(0)
    net = DCNv2(module, dense_in_features=4, deep_layers=[16], cross_layers=1)
    net.eval()
    quantize_(module, q)
    program = load_exported(export_model(net, batch(6, seed=0), tmp_path / "autosrh.pt2").path)
    with torch.no_grad():
        for size, seed, multi in ((9, 1, True), (5, 2, False), (64, 3, True)):
            b = batch(size, seed, multi)
            torch.testing.assert_close(program(*inputs(b)), net(*b), rtol=1e-6, atol=1e-6)


class _Params(Callback):
    def __init__(self):
        self.params, self.steps = {}, []

    def on_params(self, params):
        self.params.update(params)

    def on_step(self, step, metrics):
        self.steps.append(metrics)


def test_schedule_through_the_trainer_logs_the_kept_dims(tiny_dataset):
    ds = tiny_dataset
    tables = embedding_tables(ds.schema, 8)
    counts = {f: ds.counts(f) for t in tables for f in t.feature_names}
    module = compress(tables, AutoSrhConfig(budget=Budget(ratio=3), search_epochs=1, retrain_epochs=1), counts=counts, seed=0)
    torch.manual_seed(0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, 128 if s == "train" else 512, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    seen = _Params()
    result = Trainer(TrainerConfig(epochs=1, batch_size=128, device="cpu", progress="off"), callbacks=[seen]).run(
        model, module, *loaders)
    assert list(result.stages) == ["search", "select", "retrain"]
    target = module.target_bytes()
    assert 0.95 * target <= memory_report(module).bytes <= target
    assert any(k.startswith(f"{tables[0].name}.s") for k in seen.params)
    assert any(k.startswith("alpha.") for s in seen.steps for k in s)
    assert np.isfinite(result.test["auc"])


def test_the_schedule_resumes_in_retrain_after_an_interruption(tiny_dataset, tmp_path):
    """``select`` (checkpoint=False) is re-run on resume: seeded, it rebuilds the same
    deployed form, and ``retrain`` then continues from its own checkpoint (autodim's
    schedule has the same three stages)."""
    ds = tiny_dataset
    tables = embedding_tables(ds.schema, 8)
    counts = {f: ds.counts(f) for t in tables for f in t.feature_names}

    def setup():
        module = compress(tables, AutoSrhConfig(budget=Budget(ratio=3), search_epochs=2, retrain_epochs=2), counts=counts)
        torch.manual_seed(0)
        model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
        loaders = [BatchLoader(ds, s, 128 if s == "train" else 512, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
        cfg = TrainerConfig(epochs=2, batch_size=128, device="cpu", progress="off", log_every_steps=1, patience=5,
                            checkpoint_every_steps=5)  # fmt: skip
        return cfg, module, model, loaders

    cfg, module, model, loaders = setup()
    ref = Trainer(cfg).run(model, module, *loaders)
    cfg, module, model, loaders = setup()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[StopAt(("retrain", 7))], checkpoint_dir=tmp_path).run(model, module, *loaders)
    cfg, module, model, loaders = setup()
    resumed = Trainer(cfg, checkpoint_dir=tmp_path).run(model, module, *loaders)
    assert resumed.test == ref.test
    assert memory_report(module).bytes <= module.target_bytes()
