"""PIAST onset alignment (SPEC 1.1): a FluidSynth rendering of a PIAST MIDI, moved by a known
offset (late and early), is shifted back onto the MIDI within one 20 ms frame, by the pure function
and by the codes command, which keeps the shift per song."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import symusic

from bossa_jax import audio
from bossa_jax.assets import make_assets
from bossa_jax.data import align, codes, readers
from bossa_jax.errors import AudioError
from bossa_jax.symbolic.midi import write_midi

pytestmark = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not make_assets.DEFAULT_SOUNDFONT.is_file(),
    reason="needs the Debian packages fluidsynth and timgm6mb-soundfont (see .ci/run)",
)

SR = audio.SAMPLE_RATE
FRAME = 0.02  # one EnCodec frame
TPQ = 480
FIRST_BEAT = 2.5  # the piano's first note: beat 2.5 at 120 qpm = 1.25 s


def write_piast_song(path: Path) -> Path:
    """A short PIAST-layout MIDI: piano (track 0) and melody from 1.25 s, chord markers."""
    score = symusic.Score(TPQ)
    score.tempos.append(symusic.Tempo(time=0, qpm=120.0))
    piano = symusic.Track(name="piano", program=0)
    melody = symusic.Track(name="melody", program=0)
    start = int(FIRST_BEAT * TPQ)
    for beat in range(8):
        for pitch in (48, 55, 64):
            piano.notes.append(symusic.Note(start + beat * TPQ, TPQ - 40, pitch + beat % 3, 100))
        melody.notes.append(symusic.Note(start + beat * TPQ, TPQ - 40, 72 + beat % 5, 90))
    for bar in range(3):
        score.markers.append(symusic.TextMeta(time=bar * 4 * TPQ, text="C_M_C"))
    score.tracks.extend([piano, melody])
    return write_midi(score, path)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """(PIAST MIDI path, its FluidSynth rendering: mono float32 at 32 kHz)."""
    root = tmp_path_factory.mktemp("piast")
    midi = write_piast_song(root / "song.mid")
    make_assets.render(midi, make_assets.DEFAULT_SOUNDFONT, root / "song.wav")
    stereo, rate = soundfile.read(str(root / "song.wav"), dtype="float32")
    assert rate == SR
    return midi, stereo.mean(axis=1)


def moved(wave: np.ndarray, offset: float) -> np.ndarray:
    """The audio ``offset`` seconds late (offset > 0: silence prepended) or early (trimmed)."""
    n = round(abs(offset) * SR)
    return np.concatenate([np.zeros(n, np.float32), wave]) if offset > 0 else wave[n:]


def test_first_note_of_the_piano_track(rendered):
    midi, _ = rendered
    assert readers.piast_first_note_seconds(midi) == pytest.approx(FIRST_BEAT * 0.5)


@pytest.mark.parametrize("offset", [0.437, -0.613])  # audio late, audio early
def test_known_offset_is_recovered_within_one_frame(rendered, offset):
    midi, wave = rendered
    first_note = readers.piast_first_note_seconds(midi)
    _, base = align.align_to_midi(wave, SR, first_note)
    assert abs(base) <= FRAME  # the rendering itself starts on the MIDI's first note
    aligned, shift = align.align_to_midi(moved(wave, offset), SR, first_note)
    assert abs(shift - (offset + base)) <= FRAME  # the known offset, less the detection's bias
    assert abs(align.first_audio_onset(aligned, SR) - first_note) <= FRAME
    # what is left is the rendering, moved by the (sub-frame) error of the detected onset
    lag = round(offset * SR) - int(shift * SR)
    assert abs(lag) <= FRAME * SR
    np.testing.assert_array_equal(aligned[SR : 3 * SR], moved(wave, lag / SR)[SR : 3 * SR])


def test_shift_waveform_pads_or_trims_like_the_official_code():
    wave = np.arange(1.0, 11.0, dtype=np.float32)
    np.testing.assert_array_equal(align.shift_waveform(wave, 10, 0.35), wave[3:])  # int(3.5)
    np.testing.assert_array_equal(align.shift_waveform(wave, 10, -0.29)[:2], [0.0, 0.0])
    assert align.shift_waveform(wave, 10, -0.29).size == 12
    assert align.shift_waveform(wave, 10, 0.05) is wave  # under one sample: untouched
    with pytest.raises(AudioError, match="no onset"):
        align.align_to_midi(np.zeros(SR, np.float32), SR, 0.5)


def fake_encode(batch: np.ndarray) -> np.ndarray:
    """(1, samples) -> (1, 4, samples / 640) codes: the frame's loudness, quantised."""
    frames = np.abs(batch[0]).reshape(-1, 640).max(axis=1)
    level = np.minimum((frames * 2047).astype(np.int64), 2047)
    return np.stack([level] * 4)[None]


@pytest.mark.parametrize("offset", [0.437, -0.613])
def test_codes_command_aligns_piast_and_keeps_the_shift(rendered, tmp_path, offset):
    midi, wave = rendered
    (tmp_path / "midi").mkdir()
    shutil.copy(midi, tmp_path / "midi" / "song.mid")
    (tmp_path / "audio").mkdir()
    soundfile.write(str(tmp_path / "audio" / "song.wav"), moved(wave, offset), SR, subtype="FLOAT")
    sources = readers.piast_sources(tmp_path / "midi", tmp_path / "audio")
    store, skipped = codes.build_from_audio(
        tmp_path / "codes", sources, fake_encode, compute_id="fake", progress=False
    )
    assert skipped == 0
    shift = store.metadata("piast/song")["audio_shift_seconds"]
    first_note = readers.piast_first_note_seconds(midi)
    _, base = align.align_to_midi(wave, SR, first_note)
    assert abs(shift - (offset + base)) <= FRAME
    samples = codes.load_whole(tmp_path / "audio" / "song.wav")
    aligned, _ = align.align_to_midi(samples, SR, first_note)
    chunk = round(codes.DEFAULT_CHUNK_SECONDS * audio.FRAME_RATE) * 640
    expected = codes.chunked_encoder(fake_encode, chunk)(aligned)
    np.testing.assert_array_equal(store.codes("piast/song"), expected)
