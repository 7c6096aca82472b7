"""Checks on source files, so that a bad file is refused with one line, not a traceback.

polars reports a binary file, a NUL byte or a directory with its own multi-line text
and no line number; these helpers look at the bytes themselves (before a read, or
after a read failed) and name the file, the line and what is wrong.

Example::

    path = require_file(Path("train.txt"), "a Criteo TSV file")
    try:
        df = scan_lines(path).collect()
    except pl.exceptions.PolarsError as e:
        raise text_read_error(path, e, "lines of text") from None
"""

from __future__ import annotations

from pathlib import Path

from recsys.data.schema import DataError

# Bytes read to sniff a file's kind: enough for a header line and the first rows.
SNIFF_BYTES = 1 << 16
PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file, else a ``DataError`` saying what it is instead.

    Example::

        require_file(Path("data/"), "a CSV file")   # DataError: data: is a directory, not a file
    """
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file (expected {what})")
    if not path.exists():
        raise DataError(f"{path}: no such file (expected {what})")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (expected {what})")
    return path


def one_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text (polars adds hints on later lines)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def find_nul_byte(path: Path, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """``(1-based line, byte offset)`` of the first NUL byte of ``path``, or None.

    Reads in chunks with ``bytes.find`` (memchr speed), so it costs about one read of
    the file; used only after a read failed, to say where.
    """
    line, offset = 1, 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            at = block.find(b"\x00")
            if at >= 0:
                return line + block.count(b"\n", 0, at), offset + at
            line += block.count(b"\n")
            offset += len(block)
    return None


def _binary_reason(path: Path, head: bytes) -> str | None:
    """Why the first bytes of a file say it is not text (None if they look like text)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip-compressed: decompress it first"
    if head.startswith(PARQUET_MAGIC):
        return "a Parquet file, not text (name it .parquet or set format: parquet)"
    return None


def check_text_head(path: Path, what: str) -> None:
    """Refuse a file whose first bytes are compressed, Parquet or contain a NUL byte."""
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    reason = _binary_reason(path, head)
    if reason:
        raise DataError(f"{path}: {reason} (expected {what})")
    at = head.find(b"\x00")
    if at >= 0:
        line = head.count(b"\n", 0, at) + 1
        raise DataError(f"{path}:{line}: NUL byte at byte {at}: binary data, not {what}")


def check_parquet_magic(path: Path) -> None:
    """Refuse a file that does not start and end with Parquet's ``PAR1`` magic."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(4)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        kind = _binary_reason(path, head) or "no PAR1 magic at its start and end"
        raise DataError(f"{path}: not a Parquet file ({kind})")


def text_read_error(path: Path, error: BaseException, what: str) -> DataError:
    """The one-line ``DataError`` for a text file that polars failed to read.

    A NUL byte anywhere (a binary or truncated-and-padded file) is located to its line;
    otherwise the first line of polars' message is kept.
    """
    with path.open("rb") as fh:
        reason = _binary_reason(path, fh.read(SNIFF_BYTES))
    if reason:
        return DataError(f"{path}: {reason} (expected {what})")
    nul = find_nul_byte(path)
    if nul is not None:
        line, offset = nul
        return DataError(f"{path}:{line}: NUL byte at byte {offset}: binary data, not {what}")
    return DataError(f"{path}: cannot be read as {what}: {one_line(error)}")
