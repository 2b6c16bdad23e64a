"""Errors the user can fix: a bad setting, a missing or mismatched file, a run directory that cannot be
used as it is, a run that diverged.

Their message says what is wrong and what to do, on one line: the command lines (``python -m
alite_jax.main``, ``.convert``, ``.export``, ``.report``) print it as ``error: <message>`` and exit with
status 2 (:func:`exit_on_user_error`). Every other exception is a bug and keeps its traceback. The
classes also derive from the built-in exception a caller would expect (``ValueError`` for a bad setting,
``FileNotFoundError`` for a missing file, ``FloatingPointError`` for a NaN loss), so ``except ValueError``
still catches a bad setting.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import Any, Iterator, NoReturn

EXIT_USER_ERROR = 2  # the command lines' exit status for a user error (1 is a bug, with its traceback)


class UserError(Exception):
    """A problem with the user's settings, files or run directory, with the fix in its message."""


class ConfigError(UserError, ValueError):
    """A config field outside its allowed values, or settings that cannot work together."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs (a teacher run, a data set) is not there."""


class RunDirError(UserError):
    """A run directory holds another run, or history that cannot be resumed as it is."""


class DivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite: the run stopped; the message names the last good checkpoint."""


@contextlib.contextmanager
def user_input(context: str = "") -> Iterator[None]:
    """Turns the ValueError / FileNotFoundError raised while checking the user's settings and files into
    :class:`ConfigError` / :class:`MissingFileError` with the same message (prefixed by ``context``).

    Wrap the checks that only read what the user gave (config, data set, teacher run): the libraries they
    call (models, sparsity, data) raise the built-in exceptions, and what they refuse there is the user's
    input, not a bug.
    """
    prefix = f"{context}: " if context else ""
    try:
        yield
    except UserError as e:
        if not prefix:
            raise
        raise type(e)(prefix + str(e)) from e
    except FileNotFoundError as e:
        raise MissingFileError(prefix + str(e)) from e
    except ValueError as e:
        raise ConfigError(prefix + str(e)) from e


def exit_with_user_error(message: str) -> NoReturn:
    """Prints ``error: <message>`` on stderr, its whitespace collapsed to one line, and exits with
    :data:`EXIT_USER_ERROR`: how every command line reports what the user can fix, without a traceback."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def exit_on_user_error(filesystem: bool = False) -> Iterator[None]:
    """Runs the block; a :class:`UserError` raised in it ends the program by
    :func:`exit_with_user_error` (one line, status 2). With ``filesystem``, so does an ``OSError`` (a
    path that cannot be read or written: missing, a file where a directory is wanted, no permission, a
    full disk), for commands whose files are all the user's. Other exceptions pass on with their
    traceback: they are bugs."""
    try:
        yield
    except UserError as e:
        exit_with_user_error(str(e))
    except OSError as e:
        if not filesystem and e.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk is never a bug
            raise
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        exit_with_user_error(f"{where}: {e.strerror or e}" if where else str(e))


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags_or_exit)``), with an unknown flag, a
    malformed value or a value outside an enum's choices reported as a user error (one line, status 2)
    instead of absl's FATAL report."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        exit_with_user_error(str(e))


FULL_DISK_SIGNS = ("no space left on device", "resource_exhausted", "event loop is closed")
NOISY = ("orbax", "asyncio")  # where those records come from: orbax's threads, its futures' event loops


def quiet_failed_saves() -> None:
    """For a command line: a checkpoint save that fails for lack of space (reported by the trainer in one
    line, :func:`alite_jax.run_dir.checkpoint_saved`) would first print hundreds of lines: orbax's
    background threads log each failed write with its traceback, and tensorstore's callbacks into the
    save's closed event loop each print one, and asyncio reports the failed writes' futures at exit.
    Those records (orbax's and asyncio's errors mentioning a full disk, the closed loop's unraisable
    errors) are dropped; every other log record and unraisable error is
    printed as before."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not any(where in record.pathname for where in NOISY):
            return True
        text = (record.getMessage() + str(record.exc_info[1] if record.exc_info else "")).lower()
        return not any(sign in text for sign in FULL_DISK_SIGNS)

    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(keep)
    previous = sys.unraisablehook

    def unraisable(info: Any) -> None:
        if not any(sign in str(info.exc_value).lower() for sign in FULL_DISK_SIGNS):
            previous(info)

    sys.unraisablehook = unraisable
