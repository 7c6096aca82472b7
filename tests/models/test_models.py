import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import NoCompression, compress
from recsys.models import DCNv2Config, DeepFMConfig, DLRMConfig

TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=8, num_embeddings=20, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=8, num_embeddings=30, feature_names=["b"]),
]


def kjt():
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5, 6]), lengths=torch.tensor([1, 2, 0, 1, 1, 1])
    )


@pytest.mark.parametrize("cfg", [DLRMConfig(embedding_dim=8), DCNv2Config(), DCNv2Config(low_rank=2, structure="parallel"), DeepFMConfig()])
@pytest.mark.parametrize("n_dense", [0, 5])
def test_models_take_the_embedding_module_and_train(cfg, n_dense):
    model = cfg.build(compress(TABLES, NoCompression()), n_dense)
    if isinstance(cfg, DLRMConfig):
        assert isinstance(model, DLRM)
    out = model(torch.randn(3, n_dense), kjt())
    assert out.shape == (3, 1)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads


class _PerFeatureDims(torch.nn.Module):
    """Stands in for a method whose features come out at different dims."""

    def __init__(self):
        super().__init__()
        self.inner = compress(TABLES, NoCompression())
        self.proj = torch.nn.Linear(8, 12)

    def embedding_bag_configs(self):
        a, b = self.inner.embedding_bag_configs()
        return [a, EmbeddingBagConfig(name="t_b", embedding_dim=12, num_embeddings=30, feature_names=["b"])]

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

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


def test_deepfm_fm_term_is_fieldwise():
    """0.5 * ((sum v)^2 - sum v^2) equals the sum of pairwise dot products between fields."""
    from recsys.models.deepfm import DeepFM

    model = DeepFM(compress(TABLES, NoCompression()), 0, deep_layers=[4])
    emb = model.embedding_bag_collection(kjt()).to_dict()
    expected = (emb["a"] * emb["b"]).sum(dim=1, keepdim=True)
    with torch.no_grad():
        for p in model.linear.parameters():
            p.zero_()
        for p in model.deep.parameters():
            p.zero_()
        torch.testing.assert_close(model(torch.zeros(3, 0), kjt()), expected)
