"""Models never import training code (DESIGN "Layout"; issue 8 item 7): importing every
bossa_jax.models module in a fresh interpreter loads no bossa_jax.train module."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import bossa_jax.models

ROOT = Path(__file__).resolve().parents[2]


def test_models_import_no_training_code():
    names = sorted(m.name for m in pkgutil.iter_modules(bossa_jax.models.__path__))
    assert {"bossa", "losses", "musicgen", "qformer"} <= set(names)
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module('bossa_jax.models.' + name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('bossa_jax.train')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"models imported training code: {done.stdout.strip()}"
