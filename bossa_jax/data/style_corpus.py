"""A synthetic style corpus: lead sheets, piano arrangements in clearly different accompaniment
styles, and a band rendering of each song in its style (issue 11, item 1).

Every song is a lead sheet (melody + one chord per bar over a common progression, in one of the 12
keys, at a tempo drawn from its style's range) arranged for piano in one style: the melody in the
right hand (always at or above :data:`MELODY_LOW`) and the style's accompaniment pattern voiced on
the chords below it (at most :data:`ACCOMPANIMENT_HIGH`). The same song is then played by a band of
style-typical General MIDI instruments (never a piano) and rendered with FluidSynth, so a model
trained on (band audio -> piano arrangement) pairs has to carry the style across timbre, as
POP909's band audio -> piano cover does.

Styles (:data:`STYLES`; their definitions are what :mod:`bossa_jax.data.style_classifier` checks):

* ``stride``: 4/4; a single bass note on beats 1 and 3 (root, fifth), a mid-register chord on
  beats 2 and 4. Band: clarinet, tuba, banjo.
* ``bossa``: 4/4; bass root on 1, fifth on the and-of-2 and on 3, root on the and-of-4; syncopated
  two-bar chord comping (beats 1, 2.5, 4 | 2, 3.5). Band: flute, acoustic bass, nylon guitar,
  maracas and side stick.
* ``waltz``: 3/4; bass on beat 1, chords on beats 2 and 3. Band: accordion, cello, strings.
* ``ballad``: 4/4, slow; a wide rising-falling arpeggio in eighths (root, 5th, octave, 10th,
  12th, ...) spanning over an octave and a half. Band: oboe, harp, slow string pad.
* ``alberti``: 4/4; eighths low-high-middle-high of the closed triad (span under an octave).
  Band: violin, harpsichord, contrabass.
* ``pop``: 4/4; bass root in half notes, block chords on every eighth. Band: square lead,
  electric piano, fingered bass, kick/snare/hi-hat.

Files of a corpus folder (``python train.py make-corpus --out DIR``)::

    manifest.jsonl       the generic JSONL manifest (bossa_jax.data.readers): id, arrangement,
                         leadsheet, audio, split, style
    split.json           the held-out songs in the dataset_split.json format (dataset "style")
    corpus.json          the generator's settings and every song's style, key, tempo, progression
    arrangements/<id>.mid  piano arrangement (tracks "Right hand", "Left hand", program 0)
    leadsheets/<id>.mid  two-track lead sheet: melody, chords voiced as SPEC 6.2 (48 + root)
    band/<id>.mid        the band score that was rendered
    audio/<id>.flac      the band rendering, mono 32 kHz, peak -1 dBFS (absent with audio=False)

Deterministic: song ``i`` draws from ``numpy.random.default_rng([seed, i])``, so the same seed gives
byte-identical MIDI files and manifest; FluidSynth renders offline with reverb and chorus off, so
the audio is bit-exact for the same FluidSynth and soundfont builds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
import symusic

from bossa_jax.errors import BossaError, ConfigError
from bossa_jax.outputs import atomic_output, check_output
from bossa_jax.render import run_fluidsynth

OUTPUT_KIND = "style corpus"
DATASET = "style"
DEFAULT_SOUNDFONT = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
SAMPLE_RATE = 32000
TPQ = 480
PEAK_DBFS = -1.0
TAIL_SECONDS = 1.0
MELODY_LOW, MELODY_HIGH = 65, 84  # the right hand's melody stays in [65, 84]
ACCOMPANIMENT_HIGH = 64  # every accompaniment note is at most E4
HELD_OUT_FRACTION = 0.1  # of the songs, for each of validation and test

STYLES = ("stride", "bossa", "waltz", "ballad", "alberti", "pop")
BEATS_PER_BAR = {"waltz": 3}  # the others are 4/4
TEMPO_RANGE = {
    "stride": (96, 132),
    "bossa": (112, 144),
    "waltz": (120, 168),
    "ballad": (60, 80),
    "alberti": (88, 126),
    "pop": (92, 126),
}

QUALITIES = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
}
# One chord per bar: (root in semitones above the key, quality).
PROGRESSIONS = {
    "I-V-vi-IV": ((0, "maj"), (7, "maj"), (9, "min"), (5, "maj")),
    "I-vi-ii-V": ((0, "maj"), (9, "min"), (2, "min"), (7, "7")),
    "ii-V-I": ((2, "min7"), (7, "7"), (0, "maj7"), (0, "maj7")),
    "vi-IV-I-V": ((9, "min"), (5, "maj"), (0, "maj"), (7, "maj")),
    "I-IV-V-IV": ((0, "maj"), (5, "maj"), (7, "7"), (5, "maj")),
    "12-bar blues": tuple((degree, "7") for degree in (0, 0, 0, 0, 5, 5, 0, 0, 7, 5, 0, 7)),
}
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
# Melody rhythms (beats per note) for one bar of each meter.
RHYTHMS = {
    4: (
        (1, 1, 1, 1),
        (2, 1, 1),
        (1.5, 0.5, 2),
        (0.5, 0.5, 0.5, 0.5, 2),
        (1, 0.5, 0.5, 1, 1),
        (3, 1),
        (2, 2),
        (0.5, 0.5, 1, 0.5, 0.5, 1),
        (1, 1, 2),
        (1.5, 0.5, 1, 1),
    ),
    3: ((1, 1, 1), (2, 1), (3,), (1.5, 0.5, 1), (0.5, 0.5, 1, 1), (1, 0.5, 0.5, 1)),
}

# Band instruments per style: General MIDI programs (0-based) of each part; drums on channel 10.
BAND = {
    "stride": {"melody": 71, "bass": 58, "comp": 105},  # clarinet, tuba, banjo
    "bossa": {"melody": 73, "bass": 32, "comp": 24},  # flute, acoustic bass, nylon guitar
    "waltz": {"melody": 21, "bass": 42, "comp": 48},  # accordion, cello, string ensemble
    "ballad": {"melody": 68, "comp": 46, "pad": 49},  # oboe, harp, slow strings
    "alberti": {"melody": 40, "comp": 6, "bass": 43},  # violin, harpsichord, contrabass
    "pop": {"melody": 80, "bass": 33, "comp": 4},  # square lead, finger bass, electric piano
}
MARACAS, SIDE_STICK, KICK, SNARE, CLOSED_HAT = 70, 37, 36, 38, 42


@dataclasses.dataclass(frozen=True)
class SongSpec:
    """What one song is: its id, style, key (pitch class of the tonic), tempo, progression and
    length in bars; ``index`` seeds its random draws with the corpus seed."""

    id: str
    index: int
    style: str
    key: int
    tempo: int
    progression: str
    bars: int

    @property
    def beats_per_bar(self) -> int:
        return BEATS_PER_BAR.get(self.style, 4)


@dataclasses.dataclass(frozen=True)
class Part:
    """Notes of one part: onsets and durations in beats from the start, pitches, velocities."""

    onsets: list[float] = dataclasses.field(default_factory=list)
    durations: list[float] = dataclasses.field(default_factory=list)
    pitches: list[int] = dataclasses.field(default_factory=list)
    velocities: list[int] = dataclasses.field(default_factory=list)

    def add(self, onset: float, duration: float, pitches: Sequence[int], velocity: int) -> None:
        for p in pitches:
            self.onsets.append(onset)
            self.durations.append(duration)
            self.pitches.append(int(p))
            self.velocities.append(int(velocity))


@dataclasses.dataclass(frozen=True)
class SongScores:
    """The three scores of a song."""

    leadsheet: symusic.Score
    arrangement: symusic.Score
    band: symusic.Score
    seconds: float  # length of the music (without the release tail)


# --- song plans ---------------------------------------------------------------------------------
def song_specs(
    songs: int, *, seed: int = 0, styles: Sequence[str] = STYLES, bars: int = 16
) -> list[SongSpec]:
    """The corpus plan: song ``i`` has style ``styles[i % len(styles)]``; keys follow a shuffled
    cycle of all 12 per block of 12 songs; tempo and progression are drawn per song."""
    if songs < 1:
        raise ConfigError(f"--songs must be a positive number of songs, got {songs}")
    if bars < 1:
        raise ConfigError(f"--bars must be a positive number of bars, got {bars}")
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ConfigError(f"--styles: unknown style(s) {unknown}; choose from {', '.join(STYLES)}")
    styles = list(dict.fromkeys(styles))
    key_rng = np.random.default_rng([seed, 2**31])
    keys = np.concatenate([key_rng.permutation(12) for _ in range(math.ceil(songs / 12))])
    names = sorted(PROGRESSIONS)
    specs = []
    for i in range(songs):
        rng = np.random.default_rng([seed, i])
        style = styles[i % len(styles)]
        low, high = TEMPO_RANGE[style]
        specs.append(
            SongSpec(
                id=f"{style}-{i:04d}",
                index=i,
                style=style,
                key=int(keys[i]),
                tempo=int(rng.integers(low, high + 1)),
                progression=names[int(rng.integers(len(names)))],
                bars=bars,
            )
        )
    return specs


def chords_of(spec: SongSpec) -> list[tuple[int, tuple[int, ...]]]:
    """(root pitch class, intervals) of every bar: the progression repeated over the song."""
    progression = PROGRESSIONS[spec.progression]
    out = []
    for bar in range(spec.bars):
        degree, quality = progression[bar % len(progression)]
        out.append(((spec.key + degree) % 12, QUALITIES[quality]))
    return out


def _in_range(pitch_class: int, low: int) -> int:
    """The pitch of ``pitch_class`` in [low, low + 12)."""
    return low + (pitch_class - low) % 12


def leadsheet_voicing(root: int, intervals: Sequence[int]) -> list[int]:
    """SPEC 6.2's lead-sheet chord: root position from MIDI 48 + root (bass = root)."""
    return [48 + root + i for i in intervals]


def comping_voicing(root: int, intervals: Sequence[int], low: int = 52) -> list[int]:
    """The chord's pitch classes closed within [low, low + 12) (mid register, under the melody)."""
    return sorted(_in_range((root + i) % 12, low) for i in intervals)


# --- melody ---------------------------------------------------------------------------------------
def make_melody(spec: SongSpec, rng: np.random.Generator) -> Part:
    """Chord tones on the beats, scale steps (passing tones) between them, rhythms drawn per bar;
    pitches in [MELODY_LOW, MELODY_HIGH]."""
    scale = sorted({(spec.key + s) % 12 for s in MAJOR_SCALE})
    scale_pitches = [p for p in range(MELODY_LOW, MELODY_HIGH + 1) if p % 12 in scale]
    melody = Part()
    beats = spec.beats_per_bar
    previous = _in_range(spec.key, 69)
    for bar, (root, intervals) in enumerate(chords_of(spec)):
        rhythms = RHYTHMS[beats]
        rhythm = rhythms[int(rng.integers(len(rhythms)))]
        tones = [p for p in range(MELODY_LOW, MELODY_HIGH + 1) if (p - root) % 12 in intervals]
        onset = 0.0
        for duration in rhythm:
            if onset == int(onset):  # on a beat: a chord tone near the previous note
                nearest = sorted(tones, key=lambda p: (abs(p - previous), p))[:3]
                pitch = nearest[int(rng.integers(len(nearest)))]
            else:  # off the beat: a passing tone one scale step away
                i = scale_pitches.index(min(scale_pitches, key=lambda p: abs(p - previous)))
                step = int(rng.choice((-1, 1)))
                pitch = scale_pitches[min(max(i + step, 0), len(scale_pitches) - 1)]
            melody.add(bar * beats + onset, duration * 0.95, [pitch], int(rng.integers(84, 104)))
            previous = pitch
            onset += duration
    return melody


# --- accompaniment patterns ---------------------------------------------------------------------
def _bass_root(root: int) -> int:
    return _in_range(root, 36)  # E2..


def accompaniment(spec: SongSpec) -> dict[str, Part]:
    """The style's pattern voiced on every bar's chord: parts ``bass`` and ``comp`` (the piano's
    left hand and inner chords; all at most ACCOMPANIMENT_HIGH)."""
    bass, comp = Part(), Part()
    beats = spec.beats_per_bar
    for bar, (root, intervals) in enumerate(chords_of(spec)):
        t = bar * beats
        low = _bass_root(root)
        fifth = low + 7 if low + 7 <= 47 else low - 5
        chord = comping_voicing(root, intervals)
        triad = intervals[:3]
        if spec.style == "stride":
            bass.add(t, 0.9, [low], 92)
            bass.add(t + 2, 0.9, [fifth], 86)
            comp.add(t + 1, 0.5, chord, 74)
            comp.add(t + 3, 0.5, chord, 74)
        elif spec.style == "bossa":
            for beat, pitch, duration in ((0, low, 1.4), (1.5, fifth, 0.45), (2, fifth, 1.4)):
                bass.add(t + beat, duration, [pitch], 84)
            bass.add(t + 3.5, 0.45, [low], 78)
            hits = (0, 1.5, 3) if bar % 2 == 0 else (1, 2.5)
            for beat in hits:
                comp.add(t + beat, 0.6, chord, 66)
        elif spec.style == "waltz":
            bass.add(t, 0.9, [low if bar % 2 == 0 else fifth], 88)
            comp.add(t + 1, 0.8, chord, 70)
            comp.add(t + 2, 0.8, chord, 66)
        elif spec.style == "ballad":
            r = _in_range(root, 33)  # A1..G#2: the top (r + 19) stays under the melody
            figure = (0, 7, 12, 12 + triad[1], 19, 12 + triad[1], 12, 7)
            for eighth, offset in enumerate(figure):
                comp.add(t + eighth / 2, 0.5, [r + offset], 70 if eighth % 2 else 78)
        elif spec.style == "alberti":
            lo, mid, hi = comping_voicing(root, triad, low=48)
            for eighth, pitch in enumerate((lo, hi, mid, hi) * 2):
                comp.add(t + eighth / 2, 0.45, [pitch], 74 if eighth % 2 == 0 else 62)
        elif spec.style == "pop":
            bass.add(t, 1.9, [low], 90)
            bass.add(t + 2, 1.9, [low], 86)
            for eighth in range(8):
                comp.add(t + eighth / 2, 0.4, chord, 76 if eighth % 2 == 0 else 64)
        else:
            raise ConfigError(f"unknown style {spec.style!r}; choose from {', '.join(STYLES)}")
    return {"bass": bass, "comp": comp}


def band_extras(spec: SongSpec) -> tuple[dict[str, Part], Part]:
    """Band-only parts of a style (sustained pads, a bass line where the piano has none) and its
    drum part (GM percussion keys)."""
    extras: dict[str, Part] = {}
    drums = Part()
    beats = spec.beats_per_bar
    for bar, (root, intervals) in enumerate(chords_of(spec)):
        t = bar * beats
        if spec.style == "ballad":
            extras.setdefault("pad", Part()).add(t, beats, comping_voicing(root, intervals), 52)
        elif spec.style == "alberti":
            extras.setdefault("bass", Part()).add(t, beats * 0.95, [_bass_root(root)], 70)
        elif spec.style == "bossa":
            for eighth in range(8):
                drums.add(t + eighth / 2, 0.25, [MARACAS], 60 if eighth % 2 else 72)
            for beat in (0, 1.5, 3) if bar % 2 == 0 else (1, 2):  # a clave-like rim pattern
                drums.add(t + beat, 0.25, [SIDE_STICK], 70)
        elif spec.style == "pop":
            for eighth in range(8):
                drums.add(t + eighth / 2, 0.25, [CLOSED_HAT], 70 if eighth % 2 == 0 else 52)
            drums.add(t, 0.5, [KICK], 96)
            drums.add(t + 2, 0.5, [KICK], 90)
            drums.add(t + 1, 0.5, [SNARE], 84)
            drums.add(t + 3, 0.5, [SNARE], 84)
    return extras, drums


# --- scores ---------------------------------------------------------------------------------------
def _score(spec: SongSpec) -> symusic.Score:
    score = symusic.Score(TPQ)
    score.tempos.append(symusic.Tempo(time=0, qpm=float(spec.tempo)))
    score.time_signatures.append(
        symusic.TimeSignature(time=0, numerator=spec.beats_per_bar, denominator=4)
    )
    return score


def _track(name: str, parts: Sequence[Part], *, program: int = 0, drum: bool = False):
    track = symusic.Track(name=name, program=program, is_drum=drum)
    rows = sorted(
        (round(o * TPQ), round(d * TPQ), p, v)
        for part in parts
        for o, d, p, v in zip(part.onsets, part.durations, part.pitches, part.velocities)
    )
    for tick, ticks, pitch, velocity in rows:
        track.notes.append(symusic.Note(tick, max(ticks, 1), pitch, velocity))
    return track


def build_song(spec: SongSpec, seed: int) -> SongScores:
    """The lead sheet, the piano arrangement and the band score of ``spec``."""
    rng = np.random.default_rng([seed, spec.index, 1])
    melody = make_melody(spec, rng)
    chords = Part()
    beats = spec.beats_per_bar
    for bar, (root, intervals) in enumerate(chords_of(spec)):
        chords.add(bar * beats, beats, leadsheet_voicing(root, intervals), 80)
    leadsheet = _score(spec)
    leadsheet.tracks.append(_track("Melody", [melody]))
    leadsheet.tracks.append(_track("Chords", [chords]))

    parts = accompaniment(spec)
    arrangement = _score(spec)
    arrangement.tracks.append(_track("Right hand", [melody]))
    arrangement.tracks.append(_track("Left hand", [parts["bass"], parts["comp"]]))

    extras, drums = band_extras(spec)
    band = _score(spec)
    programs = BAND[spec.style]
    band.tracks.append(_track("melody", [melody], program=programs["melody"]))
    for role in ("bass", "comp", "pad"):
        notes = [p for p in (parts.get(role), extras.get(role)) if p is not None and p.pitches]
        if notes:
            band.tracks.append(_track(role, notes, program=programs[role]))
    if drums.pitches:
        band.tracks.append(_track("drums", [drums], drum=True))
    seconds = spec.bars * beats * 60.0 / spec.tempo
    return SongScores(leadsheet, arrangement, band, seconds)


# --- audio ----------------------------------------------------------------------------------------
def render_band(midi: Path, out: Path, seconds: float, soundfont: Path) -> None:
    """FluidSynth (offline, reverb and chorus off: deterministic) -> mono 32 kHz FLAC at -1 dBFS
    peak, cut ``TAIL_SECONDS`` after the music."""
    stereo = run_fluidsynth(midi, soundfont, sample_rate=SAMPLE_RATE, skip_flag="--no-audio")
    mono = stereo.mean(axis=1)[: round((seconds + TAIL_SECONDS) * SAMPLE_RATE)]
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    if peak == 0.0:
        raise BossaError(f"fluidsynth rendered silence for {midi}; check the soundfont {soundfont}")
    mono = (mono * (10 ** (PEAK_DBFS / 20) / peak)).astype(np.float32)
    soundfile.write(str(out), mono, SAMPLE_RATE, format="FLAC", subtype="PCM_16")


# --- the corpus -----------------------------------------------------------------------------------
def held_out(specs: Sequence[SongSpec]) -> dict[str, list[str]]:
    """Validation and test songs: the last ``HELD_OUT_FRACTION`` of the songs each (at least one
    each from 3 songs on); styles cycle, so every style is held out once there are enough songs."""
    n = len(specs)
    count = max(1, round(n * HELD_OUT_FRACTION)) if n >= 3 else 0
    ids = [s.id for s in specs]
    return {"validation": ids[n - 2 * count : n - count], "test": ids[n - count :]}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_corpus_files(
    root: Path,
    specs: Sequence[SongSpec],
    *,
    seed: int,
    audio: bool = True,
    soundfont: Path = DEFAULT_SOUNDFONT,
) -> None:
    """Writes every file of the corpus into the existing folder ``root`` (see the module
    docstring)."""
    if audio and not Path(soundfont).is_file():
        raise BossaError(f"{soundfont}: soundfont not found; pass --soundfont FILE or --no-audio")
    for folder in ("arrangements", "leadsheets", "band", *(("audio",) if audio else ())):
        (root / folder).mkdir()
    splits = held_out(specs)
    split_of = {i: name for name, ids in splits.items() for i in ids}
    lines, songs = [], {}
    for spec in specs:
        scores = build_song(spec, seed)
        entry = {
            "id": spec.id,
            "dataset": DATASET,
            "arrangement": f"arrangements/{spec.id}.mid",
            "leadsheet": f"leadsheets/{spec.id}.mid",
            "style": spec.style,
            "split": split_of.get(spec.id, "train"),
        }
        scores.arrangement.dump_midi(str(root / entry["arrangement"]))
        scores.leadsheet.dump_midi(str(root / entry["leadsheet"]))
        band_midi = root / "band" / f"{spec.id}.mid"
        scores.band.dump_midi(str(band_midi))
        if audio:
            entry["audio"] = f"audio/{spec.id}.flac"
            render_band(band_midi, root / entry["audio"], scores.seconds, Path(soundfont))
        lines.append(json.dumps(entry, sort_keys=True))
        fields = dataclasses.asdict(spec)
        songs[spec.id] = {k: v for k, v in fields.items() if k != "id"}
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    _write_json(root / "split.json", {DATASET: splits})
    settings = {"seed": seed, "songs": len(specs), "audio": audio, "sample_rate": SAMPLE_RATE}
    _write_json(root / "corpus.json", {"settings": settings, "songs": songs})


def make_corpus(
    out: str | os.PathLike,
    *,
    songs: int = 120,
    seed: int = 0,
    styles: Sequence[str] = STYLES,
    bars: int = 16,
    audio: bool = True,
    soundfont: str | os.PathLike = DEFAULT_SOUNDFONT,
    overwrite: bool = False,
) -> Path:
    """Generates a corpus folder at ``out`` atomically (a previous corpus is replaced only with
    ``overwrite``); returns its manifest path."""
    specs = song_specs(songs, seed=seed, styles=styles, bars=bars)
    out = check_output(out, OUTPUT_KIND, folder=True, overwrite=overwrite)
    with atomic_output(out, kind=OUTPUT_KIND, overwrite=overwrite) as tmp:
        tmp.mkdir()
        write_corpus_files(tmp, specs, seed=seed, audio=audio, soundfont=Path(soundfont))
    return out / "manifest.jsonl"
