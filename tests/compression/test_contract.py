"""The interface contract, run over every method in the registry.

A new method gets these checks by being registered: its config class must build
with no arguments, and may list variants in a ``contract_examples()`` classmethod.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import compression
from compression import (
    Budget,
    CompressedEmbeddingBagCollection,
    IdOutOfRangeError,
    MethodConfigError,
    Quantization,
    compress,
    memory_report,
)
from compression.base import _tracing
from compression.budget import BudgetError
from compression.quantization import quantize_
from compression.sizing import BudgetedConfig
from recsys.models import DCNv2Config, DeepFMConfig, DLRMConfig

DIM = 8
TABLES = [
    EmbeddingBagConfig(name="t_small", embedding_dim=DIM, num_embeddings=7, feature_names=["small"]),
    EmbeddingBagConfig(name="t_big", embedding_dim=DIM, num_embeddings=5000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_mid", embedding_dim=DIM, num_embeddings=300, feature_names=["tags"]),
]
COUNTS = {
    "small": torch.arange(7, 0, -1).numpy() * 10,
    "big": (10000 // torch.arange(1, 5001)).numpy(),
    "tags": (3000 // torch.arange(1, 301)).numpy(),
}


def examples():
    out = []
    for name, cls in sorted(compression.registered_methods().items()):
        configs = cls.contract_examples()
        out += [pytest.param(c, id=f"{name}-{i}") for i, c in enumerate(configs)]
    return out


def make_kjt(batch: int = 6, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 7, (batch,), generator=g)
    big = torch.randint(0, 5000, (batch,), generator=g)
    tag_len = torch.randint(0, 4, (batch,), generator=g)  # multi-hot, empty bags included
    tag_len[0] = 0
    tags = torch.randint(0, 300, (int(tag_len.sum()),), generator=g)
    return KeyedJaggedTensor(
        keys=["small", "big", "tags"],
        values=torch.cat([small, big, tags]),
        lengths=torch.cat([torch.ones(batch, dtype=torch.int32), torch.ones(batch, dtype=torch.int32), tag_len.int()]),
    )


def build(config, seed: int = 0) -> CompressedEmbeddingBagCollection:
    return compress(TABLES, config, counts=COUNTS, seed=seed)


@pytest.mark.parametrize("config", examples())
class TestContract:
    def test_output_is_keyed_tensor_with_declared_dims(self, config):
        m = build(config)
        assert isinstance(m, torch.nn.Module)
        out = m(make_kjt())
        assert isinstance(out, KeyedTensor)
        assert out.keys() == ["small", "big", "tags"]
        dims = {f: c.embedding_dim for c in m.embedding_bag_configs() for f in c.feature_names}
        assert [c.name for c in m.embedding_bag_configs()] == [t.name for t in TABLES]
        for key, t in out.to_dict().items():
            assert t.shape == (6, dims[key])
            assert torch.isfinite(t).all()

    def test_gradients_reach_the_tables(self, config):
        m = build(config)
        m.train()
        out = m(make_kjt())
        # a loss whose gradient in the output is never zero (x**2's is, where a pruned row outputs 0)
        w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(0))
        (out.values() * w).sum().backward()
        tables = m.table_parameters()
        assert tables, "a compressed module must own TorchRec table parameters"
        # every table learns from a batch that looks up every feature (one of three is not enough)
        dead = [tuple(p.shape) for p in tables if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"tables without a gradient: {dead}"

    def test_state_dict_round_trip(self, config):
        a, b = build(config, seed=1), build(config, seed=2)
        b.load_state_dict(a.state_dict())
        a.eval(), b.eval()
        kjt = make_kjt(seed=3)
        torch.testing.assert_close(a(kjt).values(), b(kjt).values(), rtol=0, atol=0)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        c = build(config, seed=4)
        c.load_state_dict(torch.load(buf))
        c.eval()
        torch.testing.assert_close(a(kjt).values(), c(kjt).values(), rtol=0, atol=0)

    def test_deterministic_for_a_seed(self, config):
        a, b = build(config, seed=7), build(config, seed=7)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb
            assert torch.equal(va, vb), ka
        a.eval(), b.eval()
        torch.testing.assert_close(a(make_kjt()).values(), b(make_kjt()).values(), rtol=0, atol=0)

    def test_bytes_equal_the_tensors_held(self, config):
        m = build(config)
        report = memory_report(m)
        # independent count: every parameter and buffer by numel * element size
        seen, expected = set(), 0
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() in seen and t.numel():
                continue
            seen.add(t.data_ptr())
            expected += t.numel() * t.element_size()
        assert report.bytes == expected
        assert report.uncompressed_bytes == sum(t.num_embeddings * t.embedding_dim * 4 for t in TABLES)
        assert report.ratio == pytest.approx(report.uncompressed_bytes / report.bytes)

    @pytest.mark.parametrize("model_cfg", [
        DCNv2Config(embedding_dim=DIM, deep_layers=[8]),
        # tables DIM wide: column 0 the first-order weight, an FM dim of DIM - 1
        DeepFMConfig(embedding_dim=DIM - 1, deep_layers=[8], fm_dim=4),
        DLRMConfig(embedding_dim=DIM),
    ], ids=["dcnv2", "deepfm", "dlrm"])  # fmt: skip
    def test_every_model_takes_it_and_trains_its_tables(self, config, model_cfg):
        assert model_cfg.table_dim() == DIM
        m = build(config)
        m.train()
        dims = {c.embedding_dim for c in m.embedding_bag_configs()}
        if model_cfg.needs_uniform_dims() and len(dims) > 1:
            with pytest.raises(ValueError, match="one embedding dim"):
                model_cfg.build(m, 2)
            return
        model = model_cfg.build(m, 2)
        logits = model(torch.randn(6, 2), make_kjt())
        assert logits.shape == (6, 1)
        logits.sum().backward()
        dead = [tuple(p.shape) for p in m.table_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"tables without a gradient through the model: {dead}"

    def test_an_id_past_its_table_in_eager(self, config):
        """In eager mode (not traced) an id past its table is refused naming the feature by
        a module whose rows are exact (``validates_ids``), never looked up out of bounds;
        one that hashes ids takes any int64 id."""
        m = build(config)
        seen = []
        m.register_forward_pre_hook(lambda *_: seen.append(_tracing()))
        kjt = make_kjt()
        values = kjt.values().clone()
        values[6] = 5000 * 1009  # the first id of 'big' (5000 rows)
        bad = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
        if m.validates_ids:
            with pytest.raises(IdOutOfRangeError, match="feature 'big': id 5045000 is outside its table of 5000 rows"):
                m(bad)
        else:
            assert torch.isfinite(m(bad).values()).all()
        assert seen == [False]

    def test_raw_ids_or_a_one_line_refusal(self, config):
        """A method declaring ``takes_raw_ids`` takes any 64-bit value as an id (a dataset's
        ``ids: raw``): finite outputs, the same pooled vector for the same raw id wherever it
        sits, different vectors for different ids; any other says in one line that it needs
        vocabulary ids, naming itself."""
        m = build(config)
        why = type(config).raw_id_refusal()
        if not type(config).takes_raw_ids:
            assert why is not None and why.startswith(f"{type(config).method} needs vocabulary ids") and "\n" not in why
            return
        assert why is None
        g = torch.Generator().manual_seed(1)
        raw = torch.randint(1, 2**62, (6,), generator=g)
        out = self._looked_up_after_training(m, raw)
        swapped = self._looked_up_after_training(m, raw.flip(0), train=False)
        assert all(torch.isfinite(v).all() for v in out.values())
        torch.testing.assert_close(swapped["small"], out["small"].flip(0))  # a raw id's vector follows it
        torch.testing.assert_close(swapped["big"], out["big"].flip(0))
        # different raw ids, different vectors, wherever two in-range ids get different ones
        # (managed collisions with two slots share one fallback row among all new ids)
        in_range = self._looked_up_after_training(build(config), torch.arange(6) + 1)
        if not torch.equal(in_range["big"][0], in_range["big"][1]):
            assert not torch.equal(out["big"][0], out["big"][1])

    @staticmethod
    def _looked_up_after_training(m, ids: torch.Tensor, train: bool = True) -> dict[str, torch.Tensor]:
        """``ids`` as 'small' and, reversed, as 'big' (and three as one 'tags' bag): two
        training steps' lookups first (managed collisions admit at the next step what
        they saw), then what evaluation reads."""
        kjt = KeyedJaggedTensor(keys=["small", "big", "tags"], values=torch.cat([ids, ids.flip(0), ids[:3]]),
                                lengths=torch.tensor([1] * 12 + [3, 0, 0, 0, 0, 0], dtype=torch.int32))  # fmt: skip
        if train:
            m.train()
            for _ in range(2):
                m(kjt)
        m.eval()
        with torch.no_grad():
            out = m(kjt).to_dict()
            assert all(torch.equal(v, m(kjt).to_dict()[k]) for k, v in out.items())
        return out

    def test_meta_table_device_holds_no_table(self, config):
        """``table_device="meta"`` (DMP's path, the memory pre-flight's): no table has
        storage, and the bytes counted are those the real module holds."""
        m = compress(TABLES, config, counts=COUNTS, table_device="meta")
        tables = list(m.table_parameters())
        for c in m.modules():
            if isinstance(c, EmbeddingBagCollection):
                tables += [b.weight for b in c.embedding_bags.values()]
            if isinstance(c, EmbeddingCollection):
                tables += [e.weight for e in c.embeddings.values()]
        assert tables
        real = [t.shape for t in tables if t.device.type != "meta"]
        assert not real, f"tables allocated on a real device: {real}"
        assert memory_report(m).bytes == memory_report(build(config)).bytes
        out = build(config)(make_kjt())  # the same config still builds and runs off meta
        assert isinstance(out, KeyedTensor)


# a larger vocabulary than TABLES' (same features), so that every method can reach the
# budget with quantized rows (whose scale/bias and TBE metadata weigh on tiny tables)
LARGE = [dataclasses.replace(t, num_embeddings=n) for t, n in zip(TABLES, (7, 20000, 3000))]
QUANT_RATIO = 5  # reachable by every sized method at dim 8 in int8 and int4 (mixed_dim: int8)
# methods whose memory is no TorchRec EmbeddingBagCollection (TT cores, DHE's MLP): refused in one line
NOT_QUANTIZABLE = {"dhe", "tt_rec"}


def sized_examples():
    """Every example whose method sizes itself from its budget when it is built; a config
    that declares ``sized_by_stages`` reaches its deployed form in a stage of its schedule
    and is checked after running it (``test_a_staged_method_meets_a_budget_with_quantization
    _after_its_schedule``; OptEmbed's search, DPQ/MGQE's pack, dedup's merge, pep/deeplight/
    itep's compact, autosrh/autodim's select)."""
    return [p for p in examples() if isinstance(p.values[0], BudgetedConfig) and p.values[0].budget is not None
            and not type(p.values[0]).sized_by_stages]  # fmt: skip


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("config", sized_examples())
def test_a_budget_with_quantization_is_met_by_the_deployed_module(config, precision):
    """"5x with int8" (the default budget_precision, "deployed"): the module holds
    [0.95, 1.0] of the budget once its tables are quantized, exactly the bytes planned;
    ``budget_precision="fp32"`` sizes the fp32 tables it trains to the budget instead."""
    budget = Budget(ratio=QUANT_RATIO, scope=config.budget.scope)
    deployed = dataclasses.replace(config, budget=budget, quantization=Quantization(precision))
    target = budget.target_bytes(LARGE)
    if type(config).method in NOT_QUANTIZABLE:
        with pytest.raises(MethodConfigError, match=f"^{type(config).method}: quantization does not apply"):
            compress(LARGE, deployed, counts=COUNTS)
        return
    if type(config).method == "mixed_dim" and precision == "int4":  # d_t and d_t - 1: one is odd
        with pytest.raises(MethodConfigError, match="packs 2 values per byte"):
            compress(LARGE, deployed, counts=COUNTS)
        return
    m = compress(LARGE, deployed, counts=COUNTS)
    assert memory_report(m).bytes > target  # trained in fp32: above the budget until quantized
    quantize_(m, deployed.quantization)
    held = memory_report(m).bytes
    assert 0.95 * target <= held <= target, (held, target)
    assert m.describe()["planned_bytes"] == held and m.describe()["planned_precision"] == precision
    trained = dataclasses.replace(deployed, budget_precision="fp32")
    m = compress(LARGE, trained, counts=COUNTS)
    fp32 = memory_report(m).bytes
    assert 0.95 * target <= fp32 <= target
    assert m.describe()["planned_precision"] == "fp32"
    quantize_(m, trained.quantization)
    assert memory_report(m).bytes < fp32  # then quantized below the budget


def spaces():
    return [pytest.param(cls, id=name) for name, cls in sorted(compression.registered_methods().items())]


@pytest.mark.parametrize("cls", spaces())
def test_search_space_names_fields_holds_the_default_and_every_value_builds(cls):
    """``make advise`` tunes a method over its declared ``search_space``: each knob is a field
    of its config, the default among its values, and every value builds the module (on meta)."""
    example = cls.contract_examples()[0]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, values in cls.search_space.items():
        assert key in fields, f"{cls.method}.search_space names '{key}', not a field of {cls.__name__}"
        assert len(values) >= 2 and len(set(values)) == len(values), f"{cls.method}.{key}: {values}"
        assert getattr(cls(), key) in values, f"{cls.method}.{key}: the default is not among {values}"
        for v in values:
            module = compress(TABLES, dataclasses.replace(example, **{key: v}), counts=COUNTS, table_device="meta")
            assert isinstance(module, CompressedEmbeddingBagCollection)


def staged_examples():
    """Every budgeted example whose method reaches its deployed form in a stage (the ones
    ``sized_examples`` leaves out)."""
    return [p for p in examples() if isinstance(p.values[0], BudgetedConfig) and p.values[0].budget is not None
            and type(p.values[0]).sized_by_stages]  # fmt: skip


# each staged method's schedule cut to its shortest (the knobs a method does not have are skipped)
SHORT = {"supernet_epochs": 1, "retrain_epochs": 1, "finetune_epochs": 1, "search_epochs": 1, "generations": 1,
         "mutations": 2, "crossovers": 2, "parents": 2, "prune_every": 2, "pruning_interval": 2}  # fmt: skip


@pytest.mark.parametrize("config", staged_examples())
def test_a_staged_method_meets_a_budget_with_quantization_after_its_schedule(config, tiny_dataset):
    """"4.5x with int8" for the methods that size themselves in a stage: after the whole
    schedule (its own stages, then ``quantize``) the module holds at most the budget, in
    int8 tables, counted from its tensors."""
    from recsys.data.loader import BatchLoader
    from recsys.data.schema import embedding_tables
    from recsys.training import Trainer, TrainerConfig

    ds = tiny_dataset
    tables = embedding_tables(ds.schema, 16)
    names = {f.name for f in dataclasses.fields(config)}
    counts = {f.name: ds.counts(f.name) for f in ds.schema.sparse}
    short = {k: v for k, v in SHORT.items() if k in names}
    # int8 alone is 2.8-4x on these tiny tables; the first of these ratios the method's sizes can
    # land on (within 5%: their steps are coarse on 12-80 rows), one of which each must reach
    for ratio in (4.7, 4.5, 4.3, 5.0, 6.0):
        budget = Budget(ratio=ratio, scope=config.budget.scope)
        cfg = dataclasses.replace(config, budget=budget, quantization=Quantization("int8"), **short)
        torch.manual_seed(0)
        try:
            module = compress(tables, cfg, counts=counts, seed=0)
            break
        except BudgetError as e:
            assert "cannot" in str(e), e
    else:
        pytest.fail(f"{type(config).method} reaches none of 4.3x-6x with int8 tables")
    model = DCNv2Config(embedding_dim=16, deep_layers=[8], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, 256, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    trainer_cfg = TrainerConfig(epochs=1, batch_size=256, device="cpu", progress="off", log_every_steps=0)
    result = Trainer(trainer_cfg).run(model, module, *loaders)
    assert list(result.stages)[-1] == "quantize"
    held, target = memory_report(module).bytes, budget.target_bytes(tables)
    assert held <= target, (held, target)
    assert held < memory_report(compress(tables, dataclasses.replace(cfg, quantization={}), counts=counts)).bytes


@pytest.mark.parametrize("config", examples())
def test_every_budgeted_method_is_built_by_the_one_path(config):
    """Every budgeted method comes out of ``compression.sizing.build_sized``: planned (its
    bytes verified when built), searched within the budget by a stage, or sized by its
    own rule when it has neither budget nor explicit sizes (``unbudgeted``). A builder that
    went around it would leave ``sizing`` unset."""
    module = compress(TABLES, config, counts=COUNTS, seed=0)
    if not isinstance(config, BudgetedConfig):
        assert module.sizing is None
    elif config.budget is not None:  # a search within the budget is a stage's: only a staged method has one
        assert module.sizing == "plan" or (module.sizing == "search" and type(config).sized_by_stages)
    elif all(v is None for v in config.explicit_sizes().values()):
        assert type(config).unbudgeted is not None and module.sizing == "own rule"
    else:
        assert module.sizing == "plan"


def _bad_values(f: dataclasses.Field) -> list[object]:
    """Values the field's declaration refuses: one past each bound, a choice not listed."""
    if "choices" in f.metadata:
        return ["no-such-choice"]
    out: list[object] = []
    for op, bound in f.metadata.get("range", {}).items():
        if bound is not None:
            bad = {"ge": bound - 1, "gt": bound, "le": bound + 1, "lt": bound}[op]
            out.append([bad] if f.metadata.get("each") else bad)
    return out


def declared_fields():
    out = []
    for name, cls in sorted(compression.registered_methods().items()):
        for f in dataclasses.fields(cls):
            for i, bad in enumerate(_bad_values(f)):
                out.append(pytest.param(cls, f.name, bad, id=f"{name}.{f.name}-{i}"))
    return out


@pytest.mark.parametrize("cls,key,bad", declared_fields())
def test_every_declared_field_is_refused_when_the_config_is_made(cls, key, bad):
    """Every bound and choice a method declares on its config's fields refuses a value past
    it when the config is made (before any tables or data), in one line naming
    ``<method>.<field>``: one registry-driven test instead of one per method."""
    with pytest.raises(MethodConfigError, match=rf"^{cls.method}\.{key}(\[0\])?: must be .*, got ") as e:
        cls(**{key: bad})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config", [pytest.param(cls.contract_examples()[0], id=name)
                                    for name, cls in sorted(compression.registered_methods().items())])  # fmt: skip
def test_a_pooling_the_method_does_not_take_is_refused_before_it_is_built(config):
    """Each method declares the poolings its tables take (``poolings``); a table pooled
    otherwise is refused by ``compress`` in one line naming the method and the table."""
    other = [p for p in PoolingType if p.name not in type(config).poolings]
    for pooling in other:
        tables = [dataclasses.replace(t, pooling=pooling) if t.name == "t_mid" else t for t in TABLES]
        with pytest.raises(MethodConfigError, match=rf"^{config.method}: table 't_mid' pools by {pooling.name}; it takes"):
            compress(tables, config, counts=COUNTS, seed=0)
