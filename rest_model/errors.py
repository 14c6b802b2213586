"""The kinds of error a user can meet, each with its own exit code (the CLI's table, docs/cli.md).

Every message names the file or flag at fault; only an internal error (a bug) shows a traceback.

    code  kind
    0     success
    1     internal error: a bug (the traceback is printed; please report it)
    2     bad input or usage: a flag's value, a missing/unreadable/corrupt input file, an output path that
          cannot be a video (unsupported extension, a folder in its place, its parent a file)
    3     the system refused: the output could not be written (read-only, permission, disk full), the
          requested device is not there (e.g. --device cuda without a GPU)
    4     numerical failure: NaN or infinity in a generated chunk or a training step
    130   interrupted by Ctrl-C (SIGINT), 143 terminated (SIGTERM): 128 + the signal's number
"""
from __future__ import annotations

import signal

INTERNAL, BAD_INPUT, SYSTEM, NON_FINITE = 1, 2, 3, 4


class InputError(ValueError):
    """Something the user passed is wrong (exit 2); a ValueError, so older callers still catch it."""


class OutputPathError(InputError):
    """An output path that can never hold the video: unsupported extension, a folder there, a file as parent."""


class WriteError(OSError):
    """The system refused to write an output (exit 3): permission, read-only, disk full. The earlier file
    under the name, if any, is unchanged."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class DeviceError(RuntimeError):
    """A device flag names hardware that is not there (exit 3)."""


class NonFiniteError(FloatingPointError):
    """NaN or infinity where numbers must be finite (exit 4): a diverged model or training run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so cleanup (`finally`, context managers) runs as for Ctrl-C."""

    signum = signal.SIGTERM


def exit_code(e: BaseException) -> int:
    """The exit code of the kind of error `e` is (the table above)."""
    if isinstance(e, KeyboardInterrupt):
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    if isinstance(e, NonFiniteError):
        return NON_FINITE
    if isinstance(e, (WriteError, DeviceError)):
        return SYSTEM
    # missing or unreadable input files are the user's input; FileNotFoundError before OSError
    if isinstance(e, (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return BAD_INPUT
    if isinstance(e, (OSError, MemoryError)):
        return SYSTEM
    return INTERNAL


def raise_on_sigterm():
    """Make SIGTERM raise `Terminated` in the main thread (its default kills the process with no cleanup,
    leaving half-written files); SIGKILL cannot be caught. Returns the handler it replaced."""
    def handler(signum, frame):
        raise Terminated()
    return signal.signal(signal.SIGTERM, handler)
