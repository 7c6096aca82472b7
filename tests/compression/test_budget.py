import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

import compression
from compression import Budget, BudgetError, MethodConfigError, Quantization, compress
from compression.deployed import TableFormat
from compression.methods.hashing import HashingConfig
from compression.methods.unified_embedding import UnifiedEmbeddingConfig
from compression.sizing import BudgetedConfig

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


# -- what a config declares about its budget (BudgetedConfig) --------------------------------
@pytest.mark.parametrize("name", sorted(compression.registered_methods()))
def test_every_config_declares_with_budget_and_with_uniform_output(name):
    """The job applies its budget and DLRM's one-dim need through methods every config
    declares (no probing for attributes): a copy for a method that has the knob, the
    config itself for one that has none."""
    cls = compression.config_class(name)
    config = cls()
    budgeted = config.with_budget(Budget(ratio=123))
    if issubclass(cls, BudgetedConfig):
        assert budgeted.budget == Budget(ratio=123) and budgeted is not config
        assert config.budget != Budget(ratio=123)  # the original is left as it was
    else:
        assert budgeted is config
    uniform = config.with_uniform_output()
    if cls is UnifiedEmbeddingConfig:
        assert uniform.uniform_output and not config.uniform_output
    else:
        assert uniform is config


def test_budget_precision_is_checked_and_defaults_to_the_deployed_module():
    assert HashingConfig().budget_precision == "deployed"
    with pytest.raises(MethodConfigError, match="hashing.budget_precision: must be one of"):
        HashingConfig(budget_precision="int8")
    q = Quantization("int4")
    assert HashingConfig(quantization=q).table_format(torch.device("cpu")) == TableFormat("int4", 1)
    assert HashingConfig(quantization=q).table_format(torch.device("cuda")) == TableFormat("int4", 16)
    assert HashingConfig(quantization=q, budget_precision="fp32").table_format(torch.device("cpu")) == TableFormat()
    assert HashingConfig(budget=None, rows=5, quantization=q).table_format(torch.device("cpu")) == TableFormat()


def test_a_budget_above_the_quantized_tables_says_there_is_nothing_to_compress():
    """int4 tables hold about 1/5 of fp32 (dim 16): a 2x budget leaves nothing to do."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=5000, feature_names=["f"])]
    config = HashingConfig(budget=Budget(ratio=2), quantization=Quantization("int4"))
    with pytest.raises(BudgetError, match=r"every table exact as int4 tables.*nothing to compress.*budget_precision: fp32"):
        compress(tables, config)
    config.budget_precision = "fp32"  # the fp32 tables at 2x, then int4
    assert 0.95 <= compress(tables, config).describe()["planned_bytes"] / Budget(ratio=2).target_bytes(tables) <= 1
