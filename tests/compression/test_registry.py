from dataclasses import dataclass
from typing import ClassVar

import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

import compression
from compression import CompressionConfig, NoCompression, UnknownMethodError, compress, register
from compression.api import config_class

TABLES = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]


def test_none_is_registered_by_its_config_type():
    assert compression.registered_methods()["none"] is NoCompression
    assert config_class("none") is NoCompression


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(NoCompression)(lambda tables, config, ctx: None)


def test_duplicate_name_is_refused():
    @dataclass
    class Impostor(CompressionConfig):
        method: ClassVar[str] = "none"

    with pytest.raises(ValueError, match="already taken"):
        register(Impostor)(lambda tables, config, ctx: None)


def test_unregistered_config_and_unknown_name_are_clear():
    @dataclass
    class Stranger(CompressionConfig):
        method: ClassVar[str] = "stranger"

    with pytest.raises(UnknownMethodError, match="not a registered compression config"):
        compress(TABLES, Stranger())
    with pytest.raises(UnknownMethodError, match="unknown compression method 'nope'; registered: .*none"):
        config_class("nope")


def test_empty_tables_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        compress([], NoCompression())


def test_fbgemm_cpu_build_refuses_cuda_paths_in_one_line():
    """With fbgemm-gpu-cpu, what needs FBGEMM's CUDA kernels is refused at build, before
    any tensor is made on the GPU (none is needed to check: the device is only named)."""
    import fbgemm_gpu
    import torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from compression import Budget, MethodConfigError, Quantization, compress
    from compression.methods.hashing import HashingConfig
    from compression.methods.managed_collision import ManagedCollisionConfig

    if getattr(fbgemm_gpu, "__variant__", "") != "cpu":
        pytest.skip("fbgemm-gpu here is a CUDA build")
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=1000, feature_names=["f"])]
    with pytest.raises(MethodConfigError, match=r"managed_collision on CUDA needs FBGEMM's CUDA kernels.*make setup DEVICE=cuda"):
        compress(tables, ManagedCollisionConfig(budget=Budget(ratio=2)), device=torch.device("cuda"))
    with pytest.raises(MethodConfigError, match="hashing with int8 tables on CUDA"):
        compress(tables, HashingConfig(budget=Budget(ratio=2), quantization=Quantization("int8")), device="cuda")
