"""Every python block of the README runs as written, in order, in one namespace (the
library example: compress to a budget, train, quantize, export; then the blocks after it).

``python_blocks`` and ``run_blocks`` are also how ``tests/test_docs.py`` runs the pages in docs/.
Blocks fenced as ``py`` instead of ``python`` are shown, never run (a notebook's minutes of
training, say)."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def run_blocks(blocks: list[str], filename: str, scratch: Path) -> dict:
    """Run the blocks in order in one namespace, with ``scratch`` as the working directory and
    the repository's Criteo sample at ``data/criteo-sample`` there, as the examples expect."""
    (scratch / "data").mkdir()
    (scratch / "data" / "criteo-sample").symlink_to(REPO / "data" / "criteo-sample")
    cwd = os.getcwd()
    os.chdir(scratch)  # the examples' relative paths, in a scratch directory
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, filename, "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_readme_example_runs(tmp_path, capsys):
    blocks = python_blocks(REPO / "README.md")
    assert len(blocks) >= 2 and blocks[0].startswith("# readme-example")
    run_blocks(blocks, "README.md", tmp_path)
    out = capsys.readouterr().out
    auc, nbytes, ratio = re.search(r"test AUC ([\d.]+), (\d+) bytes, ([\d.]+)x", out).groups()
    # 10x as deployed: QR sized for int8 rows (budget_precision "deployed", the default)
    assert 0.5 < float(auc) <= 1 and 10 <= float(ratio) <= 10.5
    assert (tmp_path / "model.pt2").is_file()
    assert (tmp_path / "data" / "cache").is_dir()
    assert "DLRM logits (512, 1)" in out  # TorchRec's own DLRM took the compressed module
