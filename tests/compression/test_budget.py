import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from compression import Budget, BudgetError

TABLES = [
    EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=1000, feature_names=["a"]),
    EmbeddingBagConfig(name="t_b", embedding_dim=4, num_embeddings=3000, feature_names=["b"]),
]
FULL = 4000 * 4 * 4


def test_ratio_and_bytes_targets():
    assert Budget(ratio=10).target_bytes(TABLES) == pytest.approx(FULL / 10, abs=2)
    assert Budget(bytes=1000).target_bytes(TABLES) == pytest.approx(1000, abs=2)
    per = Budget(ratio=10, scope="table").per_table(TABLES)
    assert per == {"t_a": 1600, "t_b": 4800}
    shares = Budget(ratio=4).per_table(TABLES)
    assert shares["t_b"] == pytest.approx(3 * shares["t_a"], abs=1)


@pytest.mark.parametrize(
    "budget,msg",
    [
        (Budget(ratio=0), "must be positive"),
        (Budget(ratio=-3), "must be positive"),
        (Budget(bytes=0), "must be positive"),
        (Budget(bytes=-5), "must be positive"),
        (Budget(ratio=0.5), "more memory than the uncompressed"),
        (Budget(bytes=FULL + 1), "larger than the uncompressed"),
        (Budget(), "exactly one of ratio or bytes"),
        (Budget(ratio=2, bytes=10), "exactly one of ratio or bytes"),
        (Budget(ratio=2, scope="row"), "scope"),
    ],
)
def test_bad_budgets_are_refused(budget, msg):
    with pytest.raises(BudgetError, match=msg):
        budget.target_bytes(TABLES)


def test_labels():
    assert Budget(ratio=10).label() == "10x"
    assert Budget(bytes=2**20).label() == "1MiB"
