"""C++ kernels for the CPU, built on first use.

Each source is compiled once per machine into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), for that machine's CPU
(``-march=native``, OpenMP). ``load`` builds a torch extension with torch's
``cpp_extension``; ``load_library`` a plain C library read through ``ctypes``, for code
that must not load torch (the data pipeline). Where one cannot be built (no C++ compiler,
or no ninja for an extension) there is one warning and the caller's own ops do the same
work; ``EMBCOMP_CPU_KERNELS=0`` turns every kernel off. ``make setup`` builds them, so
no training step waits for a compiler.

Example::

    k = load(Path(__file__).with_name("mc_cpu.cpp"), "remaps run as TorchRec's torch ops")
    if k is not None:
        out = k.mch_remap(values, bounds, sorted_ids, slots, fallback)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_LOADED: dict[Path, Any] = {}


def load(src: Path, without: str) -> Any:
    """The extension built from ``src``, or None where it cannot be built (``without`` says
    what then runs instead, in the one warning) or kernels are off."""
    if src not in _LOADED:  # (keyed by the path as given too: resolving it is a system call a step)
        key = src.resolve()
        if key not in _LOADED:
            _LOADED[key] = _build(key, without)
        _LOADED[src] = _LOADED[key]
    return _LOADED[src]


# built where it runs (the name keys the CPU's features); OpenMP, or at::parallel_for
# (inline in torch's headers) runs the blocks on one thread
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _name(src: Path, *keys: str) -> str:
    cpu = Path("/proc/cpuinfo")
    features = [ln for ln in cpu.read_text().splitlines() if ln.startswith("flags")][:1] if cpu.exists() else []
    # the path too: ninja rebuilds a build directory whose source path changed, so two
    # checkouts sharing the cache would take turns rebuilding one
    parts = [str(src), src.read_text(), *FLAGS, *keys, *features]
    return f"embcomp_{src.stem}_{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:12]}"


def _why(e: Exception) -> str:
    """The compiler's own line of a failed build (a missing compiler shows in many ways)."""
    text = (e.stderr or "") if isinstance(e, subprocess.CalledProcessError) else str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if "error:" in ln.lower() or "not found" in ln.lower()]
    return (said[:1] or lines[-1:] or [type(e).__name__])[0][:300]


def load_library(src: Path, without: str) -> ctypes.CDLL | None:
    """The plain C library built from ``src`` (``g++``, or ``$CXX``), or None where it
    cannot be built (``without`` says what then runs instead, in the one warning) or
    kernels are off."""
    if src not in _LOADED:
        key = src.resolve()
        if key not in _LOADED:
            _LOADED[key] = _build_library(key, without)
        _LOADED[src] = _LOADED[key]
    return _LOADED[src]  # type: ignore[no-any-return]


def _build_library(src: Path, without: str) -> ctypes.CDLL | None:
    if os.environ.get("EMBCOMP_CPU_KERNELS", "1") == "0":
        return None
    cxx = shlex.split(os.environ.get("CXX", "g++"))
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    lib = root / f"{_name(src, *cxx)}.so"
    try:
        if not lib.exists():
            log.info("building %s for this machine (once, a few seconds)", src.name)
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:  # built aside, then renamed: whole or absent
                out = Path(tmp) / lib.name
                subprocess.run([*cxx, *FLAGS, "-std=c++17", "-shared", "-fPIC", str(src), "-o", str(out)],
                               check=True, capture_output=True, text=True)  # fmt: skip
                os.replace(out, lib)
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("%s did not build (%s); %s", src.name, _why(e), without)
        return None


def _build(src: Path, without: str) -> Any:
    if os.environ.get("EMBCOMP_CPU_KERNELS", "1") == "0":
        return None
    import torch

    name = _name(src, torch.__version__)
    flags = FLAGS
    try:
        from torch.utils import cpp_extension

        try:  # (torch's own, private: only to say why the first step waits)
            built = Path(cpp_extension._get_build_directory(name, verbose=False), "build.ninja").exists()
        except Exception:  # noqa: BLE001
            built = False
        if not built:
            log.info("building %s for this machine (once, about 20 s)", src.name)
        return cpp_extension.load(name, [str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 (a missing compiler shows in many ways)
        log.warning("%s did not build (%s); %s", src.name, _why(e), without)
        return None
