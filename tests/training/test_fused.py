"""Fused table optimizers (``trainer.fused_tables``): the same update as without, on real
fbgemm TBE kernels, for every method that declares ``fusable_tables``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import compression
from compression.config_checks import ConfigError
from recsys.training.fused import FusedTables
from recsys.training.optim import build_optimizers
from recsys.training.trainer import TrainerConfig
from tests.compression.test_contract import COUNTS, TABLES, make_kjt

FUSABLE = [
    pytest.param(c, id=f"{name}-{i}")
    for name, cls in sorted(compression.registered_methods().items()) if cls.fusable_tables
    for i, c in enumerate(cls.contract_examples())
]


def _steps(module, cfg, fused: FusedTables | None, steps: int = 3) -> None:
    opts = build_optimizers(module, module, cfg) if fused is None else fused.optimizers(module, module, cfg)
    module.train()
    for s in range(steps):
        loss = (module(make_kjt(batch=16, seed=s)).values() - 0.1).pow(2).sum()
        opts.zero_grad()
        loss.backward()
        opts.step()


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
@pytest.mark.parametrize("config", FUSABLE)
def test_fused_tables_train_as_the_unfused_optimizer_does(config, optimizer):
    """Three steps with fbgemm's fused kernel (the rows updated in the backward) give the rows
    and outputs that the trainer's unfused optimizer gives;
    afterwards the module holds plain TorchRec collections again."""
    cfg = TrainerConfig(sparse_optimizer=optimizer, sparse_lr=0.3, fused_tables=True)
    plain = compression.compress(TABLES, config, counts=COUNTS, seed=0)
    fast = compression.compress(TABLES, config, counts=COUNTS, seed=0)
    fused = FusedTables.fuse(fast, cfg)
    if fused is None:  # fbgemm's CPU kernel takes dims that are multiples of 4: no collection here has only those
        assert all(any(t.embedding_dim % 4 for t in c.embedding_bag_configs())
                   for c in fast.modules() if isinstance(c, EmbeddingBagCollection))  # fmt: skip
        return
    _steps(plain, cfg, None)
    _steps(fast, cfg, fused)
    fused.unfuse()
    assert list(fast.table_parameters())  # plain collections back
    a, b = plain.state_dict(), fast.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    start = compression.compress(TABLES, config, counts=COUNTS, seed=0).state_dict()
    moved = sum(not torch.equal(start[k], a[k]) for k in a)
    assert moved > 0  # the steps trained something
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(make_kjt()).values(), plain(make_kjt()).values(), rtol=1e-5, atol=1e-6)


def test_only_what_a_fused_kernel_does_is_accepted():
    with pytest.raises(ConfigError, match=r"^trainer.fused_tables: sparse_optimizer 'adam' has no fused kernel"):
        TrainerConfig(fused_tables=True, sparse_optimizer="adam")
    with pytest.raises(ConfigError, match=r"^trainer.fused_tables: fbgemm's fused kernels do not apply the embedding L2"):
        TrainerConfig(fused_tables=True, embedding_l2=1e-4, embedding_l2_mode="batch_rows")
    with pytest.raises(ConfigError, match=r"^trainer.fused_tables: the fused rows' gradients are never formed"):
        TrainerConfig(fused_tables=True, clip_grad_norm=10.0)
    ok = TrainerConfig(fused_tables=True, sparse_optimizer="adagrad")
    assert dataclasses.replace(ok, fused_tables=False).fused_tables is False
    not_fusable = compression.compress(TABLES, compression.registered_methods()["tt_rec"](), counts=COUNTS, seed=0)
    assert FusedTables.fuse(not_fusable, ok) is None


def test_a_search_over_a_fused_trainer_does_not_try_an_embedding_l2():
    """``make advise`` crosses every method with the trainer's search space; with fused tables
    that space holds no embedding L2 (which the fused trainer refuses), only the rows' rate."""
    from recsys.training.trainer import search_space

    fused = search_space(TrainerConfig(fused_tables=True))
    assert set(fused) == {"sparse_lr"}
    for lr in fused["sparse_lr"]:
        TrainerConfig(fused_tables=True, sparse_lr=lr)  # every point is a config the trainer takes
    assert set(search_space(TrainerConfig())) == {"sparse_lr", "embedding_l2"}
