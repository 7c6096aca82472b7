"""The universal hash family (compression.hashing) and the hashing trick method."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compression import Budget, compress, memory_report
from compression.hashing import PRIME, UniversalHash
from compression.methods.hashing import HashingConfig

I64 = torch.iinfo(torch.int64)
EXTREMES = [I64.min, I64.min + 1, -PRIME - 1, -PRIME, -1, 0, 1, PRIME - 1, PRIME, PRIME + 1, 2**31, 2**62, I64.max - 1, I64.max]


def reference(coeffs: list[int], x: int, m: int) -> int:
    """The family's formula in Python integers (no overflow possible)."""
    q, r = divmod(x, PRIME)
    u = q + 2**33
    l1, l2 = u & (2**30 - 1), u >> 30
    a0, a1, a2, b = coeffs
    return ((a0 * r + a1 * l1 + a2 * l2 + b) % PRIME) % m


def random_int64(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(I64.min, I64.max, size=n, dtype=np.int64, endpoint=True))


def test_matches_the_formula_on_extremes_and_random_ids():
    h = UniversalHash(3, seed=11)
    ids = torch.cat([torch.tensor(EXTREMES), random_int64(2000, 0)])
    for m in (1, 7, 1000, PRIME):
        out = h(ids, m)
        assert out.shape == (len(ids), 3) and out.dtype == torch.int64
        for j in range(3):
            c = h.coeffs[j].tolist()
            assert out[:, j].tolist() == [reference(c, x, m) for x in ids.tolist()]
            assert torch.equal(h(ids, m, which=j), out[:, j])


def test_ranges_and_per_id_moduli():
    h = UniversalHash(2, seed=3)
    ids = torch.cat([torch.tensor(EXTREMES), random_int64(10_000, 1)])
    m = torch.randint(1, 5000, ids.shape)
    out = h(ids, m.unsqueeze(-1))
    assert ((out >= 0) & (out < m.unsqueeze(-1))).all()
    which = torch.randint(0, 2, ids.shape)
    assert torch.equal(h(ids, m, which=which), out.gather(1, which.unsqueeze(-1)).squeeze(-1))


def test_no_collisions_below_p_before_the_final_mod():
    h = UniversalHash(2, seed=5)
    ids = torch.cat([torch.arange(0, 500_000), torch.arange(PRIME - 200_000, PRIME)])
    for j in range(2):
        assert torch.unique(h(ids, PRIME, which=j)).numel() == ids.numel()


ID_SETS = {
    "sequential": torch.arange(1_000_000),
    "negative": -torch.arange(1, 1_000_001),
    "above_2^31": 2**31 + 7 * torch.arange(1_000_000),
    "huge_strided": 2**52 + PRIME * torch.arange(1_000_000),
    "random_int64": random_int64(1_000_000, 2),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ids", list(ID_SETS), ids=list(ID_SETS))
def test_uniform_by_chi_square(ids, seed):
    buckets = torch.bincount(UniversalHash(1, seed=seed)(ID_SETS[ids], 1000, which=0), minlength=1000)
    assert buckets.numel() == 1000
    assert chisquare(buckets.numpy()).pvalue > 1e-3


def test_seeds_and_streams_give_different_functions():
    ids = torch.arange(10_000)
    a = UniversalHash(1, seed=0)(ids, 1000, which=0)
    assert not torch.equal(a, UniversalHash(1, seed=1)(ids, 1000, which=0))
    assert not torch.equal(a, UniversalHash(1, seed=0, stream=1)(ids, 1000, which=0))
    assert torch.equal(a, UniversalHash(1, seed=0)(ids, 1000, which=0))
    two = UniversalHash(2, seed=0)(ids, 1000)
    assert (two[:, 0] != two[:, 1]).float().mean() > 0.99


def test_deterministic_across_processes():
    ids = EXTREMES + list(range(-50, 50))
    here = UniversalHash(2, seed=1234)(torch.tensor(ids), 977).tolist()
    # load compression/hashing.py alone: the package __init__ would import all of torchrec
    path = Path(__file__).resolve().parents[2] / "compression" / "hashing.py"
    code = (
        "import importlib.util, json, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('h', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"print(json.dumps(mod.UniversalHash(2, seed=1234)(torch.tensor({ids!r}), 977).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_coefficients_are_a_saved_buffer():
    h = UniversalHash(4, seed=9)
    assert "coeffs" in h.state_dict() and h.coeffs.shape == (4, 4)
    assert ((h.coeffs >= 0) & (h.coeffs < PRIME)).all() and (h.coeffs[:, 0] > 0).all()
    other = UniversalHash(4, seed=10)
    other.load_state_dict(h.state_dict())
    assert torch.equal(other(torch.arange(100), 50), h(torch.arange(100), 50))


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="non-negative"):
        UniversalHash(1, seed=-1)
    with pytest.raises(ValueError, match="at least one"):
        UniversalHash(0)
    with pytest.raises(TypeError, match="int64"):
        UniversalHash(1)(torch.arange(3, dtype=torch.int32), 5)


# -- the hashing trick ------------------------------------------------------------------

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=4, num_embeddings=10_000, feature_names=["big"]),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=4, num_embeddings=3, feature_names=["tiny"]),
]


def kjt(big: list[int], tiny: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["big", "tiny"], values=torch.tensor(big + tiny), lengths=torch.ones(len(big) + len(tiny), dtype=torch.int32)
    )


def test_hashing_rows_are_the_hash_and_small_tables_stay_exact():
    m = compress(TABLES, HashingConfig(budget=Budget(ratio=10)), seed=3)
    d = m.describe()
    assert d["uncompressed_fields"] == "tiny" and d["t_tiny.rows"] == "exact"
    rows = d["t_big.rows"]
    assert m.ebc.embedding_bags["t_big"].weight.shape == (rows, 4)
    big = [0, 5, 9_999, -4, 10_000, 2**40]
    tiny = [0, 1, 2, 2, 1, 0]
    out = m.rows(kjt(big, tiny))
    assert out[:6].tolist() == m.hasher(torch.tensor(big), rows, which=0).tolist()
    assert out[6:].tolist() == tiny
    # the pooled output is that row
    x = m(kjt(big, tiny)).to_dict()
    torch.testing.assert_close(x["big"], m.ebc.embedding_bags["t_big"].weight[out[:6]])


def test_hashing_folds_out_of_range_ids_of_an_exact_table():
    m = compress(TABLES, HashingConfig(budget=Budget(ratio=10)))
    bad = [-1, 3, 2**62, I64.min]
    rows = m.rows(kjt([1] * 4, bad))[4:]
    assert ((rows >= 0) & (rows < 3)).all()
    assert rows.tolist() == m.hasher(torch.tensor(bad), 3, which=0).tolist()
    assert torch.isfinite(m(kjt([1] * 4, bad)).values()).all()


def test_hashing_explicit_rows_and_bytes():
    m = compress(TABLES, HashingConfig(budget=None, rows=100))
    assert m.describe()["t_big.rows"] == 100 and m.describe()["t_tiny.rows"] == "exact"
    expected = (100 + 3) * 4 * 4 + m.hasher.coeffs.numel() * 8 + m.params.table.numel() * 8
    assert memory_report(m).bytes == expected
    with pytest.raises(ValueError, match="either a budget or rows"):
        compress(TABLES, HashingConfig(rows=100))
    with pytest.raises(ValueError, match="needs a budget or explicit sizes"):
        compress(TABLES, HashingConfig(budget=None))


def test_hashing_tolerates_key_order_and_unknown_keys():
    m = compress(TABLES, HashingConfig(budget=Budget(ratio=10)))
    m.eval()
    a = m(kjt([7, 8], [1, 2])).to_dict()
    swapped = KeyedJaggedTensor(
        keys=["other", "tiny", "big"], values=torch.tensor([123, 456, 1, 2, 7, 8]), lengths=torch.ones(6, dtype=torch.int32)
    )
    b = m(swapped).to_dict()
    for k in ("big", "tiny"):
        torch.testing.assert_close(a[k], b[k])


class _Counted:
    """The kernel, counting the calls it takes (a call it returns None for fails the test)."""

    def __init__(self, k) -> None:
        self.k, self.calls = k, 0

    def universal_hash(self, *args):
        out = self.k.universal_hash(*args)
        assert out is not None, "the kernel refused a call it should take"
        self.calls += 1
        return out


def test_the_kernel_gives_the_torch_ops_integers(monkeypatch):
    from compression import hashing

    if hashing.kernel() is None:
        pytest.skip("no C++ compiler: the kernel is not built here")
    h = UniversalHash(5, seed=7)
    ids = torch.cat([torch.tensor(EXTREMES), random_int64(5986, 3)])
    m = torch.randint(1, PRIME, ids.shape)
    which = torch.randint(0, 5, ids.shape)
    calls = [
        (ids, 1000, None), (ids, 1, 0), (ids, PRIME, 2), (ids, 2**40, None), (ids, 2**40, 4),
        (ids, m, which), (ids, m.unsqueeze(-1), None), (ids, m, 3),
        (ids.view(60, 100), m.view(60, 100), which.view(60, 100)), (ids.view(60, 100), 97, None),
        (ids, torch.tensor(77), which), (ids, torch.tensor([77]), None), (ids, m, torch.tensor(3)),
        (ids[:0], 5, None), (torch.tensor(-12), 31, None),
    ]  # fmt: skip
    spy = _Counted(hashing.kernel())
    monkeypatch.setattr(hashing, "kernel", lambda: spy)
    got = [h(*c) for c in calls]
    assert spy.calls == len(calls)
    monkeypatch.setattr(hashing, "kernel", lambda: None)
    want = [h(*c) for c in calls]
    for c, g, w in zip(calls, got, want):
        assert g.shape == w.shape and torch.equal(g, w), c[1:]


def test_the_kernel_leaves_what_it_does_not_take_to_the_torch_ops():
    h = UniversalHash(2, seed=1)
    ids = torch.arange(-50, 50)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        h(ids, 0)
    with pytest.raises(IndexError):
        h(ids, 10, which=2)
    m = torch.tensor([[3, 5]])  # one modulus per function: broadcast, not per id
    assert torch.equal(h(ids, m), torch.stack([h(ids, 3, which=0), h(ids, 5, which=1)], dim=1))
    strided = torch.arange(200)[::2]
    assert torch.equal(h(strided, 13), h(strided.contiguous(), 13))
    with pytest.raises(OverflowError):  # a modulus past int64: the torch ops' error, not a binding's
        h(ids, 2**70)
