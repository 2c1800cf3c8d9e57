"""Regenerates the built-in demo assets beside this file (README quick start; issue 2).

* ``demo_leadsheet.mid``: "Little Harbour", an original 16-bar tune in C major, 4/4 at 112 bpm,
  written for this project. Two tracks in the layout the arranger reads (SPEC 8.2, 11.4): track 0 =
  melody, track 1 = block chords (root-position triads voiced from MIDI 48 + root, as the PIAST
  lead sheets are; SPEC 6.2), progression C Am F G | C Am F G | F G Em Am | Dm G C C. No pickup
  (notes before the first downbeat would be dropped).
* ``demo_style.ogg``: the style reference, "Evening Tram", a second original 10-bar tune in A minor
  at 100 bpm (about 26 s), arranged for piano (melody with dyads in the right hand, broken-chord
  eighths in the left), fingered bass, a soft string pad and a light drum groove, rendered with
  FluidSynth and the TimGM6mb General MIDI soundfont at 32 kHz, mixed to mono, peak-normalised to
  -1 dBFS and encoded as Ogg Vorbis (quality 0.5: about 240 KB). Its MIDI score is written to
  ``demo_style.mid`` too, so the audio can be re-rendered with any soundfont.

Everything is deterministic: the notes are literal tables below, symusic writes the MIDI files,
FluidSynth renders offline (``-F``, no real-time audio) and the Ogg stream's serial number, which
libsndfile draws at random, is rewritten to a constant. Bit-exact audio requires the same
FluidSynth, soundfont and libvorbis builds; the MIDI files are bit-exact anywhere.

Needs the Debian packages ``fluidsynth`` and ``timgm6mb-soundfont`` (install with
``apt-get install -y --no-install-recommends fluidsynth timgm6mb-soundfont``). Run::

    python -m bossa_jax.assets.make_assets            # both files, in bossa_jax/assets/
    python -m bossa_jax.assets.make_assets --midi-only  # the MIDI files only (no FluidSynth)
    python -m bossa_jax.assets.make_assets --soundfont /path/to/GM.sf2 --out-dir /tmp/assets
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
from symusic import Note, Score, Tempo, TimeSignature, Track

from bossa_jax.errors import BossaError, run_cli
from bossa_jax.outputs import atomic_output
from bossa_jax.render import run_fluidsynth

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_SOUNDFONT = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
SAMPLE_RATE = 32000
TICKS_PER_BEAT = 480
BEATS_PER_BAR = 4
PEAK_DBFS = -1.0
OGG_QUALITY = 0.5  # soundfile compression_level for Vorbis: 0 = best quality, 1 = smallest
TAIL_SECONDS = 2.0  # let the last chord ring before the fade
FADE_SECONDS = 0.75

# Pitch classes of the chord roots, and the triad (or seventh) above them, in semitones.
CHORDS = {
    "C": (0, (0, 4, 7)),
    "Dm": (2, (0, 3, 7)),
    "Em": (4, (0, 3, 7)),
    "E7": (4, (0, 4, 7, 10)),
    "F": (5, (0, 4, 7)),
    "G": (7, (0, 4, 7)),
    "Am": (9, (0, 3, 7)),
}

# ----------------------------------------------------------------------- "Little Harbour" (lead)
LEAD_TEMPO = 112.0
LEAD_CHORDS = ["C", "Am", "F", "G"] * 2 + ["F", "G", "Em", "Am", "Dm", "G", "C", "C"]
# One list per bar of (MIDI pitch or None for a rest, beats).
LEAD_MELODY = [
    [(64, 1), (67, 1), (72, 1.5), (71, 0.5)],
    [(69, 2), (64, 1), (72, 1)],
    [(69, 1), (67, 0.5), (65, 0.5), (69, 1), (72, 1)],
    [(71, 1.5), (69, 0.5), (67, 2)],
    [(64, 1), (67, 1), (72, 1), (76, 1)],
    [(74, 1), (72, 1), (69, 2)],
    [(65, 1), (69, 1), (72, 1), (69, 1)],
    [(67, 3), (None, 1)],
    [(72, 1.5), (69, 0.5), (72, 1), (74, 1)],
    [(74, 1.5), (71, 0.5), (67, 2)],
    [(76, 1), (74, 1), (71, 1), (67, 1)],
    [(69, 2), (72, 1), (76, 1)],
    [(77, 1.5), (76, 0.5), (74, 1), (69, 1)],
    [(71, 1), (74, 1), (79, 1.5), (77, 0.5)],
    [(76, 1), (74, 0.5), (72, 0.5), (74, 1), (76, 1)],
    [(72, 3), (None, 1)],
]

# ----------------------------------------------------------------------- "Evening Tram" (style)
STYLE_TEMPO = 100.0
STYLE_CHORDS = ["Am", "F", "C", "G", "Am", "F", "Dm", "E7", "F", "Am"]
STYLE_MELODY = [
    [(76, 1), (72, 0.5), (71, 0.5), (69, 2)],
    [(69, 0.5), (72, 0.5), (77, 1), (76, 1), (72, 1)],
    [(72, 1.5), (74, 0.5), (76, 1), (79, 1)],
    [(79, 1), (77, 0.5), (76, 0.5), (74, 2)],
    [(76, 1), (81, 1), (79, 0.5), (76, 0.5), (72, 1)],
    [(77, 1.5), (76, 0.5), (74, 1), (72, 1)],
    [(74, 1), (77, 1), (81, 1), (77, 1)],
    [(80, 1.5), (76, 0.5), (74, 1), (71, 1)],
    [(72, 1), (69, 1), (77, 1), (76, 1)],
    [(69, 4)],
]
# Left-hand broken chord over one bar of eighths: indices into (root, third, fifth) + octaves.
BROKEN_CHORD = [(0, 0), (2, 0), (0, 1), (1, 1), (2, 1), (1, 1), (0, 1), (2, 0)]
# GM programs and drum keys.
PIANO, FINGERED_BASS, STRING_ENSEMBLE = 0, 33, 48
KICK, SIDE_STICK, CLOSED_HAT, CRASH = 36, 37, 42, 49


def _ticks(beats: float) -> int:
    return round(beats * TICKS_PER_BEAT)


def _new_score(tempo: float) -> Score:
    score = Score(TICKS_PER_BEAT)
    score.tempos.append(Tempo(0, qpm=tempo))
    score.time_signatures.append(TimeSignature(0, BEATS_PER_BAR, 4))
    return score


def _add_melody(track: Track, bars: list, velocity: int, legato: float = 0.95) -> None:
    for bar, notes in enumerate(bars):
        beat = bar * BEATS_PER_BAR
        for pitch, beats in notes:
            if pitch is not None:
                track.notes.append(Note(_ticks(beat), _ticks(beats * legato), pitch, velocity))
            beat += beats
        if beat != (bar + 1) * BEATS_PER_BAR:
            raise AssertionError(f"melody bar {bar} lasts {beat - bar * BEATS_PER_BAR} beats")


def _chord_pitches(name: str, base: int) -> list[int]:
    root, intervals = CHORDS[name]
    return [base + root + interval for interval in intervals]


def build_leadsheet() -> Score:
    """The 16-bar two-track lead sheet: melody (track 0), block chords (track 1)."""
    score = _new_score(LEAD_TEMPO)
    melody = Track(name="Melody", program=PIANO, is_drum=False)
    chords = Track(name="Chords", program=PIANO, is_drum=False)
    _add_melody(melody, LEAD_MELODY, velocity=90)
    for bar, name in enumerate(LEAD_CHORDS):
        for pitch in _chord_pitches(name, base=48):
            chords.notes.append(Note(_ticks(bar * BEATS_PER_BAR), _ticks(BEATS_PER_BAR), pitch, 80))
    score.tracks.append(melody)
    score.tracks.append(chords)
    return score


def build_style_score() -> Score:
    """The style reference's score: piano (two hands), bass, string pad and drums."""
    score = _new_score(STYLE_TEMPO)
    right = Track(name="Piano RH", program=PIANO, is_drum=False)
    left = Track(name="Piano LH", program=PIANO, is_drum=False)
    bass = Track(name="Bass", program=FINGERED_BASS, is_drum=False)
    pad = Track(name="Strings", program=STRING_ENSEMBLE, is_drum=False)
    drums = Track(name="Drums", program=0, is_drum=True)
    _add_melody(right, STYLE_MELODY, velocity=88, legato=0.9)
    last = len(STYLE_CHORDS) - 1
    for bar, name in enumerate(STYLE_CHORDS):
        start = bar * BEATS_PER_BAR
        root, intervals = CHORDS[name]
        low = 45 + (root - 9) % 12  # roots from A2 (45) up to G#3
        tones = [low + intervals[0], low + intervals[1], low + intervals[2]]
        # Right-hand dyad: a chord tone under the bar's first melody note, on the downbeat.
        first = STYLE_MELODY[bar][0][0]
        voicing = _chord_pitches(name, base=48) + _chord_pitches(name, base=60)
        under = max(p for p in voicing if p < first - 2)
        right.notes.append(Note(_ticks(start), _ticks(1.8), under, 70))
        if bar == last:  # the final bar: a rolled chord that rings
            for i, pitch in enumerate([*tones, tones[0] + 12, tones[1] + 12]):
                left.notes.append(Note(_ticks(start + 0.12 * i), _ticks(4 - 0.12 * i), pitch, 72))
            bass.notes.append(Note(_ticks(start), _ticks(4), low - 12, 72))
            pad.notes.extend(Note(_ticks(start), _ticks(4), p + 12, 50) for p in tones)
            drums.notes.append(Note(_ticks(start), _ticks(1), CRASH, 80))
            drums.notes.append(Note(_ticks(start), _ticks(1), KICK, 90))
            continue
        for eighth, (tone, octave) in enumerate(BROKEN_CHORD):
            velocity = 80 if eighth % 2 == 0 else 68
            pitch = tones[tone] + 12 * octave
            left.notes.append(Note(_ticks(start + eighth / 2), _ticks(0.5), pitch, velocity))
        fifth = low + intervals[2] - 12
        for beat, beats, pitch, velocity in (
            (0, 1.5, low - 12, 72),
            (1.5, 0.5, fifth, 60),
            (2, 1.5, low - 12, 68),
            (3.5, 0.5, low, 58),
        ):
            bass.notes.append(Note(_ticks(start + beat), _ticks(beats * 0.95), pitch, velocity))
        pad.notes.extend(Note(_ticks(start), _ticks(4), p + 12, 42) for p in tones)
        if bar == 0 or bar == 4:
            drums.notes.append(Note(_ticks(start), _ticks(1), CRASH, 70))
        for eighth in range(8):
            hat_velocity = 64 if eighth % 2 == 0 else 44
            drums.notes.append(
                Note(_ticks(start + eighth / 2), _ticks(0.5), CLOSED_HAT, hat_velocity)
            )
        for beat in (0, 1.5, 2.5):
            drums.notes.append(Note(_ticks(start + beat), _ticks(0.5), KICK, 88))
        for beat in (1, 3):
            drums.notes.append(Note(_ticks(start + beat), _ticks(0.5), SIDE_STICK, 76))
    for track in (right, left, bass, pad, drums):
        score.tracks.append(track)
    return score


def render(midi: Path, soundfont: Path, out_wav: Path) -> None:
    """Renders ``midi`` offline with FluidSynth at 32 kHz (stereo float WAV), FluidSynth's default
    reverb and chorus on (bossa_jax.render.run_fluidsynth)."""
    if not soundfont.is_file():
        raise BossaError(
            f"{soundfont}: soundfont not found; install timgm6mb-soundfont or pass one"
        )
    stereo = run_fluidsynth(
        midi, soundfont, sample_rate=SAMPLE_RATE, effects=True, skip_flag="--midi-only"
    )
    soundfile.write(str(out_wav), stereo, SAMPLE_RATE, format="WAV", subtype="FLOAT")


def master(stereo: np.ndarray, music_seconds: float) -> np.ndarray:
    """Mono (channel mean), cut after the tail, faded out, peak-normalised to PEAK_DBFS."""
    mono = stereo.mean(axis=1) if stereo.ndim == 2 else stereo
    keep = min(mono.size, round((music_seconds + TAIL_SECONDS) * SAMPLE_RATE))
    mono = mono[:keep].astype(np.float64)
    fade = round(FADE_SECONDS * SAMPLE_RATE)
    mono[-fade:] *= np.linspace(1.0, 0.0, fade)
    peak = np.max(np.abs(mono))
    if peak == 0:
        raise BossaError("fluidsynth rendered silence; check the soundfont")
    return (mono * (10 ** (PEAK_DBFS / 20) / peak)).astype(np.float32)


OGG_SERIAL = 0x626F7361  # "bosa": libsndfile draws a random stream serial number per file


def _ogg_crc(page: bytes) -> int:
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, initial value 0."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def with_fixed_ogg_serial(data: bytes, serial: int = OGG_SERIAL) -> bytes:
    """Rewrites every page's stream serial number (and its checksum) so the bytes are reproducible.

    libsndfile's Vorbis writer is deterministic except for the serial number it draws at random.
    """
    out = bytearray(data)
    position = 0
    while position < len(out):
        if out[position : position + 4] != b"OggS":
            raise BossaError(f"not an Ogg page at byte {position}")
        segments = out[position + 26]
        body = sum(out[position + 27 : position + 27 + segments])
        end = position + 27 + segments + body
        out[position + 14 : position + 18] = serial.to_bytes(4, "little")
        out[position + 22 : position + 26] = bytes(4)
        out[position + 22 : position + 26] = _ogg_crc(out[position:end]).to_bytes(4, "little")
        position = end
    return bytes(out)


def write_midi(score: Score, path: Path) -> None:
    with atomic_output(path) as tmp:
        score.dump_midi(str(tmp))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ASSETS_DIR)
    parser.add_argument("--soundfont", type=Path, default=DEFAULT_SOUNDFONT)
    parser.add_argument("--midi-only", action="store_true", help="skip the FluidSynth rendering")
    args = parser.parse_args(argv)

    write_midi(build_leadsheet(), args.out_dir / "demo_leadsheet.mid")
    style = build_style_score()
    style_midi = args.out_dir / "demo_style.mid"
    write_midi(style, style_midi)
    if args.midi_only:
        return 0
    music_seconds = len(STYLE_CHORDS) * BEATS_PER_BAR * 60.0 / STYLE_TEMPO
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "render.wav"
        render(style_midi, args.soundfont, rendered)
        stereo, rate = soundfile.read(str(rendered), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise BossaError(f"fluidsynth rendered {rate} Hz instead of {SAMPLE_RATE} Hz")
    mono = master(stereo, music_seconds)
    with atomic_output(args.out_dir / "demo_style.ogg") as tmp:
        soundfile.write(
            str(tmp), mono, SAMPLE_RATE, format="OGG", subtype="VORBIS",
            compression_level=OGG_QUALITY,
        )  # fmt: skip
        tmp.write_bytes(with_fixed_ogg_serial(tmp.read_bytes()))
    print(f"wrote {args.out_dir}/demo_leadsheet.mid, demo_style.mid, demo_style.ogg")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
