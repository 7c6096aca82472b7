import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression import NoCompression, compress
from recsys.models import DCNv2Config, DeepFMConfig, DLRMConfig
from recsys.models.deepfm import DeepFM
from recsys.models.layers import DenseFields, MLPBlock, fm_interaction


def tables(dim=8):
    return [
        EmbeddingBagConfig(name="t_a", embedding_dim=dim, num_embeddings=20, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", embedding_dim=dim, num_embeddings=30, feature_names=["b"]),
    ]


def kjt():
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([1, 2, 0, 1, 1, 1]),
    )


CONFIGS = [
    DLRMConfig(embedding_dim=8),
    DCNv2Config(embedding_dim=8),
    DCNv2Config(embedding_dim=8, low_rank=2, structure="parallel", batch_norm=True, dropout=0.2),
    DCNv2Config(embedding_dim=8, dense_as_fields=True, structure="parallel"),
    DeepFMConfig(embedding_dim=7),
    DeepFMConfig(embedding_dim=7, batch_norm=True, dropout=0.2, dense_as_fields=True),
    DeepFMConfig(embedding_dim=8, first_order=False, deep_layers=[16]),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}")
@pytest.mark.parametrize("n_dense", [0, 5])
def test_models_take_the_embedding_module_and_train(cfg, n_dense):
    module = compress(tables(cfg.table_dim()), NoCompression())
    model = cfg.build(module, n_dense)
    if isinstance(cfg, DLRMConfig):
        assert isinstance(model, DLRM)
    model.train()
    out = model(torch.randn(3, n_dense), kjt())
    assert out.shape == (3, 1)
    out.sum().backward()
    # every parameter takes part (a missing gradient is a branch that never runs)
    missing = [n for n, p in model.named_parameters() if p.grad is None and p.numel()]
    assert not missing


def test_deepfm_tables_carry_the_first_order_column():
    assert DeepFMConfig(embedding_dim=10).table_dim() == 11
    assert DeepFMConfig(embedding_dim=10, first_order=False).table_dim() == 10
    assert DCNv2Config(embedding_dim=10).table_dim() == 10
    with pytest.raises(ValueError, match="at least 2 wide"):
        DeepFMConfig(embedding_dim=0).build(compress(tables(1), NoCompression()), 0)


def test_deepfm_is_bias_plus_first_order_plus_fm_plus_mlp():
    """y = b + sum_f w_f + FM(v) + MLP: with the MLP's output layer zeroed, what is left
    is the per-id weight (column 0) summed over fields plus the field-wise FM over the rest."""
    module = compress(tables(5), NoCompression())
    model = DeepFM(module, 0, deep_layers=[4])
    with torch.no_grad():
        model.bias.fill_(0.25)
        last = [m for m in model.mlp if isinstance(m, nn.Linear)][-1]
        last.weight.zero_()
        last.bias.zero_()
    emb = module(kjt()).to_dict()
    w = emb["a"][:, :1] + emb["b"][:, :1]
    fm = (emb["a"][:, 1:] * emb["b"][:, 1:]).sum(dim=1, keepdim=True)  # two fields: one pair
    torch.testing.assert_close(model(torch.zeros(3, 0), kjt()), 0.25 + w + fm)


def test_fm_term_is_the_sum_of_pairwise_dot_products():
    v = torch.randn(4, 3, 6)
    pairs = sum(
        (v[:, i] * v[:, j]).sum(dim=1, keepdim=True) for i in range(3) for j in range(i + 1, 3)
    )
    torch.testing.assert_close(fm_interaction(v), pairs)


def test_dense_fields_are_value_times_vector():
    f = DenseFields(3, 4, first_order=True)
    x = torch.tensor([[1.0, 0.0, 2.0]])
    out = f(x)
    torch.testing.assert_close(out[0, 2], 2.0 * f.vectors[2])
    assert torch.all(out[0, 1] == 0)
    torch.testing.assert_close(
        f.first_order_term(x), (f.weights[0] + 2 * f.weights[2]).reshape(1, 1)
    )


def test_mlp_block_is_linear_batchnorm_relu_dropout():
    mlp = MLPBlock(8, [16, 4], output_dim=1, batch_norm=True, dropout=0.3)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert mlp.out_features == 1
    assert [type(m).__name__ for m in MLPBlock(8, [16])] == ["Linear", "ReLU"]
    with pytest.raises(ValueError, match="dropout"):
        MLPBlock(8, [4], dropout=1.0)


def test_dense_layers_start_xavier_normal_and_the_tables_are_left_alone():
    module = compress(tables(11), NoCompression())
    before = [p.detach().clone() for p in module.parameters()]
    model = DeepFMConfig(embedding_dim=10, deep_layers=[400]).build(module, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    first = model.mlp[0]
    fan_in, fan_out = first.weight.shape[1], first.weight.shape[0]
    assert float(first.weight.detach().std()) == pytest.approx(
        (2 / (fan_in + fan_out)) ** 0.5, rel=0.1
    )
    assert torch.all(first.bias == 0)


class _PerFeatureDims(torch.nn.Module):
    """Stands in for a method whose features come out at different dims."""

    def __init__(self):
        super().__init__()
        self.inner = compress(tables(), NoCompression())
        self.proj = torch.nn.Linear(8, 12)

    def embedding_bag_configs(self):
        a, b = self.inner.embedding_bag_configs()
        return [
            a,
            EmbeddingBagConfig(
                name="t_b", embedding_dim=12, num_embeddings=30, feature_names=["b"]
            ),
        ]

    def forward(self, features):
        d = self.inner(features).to_dict()
        return KeyedTensor.from_tensor_list(["a", "b"], [d["a"], self.proj(d["b"])])


def test_per_feature_dims():
    m = _PerFeatureDims()
    assert DCNv2Config().build(m, 2)(torch.randn(3, 2), kjt()).shape == (3, 1)
    assert DeepFMConfig(fm_dim=6).build(m, 2)(torch.randn(3, 2), kjt()).shape == (3, 1)
    with pytest.raises(ValueError, match="set fm_dim"):
        DeepFMConfig().build(m, 2)
    with pytest.raises(ValueError, match="DLRM needs one embedding dim"):
        DLRMConfig().build(m, 2)


@pytest.mark.parametrize("p", [0.3, 0.2, 0.5, 0.05])
def test_the_mlp_dropout_is_torchs_distribution(p):
    """``recsys.models.layers.Dropout`` (the MLP blocks' dropout): each element kept with
    probability 1 - p (p to 2^-32) and scaled by the inverse, the gradient through the same
    mask, an identity in eval, as ``nn.Dropout``; seeded by torch's generator."""
    from recsys.models.layers import Dropout

    torch.manual_seed(0)
    d = Dropout(p)
    x = torch.ones(1000, 1003, requires_grad=True)  # not a multiple of 4 elements
    y = d(x)
    kept = y != 0
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    keep = 1 - round(p * 2**32) / 2**32
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / keep))
    # neighbours' draws are independent: both kept with probability (1 - p)^2
    flat = kept.flatten().float()
    both, q = (flat[1:] * flat[:-1]).mean().item(), (1 - p) ** 2
    assert abs(both - q) < 5 * (q * (1 - q) / flat.numel()) ** 0.5 * 2
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d y / d x: the mask times the scale
    assert not torch.equal(d(x), y)  # a new mask every call
    torch.manual_seed(0)
    assert torch.equal(Dropout(p)(x), y)  # the same seed, the same mask
    big = torch.randn(2000, 1000)
    assert (
        abs(d(big).mean().item() - big.mean().item())
        < 5 * (big.var().item() * p / (1 - p) / big.numel()) ** 0.5
    )
    d.eval()
    assert d(x) is x
