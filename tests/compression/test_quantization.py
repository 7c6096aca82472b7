"""Post-training quantization of any method's tables (``compression.quantization``)."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    MODULE_ATTR_REGISTER_TBES_BOOL,
    MODULE_ATTR_ROW_ALIGNMENT_INT,
)
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import MethodConfigError, NoCompression, compress, memory_report
from compression.budget import Budget
from compression.quantization import (
    SCALE_BIAS_BYTES,
    TABLE_ALIGNMENT,
    Quantization,
    fbgemm_rows,
    quantize_,
    row_bytes,
    table_bytes,
)
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2Config
from recsys.training import Trainer, TrainerConfig
from tests.compression.test_contract import COUNTS, TABLES, make_kjt

PRECISIONS = ["fp16", "int8", "int4", "int2"]
LEVELS = {"int8": 255, "int4": 15, "int2": 3}
FP16_EPS = 2.0**-11  # fp16 rounds to nearest with a relative error of at most 2^-11


def random_tables(dim: int = 16) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t_a", embedding_dim=dim, num_embeddings=301, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", embedding_dim=dim, num_embeddings=77, feature_names=["b", "c"]),
    ]


def element_bound(w: torch.Tensor, precision: str) -> torch.Tensor:
    """Largest |lookup - w| per element that fbgemm's row-wise format allows.

    Integer types: bias = fp16(row min), scale = fp16(range / L); round to nearest
    errs by at most scale/2, and the fp16 rounding of bias and scale can push the
    row's extremes up to 2^-11·(|min| + range) outside the grid, where they clip.
    fp16: half an ulp, 2^-11 relative (the rows here are far from subnormals).
    """
    if precision == "fp16":
        return FP16_EPS * w.abs() + 1e-7
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = ((hi - lo) / LEVELS[precision]).half().float()
    return scale / 2 + FP16_EPS * (lo.abs() + (hi - lo)) + 1e-6


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dim", [16, 12])
def test_lookup_error_within_the_precision_bound(precision, dim):
    if precision == "int2" and dim % 4:
        pytest.skip("int2 packs 4 values per byte")
    torch.manual_seed(0)
    m = compress(random_tables(dim), NoCompression())
    with torch.no_grad():  # rows of different scales and offsets, as trained rows are
        for bag in m.ebc.embedding_bags.values():
            rows = bag.weight.shape[0]
            bag.weight.copy_(torch.randn(rows, dim) * torch.rand(rows, 1) * 2 + torch.randn(rows, 1))
    weights = {name: bag.weight.detach().clone() for name, bag in m.ebc.embedding_bags.items()}
    quantize_(m, Quantization(precision))
    ids = torch.arange(301)  # every row of t_a; t_b's rows (through both its features) repeat
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c"], values=torch.cat([ids, ids % 77, ids % 77]), lengths=torch.ones(3 * 301, dtype=torch.int32)
    )
    out = m(kjt).to_dict()
    for key, table in (("a", "t_a"), ("b", "t_b"), ("c", "t_b")):
        w = weights[table][ids % weights[table].shape[0]]
        err, bound = (out[key] - w).abs(), element_bound(w, precision)
        assert (err <= bound).all(), f"{precision} {key}: max excess {(err - bound).max()}"
        # and the bound is not vacuous: round to nearest errs uniformly in ±scale/2, so
        # the relative error is about |scale|/sqrt(12) over |w| (ulp/sqrt(12) for fp16)
        if precision == "fp16":
            predicted = (FP16_EPS * 2 * w.abs() / 12**0.5).norm() / w.norm()
        else:
            scale = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / LEVELS[precision]
            predicted = (scale.expand_as(w) / 12**0.5).norm() / w.norm()
        measured = err.norm() / w.norm()
        assert 0.5 * predicted < measured < 1.5 * predicted


def test_pooled_error_is_the_sum_of_its_rows():
    torch.manual_seed(1)
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])]
    m = compress(tables, NoCompression())
    w = m.ebc.embedding_bags["t"].weight.detach().clone()
    quantize_(m, Quantization("int4"))
    ids = torch.randint(0, 50, (30,))
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.tensor([5, 0, 10, 15], dtype=torch.int32))
    out = m(kjt).values()
    bound = element_bound(w, "int4")[ids]
    starts = [0, 5, 5, 15, 30]
    for b in range(4):
        exact = w[ids[starts[b] : starts[b + 1]]].sum(0)
        assert ((out[b] - exact).abs() <= bound[starts[b] : starts[b + 1]].sum(0) + 1e-5).all()


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4", "int2"])
def test_same_bytes_as_torchrec_from_float(precision):
    """The PTQ path is TorchRec's: the TBE holds the bytes ``from_float`` would write."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=random_tables(16))
    dtype = {"fp16": torch.float16, "int8": torch.quint8, "int4": torch.quint4x2, "int2": torch.quint2x4}[precision]
    ebc.qconfig = QuantConfig(
        activation=torch.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.quantization.PlaceholderObserver.with_args(dtype=dtype),
    )
    setattr(ebc, MODULE_ATTR_REGISTER_TBES_BOOL, True)
    setattr(ebc, MODULE_ATTR_ROW_ALIGNMENT_INT, 1)
    theirs = QuantEBC.from_float(ebc)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = ebc

    ours = quantize_(Holder(), Quantization(precision)).ebc
    assert torch.equal(ours.tbes[0].weights_host, theirs.tbes[0].weights_host)


def test_odd_int8_rows_keep_fbgemms_grid():
    """fbgemm's quantizer refuses odd packed rows; repeating the last value keeps its grid."""
    torch.manual_seed(0)
    w = torch.randn(40, 5)
    codes, scale_bias = fbgemm_rows(w, "int8")
    assert codes.shape == (40, 5) and scale_bias.shape == (40, SCALE_BIAS_BYTES)
    scale, bias = scale_bias.view(torch.float16).float().unbind(1)
    assert torch.equal(bias, w.amin(1).half().float())
    assert torch.equal(scale, ((w.amax(1) - bias) / 255).half().float())
    err = (codes.float() * scale[:, None] + bias[:, None] - w).abs()
    assert (err <= element_bound(w, "int8")).all()


# -- bytes -------------------------------------------------------------------------------
# fbgemm's inference TBE, besides the rows: per feature F (its ``feature_table_map``)
# D_offsets int32 [F+1], rows_per_table int64 [F], weights_tys uint8 [F], and as plain
# attributes weights_offsets int64 [F], weights_placements int32 [F]; fixed:
# bounds_check_warning int64 [1], the (unused, empty-cache) LRU/LFU state
# cache_hash_size_cumsum, cache_index_table_map, lxu_cache_state, lxu_state,
# lxu_cache_miss_timestamp int64 [1] each, cache_miss_counter int64 [4],
# uvm_cache_stats int64 [6], local_uvm_cache_stats int32 [6]; the pruning and cache
# tensors (index_remapping*, lxu_cache_weights, ...) are empty.
def tbe_metadata(features: int) -> dict[str, int]:
    return {
        "D_offsets": 4 * (features + 1), "rows_per_table": 8 * features, "weights_tys": features,
        "weights_offsets": 8 * features, "weights_placements": 4 * features,
        "bounds_check_warning": 8, "cache_hash_size_cumsum": 8, "cache_index_table_map": 8,
        "lxu_cache_state": 8, "lxu_state": 8, "lxu_cache_miss_timestamp": 8,
        "cache_miss_counter": 32, "uvm_cache_stats": 48, "local_uvm_cache_stats": 24,
    }  # fmt: skip


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("alignment", [1, 16])
def test_bytes_per_row_are_the_format_and_nothing_else(precision, alignment):
    tables = random_tables(16)
    m = compress(tables, NoCompression())
    quantize_(m, Quantization(precision, row_alignment=alignment))
    bits = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}[precision]
    raw = 16 * bits // 8 + (0 if precision == "fp16" else SCALE_BIAS_BYTES)
    padded = -(-raw // alignment) * alignment
    assert row_bytes(16, precision, alignment) == padded
    # each table's rows, then padding of its block to fbgemm's 128-byte alignment
    rows = sum(-(-t.num_embeddings * padded // TABLE_ALIGNMENT) * TABLE_ALIGNMENT for t in tables)
    assert rows == sum(table_bytes(t, precision, alignment) for t in tables)
    report = memory_report(m)
    by = report.by_tensor
    # one storage for both tables, counted once (the views are the per-table weights)
    assert by["buffer:ebc.embedding_bags.t_a.weight"] == rows
    assert "buffer:ebc.embedding_bags.t_b.weight" not in by
    meta = tbe_metadata(features=3)
    for name, nbytes in meta.items():
        key = next(k for k in by if k.endswith(f".tbes.0.{name}"))
        assert by[key] == nbytes, name
    assert report.bytes == rows + sum(meta.values())  # nothing else: no fp32 rows left
    assert report.parameter_bytes == 0
    # row_alignment 1 pads nothing but the 128-byte blocks
    if alignment == 1:
        assert rows - sum(t.num_embeddings * raw for t in tables) < TABLE_ALIGNMENT * len(tables)


def test_quantized_module_is_smaller_and_counts_the_transform():
    config = compression.config_class("hashing")(budget=Budget(ratio=4))
    m = compress(TABLES, config, counts=COUNTS)
    before = memory_report(m)
    quantize_(m, Quantization("int8"))
    after = memory_report(m)
    assert after.bytes < before.bytes
    # the hash parameters and per-feature sizes are still there, unchanged
    for name, nbytes in before.by_tensor.items():
        if "embedding_bags" not in name:
            assert after.by_tensor[name] == nbytes


# -- composition ---------------------------------------------------------------------------
COMPOSED = ["hashing", "double_hashing", "qr", "frequency_hybrid", "unified_embedding", "managed_collision", "mpzch"]


@pytest.mark.parametrize("method", COMPOSED)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_composes_with_hashing_methods_and_multiplexing(method, precision):
    cls = compression.config_class(method)
    tables = [
        EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=20000, feature_names=["big"]),
        EmbeddingBagConfig(name="t_mid", embedding_dim=8, num_embeddings=3000, feature_names=["tags"]),
        EmbeddingBagConfig(name="t_small", embedding_dim=8, num_embeddings=7, feature_names=["small"]),
    ]
    counts = {"big": (1e5 / torch.arange(1, 20001)).long().numpy(), "tags": (1e4 / torch.arange(1, 3001)).long().numpy(),
              "small": COUNTS["small"]}  # fmt: skip
    m = compress(tables, cls(budget=Budget(ratio=10), quantization=Quantization(precision)), counts=counts)
    assert [s.name for s in m.schedule()][-1] == "quantize"
    g = torch.Generator().manual_seed(0)
    kjt = KeyedJaggedTensor(
        keys=["big", "tags", "small"],
        values=torch.cat([torch.randint(0, 20000, (6,), generator=g), torch.randint(0, 3000, (9,), generator=g),
                          torch.randint(0, 7, (6,), generator=g)]),
        lengths=torch.tensor([1] * 6 + [2, 0, 3, 1, 1, 2] + [1] * 6, dtype=torch.int32),
    )  # fmt: skip
    m.eval()
    fp32 = m(kjt).values()
    before = memory_report(m).bytes
    quantize_(m, m.compression_config.quantization, method)
    out = m(kjt)
    assert out.keys() == ["big", "tags", "small"]
    assert out.values().shape == fp32.shape and torch.isfinite(out.values()).all()
    # what quantization changes is the rows: the lookups stay close
    assert (out.values() - fp32).norm() < (0.01 if precision == "int8" else 0.2) * fp32.norm()
    assert memory_report(m).bytes < before
    assert not any(isinstance(x, EmbeddingBagCollection) for x in m.modules())


# -- refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "precision, words",
    [("bf16", "SIGFPE"), ("fp8", "raises"), ("fp32", "baseline"), ("int3", "must be one of")],
)
def test_refused_precisions_raise_before_fbgemm(precision, words):
    with pytest.raises(MethodConfigError, match=words):
        Quantization(precision)
    with pytest.raises(MethodConfigError, match=words):
        NoCompression(quantization={"precision": precision})
    # a field changed after construction is checked again before any table is touched
    q = Quantization("int8")
    q.precision = precision
    m = compress(TABLES, NoCompression())
    with pytest.raises(MethodConfigError, match=words):
        quantize_(m, q)
    assert isinstance(m.ebc, EmbeddingBagCollection)


def test_tables_that_cannot_pack_are_refused_at_build_time():
    cls = compression.config_class("mixed_dim")
    with pytest.raises(MethodConfigError, match=r"mixed_dim: int4 packs 2 values per byte, but table '.*' has dim"):
        compress(TABLES, cls(quantization=Quantization("int4")), counts=COUNTS)
    # int8 and fp16 take any dim
    for precision in ("int8", "fp16"):
        m = compress(TABLES, cls(quantization=Quantization(precision)), counts=COUNTS)
        quantize_(m, m.compression_config.quantization)
        assert torch.isfinite(m(make_kjt()).values()).all()


def test_other_options_are_checked():
    with pytest.raises(MethodConfigError, match="quantization-aware training is for"):
        Quantization("fp16", aware=True)
    with pytest.raises(MethodConfigError, match="stochastic_rounding applies"):
        Quantization("int8", stochastic_rounding=True)
    with pytest.raises(MethodConfigError, match="row_alignment"):
        Quantization("int8", row_alignment=0)
    with pytest.raises(MethodConfigError, match=r"no field\(s\) \['bits'\]"):
        NoCompression(quantization={"bits": 4})
    assert NoCompression().quantization is None
    assert NoCompression(quantization={}).quantization is None


# -- the trainer's quantize stage ------------------------------------------------------------
def test_trainer_quantizes_after_training_and_resumes(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=1, batch_size=128, device="cpu", progress="off", log_every_steps=0)
    q = Quantization("int8")
    module = compress(embedding_tables(tiny_dataset.schema, 8), NoCompression(quantization=q))
    assert [s.name for s in module.schedule()] == ["train", "quantize"]
    assert [s.name for s in module.stages()] == ["train"]
    fp32_bytes = memory_report(module).bytes
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(tiny_dataset.schema.dense))
    loaders = [BatchLoader(tiny_dataset, s, 128, shuffle=s == "train") for s in ("train", "val", "test")]
    result = Trainer(cfg, checkpoint_dir=tmp_path).run(model, module, *loaders)
    assert isinstance(module.ebc, QuantEBC)
    stage = result.stages["quantize"]
    assert stage["embedding_bytes_before"] == fp32_bytes
    assert stage["embedding_bytes"] == memory_report(module).bytes < fp32_bytes
    assert result.test["auc"] > 0.6 and abs(stage["val_auc"] - result.stages["train"]["val_auc"]) < 0.02
    assert not (tmp_path / "quantize").exists()  # re-run on resume, never restored
    # resume: training is restored from its checkpoint, quantize runs again on a fresh module
    module2 = compress(embedding_tables(tiny_dataset.schema, 8), NoCompression(quantization=q))
    model2 = DCNv2Config(deep_layers=[16], cross_layers=1).build(module2, len(tiny_dataset.schema.dense))
    again = Trainer(cfg, checkpoint_dir=tmp_path).run(model2, module2, *loaders)
    assert again.test == result.test


# -- Hydra -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["compression=qr", "compression.budget.ratio=10", "+compression.quantization.precision=int4"], Quantization("int4")),
        (["compression=qr_int4"], Quantization("int4")),
        (["compression=qr_int4", "compression.quantization.aware=true"], Quantization("int4", aware=True)),
        (["compression=none", "+compression.quantization.precision=int8", "+compression.quantization.aware=true",
          "+compression.quantization.stochastic_rounding=true"], Quantization("int8", aware=True, stochastic_rounding=True)),
        (["compression=unified_embedding", "+compression.quantization.precision=int4"], Quantization("int4")),
        (["compression=hashing"], None),
    ],
)  # fmt: skip
def test_hydra_composes_quantization_with_any_method(overrides, expected):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from experiments.config import register_configs
    from tests.experiments.conftest import CONF

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
            comp = OmegaConf.to_object(cfg.compression)
            assert comp.quantization == expected
            if "qr" in overrides[0]:
                assert comp.budget == Budget(ratio=10)
            with pytest.raises(MethodConfigError, match="SIGFPE"):
                bad = compose(config_name="config", overrides=["compression=qr_int4", "compression.quantization.precision=bf16"])
                OmegaConf.to_object(bad.compression)
    finally:
        GlobalHydra.instance().clear()


def test_lookup_benchmark_runs(capsys):
    from experiments.benches.lookup import main

    main(["--batch", "64", "--dims", "8", "--scenarios", "sample", "--steps", "2", "--rounds", "1", "--ids", "uniform"])
    out = capsys.readouterr().out
    for name in ("fp32", "fp32-tbe", "fp16", "int8", "int4"):
        assert f" {name} " in out
