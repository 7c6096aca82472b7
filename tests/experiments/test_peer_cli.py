"""``make peer-compare``'s entry point on bad input: one line and exit 1."""

from __future__ import annotations

import subprocess
import sys

from tests.experiments.conftest import REPO


def test_a_missing_split_file_is_one_line(tmp_path):
    missing = tmp_path / "frappe" / "train.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.peer", "--peer-python", sys.executable, "--peer-script", __file__,
         "--dataset", "frappe_shaped", "--out", str(tmp_path / "out"),
         f"dataset.train_path={missing}", f"cache_dir={tmp_path}/cache"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {missing}: no such file (expected a Parquet, CSV or TSV file)"], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing written for a run that did not start"
