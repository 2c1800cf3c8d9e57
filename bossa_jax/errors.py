"""The errors users see and the entry-point pattern that shows them (DESIGN "Errors and output
files").

Every failure a user can cause raises a ``BossaError`` whose message is one line that names the
file, key or shape at fault and says what to do. Entry points run through :func:`run_cli`, which
prints that line to stderr and exits non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


class BossaError(Exception):
    """A failure caused by the user's input; ``str(err)`` is the whole message they see."""


class ConfigError(BossaError):
    """Unknown key, wrong type or impossible value in a config or a ``key=value`` override."""


class AudioError(BossaError):
    """A missing, corrupt, silent or too short audio file."""


class MidiError(BossaError):
    """A missing, corrupt or empty MIDI file, or a lead sheet without melody notes."""


class CheckpointError(BossaError):
    """A checkpoint with missing or unexpected keys, wrong shapes, or disallowed pickled objects."""


class DataError(BossaError):
    """A dataset layout, manifest or split that cannot be read."""


class OutputError(BossaError):
    """An output path that cannot be written, or whose writing would replace what the program did
    not write (bossa_jax.outputs)."""


def one_line(message: str) -> str:
    """Folds a message onto one line (library errors sometimes carry newlines)."""
    return " ".join(str(message).split())


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Runs an entry point: a BossaError becomes one line on stderr and exit code 2.

    ``--debug`` anywhere in argv is removed before ``main`` sees it and makes errors re-raise with
    their traceback. KeyboardInterrupt exits 130 without a traceback; a closed stdout pipe exits 141
    quietly.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = main(args)
    except BossaError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _exit_on_closed_stdout()
    try:  # output still buffered can meet a closed pipe too
        sys.stdout.flush()
    except BrokenPipeError:
        _exit_on_closed_stdout()
    sys.exit(code or 0)


def _exit_on_closed_stdout() -> None:
    """The reader of stdout went away (``... | head``): stop quietly with SIGPIPE's status, as Unix
    tools do. stdout points at /dev/null so the interpreter's final flush cannot complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + 13)
