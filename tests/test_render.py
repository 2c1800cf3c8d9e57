"""render.py: FluidSynth piano rendering and the piano-roll picture; their one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile
import symusic

from bossa_jax import render
from bossa_jax.errors import BossaError
from bossa_jax.symbolic.leadsheet import read_leadsheet
from bossa_jax.symbolic.notes import NoteTable
from tests.symbolic.conftest import build_score

HAVE_FLUIDSYNTH = render.shutil.which("fluidsynth") is not None and any(
    (render.SOUNDFONT_DIR / n).is_file() for n in render.SOUNDFONT_NAMES
)
needs_fluidsynth = pytest.mark.skipif(
    not HAVE_FLUIDSYNTH, reason="needs the Debian packages fluidsynth and timgm6mb-soundfont"
)


def two_bar_score() -> symusic.Score:
    notes = [(i * 480, 480, 60 + i, 90) for i in range(8)]
    return build_score([(40, False, notes, "violin")], time_signatures=[(0, 4, 4)])


@needs_fluidsynth
def test_render_wav_plays_a_piano_at_minus_one_dbfs(tmp_path):
    score = two_bar_score()
    out = render.render_wav(score, tmp_path / "a.wav")
    samples, rate = soundfile.read(str(out), dtype="float32", always_2d=True)
    assert rate == render.RENDER_RATE and samples.shape[1] == 2
    seconds = 4.0  # 8 quarters at 120 bpm
    assert abs(len(samples) / rate - (seconds + render.TAIL_SECONDS)) < 0.05
    assert np.max(np.abs(samples)) == pytest.approx(10 ** (render.PEAK_DBFS / 20), abs=1e-3)
    assert os.listdir(tmp_path) == ["a.wav"]  # no temporary left
    assert score.tracks[0].program == 40  # the caller's score is not changed
    assert render.piano_score(score).tracks[0].program == 0
    # a MIDI file gives the same audio as its score
    score.dump_midi(str(tmp_path / "a.mid"))
    again, _ = soundfile.read(str(render.render_wav(tmp_path / "a.mid", tmp_path / "b.wav")))
    np.testing.assert_array_equal(again, soundfile.read(str(out))[0])


@needs_fluidsynth
def test_render_wav_of_no_notes_is_a_second_of_silence(tmp_path):
    out = render.render_wav(symusic.Score(480), tmp_path / "s.wav")
    samples, rate = soundfile.read(str(out))
    assert len(samples) == rate and not np.any(samples)


def test_missing_fluidsynth_or_soundfont_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(BossaError, match=r"nope.sf2: soundfont not found \(--soundfont\)"):
        render.render_wav(two_bar_score(), tmp_path / "a.wav", tmp_path / "nope.sf2")
    monkeypatch.setattr(render, "SOUNDFONT_DIR", tmp_path / "no-such-dir")
    with pytest.raises(BossaError, match="no General MIDI soundfont .*--no-render"):
        render.find_soundfont()
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    with pytest.raises(BossaError, match="fluidsynth not found.*--no-render") as info:
        render.run_fluidsynth(tmp_path / "a.mid", tmp_path / "x.sf2", sample_rate=32000)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_piano_roll_png_overlays_the_melody(tmp_path):
    from bossa_jax.assets import DEMO_LEADSHEET

    song = read_leadsheet(DEMO_LEADSHEET)
    arrangement = build_score(
        [(0, False, [(i * 240, 240, 48 + i % 24, 30 + 4 * (i % 20)) for i in range(64)], "p")],
        time_signatures=[(0, 4, 4)],
    )
    out = render.piano_roll_png(arrangement, song, tmp_path / "roll.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["roll.png"]
    # the overlay is the lead sheet's melody (instrument 0) only, on the same bar grid
    melody = render._note_rectangles(render._melody_score(song))
    table = song.leadsheet
    assert len(melody) == int(np.sum(table.events[:, 2] == 0)) > 0
    # an empty arrangement and no lead sheet still draw
    render.piano_roll_png(symusic.Score(480), NoteTable(), tmp_path / "empty.png")
    render.piano_roll_png(symusic.Score(480), None, tmp_path / "none.png")
    assert render._bar_lines(arrangement, 16.0).tolist() == [0.0, 4.0, 8.0, 12.0, 16.0]
