"""Errors the user can fix: a bad setting, a missing or mismatched file, a run directory that cannot be
used as it is, a run that diverged.

Their message says what is wrong and what to do, on one line: ``python -m alite_jax.main`` (and
``python -m alite_jax.report``) print it as ``error: <message>`` and exit with status 2. Every other
exception is a bug and keeps its traceback. The classes also derive from the built-in exception a caller
would expect (``ValueError`` for a bad setting, ``FileNotFoundError`` for a missing file,
``FloatingPointError`` for a NaN loss), so ``except ValueError`` still catches a bad setting.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


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
