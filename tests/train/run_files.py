"""Test helpers for a run folder's files: a byte snapshot and a damaged checkpoint."""

from __future__ import annotations

from pathlib import Path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that a command changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def damage_checkpoint(step_dir: Path) -> None:
    """Deletes the array data files of an orbax checkpoint step (as a lost or partial copy
    would)."""
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data, step_dir
    for path in data:
        path.unlink()
