"""Writes the real-material test set of bench/mini_eval.py: lead sheets of public-domain tunes and
band scores of other public-domain pieces (see README.md here). Deterministic; run from the
repository root:

    python bench/assets/real/make_real.py          # rewrites leadsheets/*.mid and recordings/*.mid

The recordings are rendered to audio at bench time (``render_recordings``) with a soundfont the
style corpus does not use, so no audio is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import symusic

HERE = Path(__file__).resolve().parent
TPQ = 480
# the corpus renders with TimGM6mb; these with MuseScore General (Debian package
# musescore-general-soundfont-small) or FluidR3 (fluid-soundfont-gm)
SOUNDFONTS = (
    Path("/usr/share/sounds/sf3/MuseScore_General_Lite.sf3"),
    Path("/usr/share/sounds/sf3/MuseScore_General.sf3"),
    Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"),
)
NAMES = {n: i for i, n in enumerate("C C# D D# E F F# G G# A A# B".split())}
NAMES.update({"Db": 1, "Eb": 3, "Gb": 6, "Ab": 8, "Bb": 10})
QUALITY = {"": (0, 4, 7), "m": (0, 3, 7), "7": (0, 4, 7, 10), "maj7": (0, 4, 7, 11),
           "m7": (0, 3, 7, 10)}  # fmt: skip


def pitch(name: str) -> int:
    """'C5' -> 72, 'F#4' -> 66, 'Bb3' -> 58."""
    return 12 * (int(name[-1]) + 1) + NAMES[name[:-1]]


def chord_pcs(symbol: str) -> tuple[int, tuple[int, ...]]:
    root = symbol[:2] if len(symbol) > 1 and symbol[1] in "#b" else symbol[:1]
    return NAMES[root], QUALITY[symbol[len(root) :]]


def melody_notes(text: str) -> list[tuple[float, float, int | None]]:
    """'C5:1 D5:0.5 r:1 ...' -> (onset beats, duration beats, pitch or None for a rest)."""
    out, t = [], 0.0
    for item in text.split():
        name, beats = item.split(":")
        out.append((t, float(beats), None if name == "r" else pitch(name)))
        t += float(beats)
    return out


def score(tempo: float, beats_per_bar: int) -> symusic.Score:
    s = symusic.Score(TPQ)
    s.tempos.append(symusic.Tempo(time=0, qpm=float(tempo)))
    s.time_signatures.append(symusic.TimeSignature(time=0, numerator=beats_per_bar, denominator=4))
    return s


def track(name: str, notes, program: int = 0, drum: bool = False) -> symusic.Track:
    tr = symusic.Track(name=name, program=program, is_drum=drum)
    for onset, duration, p, velocity in sorted(notes):
        tr.notes.append(
            symusic.Note(round(onset * TPQ), max(1, round(duration * TPQ)), p, velocity)
        )
    return tr


def melody_track(name: str, melody: str, program: int, velocity: int) -> symusic.Track:
    notes = [(o, d * 0.9, p, velocity) for o, d, p in melody_notes(melody) if p]
    return track(name, notes, program)


# --- lead sheets: (title, tempo, beats per bar, melody, one chord symbol per half bar or bar) ----
# Melodies written out from the traditional tunes (all public domain), first 8 bars, no pickup.
LEADSHEETS = {
    "ode_to_joy": (  # Beethoven, Symphony No. 9 (1824), in F
        "Ode to Joy",
        104,
        4,
        "A4:1 A4:1 Bb4:1 C5:1 C5:1 Bb4:1 A4:1 G4:1 F4:1 F4:1 G4:1 A4:1 A4:1.5 G4:0.5 G4:2 "
        "A4:1 A4:1 Bb4:1 C5:1 C5:1 Bb4:1 A4:1 G4:1 F4:1 F4:1 G4:1 A4:1 G4:1.5 F4:0.5 F4:2",
        "F | C | F | C | F | C | F | C F",
    ),
    "twinkle": (  # French folk tune "Ah! vous dirai-je, maman" (1761), in C
        "Twinkle, Twinkle, Little Star",
        96,
        4,
        "C5:1 C5:1 G5:1 G5:1 A5:1 A5:1 G5:2 F5:1 F5:1 E5:1 E5:1 D5:1 D5:1 C5:2 "
        "G5:1 G5:1 F5:1 F5:1 E5:1 E5:1 D5:2 G5:1 G5:1 F5:1 F5:1 E5:1 E5:1 D5:2",
        "C | F C | F C | G C | C F | C G | C F | C G",
    ),
    "oh_susanna": (  # Stephen Foster (1848), in C, the pickup left out
        "Oh! Susanna",
        112,
        4,
        "E5:1 G5:1 G5:1.5 A5:0.5 G5:1 E5:1 C5:1.5 D5:0.5 E5:1 E5:1 D5:1 C5:1 D5:3 C5:0.5 D5:0.5 "
        "E5:1 G5:1 G5:1.5 A5:0.5 G5:1 E5:1 C5:1.5 D5:0.5 E5:1 E5:1 D5:1 D5:1 C5:4",
        "C | C | C | G7 | C | C | G7 | C",
    ),
    "frere_jacques": (  # French traditional round, in F
        "Frere Jacques",
        100,
        4,
        "F4:1 G4:1 A4:1 F4:1 F4:1 G4:1 A4:1 F4:1 A4:1 Bb4:1 C5:2 A4:1 Bb4:1 C5:2 "
        "C5:0.5 D5:0.5 C5:0.5 Bb4:0.5 A4:1 F4:1 C5:0.5 D5:0.5 C5:0.5 Bb4:0.5 A4:1 F4:1 "
        "F4:1 C4:1 F4:2 F4:1 C4:1 F4:2",
        "F | F | F | F | F | F | F C7 | F",
    ),
    "amazing_grace": (  # "New Britain" (1829), in C, 3/4, the pickup left out
        "Amazing Grace",
        84,
        3,
        "C5:2 E5:0.5 C5:0.5 E5:2 D5:1 C5:2 A4:1 G4:2 G4:1 "
        "C5:2 E5:0.5 C5:0.5 E5:2 D5:1 G5:3 G5:2 E5:1",
        "C | C | F | C | C | C | G | G",
    ),
    "greensleeves": (  # English traditional (16th century), in A minor, 3/4, the pickup left out
        "Greensleeves",
        96,
        3,
        "C5:2 D5:1 E5:1.5 F5:0.5 E5:1 D5:2 B4:1 G4:1.5 A4:0.5 B4:1 "
        "C5:2 A4:1 A4:1.5 G#4:0.5 A4:1 B4:2 G#4:1 E4:2 A4:1",
        "Am | C | G | Em | Am | E | E | Am",
    ),
}


def leadsheet_score(tempo: float, beats: int, melody: str, chords: str) -> symusic.Score:
    """Two tracks as the project's lead-sheet reader wants them: melody, then chords voiced in
    root position from MIDI 48 + root (SPEC 6.2)."""
    s = score(tempo, beats)
    s.tracks.append(
        track("Melody", [(o, d * 0.95, p, 92) for o, d, p in melody_notes(melody) if p])
    )
    chord_notes = []
    for bar, cell in enumerate(chords.split("|")):
        symbols = cell.split()
        span = beats / len(symbols)
        for k, symbol in enumerate(symbols):
            root, intervals = chord_pcs(symbol)
            for i in intervals:
                chord_notes.append((bar * beats + k * span, span, 48 + root + i, 80))
    s.tracks.append(track("Chords", chord_notes))
    return s


# --- recordings: band scores of other public-domain pieces, instruments the corpus never uses --
def bars_of(chords: str) -> list[list[tuple[int, tuple[int, ...]]]]:
    return [[chord_pcs(s) for s in cell.split()] for cell in chords.split("|")]


def saints_march() -> symusic.Score:
    """'When the Saints Go Marching In' (traditional), a brass-band march: trumpet melody,
    electric bass (pick) on 1 and 3, brass section chords on 2 and 4, bass drum and snare."""
    beats, s = 4, score(112, 4)
    melody = (
        "r:1 F4:1 A4:1 Bb4:1 C5:4 r:1 F4:1 A4:1 Bb4:1 C5:4 "
        "r:1 F4:1 A4:1 Bb4:1 C5:2 A4:2 F4:2 A4:2 G4:4"
    )
    s.tracks.append(melody_track("trumpet", melody, 56, 100))
    bass, comp, drums = [], [], []
    for bar, [(root, iv)] in enumerate(bars_of("F | F | F | F | F | F | F | C7")):
        t = bar * beats
        bass += [(t, 0.9, 36 + root, 96), (t + 2, 0.9, 36 + (root + 7) % 12, 90)]
        for beat in (1, 3):
            comp += [(t + beat, 0.5, 53 + (root + i - 5) % 12, 80) for i in iv]
            drums += [(t + beat, 0.25, 38, 90)]
        drums += [(t, 0.25, 36, 100), (t + 2, 0.25, 36, 95)]
    s.tracks.append(track("bass", bass, 34))
    s.tracks.append(track("brass", comp, 61))
    s.tracks.append(track("drums", drums, drum=True))
    return s


def prelude_arpeggios() -> symusic.Score:
    """J. S. Bach, Prelude in C major BWV 846 (1722), bars 1-8: the five-note figure in
    sixteenths on vibraphone over a fretless bass."""
    beats, s = 4, score(66, 4)
    figures = (
        "C4 E4 G4 C5 E5", "C4 D4 A4 D5 F5", "B3 D4 G4 D5 F5", "C4 E4 G4 C5 E5",
        "C4 E4 A4 E5 A5", "C4 D4 F#4 A4 D5", "B3 D4 G4 D5 G5", "B3 C4 E4 G4 C5",
    )  # fmt: skip
    vib, bass = [], []
    for bar, figure in enumerate(figures):
        n = [pitch(x) for x in figure.split()]
        for half in range(2):
            for k, idx in enumerate((0, 1, 2, 3, 4, 2, 3, 4)):
                vib.append((bar * beats + half * 2 + k * 0.25, 0.25, n[idx], 84 if k == 0 else 70))
        bass.append((bar * beats, beats * 0.95, n[0] - 12, 88))
    s.tracks.append(track("vibraphone", vib, 11))
    s.tracks.append(track("bass", bass, 35))
    return s


def yankee_rock() -> symusic.Score:
    """'Yankee Doodle' (traditional) as rock: alto sax melody, distortion-guitar power chords and
    picked bass in eighths, kick / snare / hi-hat."""
    beats, s = 4, score(120, 4)
    melody = (
        "G4:1 G4:1 A4:1 B4:1 G4:1 B4:1 A4:1 D4:1 G4:1 G4:1 A4:1 B4:1 G4:2 F#4:2 "
        "G4:1 G4:1 A4:1 B4:1 C5:1 B4:1 A4:1 G4:1 F#4:1 D4:1 E4:1 F#4:1 G4:2 G4:2"
    )
    s.tracks.append(melody_track("sax", melody, 65, 100))
    guitar, bass, drums = [], [], []
    for bar, cell in enumerate(bars_of("G | G D | G | G D | G | C | D | G")):
        for k in range(8):
            root, _ = cell[min(k * len(cell) // 8, len(cell) - 1)]
            t = bar * beats + k * 0.5
            guitar += [(t, 0.45, 40 + root, 90), (t, 0.45, 47 + root, 90)]
            bass += [(t, 0.45, 28 + root, 96)]
            drums += [(t, 0.2, 42, 80 if k % 2 == 0 else 60)]
        t = bar * beats
        drums += [(t, 0.25, 36, 110), (t + 2, 0.25, 36, 105), (t + 1, 0.25, 38, 100),
                  (t + 3, 0.25, 38, 100)]  # fmt: skip
    s.tracks.append(track("guitar", guitar, 30))
    s.tracks.append(track("bass", bass, 34))
    s.tracks.append(track("drums", drums, drum=True))
    return s


def paloma_habanera() -> symusic.Score:
    """'La Paloma' (Sebastian Yradier, c. 1863) in the habanera rhythm: tenor sax melody,
    marimba chords off the beat, fretless bass dotted-eighth-sixteenth figure, congas."""
    beats, s = 4, score(100, 4)
    melody = (
        "B4:1.5 C5:0.5 D5:2 C5:1.5 B4:0.5 A4:2 A4:1.5 B4:0.5 C5:2 B4:3 r:1 "
        "D5:1.5 E5:0.5 D5:2 C5:1.5 B4:0.5 A4:2 C5:1.5 B4:0.5 A4:1 F#4:1 G4:3 r:1"
    )
    s.tracks.append(melody_track("sax", melody, 66, 96))
    marimba, bass, drums = [], [], []
    for bar, [(root, iv)] in enumerate(bars_of("G | D7 | D7 | G | G | C | D7 | G")):
        for half in range(2):
            t = bar * beats + half * 2
            fifth = 36 + (root + 7) % 12
            bass += [(t, 0.7, 36 + root, 96), (t + 0.75, 0.25, fifth, 84),
                     (t + 1, 0.45, fifth, 88), (t + 1.5, 0.45, 36 + root, 84)]  # fmt: skip
            for beat in (0.5, 1.5):
                marimba += [(t + beat, 0.3, 60 + (root + i) % 12, 76) for i in iv]
            drums += [(t, 0.25, 64, 80), (t + 0.75, 0.25, 63, 70), (t + 1, 0.25, 62, 80),
                      (t + 1.5, 0.25, 63, 70)]  # fmt: skip
    s.tracks.append(track("marimba", marimba, 12))
    s.tracks.append(track("bass", bass, 35))
    s.tracks.append(track("congas", drums, drum=True))
    return s


def danube_waltz() -> symusic.Score:
    """Johann Strauss II, 'The Blue Danube' (1866), the waltz theme twice (16 bars: a clip is
    10.16 s): French horn melody, bassoon on beat 1, pizzicato strings on 2 and 3."""
    beats, s = 3, score(150, 3)
    melody = "D5:1 F#5:1 A5:1 A5:3 D5:1 F#5:1 A5:1 A5:3 C#5:1 E5:1 B5:1 B5:3 C#5:1 E5:1 B5:1 B5:3"
    s.tracks.append(melody_track("horn", f"{melody} {melody}", 60, 96))
    bass, pizz = [], []
    for bar, [(root, iv)] in enumerate(
        bars_of(" | ".join(["D | D | D | D | A7 | A7 | A7 | A7"] * 2))
    ):
        t = bar * beats
        bass.append((t, 0.9, 38 + (root - 2) % 12, 92))
        for beat in (1, 2):
            pizz += [(t + beat, 0.5, 60 + (root + i) % 12, 78) for i in iv]
    s.tracks.append(track("bassoon", bass, 70))
    s.tracks.append(track("pizzicato", pizz, 45))
    return s


RECORDINGS = {
    "saints_march": saints_march,
    "prelude_arpeggios": prelude_arpeggios,
    "yankee_rock": yankee_rock,
    "paloma_habanera": paloma_habanera,
    "danube_waltz": danube_waltz,
}
# what a listener would call each recording's accompaniment, in the corpus's style names
RECORDING_STYLE = {
    "saints_march": "stride",
    "prelude_arpeggios": "ballad",
    "yankee_rock": "pop",
    "paloma_habanera": "bossa",
    "danube_waltz": "waltz",
}


def seconds_of(s: symusic.Score) -> float:
    """Length of a score in seconds at its single tempo."""
    end = max(n.time + n.duration for t in s.tracks for n in t.notes)
    return end / TPQ * 60.0 / s.tempos[0].qpm


def write_all(root: Path = HERE) -> list[Path]:
    """Writes leadsheets/<name>.mid and recordings/<name>.mid under ``root``."""
    written = []
    for folder in ("leadsheets", "recordings"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, (_, tempo, beats, melody, chords) in LEADSHEETS.items():
        path = root / "leadsheets" / f"{name}.mid"
        leadsheet_score(tempo, beats, melody, chords).dump_midi(str(path))
        written.append(path)
    for name, build in RECORDINGS.items():
        path = root / "recordings" / f"{name}.mid"
        build().dump_midi(str(path))
        written.append(path)
    return written


def soundfont() -> Path | None:
    """The first installed soundfont the corpus does not use (None: none is installed)."""
    return next((p for p in SOUNDFONTS if p.is_file()), None)


def render_recordings(out: Path, sf: Path) -> dict[str, Path]:
    """Renders every recording with FluidSynth and ``sf`` to ``out/<name>.flac`` (mono 32 kHz,
    the corpus's own renderer); existing files are kept."""
    from bossa_jax.data.style_corpus import render_band

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in RECORDINGS.items():
        midi, flac = HERE / "recordings" / f"{name}.mid", out / f"{name}.flac"
        if not flac.is_file():
            render_band(midi, flac, seconds_of(build()), sf)
        paths[name] = flac
    return paths


if __name__ == "__main__":
    for p in write_all():
        print(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p)
    sys.exit(0)
