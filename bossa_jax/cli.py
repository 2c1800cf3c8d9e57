"""What every command-line entry point shares: one argument parser whose mistakes are one line,
and library logging kept off the user's terminal (DESIGN "Errors and output files")."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from bossa_jax.errors import BossaError


class UsageError(BossaError):
    """A command line argparse cannot make sense of (unknown flag, missing or malformed value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: PROG: what (see --help)``, exit 2 through
    :func:`bossa_jax.errors.run_cli`) instead of a usage dump, and options and positionals in any
    order (``key=value`` overrides may follow ``--config``), unless it has subcommands."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        if self._subparsers is None:
            return self.parse_intermixed_args(args, namespace)
        return super().parse_args(args, namespace)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--overwrite`` (replace a previous output of the same kind, bossa_jax.outputs)."""
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace a previous output of this command (never a folder it did not write)",
    )  # fmt: skip


def setup_logging(verbose: bool = False) -> None:
    """Progress messages of bossa_jax on stderr; other libraries' (orbax, absl, jax) only with
    ``verbose`` or when they warn."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("bossa_jax").setLevel(logging.INFO)
    if not verbose:
        for noisy in ("absl", "jax", "orbax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger("asyncio").addFilter(_drop_orphaned_task_errors)


def _drop_orphaned_task_errors(record: logging.LogRecord) -> bool:
    """orbax reads a checkpoint with one asyncio task per array; after a failed restore (reported
    in one line) the tasks still pending are collected later and asyncio logs each one's traceback
    ("Task exception was never retrieved"). Dropped unless ``--verbose``."""
    return not record.getMessage().startswith("Task exception was never retrieved")
