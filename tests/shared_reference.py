"""Finds the project's shared reference files (``shared/reference/...``) from any checkout.

CI runs a fresh clone with ``shared/`` beside it (``../shared``); a checkout may also hold its own
``shared/``, and a git worktree finds the one beside its main checkout. ``BOSSA_SHARED_DIR``
overrides all of them. A test that needs a file none of them holds fails naming the places it
looked, never skips: a silently skipped parity test reads as a passed one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _main_checkout() -> Path | None:
    """The main checkout of a git worktree (None outside git)."""
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(common).parent if common else None


def shared_dirs() -> list[Path]:
    """Where ``shared/`` may be, in the order searched."""
    dirs = [Path(os.environ["BOSSA_SHARED_DIR"])] if os.environ.get("BOSSA_SHARED_DIR") else []
    dirs += [ROOT / "shared", ROOT.parent / "shared"]
    main = _main_checkout()
    if main is not None:
        dirs += [main / "shared", main.parent / "shared"]
    return list(dict.fromkeys(dirs))


def shared_file(relative: str) -> Path:
    """``shared/<relative>`` from the first place that has it; fails the test otherwise."""
    tried = shared_dirs()
    for base in tried:
        if (base / relative).is_file():
            return base / relative
    pytest.fail(
        f"shared/{relative} not found in {', '.join(str(d) for d in tried)}: put the project's "
        "shared/ beside the checkout or set BOSSA_SHARED_DIR"
    )
