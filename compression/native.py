"""C++ kernels for the CPU, built on first use with torch's ``cpp_extension``.

Each source is compiled once per machine into torch's extension cache
(``TORCH_EXTENSIONS_DIR``), for that machine's CPU (``-march=native``, OpenMP for
``at::parallel_for``). Where it cannot be built (no C++ compiler or ninja) there is one
warning and the caller's torch ops do the same work; ``EMBCOMP_CPU_KERNELS=0`` turns every
kernel off. ``make setup`` builds them, so no training step waits for a compiler.

Example::

    k = load(Path(__file__).with_name("mc_cpu.cpp"), "remaps run as TorchRec's torch ops")
    if k is not None:
        out = k.mch_remap(values, bounds, sorted_ids, slots, fallback)
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_LOADED: dict[Path, Any] = {}


def load(src: Path, without: str) -> Any:
    """The extension built from ``src``, or None where it cannot be built (``without`` says
    what then runs instead, in the one warning) or kernels are off."""
    src = src.resolve()
    if src not in _LOADED:
        _LOADED[src] = _build(src, without)
    return _LOADED[src]


def _build(src: Path, without: str) -> Any:
    if os.environ.get("EMBCOMP_CPU_KERNELS", "1") == "0":
        return None
    # built where it runs (the name keys the CPU's features); OpenMP, or at::parallel_for
    # (inline in torch's headers) runs the blocks on one thread
    flags = ["-O3", "-march=native", "-fopenmp"]
    cpu = Path("/proc/cpuinfo")
    features = [ln for ln in cpu.read_text().splitlines() if ln.startswith("flags")][:1] if cpu.exists() else []
    # the path too: ninja rebuilds a build directory whose source path changed, so two
    # checkouts sharing the cache would take turns rebuilding one
    parts = [str(src), src.read_text(), *flags, torch.__version__, *features]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    name = f"embcomp_{src.stem}_{key}"
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
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        said = [ln for ln in lines if "error:" in ln.lower() or "not found" in ln.lower()]  # the compiler's own line
        why = (said[:1] or lines[-1:] or [type(e).__name__])[0][:300]
        log.warning("%s did not build (%s); %s", src.name, why, without)
        return None
