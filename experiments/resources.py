"""Peak resident memory of a job, not of the whole sweep process.

Linux keeps a process's peak RSS (``VmHWM``); writing ``5`` to ``/proc/self/clear_refs``
resets it to the current RSS, so each job of an in-process sweep reads its own peak.
Elsewhere the process's lifetime peak (``getrusage``) is the fallback.

Example::

    reset_peak_rss(); run(); peak_rss_bytes()
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset (Linux), else the process's lifetime peak."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
