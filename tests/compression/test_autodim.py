"""AutoDim: the budgeted choice (bytes counted from the tensors), the deployed form against
the supernet, the search on a problem whose answer is known, refusals, int8, export, and
its three-stage schedule through the trainer."""

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
from compression.methods.autodim import AutoDimConfig, choose_dims
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2, DCNv2Config
from recsys.training import Callback, Trainer, TrainerConfig
from tests.compression.test_export import TABLES as EXPORT_TABLES
from tests.compression.test_export import batch

D = 8
TABLES = [
    EmbeddingBagConfig(name="t_small", embedding_dim=D, num_embeddings=7, feature_names=["small"]),
    EmbeddingBagConfig(name="t_big", embedding_dim=D, num_embeddings=20000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_mid", embedding_dim=D, num_embeddings=3000, feature_names=["tags"]),
]


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
            a.copy_(torch.randn(a.shape, generator=g))


@pytest.mark.parametrize("ratio", [1.5, 2, 3, 3.9])
def test_a_budget_is_met_by_the_deployed_tensors(ratio):
    cfg = AutoDimConfig(budget=Budget(ratio=ratio), candidates=[2, 4])
    m = compress(TABLES, cfg)
    randomise_alpha(m, seed=int(ratio * 10))
    target = m.target_bytes()
    m.deploy(choose_dims(m.source_tables(), m.probabilities(), m.cands, m.fmt, target))
    held = memory_report(m).bytes
    counted = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    assert held == counted == m.describe()["planned_bytes"]
    assert 0.95 * target <= held <= target, (held, target, m.chosen)
    assert m(kjt()).values().shape == (16, 3 * D)


def test_the_choice_follows_alpha_per_byte():
    tables = TABLES[1:]  # two fields of 20000 and 3000 ids
    cands = {"t_big": [2, 4, 8], "t_mid": [2, 4, 8]}
    probs = {"t_big": [0.1, 0.1, 0.8], "t_mid": [0.8, 0.1, 0.1]}
    from compression.deployed import TableFormat

    assert choose_dims(tables, probs, cands, TableFormat(), None) == {"t_big": (8, 8, 0), "t_mid": (2, 2, 0)}
    # about half the bytes: the big field wants its largest dim most, so it keeps the most
    target = int(sum(t.num_embeddings * D * 4 for t in tables) / 2)
    chosen = choose_dims(tables, probs, cands, TableFormat(), target)
    assert chosen["t_big"][0] >= chosen["t_mid"][0]


def test_deployed_form_equals_the_supernet_with_the_chosen_dims_fixed():
    m = compress(TABLES, AutoDimConfig(retrain_from="search", candidates=[2, 4]), seed=3)
    randomise_alpha(m, seed=1)
    m.train()
    for s in range(3):  # move the batch norms' running statistics off their init
        m(kjt(32, seed=10 + s))
    chosen = choose_dims(m.source_tables(), m.probabilities(), m.cands, m.fmt, None)
    with torch.no_grad():  # a one-hot architecture: the supernet is then exactly the chosen candidate
        for a in m.alpha.values():
            a.copy_(torch.where(torch.arange(len(a)) == a.argmax(), 1e4, 0.0))
    m.eval()
    ref = m(kjt(seed=5)).values()
    m.deploy(chosen, warm=True)
    m.eval()
    torch.testing.assert_close(m(kjt(seed=5)).values(), ref, rtol=1e-5, atol=1e-6)
    assert m.chosen == chosen and m.describe()["t_big.dim"] == chosen["t_big"][0]


def test_the_search_gives_the_informative_field_its_largest_dim():
    """logit = <e_a, e_b> with a rank-8 truth needs all 8 dims of a and b; field c is noise.
    The search's weights move to a's largest candidate, not c's."""
    torch.manual_seed(0)
    n = 30
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=D, num_embeddings=n, feature_names=[k]) for k in "abc"]
    m = compress(tables, AutoDimConfig(candidates=[1, 2], alpha_lr=0.05, anneal=0.0), seed=0)
    truth_a, truth_b = torch.randn(n, D), torch.randn(n, D)
    opt = torch.optim.Adam([p for p in m.parameters() if all(p is not a for a in m.alpha.values())], lr=0.02)
    (alpha_opt,) = m.extra_optimizers()
    m.train()
    for step in range(250):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, n, (3, 128), generator=g)
        y = ((truth_a[ids[0]] * truth_b[ids[1]]).sum(1) > 0).float()
        out = m(KeyedJaggedTensor(keys=["a", "b", "c"], values=ids.flatten(), lengths=torch.ones(384, dtype=torch.int32)))
        e = out.to_dict()
        logit = (e["a"] * e["b"]).sum(1) + 0.1 * e["c"].sum(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad(), alpha_opt.zero_grad()
        loss.backward()
        opt.step(), alpha_opt.step()
    p = m.probabilities()
    assert int(np.argmax(p["t_a"])) == len(p["t_a"]) - 1
    assert p["t_a"][-1] > p["t_c"][-1]


def test_refusals_are_one_line():
    with pytest.raises(BudgetError, match=r"smallest .* ratio of [\d.]+x") as e:
        compress(TABLES, AutoDimConfig(budget=Budget(ratio=1000)))
    assert "\n" not in str(e.value)
    with pytest.raises(MethodConfigError, match=r"^autodim\.candidates\[0\]: must be >= 1, got 0$"):
        AutoDimConfig(candidates=[0, 4])
    with pytest.raises(MethodConfigError, match=r"int4 packs 2 values per byte, but candidates \[3\] of table 't_small'"):
        compress(TABLES, AutoDimConfig(candidates=[3, 4], budget=Budget(ratio=2), quantization=Quantization("int4")))
    with pytest.raises(MethodConfigError, match="quantization-aware training is refused"):
        compress(TABLES, AutoDimConfig(quantization=Quantization("int8", aware=True)))


@pytest.mark.parametrize("kwargs, key", [
    ({"candidates": [2, -4]}, "autodim.candidates[1]: must be >= 1"),
    ({"candidates": []}, "autodim.candidates: must hold at least one dim"),
    ({"retrain_from": "warm"}, "autodim.retrain_from: must be one of scratch, search"),
    ({"alpha_lr": 0.0}, "autodim.alpha_lr: must be > 0"),
    ({"tau0": 0.0}, "autodim.tau0: must be > 0"),
    ({"tau_min": 0.0}, "autodim.tau_min: must be > 0"),
    ({"anneal": -0.1}, "autodim.anneal: must be >= 0"),
    ({"tau0": 0.5, "tau_min": 0.6}, "autodim.tau_min and autodim.tau0:"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        AutoDimConfig(**kwargs)
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_int8_budget_counts_the_quantized_deployed_tables():
    q = Quantization("int8")
    m = compress(TABLES, AutoDimConfig(budget=Budget(ratio=5), candidates=[2, 4], quantization=q))
    randomise_alpha(m)
    target = m.target_bytes()
    m.deploy(choose_dims(m.source_tables(), m.probabilities(), m.cands, m.fmt, target))
    m.train()
    m(kjt(32))  # batch norm statistics
    m.eval()
    before = m(kjt(seed=2)).values()
    assert memory_report(m).bytes > target  # fp32 rows until quantized
    quantize_(m, q)
    held = memory_report(m).bytes
    assert 0.95 * target <= held <= target and held == m.describe()["planned_bytes"]
    torch.testing.assert_close(m(kjt(seed=2)).values(), before, rtol=0.05, atol=0.05)


def test_the_deployed_form_exports(tmp_path):
    counts = {t.feature_names[0]: np.arange(t.num_embeddings)[::-1].copy() for t in EXPORT_TABLES}
    module = compress(EXPORT_TABLES, AutoDimConfig(budget=Budget(ratio=5), quantization=Quantization("int8")), counts=counts)
    randomise_alpha(module)
    module.deploy(choose_dims(module.source_tables(), module.probabilities(), module.cands, module.fmt, module.target_bytes()))
    torch.manual_seed(0)
    net = DCNv2(module, dense_in_features=4, deep_layers=[16], cross_layers=1)
    net.eval()
    quantize_(module, Quantization("int8"))
    program = load_exported(export_model(net, batch(6, seed=0), tmp_path / "autodim.pt2").path)
    with torch.no_grad():
        for size, seed in ((9, 1), (64, 3)):
            b = batch(size, seed)
            torch.testing.assert_close(program(*inputs(b)), net(*b), rtol=1e-6, atol=1e-6)


class _Params(Callback):
    def __init__(self):
        self.params, self.steps = {}, []

    def on_params(self, params):
        self.params.update(params)

    def on_step(self, step, metrics):
        self.steps.append(metrics)


def test_schedule_through_the_trainer_logs_the_chosen_dims(tiny_dataset):
    ds = tiny_dataset
    tables = embedding_tables(ds.schema, 8)
    module = compress(tables, AutoDimConfig(budget=Budget(ratio=2), search_epochs=1, retrain_epochs=1), seed=0)
    torch.manual_seed(0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, 128 if s == "train" else 512, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    cfg = TrainerConfig(epochs=1, batch_size=128, device="cpu", progress="off")
    seen = _Params()
    result = Trainer(cfg, callbacks=[seen]).run(model, module, *loaders)
    assert list(result.stages) == ["search", "select", "retrain"]
    target = module.target_bytes()
    assert 0.95 * target <= memory_report(module).bytes <= target
    assert {f"{t.name}.dim" for t in tables} <= set(seen.params)
    assert any("tau" in s for s in seen.steps)
    assert np.isfinite(result.test["auc"])
