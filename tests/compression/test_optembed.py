"""OptEmbed: the surrogate, thresholds, dimension sampling, the budgeted search, the
compact export and resuming a four-stage schedule."""

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
from compression.deployed import TableFormat
from compression.evolution import evolutionary_search
from compression.methods.optembed import OptEmbedConfig, SurrogateStep
from compression.optembed_schedule import best_single_field, dense_state, retrain
from compression.preflight import training_bytes
from recsys.data.loader import BatchLoader
from recsys.data.schema import embedding_tables
from recsys.models import DCNv2Config
from recsys.training import Trainer, TrainerConfig
from tests.stages import EpochsByStage, StopAt

D = 8
TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=D, num_embeddings=40, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=D, num_embeddings=25, feature_names=["b"]),
]


def kjt(batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.cat([torch.randint(0, 40, (batch,), generator=g), torch.randint(0, 25, (batch,), generator=g)]),
        lengths=torch.ones(2 * batch, dtype=torch.int32),
    )


def test_surrogate_gradient_is_the_reference_piecewise_slope():
    x = torch.tensor([-1.5, -0.8, -0.3, 0.0, 0.2, 0.4, 0.5, 1.0, 1.2], requires_grad=True)
    y = SurrogateStep.apply(x)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    y.sum().backward()
    expected = [0, 0.4, 2 - 4 * 0.3, 2, 2 - 4 * 0.2, 2 - 4 * 0.4, 0.4, 0.4, 0]
    torch.testing.assert_close(x.grad, torch.tensor(expected))


def test_thresholds_rise_under_the_regulariser_and_small_rows_get_masked():
    m = compress(TABLES, OptEmbedConfig(alpha=1.0, threshold_lr=0.05))
    with torch.no_grad():
        w = next(m.ec.parameters())
        w.fill_(1.0)
        w[:10] *= 0.05  # ten rows of field a with small norms
    opt = m.extra_optimizers()[0]
    m.train()
    for _ in range(30):
        opt.zero_grad()
        m.regularization().backward()
        opt.step()
    assert (m.thresholds > 0.5).all()  # exp(-t) pushed them up
    m.freeze_rows()
    kept = m.kept_t_a
    assert not kept[:10].any() and kept[10:].all()
    assert m.threshold_metrics()["kept_ratio.t_a"] == pytest.approx(30 / 40)


def test_dimension_sampling_is_uniform_over_1_to_D():
    from scipy.stats import chisquare

    m = compress(TABLES, OptEmbedConfig())
    with torch.no_grad():
        for w in m.ec.parameters():
            w.fill_(1.0)
    m.train()
    counts = np.zeros(D + 1, dtype=int)
    for seed in range(20):
        out = m(kjt(batch=256, seed=seed)).to_dict()
        for t in out.values():
            kept = (t != 0).sum(dim=1).numpy()
            assert ((t != 0).int().diff(dim=1) <= 0).all(), "only the first i dims are kept"
            counts += np.bincount(kept, minlength=D + 1)
    assert counts[0] == 0
    assert chisquare(counts[1:]).pvalue > 1e-3
    m.eval()  # no dimension masks at validation
    assert all((t != 0).all() for t in m(kjt()).to_dict().values())


def test_search_under_a_budget_never_returns_an_architecture_over_it():
    kept = np.array([50, 400, 7, 1200])

    def size_of(dims):
        return int(sum((k + 1) * d * 4 + k * 4 for k, d in zip(kept, dims) if d > 0))

    evaluated = []

    def value(dims):
        return float(np.dot(np.sqrt(dims), [3, 1, 2, 1]))

    def fitness(dims):
        evaluated.append(dims)
        return value(dims)

    target = size_of([8, 8, 8, 8]) // 5
    best, auc = evolutionary_search([0] * 4, 8, fitness, size_of, target, OptEmbedConfig(generations=6), seed=3)
    assert size_of(best) <= target
    assert all(size_of(c) <= target for c in evaluated)
    # candidates are grown to the budget's size, not only shrunk into it
    assert size_of(best) >= 0.9 * target, (size_of(best), target)
    assert auc == value(best) and auc == max(value(c) for c in evaluated)
    with pytest.raises(BudgetError, match="smallest architecture holds"):
        evolutionary_search([1] * 4, 8, fitness, size_of, 10, OptEmbedConfig(generations=1), seed=0)


def test_crossover_cuts_between_fields():
    seen = set()

    def fitness(dims):
        seen.add(dims)
        return 1.0 if dims in {(8,) * 6, (1,) * 6} else 0.0

    cfg = OptEmbedConfig(generations=3, mutations=0, crossovers=10, parents=2)
    evolutionary_search([1] * 6, 8, fitness, lambda d: 0, None, cfg, seed=0)
    mixed = [c for c in seen if len(set(c)) == 2 and set(c) == {1, 8}]
    assert mixed, "crossover of two parents must produce children mixing their fields"
    for c in mixed:  # a prefix from one parent, the rest from the other
        cut = [i for i in range(1, 6) if c[i] != c[i - 1]]
        assert len(cut) == 1


def test_compact_export_equals_the_masked_model():
    m = compress(TABLES, OptEmbedConfig(), seed=1)
    g = torch.Generator().manual_seed(0)
    m.kept_t_a.copy_(torch.rand(40, generator=g) > 0.5)
    m.kept_t_b.copy_(torch.rand(25, generator=g) > 0.7)
    m.unit_dims.copy_(torch.tensor([3, 6]))
    m.mode = "fixed"
    model = DCNv2Config(deep_layers=[8]).build(m, 0).eval()
    x = kjt(batch=64, seed=5)
    before = model(torch.zeros(64, 0), x)
    full = sum(int(n) * D * 4 for n in (40, 25))
    m.compact()
    after = model(torch.zeros(64, 0), x)
    torch.testing.assert_close(after, before)
    from compression import memory_report

    kept = int(m.compact_module.ids_t_a.numel()), int(m.compact_module.ids_t_b.numel())
    # rows at their dims + a zero row each, int32 kept ids, thresholds/scales/dims of 2 fields
    assert memory_report(m).bytes == (kept[0] + 1) * 3 * 4 + (kept[1] + 1) * 6 * 4 + 4 * sum(kept) + 2 * (4 + 4 + 8)
    assert memory_report(m).bytes < full
    assert m.candidate_bytes([3, 6]) == memory_report(m).bytes


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_candidate_bytes_count_the_quantized_export_when_the_config_quantizes(precision):
    """With quantization (and a budget meaning the deployed module, the default) the search
    sizes the compact export as it is deployed: its tables quantized."""
    config = OptEmbedConfig(budget=Budget(ratio=2), quantization=Quantization(precision))
    m = compress(TABLES, config, seed=1)
    g = torch.Generator().manual_seed(0)
    m.kept_t_a.copy_(torch.rand(40, generator=g) > 0.5)
    m.kept_t_b.copy_(torch.rand(25, generator=g) > 0.7)
    m.unit_dims.copy_(torch.tensor([4, 6]))
    planned = m.candidate_bytes([4, 6])
    m.compact()
    quantize_(m, config.quantization, "optembed")
    assert memory_report(m).bytes == planned
    m.table_format = TableFormat()  # budget_precision="fp32": the fp32 export, as before
    kept = m.kept_counts()
    assert m.candidate_bytes([4, 6]) == (kept[0] + 1) * 4 * 4 + (kept[1] + 1) * 6 * 4 + 4 * sum(kept) + 2 * (4 + 4 + 8)


def test_builds_on_meta_without_real_tables():
    """The memory pre-flight builds OptEmbed with meta tables: nothing is allocated, the
    row-norm scale comes from the tables' own init drawn on a sample of rows."""
    meta = compress(TABLES, OptEmbedConfig(), seed=0, table_device="meta")
    real = compress(TABLES, OptEmbedConfig(), seed=0)
    assert all(p.device.type == "meta" for p in meta.table_parameters())
    assert meta.norm_scale.device.type == "cpu"
    # TorchRec's default init, uniform in ±sqrt(1/N): a row's mean L1 norm is D·sqrt(1/N)/2
    expected = torch.tensor([D * (1 / 40) ** 0.5 / 2, D * (1 / 25) ** 0.5 / 2])
    torch.testing.assert_close(meta.norm_scale, expected, rtol=0.1, atol=0)
    torch.testing.assert_close(real.norm_scale, expected, rtol=0.25, atol=0)  # 40 and 25 rows only
    need = training_bytes(TABLES, OptEmbedConfig())
    assert need.tables == memory_report(real).bytes  # the whole supernet, counted off meta


def _setup(ds):
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=2, batch_size=128, device="cpu", progress="off", log_every_steps=1, patience=5,
                        checkpoint_every_steps=5)
    oe = OptEmbedConfig(generations=2, mutations=3, crossovers=3, parents=3, budget=Budget(ratio=3))
    module = compress(embedding_tables(ds.schema, 8), oe, seed=0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, 128 if s == "train" else 512, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    return cfg, module, model, loaders


def test_schedule_resumes_across_stages_after_an_interruption(tiny_dataset, tmp_path):
    cfg, module, model, loaders = _setup(tiny_dataset)
    ref = Trainer(cfg).run(model, module, *loaders)
    assert list(ref.stages) == ["supernet", "search", "retrain", "compact"]
    assert ref.stages["search"]["search_bytes"] <= module.target_bytes()
    from compression import memory_report

    assert memory_report(module).bytes <= module.target_bytes()

    cfg, module, model, loaders = _setup(tiny_dataset)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callbacks=[StopAt(("retrain", 7))], checkpoint_dir=tmp_path).run(model, module, *loaders)
    cfg, module, model, loaders = _setup(tiny_dataset)
    resumed = Trainer(cfg, checkpoint_dir=tmp_path).run(model, module, *loaders)
    assert resumed.test == ref.test
    assert resumed.stages["search"] == ref.stages["search"]


def test_a_budget_below_every_pair_of_fields_keeps_the_fittest_single_field():
    """When the search can only fit one field, the result keeps the fittest field alone at the
    largest dim that fits (not an empty model); below any single field it refuses clearly."""
    module = compress(TABLES, OptEmbedConfig(budget=Budget(ratio=2)), seed=0)
    n = len(module.units)
    one = [module.candidate_bytes([1 if j == i else 0 for j in range(n)]) for i in range(n)]
    target = max(one) + 4 * 3  # any field fits alone at a small dim; two fields at dim 1 do not
    assert module.candidate_bytes([1] * n) > target
    module.config.budget = Budget(bytes=target)
    arch, auc = best_single_field(module, lambda dims: float(dims[1] > 0) + 0.01 * sum(dims))
    assert sum(d > 0 for d in arch) == 1 and arch[1] > 0  # the fitter field
    assert module.candidate_bytes(list(arch)) <= target
    assert module.candidate_bytes([arch[0], arch[1] + 1]) > target  # the largest dim that fits
    module.config.budget = Budget(bytes=min(one) - 1)
    with pytest.raises(BudgetError, match=r"smallest architecture that keeps one field \(at dim 1\) holds"):
        best_single_field(module, lambda dims: 0.5)
    with pytest.raises(BudgetError, match=r"^optembed cannot reach .*\(one field kept at dim 1\) is \d+ bytes"):
        compress(TABLES, OptEmbedConfig(budget=Budget(bytes=8)), seed=0)  # refused when built


FRAPPE_VOCAB = [957, 4082, 7, 7, 2, 3, 2, 9, 80, 233]  # the published Frappe CSV's fields


def test_budgeted_search_on_frappe_shaped_data_beats_hashing_at_the_same_bytes(tmp_path):
    """Ten single-hot fields of Frappe's vocabularies with a planted signal, 10x: the budget
    prunes rows (the rare tail of the two large fields) as well as dims, and the search
    keeps every field, the largest included (it used to drop it from every candidate and
    score about 0.5), so the result beats the hashing trick holding the same bytes."""
    from compression.methods.hashing import HashingConfig
    from recsys.data.synthetic import SyntheticConfig
    from recsys.models import DeepFMConfig

    ds = SyntheticConfig(rows=60_000, cardinalities=FRAPPE_VOCAB, n_dense=0, signal=3.0, seed=0).prepare(tmp_path)
    loaders = [BatchLoader(ds, s, 256 if s == "train" else 4096, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    cfg = TrainerConfig(epochs=2, batch_size=256, device="cpu", progress="off", log_every_steps=0, patience=2)

    def train(config):
        torch.manual_seed(0)
        module = compress(embedding_tables(ds.schema, 16), config, seed=0)
        model = DeepFMConfig(embedding_dim=15, deep_layers=[32, 32]).build(module, 0)
        return Trainer(cfg).run(model, module, *loaders), module

    budget = Budget(ratio=10)
    oe, module = train(OptEmbedConfig(budget=budget, generations=4, mutations=6, crossovers=6, parents=6))
    hashed, hashing = train(HashingConfig(budget=budget))
    target = module.target_bytes()
    assert memory_report(module).bytes <= target and memory_report(hashing).bytes <= target
    assert memory_report(module).bytes >= 0.9 * target, (memory_report(module).bytes, target)  # it uses the budget
    dims = dict(zip(module.units, module.unit_dims.tolist()))
    kept = dict(zip(module.units, module.kept_counts()))
    assert dims["t_C2"] > 0 and kept["t_C2"] > 0  # the largest field is kept
    assert kept["t_C2"] < 4082 and oe.stages["compact"]["kept_row_ratio"] < 0.5  # rows pruned by the budget
    assert oe.test["auc"] > hashed.test["auc"] + 0.01, (oe.test, hashed.test)


def test_the_supernet_prunes_to_the_kept_fraction_asked_for(tiny_dataset):
    """target_kept: the floor ramps down over the supernet, each epoch logs the fraction kept
    beside its validation AUC, and the rows frozen for the search are that fraction (the
    thresholds alone, on so few steps, would keep nearly all of them)."""
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=3, batch_size=128, device="cpu", progress="off", log_every_steps=0, patience=5)
    oe = OptEmbedConfig(target_kept=0.3, prune_ramp=0.6, generations=1, mutations=2, crossovers=2, parents=2)
    module = compress(embedding_tables(tiny_dataset.schema, 8), oe, seed=0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(tiny_dataset.schema.dense))
    loaders = [BatchLoader(tiny_dataset, s, 128, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    epochs = EpochsByStage()
    result = Trainer(cfg, callbacks=[epochs]).run(model, module, *loaders)
    supernet = epochs.of("supernet")
    ratios = [m["kept_row_ratio"] for m in supernet]
    assert len(ratios) == 3 and all("val_auc" in m for m in supernet)
    assert ratios[0] > ratios[-1] and ratios == sorted(ratios, reverse=True)
    total = sum(module.rows)
    assert result.stages["compact"]["kept_rows"] == int(0.3 * total)
    assert result.stages["supernet"]["kept_row_ratio"] == pytest.approx(int(0.3 * total) / total)


def test_a_row_under_its_threshold_still_learns_in_the_supernet():
    """The cause of the paper setting's losses on heavy-tailed data: a row masked before it
    had learned got no gradient (e * 0), so its norm, the importance, could never rise and
    the rare informative ids of user and item stayed pruned. The supernet's forward masks
    it; its backward gives it the gradient it would get if kept (straight through)."""
    features = kjt(batch=256, seed=3)
    weights = None

    def row_grads(threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal weights
        m = compress(TABLES, OptEmbedConfig())
        m.mode = "supernet"
        m.unit_dims.copy_(torch.tensor(m.full_dims))
        with torch.no_grad():
            m.thresholds.fill_(threshold)
            w = m.weights()[0]
            w.fill_(0.1)
            w[:20] *= 0.01  # rows 0..19 of field a: importance 0.01 of the typical row's
        m.norm_scale.fill_(0.8)
        m.train()
        torch.manual_seed(0)  # the same dims sampled
        out = m(features).values()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) if weights is None else weights
        (out * weights).sum().backward()  # a loss whose gradient is the same whatever is masked
        return out, w.grad

    ids = features["a"].values()
    small = torch.unique(ids[ids < 20])
    out, masked = row_grads(1.5)  # the small rows 1.49 under it: outside the surrogate's slope
    rows = torch.isin(ids, small)
    assert out[: len(ids), :D][rows].abs().sum() == 0  # forward: masked
    _, kept = row_grads(-100.0)  # every row kept
    assert kept[small].abs().sum() > 0
    torch.testing.assert_close(masked[small], kept[small])  # backward: as if kept


def _supernet_run(ds, tolerance, alpha=2.0):
    torch.manual_seed(0)
    cfg = TrainerConfig(epochs=3, batch_size=128, device="cpu", progress="off", log_every_steps=0, patience=5)
    oe = OptEmbedConfig(alpha=alpha, threshold_lr=0.2, guard_tolerance=tolerance, generations=1, mutations=2,
                        crossovers=2, parents=2)  # fmt: skip
    module = compress(embedding_tables(ds.schema, 8), oe, seed=0)
    model = DCNv2Config(deep_layers=[16], cross_layers=1).build(module, len(ds.schema.dense))
    loaders = [BatchLoader(ds, s, 128, shuffle=s == "train", seed=0) for s in ("train", "val", "test")]
    epochs = EpochsByStage()
    Trainer(cfg, callbacks=[epochs]).run(model, module, *loaders)
    return epochs.of("supernet"), module


def test_the_guard_backs_off_pruning_that_costs_more_auc_than_its_tolerance(tiny_dataset):
    """Thresholds pushed up hard (alpha 2) prune rows the loss wants; each supernet epoch
    logs what pruning costs against the same supernet unpruned, in all and per field, and
    where it is over the tolerance the thresholds back off to within it and stop."""
    logged, _ = _supernet_run(tiny_dataset, tolerance=None)  # the cost, measured, nothing done
    fields = [f"t_{f.name}" for f in tiny_dataset.schema.sparse]
    assert all({"prune_cost_auc", "val_auc_unpruned", *(f"prune_cost_auc.{u}" for u in fields)} <= set(m)
               for m in logged)  # fmt: skip
    assert max(m["prune_cost_auc"] for m in logged) > 0.01  # unguarded, pruning costs AUC
    guarded, module = _supernet_run(tiny_dataset, tolerance=0.001)
    backed = [m for m in guarded if "prune_backed_off_to" in m]
    assert len(backed) == 1 and 0 <= backed[0]["prune_backed_off_to"] < 1
    assert backed[0]["prune_cost_auc_after"] <= 0.001
    after = guarded[guarded.index(backed[0]) + 1:]
    assert all(m[f"threshold.{u}"] == backed[0][f"threshold.{u}"] for m in after for u in fields)  # stopped
    unguarded_kept = logged[-1]["kept_row_ratio"]
    assert guarded[-1]["kept_row_ratio"] > unguarded_kept


@pytest.mark.parametrize(
    "kwargs, key",
    [({"alpha": -1.0}, "alpha"), ({"threshold_lr": -0.1}, "threshold_lr"), ({"retrain_from": "search"}, "retrain_from"),
     ({"mutation_prob": 1.5}, "mutation_prob"), ({"parents": 0}, "parents"), ({"generations": -1}, "generations"),
     ({"target_kept": 0.0}, "target_kept"), ({"prune_ramp": 2.0}, "prune_ramp"), ({"prune_every_steps": 0}, "prune_every_steps"),
     ({"budget_dim_share": 0.0}, "budget_dim_share"), ({"norm_momentum": 1.0}, "norm_momentum"),
     ({"supernet_epochs": 0}, "supernet_epochs"), ({"guard_tolerance": -0.1}, "guard_tolerance")],
)
def test_a_bad_value_is_refused_when_the_config_is_made(kwargs, key):
    with pytest.raises(MethodConfigError, match=rf"^optembed\.{key}: must be"):
        OptEmbedConfig(**kwargs)


def test_a_retrain_from_scratch_restarts_the_dense_layers_too(tiny_dataset):
    """``retrain_from="scratch"`` restarts the whole model from the weights it was built
    with: the dense layers as well as the tables. (Restarting the tables alone left the MLP
    the supernet had trained with random dim truncation: with nothing pruned and every dim
    kept, 0.0026 test AUC below the full table on MovieLens-100K, DeepFM, 3 seeds.)"""
    cfg, module, model, loaders = _setup(tiny_dataset)
    built = dense_state(model, module)
    assert built and len(built) == len(model.state_dict()) - len(module.state_dict())  # the dense part only
    seen: list[dict[str, torch.Tensor]] = []

    class Ctx:  # the stage protocol, training replaced by a look at the weights it starts from
        def __init__(self) -> None:
            self.model, self.module, self.device = model, module, torch.device("cpu")

        def fit(self, epochs=None, on_epoch=None):
            seen.append(dense_state(model, module))
            return {}

    module._dense_init = built  # what the supernet stage copies when it starts
    with torch.no_grad():  # the supernet's training moved every dense weight
        for p in model.parameters():
            if all(p is not q for q in module.parameters()):
                p.add_(1.0)
    retrain(module, Ctx())
    assert len(seen) == 1 and seen[0].keys() == built.keys()
    for k, v in built.items():
        torch.testing.assert_close(seen[0][k], v, rtol=0, atol=0, msg=k)


def test_the_supernet_copies_the_dense_layers_as_built(tiny_dataset):
    cfg, module, model, loaders = _setup(tiny_dataset)
    built = dense_state(model, module)
    Trainer(cfg).run(model, module, *loaders)
    assert module._dense_init is not None and module._dense_init.keys() == built.keys()
    for k, v in built.items():
        torch.testing.assert_close(module._dense_init[k], v, rtol=0, atol=0, msg=k)
