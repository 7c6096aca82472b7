import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, Quantization, compress, memory_report
from compression.budget import BudgetError
from compression.dpq_codes import pack_codes, packed_bytes, unpack_codes
from compression.methods.dpq import DPQConfig, MGQEConfig
from compression.quantization import quantize_
from tests.stages import user_item_tags

DIM = 16
TABLES = [
    EmbeddingBagConfig(name="t_user", embedding_dim=DIM, num_embeddings=20000, feature_names=["user"]),
    EmbeddingBagConfig(name="t_item", embedding_dim=DIM, num_embeddings=3000, feature_names=["item"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=DIM, num_embeddings=300, feature_names=["tags"]),
]
COUNTS = {t.feature_names[0]: 100_000 // np.arange(1, t.num_embeddings + 1) for t in TABLES}
FULL = sum(t.num_embeddings * DIM * 4 for t in TABLES)


def kjt(seed: int = 0, batch: int = 32) -> KeyedJaggedTensor:
    return user_item_tags(TABLES, seed, batch)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_at_their_bit_width(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(1001, bits) == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, torch.arange(1001), bits), codes)


@pytest.mark.parametrize("cls", [DPQConfig, MGQEConfig])
def test_deployed_module_holds_packed_codes_and_codebooks_within_the_budget(cls):
    m = compress(TABLES, cls(budget=Budget(ratio=100)), counts=COUNTS)
    target = FULL // 100
    assert memory_report(m).bytes > FULL  # training: the whole query table, plus codebooks
    assert [s.name for s in m.schedule()] == ["train", "pack"]
    m.eval()
    x = kjt()
    before = m(x).values()
    m.pack()
    report = memory_report(m)
    assert 0.95 * target <= report.bytes <= target and report.bytes == m.describe()["planned_bytes"]
    torch.testing.assert_close(m(x).values(), before)  # packing loses nothing (float sums aside)
    d = m.describe()
    for t in TABLES:
        if d[f"{t.name}.shape"] == "exact":
            continue
        D, K = d[f"{t.name}.subspaces"], d[f"{t.name}.centroids"]
        cold = d.get(f"{t.name}.cold_centroids", K)
        assert report.by_tensor[f"buffer:packed.codes_{t.name}"] == packed_bytes(t.num_embeddings * D, int(np.log2(cold)))
        assert report.by_tensor[f"param:packed.ebc.embedding_bags.{t.name}__codebook.weight"] == D * K * (DIM // D) * 4
    assert not any("ec." in k or "codebooks" in k for k in report.by_tensor)  # no query table left


def test_training_picks_the_nearest_centroid_straight_through():
    m = compress(TABLES, DPQConfig(budget=None, subspaces=4, centroids=16), seed=3)
    m.train()
    x = KeyedJaggedTensor(keys=["user", "item", "tags"], values=torch.tensor([5, 7, 1]), lengths=torch.tensor([1, 1, 1]))
    out = m(x).to_dict()["user"][0]
    q = m.query_table("t_user")[5].detach().view(4, 4)
    books = m.codebooks["t_user"].detach().view(4, 16, 4)
    nearest = books[torch.arange(4), ((q.unsqueeze(1) - books) ** 2).sum(-1).argmin(1)]
    torch.testing.assert_close(out, nearest.reshape(-1))
    (m(x).values().sum() + m.regularization()).backward()
    assert m.query_table("t_user").grad is not None and m.codebooks["t_user"].grad.abs().sum() > 0


def test_mgqe_cold_ids_use_the_first_centroids_only():
    m = compress(TABLES, MGQEConfig(budget=None, subspaces=8, centroids=64, hot_fraction=0.05), counts=COUNTS)
    assert m.describe()["t_user.cold_centroids"] == 16 and m.describe()["t_user.hot_ids"] == 1000
    with torch.no_grad():  # make the last centroids the nearest for every row
        m.codebooks["t_user"].view(8, 64, 2)[:, 16:] = m.query_table("t_user").view(-1, 8, 2).mean(0).unsqueeze(1)
    ids = torch.arange(20000)
    codes = m.assign("t_user", m.query_table("t_user"), ids)
    hot = ids < 1000  # the counts fall with the id
    assert (codes[~hot] < 16).all() and (codes[hot] >= 16).any()
    m.eval()
    x = kjt(seed=1)
    before = m(x).values()
    m.pack()
    assert torch.equal(m.packed.codes("t_user", ids), codes)
    torch.testing.assert_close(m(x).values(), before)
    with pytest.raises(MethodConfigError, match="mgqe needs the train counts of feature 'user'"):
        compress(TABLES, MGQEConfig())


def test_codebooks_quantize_after_packing_to_the_deployed_budget():
    config = DPQConfig(budget=Budget(ratio=50), quantization=Quantization("int8"))
    m = compress(TABLES, config)
    assert [s.name for s in m.schedule()] == ["train", "pack", "quantize"]
    m.eval()
    m.pack()
    fp32 = m(kjt()).values()
    quantize_(m, config.quantization)
    held = memory_report(m).bytes
    assert 0.95 * FULL / 50 <= held <= FULL / 50 and held == m.describe()["planned_bytes"]
    torch.testing.assert_close(m(kjt()).values(), fp32, atol=0.02, rtol=0)
    with pytest.raises(MethodConfigError, match="dpq: quantization-aware training is refused"):
        compress(TABLES, DPQConfig(quantization=Quantization("int8", aware=True)))


def test_unreachable_budgets_and_bad_sizes_are_refused_in_one_line():
    with pytest.raises(BudgetError, match=r"dpq cannot reach 1000x .* smallest .* ratio of"):
        compress(TABLES, DPQConfig(budget=Budget(ratio=1000)))
    with pytest.raises(MethodConfigError, match="cannot take 3 subspaces x 16 centroids"):
        compress(TABLES, DPQConfig(budget=None, subspaces=3, centroids=16))
    with pytest.raises(MethodConfigError, match=r"^dpq\.subspaces and dpq\.centroids: explicit sizes need both"):
        DPQConfig(budget=None, subspaces=4)
    with pytest.raises(MethodConfigError, match=r"^mgqe\.subspaces and mgqe\.centroids: explicit sizes need both"):
        MGQEConfig(budget=None, centroids=16)
    with pytest.raises(BudgetError, match="^dpq: needs a budget or explicit sizes"):  # neither: the builder says
        compress(TABLES, DPQConfig(budget=None))


@pytest.mark.parametrize("cls, kwargs, key", [
    (DPQConfig, {"beta": -0.1}, "dpq.beta: must be >= 0, got -0.1"),
    (DPQConfig, {"finetune_epochs": -1}, "dpq.finetune_epochs: must be >= 0, got -1"),
    (MGQEConfig, {"beta": -0.1}, "mgqe.beta: must be >= 0, got -0.1"),
    (MGQEConfig, {"hot_fraction": -0.1}, "mgqe.hot_fraction: must be >= 0, got -0.1"),
    (MGQEConfig, {"hot_fraction": 1.0}, "mgqe.hot_fraction: must be < 1, got 1.0"),
    (MGQEConfig, {"cold_divisor": 0}, "mgqe.cold_divisor: must be >= 1, got 0"),
    (MGQEConfig, {"cold_divisor": 3}, "mgqe.cold_divisor: must be a power of two, got 3"),
])  # fmt: skip
def test_a_bad_value_is_refused_when_the_config_is_made(cls, kwargs, key):
    with pytest.raises(MethodConfigError) as e:
        cls(**kwargs)
    assert str(e.value) == key
    MGQEConfig(hot_fraction=0.0, cold_divisor=1)  # the edges are accepted


@pytest.mark.parametrize("cls", [DPQConfig, MGQEConfig])
def test_budget_bound_on_criteo_sample_once_packed(cls):
    from tests.compression.test_sizing import criteo

    tables, counts = criteo()
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    for ratio in (10, 100):
        m = compress(tables, cls(budget=Budget(ratio=ratio)), counts=counts)
        m.pack()
        held = memory_report(m).bytes
        assert 0.95 * full / ratio <= held <= full / ratio and m.describe()["planned_bytes"] == held
    with pytest.raises(BudgetError, match="smallest it can hold"):
        compress(tables, cls(budget=Budget(ratio=1000)), counts=counts)


def test_counts_longer_than_the_table_are_refused_not_cut():
    """The counts of a feature must be one per id of its table: a longer array (another
    dataset's counts) is refused naming the feature and table, as every method reads them."""
    t = EmbeddingBagConfig(name="t_x", embedding_dim=16, num_embeddings=5000, feature_names=["x"])
    cfg = MGQEConfig(budget=None, subspaces=8, centroids=64, hot_fraction=0.05)
    compress([t], cfg, counts={"x": np.arange(5000)})  # one per id: builds
    with pytest.raises(MethodConfigError, match="mgqe: counts of feature 'x' must be one count per id of table 't_x', at most 5000"):
        compress([t], cfg, counts={"x": np.arange(6000)})
