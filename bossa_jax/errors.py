"""The errors users see and the entry-point pattern that shows them (DESIGN "Errors and output
files").

Every failure a user can cause raises a ``BossaError`` whose message is one line that names the
file, key or shape at fault and says what to do. Entry points run through :func:`run_cli`, which
prints that line to stderr and exits non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
_interrupts = 0  # SIGINTs received while run_cli's handler was installed
_next_unraisablehook = sys.__unraisablehook__  # the hook _quiet_unraisable passes the rest to


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


def interrupt_pending() -> bool:
    """Whether Ctrl-C was pressed during this run_cli call. Python drops a KeyboardInterrupt
    raised inside a gc callback or ``__del__`` (jax runs one on every collection), so long-running
    code that owns its own stop logic (the training loop) asks here too."""
    return _interrupts > 0


def _on_sigint(signum: int, frame: object) -> None:
    global _interrupts
    _interrupts += 1
    raise KeyboardInterrupt


def _quiet_unraisable(unraisable: object) -> None:
    """``sys.unraisablehook`` that drops two harmless messages and passes the rest on:

    * a Ctrl-C that landed in a gc callback or ``__del__`` (Python cannot raise it there; it is
      counted by :func:`interrupt_pending` and acted on);
    * "RuntimeError: Event loop is closed": when orbax's restore fails on a damaged checkpoint,
      tensorstore reads it had started finish afterwards and report to the asyncio loop orbax
      already closed (two tracebacks under the one-line error).

    It stays installed after run_cli returns: those callbacks can come during interpreter exit.
    """
    exc = getattr(unraisable, "exc_value", None)
    if isinstance(exc, KeyboardInterrupt):
        return
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    _next_unraisablehook(unraisable)


def _exit_at_once(signum: int, frame: object) -> None:
    print("interrupted", file=sys.stderr)
    _flush_and_exit(EXIT_INTERRUPTED)


def quiet_ctrl_c_while_starting(package: str) -> None:
    """Called by a package's ``__init__``: when this process runs ``python -m <package>.<cmd>``,
    a Ctrl-C during the seconds of imports before :func:`run_cli` takes over exits 130 at once
    (nothing is written before run_cli runs) instead of printing a traceback. A plain import
    (a library user, a test) changes nothing."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" not in argv[:-1]:
        return
    i = argv.index("-m")
    if not all(a.startswith("-") for a in argv[1:i]) or argv[i + 1].split(".")[0] != package:
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_at_once)


def _flush_and_exit(code: int) -> None:
    """Leaves at once with ``code``: interpreter finalisation while XLA, orbax or grain threads
    still run can crash (a segfault after Ctrl-C), and everything worth keeping was either
    written atomically or unwound by the context managers the interrupt passed through."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Runs an entry point: a BossaError becomes one line on stderr and exit code 2.

    ``--debug`` anywhere in argv is removed before ``main`` sees it and makes errors re-raise with
    their traceback. Ctrl-C (KeyboardInterrupt) prints ``interrupted`` and exits 130 without a
    traceback, after the ``with`` blocks it passed through removed their temporary outputs; an
    interrupt that Python swallowed (see :func:`interrupt_pending`) still ends in 130. A closed
    stdout pipe exits 141 quietly.
    """
    global _interrupts, _next_unraisablehook
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _interrupts = 0
    if sys.unraisablehook is not _quiet_unraisable:
        _next_unraisablehook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        previous = None
    try:
        code = main(args)
    except BossaError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        print("interrupted", file=sys.stderr)
        _flush_and_exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _exit_on_closed_stdout()
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, previous)
    if interrupt_pending() and not code:
        print("interrupted", file=sys.stderr)
        _flush_and_exit(EXIT_INTERRUPTED)
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
