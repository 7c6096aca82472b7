"""Binary files, NUL bytes and directories get one line from every loader; killed builds are cleaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from recsys.data.common import BUILD_LOCK, _host, atomic_directory, remove_stale_builds
from recsys.data.criteo import CriteoConfig
from recsys.data.libfm import LibFMConfig
from recsys.data.schema import DataError
from recsys.data.tabular import TabularConfig
from tests.conftest import CRITEO_SAMPLE
from tests.data.conftest import leftovers

LINES = CRITEO_SAMPLE.read_bytes().splitlines(keepends=True)[:20]
LIBFM = [b"1 0:1 5:1\n", b"0 1:1 6:1\n"] * 10
LOADERS = {
    "criteo": (lambda p: CriteoConfig(path=str(p)), LINES, "Criteo TSV text"),
    "libfm": (lambda p: LibFMConfig(path=str(p), fields=[{"name": "a", "start": 0, "end": 10}]), LIBFM, "libFM text"),
}


def _refused(tmp_path: Path, loader: str, data: bytes | None, match: str) -> None:
    make, _, _ = LOADERS[loader]
    path = tmp_path / "bad.txt"
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=match) as info:
        make(path).prepare(cache)
    assert "\n" not in str(info.value)
    assert leftovers(cache) == []


@pytest.mark.parametrize("loader", LOADERS)
def test_binary_file(tmp_path, loader):
    garbage = np.random.default_rng(1).bytes(100_000)
    first_nul = garbage.index(b"\x00")
    line = garbage[:first_nul].count(b"\n") + 1
    what = LOADERS[loader][2]
    _refused(tmp_path, loader, garbage, rf"bad\.txt:{line}: NUL byte at byte {first_nul}: binary data, not {what}$")


@pytest.mark.parametrize("loader", LOADERS)
def test_nul_byte_in_first_line(tmp_path, loader):
    lines = list(LOADERS[loader][1])
    lines[0] = lines[0][:3] + b"\x00" + lines[0][3:]
    _refused(tmp_path, loader, b"".join(lines), r"bad\.txt:1: NUL byte at byte 3: binary data")


@pytest.mark.parametrize("loader", LOADERS)
def test_nul_byte_in_a_later_line(tmp_path, loader):
    lines = list(LOADERS[loader][1])
    lines[6] = lines[6][:4] + b"\x00" + lines[6][4:]
    offset = sum(len(x) for x in lines[:6]) + 4
    _refused(tmp_path, loader, b"".join(lines), rf"bad\.txt:7: NUL byte at byte {offset}: binary data")


@pytest.mark.parametrize("loader", LOADERS)
def test_directory_is_not_a_file(tmp_path, loader):
    _refused(tmp_path, loader, None, r"bad\.txt: is a directory, not a file")


# --- builds killed with -9 -----------------------------------------------------------

BUILDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from recsys.data.common import atomic_directory
    with atomic_directory(Path(sys.argv[1])) as tmp:
        (tmp / "train.parquet").write_bytes(b"partial")
        print(tmp, flush=True)
        time.sleep(120)
    """
)


def _builder(final: Path) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of a build of ``final``, and its temporary directory."""
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(final)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_killed_build_is_removed_by_the_next(tmp_path):
    cache = tmp_path / "cache"
    proc, tmp = _builder(cache / "ds-0001")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and (tmp / BUILD_LOCK).is_file()  # kill -9: nothing could clean up
    path = tmp_path / "ok.tsv"
    path.write_bytes(b"".join(LINES))
    ds = CriteoConfig(path=str(path)).prepare(cache)
    assert not tmp.exists()
    assert leftovers(cache) == [ds.root.name]


def test_live_build_is_never_removed(tmp_path):
    cache = tmp_path / "cache"
    proc, tmp = _builder(cache / "ds-0002")
    try:
        assert remove_stale_builds(cache) == []
        with atomic_directory(cache / "other"):  # another build in the same cache meanwhile
            pass
        assert tmp.is_dir() and (tmp / "train.parquet").read_bytes() == b"partial"
    finally:
        proc.kill()
        proc.wait()
    assert remove_stale_builds(cache) == [tmp]


def test_unknown_leftovers_are_left_alone(tmp_path):
    """Older code's directories, ones without a lock file, and other hosts' builds."""
    dead = 2**22 + 7  # above Linux's largest pid: never running
    old = tmp_path / "ds-0003.tmp-1-deadbeef"
    no_lock = tmp_path / f"ds-0004.tmp-{_host()}-{dead}-0123abcd"
    other_host = tmp_path / f"ds-0005.tmp-{_host()}x-{dead}-0123abcd"
    for path in (old, no_lock, other_host):
        path.mkdir()
    (other_host / BUILD_LOCK).touch()
    assert remove_stale_builds(tmp_path) == []
    assert old.is_dir() and no_lock.is_dir() and other_host.is_dir()
    (no_lock / BUILD_LOCK).touch()  # this host, dead pid, lock free: stale
    assert remove_stale_builds(tmp_path) == [no_lock]


def test_tabular_build_killed_then_rebuilt(tmp_path):
    """A tabular build killed mid-way leaves its directory; the next prepare removes it."""
    cache = tmp_path / "cache"
    proc, tmp = _builder(cache / "tabular-0005")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    data = tmp_path / "t.csv"
    data.write_text("label,u\n" + "".join(f"{i % 2},{i % 5}\n" for i in range(60)))
    ds = TabularConfig(path=str(data), categorical=["u"]).prepare(cache)
    assert leftovers(cache) == [ds.root.name]
