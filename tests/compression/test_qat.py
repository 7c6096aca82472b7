"""Quantization-aware training (``compression.qat``): a learned per-row grid that is
fbgemm's row-wise format, so the integer model reads what training read."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import MethodConfigError, NoCompression, compress
from compression.qat import (
    FakeQuantEmbeddingBagCollection,
    codes,
    fake_quantize,
    grid,
    pack,
    unpack,
)
from compression.quantization import Quantization, quantize_
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2, DCNv2Config
from recsys.training import Trainer, TrainerConfig
from recsys.training.optim import build_optimizers
from tests.compression.test_contract import COUNTS, TABLES, make_kjt

BITS = [8, 4, 2]
PREC = {8: "int8", 4: "int4", 2: "int2"}
OPT = type("Opt", (), {"sparse_lr": 0.05, "dense_lr": 0.01, "weight_decay": 0.0, "sparse_optimizer": "rowwise_adagrad"})


def qat_tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t_u", embedding_dim=8, num_embeddings=400, feature_names=["u"]),
        EmbeddingBagConfig(name="t_g", embedding_dim=8, num_embeddings=30, feature_names=["g"], pooling=PoolingType.MEAN),
    ]


def qat_kjt(batch: int = 64, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    glen = torch.randint(0, 4, (batch,), generator=g)
    return KeyedJaggedTensor(
        keys=["u", "g"],
        values=torch.cat([torch.randint(0, 400, (batch,), generator=g), torch.randint(0, 30, (int(glen.sum()),), generator=g)]),
        lengths=torch.cat([torch.ones(batch, dtype=torch.int32), glen.int()]),
    )


def train_a_little(model, module, steps: int = 15) -> None:
    """Real optimizers (row-wise Adagrad on rows, Adam on the rest, α included) on noise."""
    opts = build_optimizers(model, module, OPT)
    model.train()
    for step in range(steps):
        kjt = qat_kjt(seed=step)
        loss = (model(torch.randn(64, 2), kjt) - torch.randn(64, 1)).pow(2).mean()
        opts.zero_grad()
        loss.backward()
        opts.step()


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_fbgemms_layout(bits):
    torch.manual_seed(0)
    w = torch.randn(20, 16)
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    packed, scale_bias = fused[:, :-4], fused[:, -4:]
    q = unpack(packed, bits, 16)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    assert torch.equal(pack(q, bits), packed)
    # the unpacked codes are fbgemm's: they rebuild w within half a step
    scale, bias = scale_bias.contiguous().view(torch.float16).float().unbind(1)
    err = (q * scale[:, None] + bias[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 2**-11 * (w.abs().amax(1, keepdim=True) * 3) + 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_the_learned_grid_is_representable_in_fbgemms_format(bits):
    torch.manual_seed(0)
    w = torch.randn(50, 8) * torch.rand(50, 1) * 3
    alpha = torch.rand(50) + 0.3
    levels = 2**bits - 1
    scale, bias = grid(w, alpha, levels)
    assert torch.equal(scale, scale.half().float()) and torch.equal(bias, bias.half().float())
    q = codes(w, scale, bias, levels)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= levels
    assert torch.equal(fake_quantize(w, alpha, levels), q * scale[:, None] + bias[:, None])
    # α = 1 is fbgemm's min-max grid: the extremes are on it
    scale1, bias1 = grid(w, torch.ones(50), levels)
    hat = fake_quantize(w, torch.ones(50), levels)
    assert (hat.amin(1) - w.amin(1)).abs().max() < 1e-2 * (w.amax(1) - w.amin(1)).max()


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantized_forward_equals_the_integer_model(bits):
    torch.manual_seed(0)
    module = compress(qat_tables(), NoCompression(quantization=Quantization(PREC[bits], aware=True)))
    model = DCNv2(module, dense_in_features=2, deep_layers=[16], cross_layers=1)
    train_a_little(model, module)
    fq = module.ebc
    assert isinstance(fq, FakeQuantEmbeddingBagCollection)
    assert not torch.equal(fq.row_step["t_u"], torch.ones(400))  # α was learned
    model.eval()
    kjt, dense = qat_kjt(256, seed=99), torch.randn(256, 2)
    with torch.no_grad():
        emb_fake, logits_fake = module(kjt).values(), model(dense, kjt)
    quantize_(module, module.compression_config.quantization)
    assert isinstance(module.ebc, QuantEBC)
    with torch.no_grad():
        emb_int, logits_int = module(kjt).values(), model(dense, kjt)
    # each looked-up row is bit-identical; sums and means may differ in the last ulp
    torch.testing.assert_close(emb_int, emb_fake, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits_int, logits_fake, rtol=1e-5, atol=1e-5)
    single = KeyedJaggedTensor(keys=["u", "g"], values=torch.arange(400).repeat(2) % torch.tensor([400] * 400 + [30] * 400),
                               lengths=torch.ones(800, dtype=torch.int32))  # fmt: skip
    rows = module(single).values()
    expected = torch.cat([fake_quantize(fq.embedding_bags[t].weight, fq.row_step[t], 2**bits - 1)[idx]
                          for t, idx in (("t_u", torch.arange(400)), ("t_g", torch.arange(400) % 30))], dim=1)  # fmt: skip
    assert torch.equal(rows, expected.detach())


def test_rows_train_by_adagrad_and_steps_by_adam():
    module = compress(qat_tables(), NoCompression(quantization=Quantization("int4", aware=True)))
    model = DCNv2(module, dense_in_features=2, deep_layers=[8], cross_layers=1)
    tables = module.table_parameters()
    steps = list(module.ebc.row_step.parameters())
    assert {id(p) for p in tables} == {id(b.weight) for b in module.ebc.embedding_bags.values()}
    assert not {id(p) for p in steps} & {id(p) for p in tables}
    opts = build_optimizers(model, module, OPT)
    dense_ids = {id(p) for g in opts.named["dense"].param_groups for p in g["params"]}
    assert all(id(p) in dense_ids for p in steps)
    kjt = qat_kjt()
    module(kjt).values().pow(2).sum().backward()
    seen = kjt.values()[:64]
    grad = module.ebc.row_step["t_u"].grad
    assert grad[seen].abs().sum() > 0
    unseen = torch.ones(400, dtype=torch.bool)
    unseen[seen] = False
    assert grad[unseen].abs().sum() == 0
    assert module.ebc.embedding_bags["t_u"].weight.grad[seen].abs().sum() > 0


def test_straight_through_and_lsq_gradients():
    """dŵ/dw = 1 inside the grid, 0 where clipped; dŵ/dα is LSQ's through scale and bias."""
    torch.manual_seed(3)
    levels = 15
    w = torch.randn(1, 12, requires_grad=True)
    alpha = torch.tensor([0.6], requires_grad=True)
    upstream = torch.randn(1, 12)
    (fake_quantize(w, alpha, levels) * upstream).sum().backward()
    with torch.no_grad():
        scale, bias = grid(w, alpha, levels)
        v = (w - bias[:, None]) / scale[:, None]
        inside = (v.round() >= 0) & (v.round() <= levels)
        hi, lo = w.max(), w.min()
        h = (hi - lo) / 2
        q = v.round().clamp(0, levels)
        dscale = torch.where(inside, v.round() - v, q)  # dŵ/dscale
        dbias = torch.where(inside, 0.0, 1.0)  # dŵ/dbias
        expected_alpha = (upstream * (dscale * 2 * h / levels + dbias * -h)).sum()
    torch.testing.assert_close(alpha.grad[0], expected_alpha, rtol=1e-4, atol=1e-5)
    extremes = (w == hi) | (w == lo)
    middle = ~extremes
    torch.testing.assert_close(w.grad[middle & inside], upstream[middle & inside])
    assert (w.grad[middle & ~inside] == 0).all()
    assert (~inside).any() and (middle & inside).any()  # the example exercises both cases


def test_stochastic_rounding_is_unbiased_and_only_in_training():
    torch.manual_seed(0)
    m = compress(qat_tables(), NoCompression(quantization=Quantization("int2", aware=True, stochastic_rounding=True)))
    kjt = KeyedJaggedTensor(keys=["u", "g"], values=torch.tensor([5, 7]), lengths=torch.tensor([1, 1], dtype=torch.int32))
    w = m.ebc.embedding_bags["t_u"].weight[5].detach()
    m.train()
    with torch.no_grad():
        draws = torch.stack([m(kjt).to_dict()["u"][0] for _ in range(1500)])
    assert draws.std(0).max() > 0  # it is random
    scale, _ = grid(w[None], torch.ones(1), 3)
    assert (draws.mean(0) - w).abs().max() < 0.1 * scale.item()  # and unbiased (σ/√n ≈ 0.013 step)
    m.eval()
    with torch.no_grad():
        a, b = m(kjt).values(), m(kjt).values()
    assert torch.equal(a, b)
    assert torch.equal(a[0, :8], fake_quantize(w[None], torch.ones(1), 3)[0])


# every method whose tables are TorchRec EBCs from the start; any other must refuse clearly
TRAINS_QAT = {"double_hashing", "frequency_hybrid", "hashing", "managed_collision", "mixed_dim", "none", "qr",
              "unified_embedding"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(compression.registered_methods()))
def test_every_method_trains_quantization_aware(name):
    precision = "int8" if name == "mixed_dim" else "int4"  # mixed_dim's dims are odd
    config = compression.config_class(name)(quantization=Quantization(precision, aware=True))
    try:
        m = compress(TABLES, config, counts=COUNTS)
    except MethodConfigError as e:
        assert name not in TRAINS_QAT, str(e)
        assert str(e).startswith(f"{name}: ")  # a refusal that names the method and why
        return
    fqs = [x for x in m.modules() if isinstance(x, FakeQuantEmbeddingBagCollection)]
    assert fqs
    m.train()
    m(make_kjt()).values().pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.table_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for fq in fqs for p in fq.row_step.parameters())
    m.eval()
    kjt = make_kjt(seed=5)
    with torch.no_grad():
        fake = m(kjt).values()
        quantize_(m, m.compression_config.quantization)
        torch.testing.assert_close(m(kjt).values(), fake, rtol=1e-6, atol=1e-6)


def test_trainer_runs_qat_then_writes_the_learned_grid(tiny_dataset):
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=1, batch_size=128, device="cpu", progress="off", log_every_steps=0)
    module = compress(embedding_tables(tiny_dataset.schema, 8), NoCompression(quantization=Quantization("int4", aware=True)))
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(tiny_dataset.schema.dense))
    loaders = [BatchLoader(tiny_dataset, s, 128, shuffle=s == "train") for s in ("train", "val", "test")]
    result = Trainer(cfg).run(model, module, *loaders)
    assert isinstance(module.ebc, QuantEBC)
    # validation read the fake-quantized tables during training, the integer ones after
    assert result.stages["quantize"]["val_auc"] == pytest.approx(result.stages["train"]["val_auc"], abs=1e-6)
    assert result.test["auc"] > 0.6


def test_a_qat_grid_converts_only_to_its_own_precision():
    m = compress(qat_tables(), NoCompression(quantization=Quantization("int4", aware=True)))
    with pytest.raises(MethodConfigError, match="trained quantization-aware at 4 bits"):
        quantize_(m, Quantization("int8"))
