"""Signed hashing: each hashed id reads its row times a sign of its own; exact tables are
plain lookups; sum pooling only; its config refuses bad rows when made."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, MethodConfigError, compress
from compression.methods.hashing import HashingConfig
from compression.methods.signed_hashing import SignedHashingConfig

BIG = EmbeddingBagConfig(name="t_big", embedding_dim=4, num_embeddings=10_000, feature_names=["big"])
SMALL = EmbeddingBagConfig(name="t_small", embedding_dim=4, num_embeddings=5, feature_names=["small"])


def one_id_bags(ids: torch.Tensor, key: str = "big") -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=[key], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))


def test_every_hashed_id_reads_its_row_times_its_own_sign():
    m = compress([BIG], SignedHashingConfig(budget=None, rows=1), seed=3)  # one row: only the signs differ
    ids = torch.arange(2000)
    out = m(one_id_bags(ids)).values()
    row = m.ebc.embedding_bags["t_big"].weight[0]
    signs = torch.sign(out[:, 0] / row[0])
    torch.testing.assert_close(out, signs[:, None] * row[None, :])
    assert 0.45 < (signs < 0).float().mean() < 0.55  # half the ids subtract, half add
    again = compress([BIG], SignedHashingConfig(budget=None, rows=1), seed=3)(one_id_bags(ids)).values()
    torch.testing.assert_close(torch.sign(again[:, 0] / row[0]), signs)  # a seed fixes each id's sign


def test_colliding_ids_cancel_in_expectation_where_the_plain_trick_adds_up():
    """Two ids sharing a row: their outputs' inner product has mean about 0 with signs (Weinberger
    et al.'s unbiased estimate), and is the row's squared norm without."""
    signed = compress([BIG], SignedHashingConfig(budget=None, rows=1), seed=0)
    plain = compress([BIG], HashingConfig(budget=None, rows=1), seed=0)
    x, y = torch.arange(0, 4000, 2), torch.arange(1, 4000, 2)
    dots = {}
    for name, m in (("signed", signed), ("plain", plain)):
        ex, ey = m(one_id_bags(x)).values(), m(one_id_bags(y)).values()
        norm = (ex * ex).sum(dim=1)
        dots[name] = ((ex * ey).sum(dim=1) / norm).mean().item()
    assert abs(dots["signed"]) < 0.1 and dots["plain"] == pytest.approx(1.0)


def test_a_table_kept_exact_is_a_plain_lookup_with_sign_one():
    m = compress([BIG, SMALL], SignedHashingConfig(budget=Budget(ratio=4)))
    assert m.plan.sizes["t_small"] is None and m.plan.sizes["t_big"] is not None
    kjt = KeyedJaggedTensor(keys=["big", "small"], values=torch.cat([torch.arange(5), torch.arange(5)]),
                            lengths=torch.ones(10, dtype=torch.int32))  # fmt: skip
    out = m(kjt).to_dict()["small"]
    torch.testing.assert_close(out, m.ebc.embedding_bags["t_small"].weight)


def test_sum_pooling_only_and_bad_rows_refused_when_made():
    mean = EmbeddingBagConfig(name="t_m", embedding_dim=4, num_embeddings=100, feature_names=["m"], pooling=PoolingType.MEAN)
    with pytest.raises(MethodConfigError, match=r"^signed_hashing: table 't_m' pools by MEAN; it takes SUM pooling \(the signs weight a sum\)$"):
        compress([mean], SignedHashingConfig())
    with pytest.raises(MethodConfigError, match=r"^signed_hashing\.rows: must be >= 1, got 0"):
        SignedHashingConfig(budget=None, rows=0)
