"""Tests for the built-in demo assets (bossa_jax/assets/) and the script that makes them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile
from symusic import Score

from bossa_jax.assets import DEMO_LEADSHEET, DEMO_STYLE, DEMO_STYLE_MIDI, make_assets
from bossa_jax.audio import audio_duration, load_clip

TICKS_PER_BAR = 4 * 480


def test_demo_leadsheet_layout():
    score = Score(str(DEMO_LEADSHEET))
    assert score.tpq == 480
    assert [(ts.numerator, ts.denominator) for ts in score.time_signatures] == [(4, 4)]
    assert len(score.tempos) == 1 and 100 <= score.tempos[0].qpm <= 120
    assert len(score.tracks) == 2
    melody, chords = score.tracks
    assert score.end() == 16 * TICKS_PER_BAR
    # Track 0: a monophonic melody starting on the first downbeat (no pickup).
    onsets = [note.time for note in melody.notes]
    assert onsets == sorted(set(onsets)) and onsets[0] == 0
    assert all(a.end <= b.time for a, b in zip(melody.notes, melody.notes[1:], strict=False))
    # Track 1: one block chord (3 notes, same onset and length) per bar, for all 16 bars.
    bars: dict[int, list] = {}
    for note in chords.notes:
        bars.setdefault(note.time, []).append(note)
    assert sorted(bars) == [bar * TICKS_PER_BAR for bar in range(16)]
    for notes in bars.values():
        assert len(notes) == 3 and len({note.duration for note in notes}) == 1


def test_demo_style_audio():
    info = soundfile.info(str(DEMO_STYLE))
    assert info.samplerate == 32000 and info.channels == 1
    assert 20.0 <= audio_duration(DEMO_STYLE) <= 30.0
    assert DEMO_STYLE.stat().st_size < 600_000
    clip = load_clip(DEMO_STYLE)
    assert clip.valid_frames == 508
    rms = float(np.sqrt(np.mean(clip.samples**2)))
    assert 0.03 < rms < 0.5  # music at a sensible level, not noise-floor or clipped
    # Not a test tone: energy spread over bass, mid and treble bands.
    spectrum = np.abs(np.fft.rfft(clip.samples)) ** 2
    freqs = np.fft.rfftfreq(clip.samples.size, 1 / 32000)
    bands = [(30, 200), (200, 2000), (2000, 12000)]
    shares = [spectrum[(freqs >= lo) & (freqs < hi)].sum() / spectrum.sum() for lo, hi in bands]
    assert min(shares) > 0.005, shares


def test_midi_assets_are_the_script_output(tmp_path):
    assert make_assets.main(["--midi-only", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "demo_leadsheet.mid").read_bytes() == DEMO_LEADSHEET.read_bytes()
    assert (tmp_path / "demo_style.mid").read_bytes() == DEMO_STYLE_MIDI.read_bytes()


def test_fixed_ogg_serial_keeps_audio(tmp_path):
    rng = np.random.default_rng(0)
    noise = (0.2 * rng.standard_normal(64000)).astype(np.float32)
    first, second = tmp_path / "a.ogg", tmp_path / "b.ogg"
    for path in (first, second):
        soundfile.write(str(path), noise, 32000, format="OGG", subtype="VORBIS")
    assert first.read_bytes() != second.read_bytes()  # libsndfile draws a random serial
    fixed = [make_assets.with_fixed_ogg_serial(p.read_bytes()) for p in (first, second)]
    assert fixed[0] == fixed[1]
    rewritten = tmp_path / "fixed.ogg"
    rewritten.write_bytes(fixed[0])
    # libogg drops pages whose checksum is wrong, so a bad CRC would lose samples here.
    original, _ = soundfile.read(str(first), dtype="float32")
    decoded, _ = soundfile.read(str(rewritten), dtype="float32")
    np.testing.assert_array_equal(decoded, original)


@pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not make_assets.DEFAULT_SOUNDFONT.is_file(),
    reason="needs the Debian packages fluidsynth and timgm6mb-soundfont",
)
def test_style_audio_is_the_script_output(tmp_path):
    assert make_assets.main(["--out-dir", str(tmp_path)]) == 0
    rendered, _ = soundfile.read(str(tmp_path / "demo_style.ogg"), dtype="float32")
    committed, _ = soundfile.read(str(DEMO_STYLE), dtype="float32")
    assert rendered.shape == committed.shape
    # Identical with the same FluidSynth/soundfont/libvorbis; otherwise re-run make_assets.py.
    np.testing.assert_allclose(rendered, committed, atol=1e-4, rtol=0)
