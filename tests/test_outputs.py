"""bossa_jax.outputs: outputs never delete what the program did not write (issue 7 items 1 and 5).

On the code before this module's contract, ``atomic_output`` removed an existing folder before
renaming its temporary into place: a user's folder given as an output was deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bossa_jax.errors import OutputError
from bossa_jax.outputs import MARKER, atomic_output, check_location, check_output

KIND = "test checkpoint"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _write_folder(path: Path, kind: str = KIND, overwrite: bool = False, text: str = "new"):
    with atomic_output(path, kind=kind, overwrite=overwrite) as tmp:
        tmp.mkdir()
        (tmp / "weights.txt").write_text(text)
        (tmp / "params").mkdir()
        (tmp / "params" / "a.bin").write_text(text)


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "musicgen").mkdir(parents=True)
    (folder / "notes.txt").write_text("n")
    (folder / "musicgen" / "config.yaml").write_text("mine")
    (tmp_path / "beside.txt").write_text("b")
    return folder


def test_a_users_folder_is_never_replaced(tmp_path, user_folder):
    before = _snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by bossa-jax"):
            check_output(user_folder, KIND, folder=True, overwrite=overwrite)
        with pytest.raises(OutputError, match="not written by bossa-jax"):
            _write_folder(user_folder, overwrite=overwrite)
    assert _snapshot(tmp_path) == before  # the temporary is gone too


def test_empty_folder_is_used_and_marked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output(out, KIND, folder=True)
    _write_folder(out)
    assert json.loads((out / MARKER).read_text()) == {
        "kind": KIND,
        "files": ["params", "weights.txt"],
    }
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_previous_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    _write_folder(out, text="old")
    (out / "params" / "stale.bin").write_text("from the old run")  # inside a listed entry: ours
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output(out, KIND, folder=True)
    with pytest.raises(OutputError, match="pass --overwrite"):
        _write_folder(out)
    assert (out / "weights.txt").read_text() == "old"
    check_output(out, KIND, folder=True, overwrite=True)
    _write_folder(out, overwrite=True)
    assert (out / "weights.txt").read_text() == "new"
    assert sorted(os.listdir(out / "params")) == ["a.bin"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_keeps_a_user_file_put_inside_a_previous_output(tmp_path):
    out = tmp_path / "out"
    _write_folder(out, text="old")
    (out / "my-notes.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"did not write \(my-notes.txt\)"):
        check_output(out, KIND, folder=True, overwrite=True)
    with pytest.raises(OutputError, match="did not write"):
        _write_folder(out, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_another_kind_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    _write_folder(out, kind="features")
    with pytest.raises(OutputError, match="holds a bossa-jax features, not a test checkpoint"):
        check_output(out, KIND, folder=True, overwrite=True)


def test_failure_inside_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    _write_folder(out, text="old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, kind=KIND, overwrite=True) as tmp:
            tmp.mkdir()
            raise RuntimeError("crash mid-write")
    assert (out / "weights.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_files(tmp_path):
    report = tmp_path / "r.json"
    check_output(report, "report", folder=False)
    report.write_text("old")
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output(report, "report", folder=False)
    check_output(report, "report", folder=False, overwrite=True)
    with atomic_output(report) as tmp:
        tmp.write_text("new")
    assert report.read_text() == "new"
    folder = tmp_path / "mydir"
    folder.mkdir()
    (folder / "keep.txt").write_text("k")
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_output(folder, "report", folder=False, overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        with atomic_output(folder) as tmp:
            tmp.write_text("{}")
    assert (folder / "keep.txt").read_text() == "k"


@pytest.mark.parametrize("name", [".", "..", "./", "sub/.."])
def test_dot_is_refused(tmp_path, monkeypatch, name):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="give a new"):
        check_output(name, KIND, folder=True, overwrite=True)


def test_impossible_places(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file and not a folder"):
        check_output(tmp_path / "file" / "out", KIND, folder=True)
    with pytest.raises(OutputError, match="is a file; the test checkpoint is a folder"):
        check_output(tmp_path / "file", KIND, folder=True, overwrite=True)
    readonly = Path("/sys/bossa-out") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(OutputError, match="cannot write in"):
        check_output(readonly, KIND, folder=True)
    with pytest.raises(OutputError, match="cannot write in"):
        check_location(readonly / "deeper" / "x.npz", "features", folder=False)


def test_output_overlapping_a_source_is_refused(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "model.safetensors").write_text("w")
    before = _snapshot(tmp_path)
    for out, match in [(src, "is the input"), (src / "out", "inside the input")]:
        with pytest.raises(OutputError, match=match):
            check_output(out, KIND, folder=True, overwrite=True, sources=[src])
    with pytest.raises(OutputError, match="is the input"):  # the same file by another name
        check_output(tmp_path / "hf" / ".." / "hf" / "model.safetensors", "x", folder=False,
                     overwrite=True, sources=[src / "model.safetensors"])  # fmt: skip
    with pytest.raises(OutputError, match="contains the input"):
        check_output(tmp_path, KIND, folder=True, overwrite=True, sources=[src])
    assert _snapshot(tmp_path) == before
