"""``keep_freed_memory``: a step's freed activations stay in the process, so the next step
does not fault their pages in again (counted by the kernel, in fresh processes).

The baseline pins glibc's mmap threshold at its starting 128 KiB, so that every 6.5 MiB
activation is a fresh mapping: glibc's own default adapts that threshold to what the
process has freed so far, so whether a plain process faults depends on what it did
before (one CI run counted none), and a test against it could not tell the setting from
luck."""

import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from recsys.training.malloc import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
else:  # glibc's starting mmap threshold, fixed (M_MMAP_THRESHOLD): freed activations go back
    import ctypes
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10) == 1
x = torch.randn(4096, 400)
def step():  # a layer's activations: several 6.5 MiB tensors live at once, then freed
    held = [x * 2.0 for _ in range(6)]
    return sum(float(h[0, 0]) for h in held)
for _ in range(5):  # warm up: the first allocations fault in either way
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_are_not_faulted_in_again():
    # an activation is 1,600 pages: the baseline faults all of them in at every step (20 x 6 x
    # 1,600 = 192,000); kept, the heap can still grow once past its high-water mark when a
    # small allocation lands between the activations (one run in six here faulted one
    # activation's 1,600 pages once), but not step after step
    fresh, kept = faults("fresh"), faults("kept")
    assert fresh >= 20 * 6 * 1600 * 9 // 10
    assert kept <= 6 * 1600
