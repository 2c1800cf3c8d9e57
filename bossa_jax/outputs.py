"""Output paths that never cost the user a file (DESIGN "Errors and output files").

Every command that writes follows one contract:

* :func:`check_output` runs before any work (models, data): an output that cannot be written (a
  read-only place, a path under a regular file, ``.``, a folder where a file goes or a file where a
  folder goes), an output equal to, inside or containing one of the command's sources, and an
  existing output without ``--overwrite`` are one-line :class:`~bossa_jax.errors.OutputError` s.
* Output folders carry a marker, :data:`MARKER`, naming their kind and the entries the program
  wrote. Only such a folder of the same kind, holding nothing but those entries, is ever replaced
  (with ``--overwrite``); an existing folder the program did not write is never touched (an empty
  one is used).
* :func:`atomic_output` writes under a temporary name beside the output and renames it into place,
  so a crash never leaves a half-written MIDI, WAV, array or checkpoint. It never removes anything
  but its own temporary and a previous output of the same kind that the caller asked to replace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from bossa_jax.errors import OutputError

MARKER = ".bossa-output.json"


def _shown(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder this program wrote (``{"kind": ..., "files": [...]}``), else None."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("kind"), str)
    return marker if ok and isinstance(marker.get("files"), list) else None


def foreign_entries(folder: Path, marker: dict) -> list[str]:
    """What ``folder`` holds besides the marker and the entries it lists (someone else's files)."""
    ours = {MARKER, *map(str, marker["files"])}
    return sorted(name for name in os.listdir(folder) if name not in ours)


def _replaceable_folder(final: Path, kind: str, overwrite: bool) -> bool:
    """True when ``final`` (an existing folder) holds a previous ``kind`` output and may be
    replaced; False when it is empty; otherwise an OutputError saying why it is left alone."""
    entries = os.listdir(final)
    if not entries:
        return False
    marker = read_marker(final)
    if marker is None:
        raise OutputError(
            f"{final}: folder exists and was not written by bossa-jax (holds {_shown(entries)}); "
            "give a new or empty folder"
        )
    if marker["kind"] != kind:
        raise OutputError(
            f"{final}: holds a bossa-jax {marker['kind']}, not a {kind}; give another folder"
        )
    foreign = foreign_entries(final, marker)
    if foreign:
        raise OutputError(
            f"{final}: holds files bossa-jax did not write ({_shown(foreign)}); move them out "
            "or give another folder"
        )
    if not overwrite:
        raise OutputError(f"{final}: holds a previous {kind}; pass --overwrite to replace it")
    return True


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or ".")


def _check_writable(path: Path) -> None:
    """Refuses a path under a regular file and a place this process cannot create files in."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"{path}: cannot be created, {base} is a file and not a folder")
    try:  # a real probe: os.access says yes to root on read-only file systems
        handle, probe = tempfile.mkstemp(prefix=".bossa-probe.", dir=base)
    except OSError as err:
        raise OutputError(f"{path}: cannot write in {base} ({err.strerror})") from err
    os.close(handle)
    os.unlink(probe)


def _check_sources(path: Path, sources: Iterable[str | os.PathLike]) -> None:
    out = path.resolve()
    for source in sources:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise OutputError(
                f"{path}: output is {'the' if out == src else 'inside the'} input {source}; "
                "write it elsewhere"
            )
        if out in src.parents:
            raise OutputError(f"{path}: output folder contains the input {source}; write elsewhere")


def check_location(
    path: str | os.PathLike, kind: str, *, folder: bool, sources: Iterable[str | os.PathLike] = ()
) -> Path:
    """The checks of :func:`check_output` that do not look inside an existing output: a name that
    is not ``.``, no overlap with ``sources``, a folder or file as expected, a writable place."""
    path = Path(path)
    if path.name in ("", ".", "..") or path.resolve() == Path.cwd().resolve():
        raise OutputError(
            f"{path}: give a new {'folder' if folder else 'file'} name for the output"
        )
    _check_sources(path, sources)
    if path.is_dir() and not folder:
        raise OutputError(f"{path}: is a folder; give a file name for the {kind}")
    if folder and (path.exists() or path.is_symlink()) and not path.is_dir():
        raise OutputError(f"{path}: is a file; the {kind} is a folder, give a folder name")
    _check_writable(path)
    return path


def check_output(
    path: str | os.PathLike,
    kind: str,
    *,
    folder: bool,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
) -> Path:
    """Checks, before any work, that output ``path`` (a folder when ``folder``, else a file) can be
    written as a ``kind`` (e.g. "encodec checkpoint") without losing anything; returns it.

    ``sources`` are the command's inputs: the output may not be, lie inside or contain one. An
    existing output needs ``overwrite``, and a folder must be empty or a previous ``kind``.
    """
    path = check_location(path, kind, folder=folder, sources=sources)
    if path.is_dir():
        _replaceable_folder(path, kind, overwrite)
    elif (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")
    return path


def _write_marker(folder: Path, kind: str) -> None:
    files = sorted(name for name in os.listdir(folder) if name != MARKER)
    (folder / MARKER).write_text(json.dumps({"kind": kind, "files": files}) + "\n")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, kind: str | None = None, overwrite: bool = False
) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success renames it to ``path``, else deletes it.

    Works for files and for folders (the caller creates whichever it needs at the yielded path).
    A file replaces an existing file (commands check ``--overwrite`` first with
    :func:`check_output`). A folder gets the :data:`MARKER` of ``kind`` (required) and takes the
    place of an empty folder, or of a previous ``kind`` output when ``overwrite``; anything else at
    ``path`` is an OutputError and stays as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if tmp.is_dir():
            if kind is None:
                raise ValueError("atomic_output: a folder output needs its kind")
            _write_marker(tmp, kind)
            if final.is_dir() and not final.is_symlink():
                if _replaceable_folder(final, kind, overwrite):
                    os.replace(final, tmp_dir / "previous")  # removed with tmp_dir below
            elif final.exists() or final.is_symlink():
                raise OutputError(f"{final}: is a file; the {kind} is a folder")
        elif final.is_dir() and not final.is_symlink():
            raise OutputError(f"{final}: is a folder; give a file name")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
