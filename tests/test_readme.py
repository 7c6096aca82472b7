"""The README's library example runs as written (compress to a budget, train, quantize, export)."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path, capsys):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(# readme-example\n.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "criteo-sample").symlink_to(REPO / "data" / "criteo-sample")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example's relative paths, in a scratch directory
    try:
        exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    auc, nbytes, ratio = re.search(r"test AUC ([\d.]+), (\d+) bytes, ([\d.]+)x", out).groups()
    # 10x as deployed: QR sized for int8 rows (budget_precision "deployed", the default)
    assert 0.5 < float(auc) <= 1 and 10 <= float(ratio) <= 10.5
    assert (tmp_path / "model.pt2").is_file()
    assert (tmp_path / "data" / "cache").is_dir()
