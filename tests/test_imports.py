"""The light layers stay light: the data pipeline and the config checks load no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["recsys.data", "recsys.data.criteo", "recsys.data.movielens", "recsys.data.tabular", "recsys.data.tabular_synth",
     "recsys.data.synthetic", "compression.errors", "compression.config_checks"],
)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"


def test_every_user_error_is_one_family():
    from compression import (
        BudgetError,
        ConfigError,
        EmbcompError,
        IdOutOfRangeError,
        MethodConfigError,
    )
    from compression.api import UnknownMethodError
    from compression.preflight import MemoryPreflightError
    from experiments.advise import AdviseError
    from experiments.job import CheckpointMismatch
    from experiments.seeds import SeedsError
    from experiments.tracking import TrackingError
    from recsys.data import DataError
    from recsys.training.distributed import DistributedError

    for cls in (BudgetError, ConfigError, IdOutOfRangeError, MethodConfigError, UnknownMethodError, MemoryPreflightError,
                AdviseError, CheckpointMismatch, SeedsError, TrackingError, DataError, DistributedError):  # fmt: skip
        assert issubclass(cls, EmbcompError), cls


def test_the_package_exports_what_it_lists():
    import compression

    for name in compression.__all__:
        assert getattr(compression, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        compression.nope  # noqa: B018


def _module_imports() -> dict[str, set[str]]:
    """Each module of the three packages -> the package modules it imports, at its top or
    inside a function (a deferred import hides a circle, it does not remove it); imports
    under TYPE_CHECKING are for type hints only and not counted."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for pkg in ("compression", "recsys", "experiments"):
        for p in (root / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            files[name] = p
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        out = graph.setdefault(name, set())
        tree = ast.parse(path.read_text())
        hints = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in hints:
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                out.update(subs or ({node.module} & files.keys()))
        out.discard(name)
    return graph


def test_no_import_circle():
    """Layers point down: no module of compression, recsys or experiments imports itself
    back through the others (a circle makes import order matter and hides layering)."""
    graph, state, circles = _module_imports(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 100 and any(graph.values())  # the walk saw the packages
    assert not circles, circles
