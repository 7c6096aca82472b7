"""Binary codes (compression.methods.binary): recurrent binarization, packing, the budget."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import (
    Budget,
    MethodConfigError,
    Quantization,
    compress,
    memory_report,
    uncompressed_bytes,
)
from compression.methods.binary import (
    BinaryConfig,
    binarize,
    code_bytes,
    pack_bits,
    reconstruct,
    unpack_bits,
)

DIM = 16
TABLES = [
    EmbeddingBagConfig(name="t_small", embedding_dim=DIM, num_embeddings=7, feature_names=["small"]),
    EmbeddingBagConfig(name="t_big", embedding_dim=DIM, num_embeddings=20000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_mid", embedding_dim=DIM, num_embeddings=3000, feature_names=["tags"]),
]


def kjt(batch: int = 32, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.ones(2 * batch, dtype=torch.int64), torch.randint(0, 4, (batch,), generator=g)])
    values = torch.cat([torch.randint(0, 7, (batch,), generator=g), torch.randint(0, 20000, (batch,), generator=g),
                        torch.randint(0, 3000, (int(lengths[2 * batch:].sum()),), generator=g)])  # fmt: skip
    return KeyedJaggedTensor(keys=["small", "big", "tags"], values=values, lengths=lengths)


def test_each_code_fits_the_residual_of_the_ones_before():
    """The reconstruction error falls with every code; a row of ±c is exact at one code."""
    v = torch.randn(500, DIM, generator=torch.Generator().manual_seed(0))
    errors = [float((reconstruct(*binarize(v, k)) - v).pow(2).mean()) for k in range(1, 6)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * float(v.pow(2).mean())
    signs = torch.where(torch.randn(10, DIM) > 0, 1.0, -1.0)
    torch.testing.assert_close(reconstruct(*binarize(0.25 * signs, 1)), 0.25 * signs)


@pytest.mark.parametrize("dim", [16, 13, 1])
def test_codes_pack_one_bit_an_element_and_unpack_to_the_same_signs(dim):
    signs = torch.where(torch.randn(9, 3, dim) > 0, 1.0, -1.0)
    bits = pack_bits(signs)
    assert bits.dtype == torch.uint8 and bits.shape == (9, 3, (dim + 7) // 8)
    assert torch.equal(unpack_bits(bits, dim), signs)


def test_the_packed_module_holds_the_budget_and_predicts_as_it_trained():
    """10x: the module trains latent fp32 rows (above the budget) and, packed, holds [0.95, 1.0]
    of it, exactly the bytes planned; its outputs are those the straight-through forward
    gave in evaluation (the scales were already rounded to fp16)."""
    budget = Budget(ratio=10)
    m = compress(TABLES, BinaryConfig(budget=budget), seed=0)
    target = budget.target_bytes(TABLES)
    assert memory_report(m).bytes > target
    m.eval()
    before = m(kjt()).values()
    m.pack()
    held = memory_report(m).bytes
    assert 0.95 * target <= held <= target and held == m.describe()["planned_bytes"]
    torch.testing.assert_close(m(kjt()).values(), before, rtol=1e-6, atol=1e-6)
    d = m.describe()
    # 10x is 6.4 bytes a row at dim 16: more than one code on every id (4 bytes), so two codes on
    # the rows that fit (more than half the ids, hashed into them)
    assert d["t_big.codes"] == 2 and 10000 < d["t_big.rows"] < 20000
    assert "t_small.codes" not in d  # its fp32 form fits its share: exact


def test_beyond_one_code_a_row_the_ids_are_hashed():
    """100x is past one code a row (16x at dim 16): the large tables hash their ids into fewer
    rows of one code, and every id still reads a row."""
    m = compress(TABLES, BinaryConfig(budget=Budget(ratio=100)), seed=0)
    m.pack()
    d = m.describe()
    assert d["t_big.codes"] == 1 and d["t_big.rows"] < 20000
    held, target = memory_report(m).bytes, Budget(ratio=100).target_bytes(TABLES)
    assert 0.95 * target <= held <= target
    assert torch.isfinite(m(kjt()).values()).all()


def test_the_gradient_passes_straight_through_to_the_latent_rows():
    m = compress(TABLES, BinaryConfig(budget=None, codes=2), seed=0)
    m(kjt()).values().sum().backward()
    w = m.ec["d16"].embeddings["t_big"].weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    # explicit codes: every id its own row, the bytes those of the codes
    m.pack()
    assert memory_report(m).bytes < uncompressed_bytes(TABLES) / 7
    assert m.describe()["t_big.codes"] == 2 and m.describe()["t_big.rows"] == 20000
    assert code_bytes(20000, 2, DIM) == 20000 * 2 * 4


def test_refusals_are_one_line():
    with pytest.raises(MethodConfigError, match=r"^binary: quantization-aware training"):
        compress(TABLES, BinaryConfig(quantization=Quantization("int8", aware=True)))
    with pytest.raises(MethodConfigError, match=r"^binary.codes and binary.max_codes: codes 5 is above max_codes 4$"):
        BinaryConfig(budget=None, codes=5)
    with pytest.raises(MethodConfigError, match=r"^binary.codes: must be <= 8, got 9$"):
        BinaryConfig(budget=None, codes=9, max_codes=8)
