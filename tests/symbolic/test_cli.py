"""``python -m bossa_jax.symbolic``: bad files give one line and a non-zero exit (DESIGN errors)."""

import json
import subprocess
import sys

import pytest

from bossa_jax.symbolic import remi
from bossa_jax.symbolic.midi import write_midi


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bossa_jax.symbolic", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def specimens(tmp_path, make_score):
    good = make_score(
        [(0, False, [(k * 480, 480, 60 + k, 80) for k in range(8)], "melody"),
         (0, False, [(0, 1920, 48, 70), (1920, 1920, 50, 70)], "chords")]
    )  # fmt: skip
    good_path = write_midi(good, tmp_path / "good.mid")
    data = good_path.read_bytes()
    (tmp_path / "truncated.mid").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mid").write_bytes(b"")
    (tmp_path / "text.mid").write_text("this is not a MIDI file\n")
    write_midi(make_score([], tempos=[(0, 100.0)]), tmp_path / "no_notes.mid")
    write_midi(make_score([(0, True, [(0, 120, 36, 100)], "drums")]), tmp_path / "drums.mid")
    return tmp_path


@pytest.mark.parametrize(
    "name,extra",
    [("truncated.mid", []), ("empty.mid", []), ("text.mid", []), ("no_notes.mid", []),
     ("drums.mid", ["--leadsheet"]), ("missing.mid", [])],
)  # fmt: skip
def test_bad_midi_one_line_nonzero_exit(specimens, name, extra):
    result = _run("tokens", specimens / name, "--codec", "remi", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_tokens_and_segments_output(specimens):
    good = specimens / "good.mid"
    result = _run("tokens", good, "--codec", "remi", "--leadsheet", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (
        out["tokens"][0] == "</s>" and out["tokens"][61] == "<sep>" and out["tokens"][-1] == "<sep>"
    )
    assert remi.to_ids(out["tokens"]).tolist() == out["ids"]
    result = _run("tokens", good, "--codec", "octuple", "--json", "--bars", "1:2")
    out = json.loads(result.stdout)
    assert out["tokens"][:8] == ["<s>"] * 8 and out["tokens"][-8:] == ["</s>"] * 8
    assert out["tokens"][8] == "<0-0>"  # bars counted from the first selected bar
    result = _run("tokens", good, "--codec", "remi")
    assert result.returncode == 0 and result.stdout.startswith("bar 0: s-9 t-35 o-0")
    result = _run("segments", good)
    assert result.returncode == 0 and "0 windows" in result.stdout  # 2 bars: no 4-bar window
