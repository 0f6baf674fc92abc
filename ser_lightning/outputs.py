"""Writing result files safely: output folders checked before the work, files replaced atomically.

A result file is written to a temporary file in its folder and renamed over the old one, so a
failure (a full disk, a permission problem, an interrupt) leaves the old file or none, never a
truncated one; the failure is a ``DataError`` naming the path. Output folders are checked (created
and written to) before a command starts its work, so that a read-only folder fails in seconds, not
after the work is done. This module imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ser_lightning.errors import DataError, os_error_text


class OutputError(DataError, OSError):
    """An output file or folder cannot be written; the message names the path and the system's reason."""


def check_writable(folder: str | Path, option: str) -> Path:
    """Create ``folder`` if needed and prove it writable with a temporary file; OutputError naming ``option``."""
    folder = Path(folder).expanduser()
    blocking = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputError(f"{option}: cannot write there: {blocking} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"{option}: cannot write there: {os_error_text(error, folder)}") from error
    return folder


def check_writable_file(path: str | Path, option: str) -> Path:
    """Check that the file ``path`` can be written (its folder writable, the path not a folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{option}: {path} is a folder, not a file name")
    check_writable(path.parent, option)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block ends without an error.

    For writers that take a file name (e.g. an exporter); any failure removes the temporary file and
    leaves the old ``path`` (or none) in place. An OSError becomes an OutputError naming ``path``
    ("no space left on device: PATH").
    """
    path = Path(path)
    # the same suffix: writers that choose a format by the file name choose the same one
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(os_error_text(error, path)) from error
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` on a temporary file, flushed to disk and renamed to ``path`` at the end of the block."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers never see half a file)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
