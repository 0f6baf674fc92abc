"""The project's error types, and the one line a command prints for an error.

Every command runs under one handler (``ser_lightning.cli.main``) that turns an error into one line on
stderr and an exit status (the traceback only with ``--debug`` or ``SER_LIGHTNING_DEBUG=1``):

- ``UsageError`` (status 2): an option, argument or configuration value is wrong. The configuration
  checks raise ``ValueError`` naming the option; a ``ValueError`` raised by the project's own code is
  reported with status 2 too (one raised inside a library is unexpected).
- ``DataError`` (status 1): an input file is unusable (``AudioError``, ``CorpusError``,
  ``CheckpointError`` derive from it), an output cannot be written, or a run produced numbers that
  make no sense (it diverged, it never trained).
- ``OSError``: status 1, naming the path and the system's reason ("no space left on device: PATH").
- Anything else is unexpected (a bug): status 1 and a line saying how to see the traceback.

This module imports nothing heavy: the entry point and every layer can use it.
"""
from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "SER_LIGHTNING_DEBUG"
USAGE_STATUS, FAILURE_STATUS, INTERRUPTED_STATUS = 2, 1, 130
PACKAGE_DIR = Path(__file__).resolve().parent


class SERError(Exception):
    """An error the project reports in one line; ``exit_status`` is the command's exit status."""

    exit_status = FAILURE_STATUS


class UsageError(SERError, ValueError):
    """An option, argument or configuration value is wrong; the message names it."""

    exit_status = USAGE_STATUS


class DataError(SERError):
    """An input is unusable, an output cannot be written, or a result makes no sense; the message names it."""


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for the commands: a bad argument raises ``UsageError`` (one line) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.split()[-1]}: {message} (--help lists the options)")


def causes(error: BaseException) -> Iterator[BaseException]:
    """The error and the errors it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def os_reason(error: OSError) -> str:
    """The system's reason for an OSError, e.g. "permission denied", "no space left on device"."""
    return "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error)).lower()


def os_error_text(error: OSError, path: str | Path | None = None) -> str:
    """An OSError as "reason: path", e.g. "no space left on device: /data/cache/x.pt"."""
    where = path if path is not None else error.filename
    reason = os_reason(error)
    if where is None:
        return reason
    other = f" -> {error.filename2}" if error.filename2 is not None and path is None else ""
    return f"{reason}: {where}{other}"


def one_line(text: str) -> str:
    """A message on one line: the first line, then the others joined with '; '."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} {'; '.join(lines[1:])}"


def _raised_by_project(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is the project's own code (a configuration check)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return Path(traceback.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def describe(error: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an error that ended a command."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_STATUS, "interrupted"
    if isinstance(error, SERError):
        return error.exit_status, one_line(str(error))
    if isinstance(error, OSError):
        return FAILURE_STATUS, one_line(os_error_text(error))
    if isinstance(error, ValueError) and _raised_by_project(error):
        return USAGE_STATUS, one_line(str(error))
    found = next((cause for cause in causes(error) if isinstance(cause, OSError)), None)
    if found is not None:  # e.g. torch.save's "enforce fail at inline_container.cc" on a full disk
        text = os_error_text(found) if found.filename else f"{os_reason(found)} ({type(error).__name__}: {error})"
        return FAILURE_STATUS, one_line(text)
    return FAILURE_STATUS, one_line(f"unexpected {type(error).__name__}: {error} (rerun with {DEBUG_FLAG} or "
                                    f"{DEBUG_VARIABLE}=1 for the traceback, and report it if it is a bug)")


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks are wanted, argv without ``--debug``)."""
    wanted = DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")
    return wanted, [arg for arg in argv if arg != DEBUG_FLAG]
