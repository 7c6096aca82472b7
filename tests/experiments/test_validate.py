"""Configs that cannot be right are refused when the job starts: one line, exit 1, no data
read and no store or cache created (issue: each case a user hit, and the ranges beside them)."""

from __future__ import annotations

import pytest

from experiments.run import main
from tests.experiments.conftest import run_cli, smoke_overrides

CASES = [
    ("trainer.batch_size=0", "trainer.batch_size: must be >= 1, got 0"),
    ("trainer.epochs=-1", "trainer.epochs: must be >= 1, got -1"),
    ("model.embedding_dim=0", "model.embedding_dim: must be >= 1, got 0"),
    ("+trainer.epoch=3", "trainer.epoch: no such key in TrainerConfig (did you mean trainer.epochs?)"),
    ("budget=0x", "budget"),
    ("budget=-5MiB", "budget"),
    ("compression=qr compression.budget.ratio=0.5", "compression.budget.ratio: must be >= 1, got 0.5"),
    ("model.dropout=1.5", "model.dropout: must be < 1, got 1.5"),
    ("dataset.split=[0.5,0.5,0.5]", "dataset.split: must be three fractions"),
    ("seeds=0", "seeds"),
    ("trainer.sparse_lr=0", "trainer.sparse_lr: must be > 0, got 0"),
    # a method's config checks itself when made; named as the override, its method beside
    ("compression=optembed compression.alpha=-1", "compression.alpha: must be >= 0, got -1.0 (optembed)"),
    ("compression=optembed compression.retrain_from=search", "compression.retrain_from: must be one of scratch, supernet"),
]


@pytest.mark.parametrize("overrides,line", CASES, ids=[c[0] for c in CASES])
def test_a_config_that_cannot_be_right_is_one_line_before_any_data(compose_cfg, tmp_path, capsys, overrides, line):
    cfg = compose_cfg(smoke_overrides(tmp_path, "dataset=criteo_sample", *overrides.split()))
    with pytest.raises(SystemExit) as e:
        main.__wrapped__(cfg)  # the job as Hydra calls it, without Hydra's own logging
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and line in err[0], err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()


def test_on_the_command_line_too(tmp_path):
    r = run_cli("dataset=criteo_sample", *smoke_overrides(tmp_path), "+trainer.epoch=3", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: trainer.epoch: no such key in TrainerConfig (did you mean trainer.epochs?)")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "summary.json").exists()
