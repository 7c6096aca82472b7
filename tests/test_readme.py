"""Every python block of the README runs as written, in order, in one namespace (the
library example: compress to a budget, train, quantize, export; then the blocks after it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path, capsys):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2 and blocks[0].startswith("# readme-example")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "criteo-sample").symlink_to(REPO / "data" / "criteo-sample")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example's relative paths, in a scratch directory
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    auc, nbytes, ratio = re.search(r"test AUC ([\d.]+), (\d+) bytes, ([\d.]+)x", out).groups()
    # 10x as deployed: QR sized for int8 rows (budget_precision "deployed", the default)
    assert 0.5 < float(auc) <= 1 and 10 <= float(ratio) <= 10.5
    assert (tmp_path / "model.pt2").is_file()
    assert (tmp_path / "data" / "cache").is_dir()
    assert "DLRM logits (512, 1)" in out  # TorchRec's own DLRM took the compressed module
