"""MusicXML and ABC lead sheets (built here with music21 / as ABC text) give the same lead sheet and
prompt tokens as the equivalent MIDI file; bad files are one-line errors naming them (SPEC 6.2,
8.2, 11.4)."""

from __future__ import annotations

import numpy as np
import pytest

from bossa_jax.errors import MidiError
from bossa_jax.symbolic import remi
from bossa_jax.symbolic.leadsheet import read_leadsheet
from bossa_jax.symbolic.leadsheet_formats import chord_symbol_voicing, read_any_leadsheet
from tests.symbolic.conftest import build_score

music21 = pytest.importorskip("music21")
from music21 import harmony, meter, note, stream, tempo  # noqa: E402

Q = 480  # ticks per quarter of the hand-written MIDI
# (quarter offset, quarter length, pitch) of the melody; (offset, figure) of the chord symbols
MELODY = [(0, 2, 76), (2, 1, 79), (3, 1.5, 81), (4.5, 0.5, 79), (5, 3, 77), (9, 3, 72)]
CHORDS = [(0, "C"), (2, "Am7/G"), (4, "F#dim7"), (8, "G7"), (10, "N.C.")]
# SPEC 6.2 voicings written out by hand: 48 + bass pitch class + intervals above the bass
VOICED = {"C": [48, 52, 55], "Am7/G": [55, 57, 60, 64], "F#dim7": [54, 57, 60, 63],
          "G7": [55, 59, 62, 65]}  # fmt: skip
END = 12  # three 4/4 bars


def equivalent_midi(path, *, qpm=100.0, pickup=0.0, melody=MELODY, chords=CHORDS, end=END):
    """The lead sheet as a two-track MIDI file: melody, then the hand-voiced chords (velocity 80),
    each chord until the next symbol or the end."""
    mel = [(round((o + pickup) * Q), round(d * Q), p, 100) for o, d, p in melody]
    bounds = [o for o, _ in chords[1:]] + [end]
    ch = [
        (round((o + pickup) * Q), round((e - o) * Q), p, 80)
        for (o, fig), e in zip(chords, bounds, strict=True)
        if fig != "N.C."
        for p in VOICED[fig]
    ]
    score = build_score(
        [(0, False, mel, "melody"), (0, False, ch, "chords")],
        tpq=Q,
        time_signatures=[(0, 4, 4)],
        tempos=[(0, qpm)],
    )
    score.dump_midi(str(path))
    return path


def music21_leadsheet() -> stream.Score:
    part = stream.Part()
    part.insert(0, meter.TimeSignature("4/4"))
    part.insert(0, tempo.MetronomeMark(number=100))
    for offset, length, pitch in MELODY:
        if offset == 3:  # written as two tied notes: joined into one
            first = note.Note(pitch, quarterLength=1)
            second = note.Note(pitch, quarterLength=0.5)
            first.tie, second.tie = music21.tie.Tie("start"), music21.tie.Tie("stop")
            part.insert(3, first)
            part.insert(4, second)
        else:
            part.insert(offset, note.Note(pitch, quarterLength=length))
    for offset, figure in CHORDS:
        part.insert(offset, harmony.NoChord() if figure == "N.C." else harmony.ChordSymbol(figure))
    score = stream.Score()
    score.insert(0, part.makeMeasures())  # rests fill the gaps
    return score


ABC = """X:1
T:lead sheet
M:4/4
L:1/4
Q:1/4=100
K:C
"C"e2 "Am7/G"g a-|"F#dim7"a/2 g/2 f3|"G7"z c'- "N.C."c'2|
"""  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    equivalent_midi(d / "song.mid")
    score = music21_leadsheet()
    score.write("mxl", fp=str(d / "song.mxl"))  # (it removes a .musicxml of the same stem)
    score.write("musicxml", fp=str(d / "song.musicxml"))
    (d / "song.xml").write_bytes((d / "song.musicxml").read_bytes())
    abc_melody = [(0, 2, 76), (2, 1, 79), (3, 1.5, 81), (4.5, 0.5, 79), (5, 3, 77), (9, 3, 84)]
    (d / "song.abc").write_text(ABC)
    equivalent_midi(d / "abc.mid", melody=abc_melody)
    return d


def assert_same_leadsheet(song, reference):
    np.testing.assert_array_equal(song.leadsheet.events, reference.leadsheet.events)
    np.testing.assert_allclose(song.downbeat_times, reference.downbeat_times)
    prompt = remi.prompt(song.leadsheet)
    np.testing.assert_array_equal(prompt, remi.prompt(reference.leadsheet))
    assert len(song.arrangement) == 0


@pytest.mark.parametrize("name", ["song.musicxml", "song.mxl", "song.xml"])
def test_musicxml_gives_the_prompt_of_the_equivalent_midi(files, name):
    reference = read_leadsheet(files / "song.mid")
    assert len(reference.leadsheet) == len(MELODY) + 3 + 4 + 4 + 4  # N.C. ends G7, adds nothing
    assert_same_leadsheet(read_any_leadsheet(files / name), reference)


def test_abc_gives_the_prompt_of_the_equivalent_midi(files):
    assert_same_leadsheet(read_any_leadsheet(files / "song.abc"), read_leadsheet(files / "abc.mid"))


def test_midi_goes_through_the_midi_reader(files):
    song, reference = read_any_leadsheet(files / "song.mid"), read_leadsheet(files / "song.mid")
    assert_same_leadsheet(song, reference)


def test_pickup_bar_is_padded_to_a_whole_bar(tmp_path):
    abc = 'X:1\nM:4/4\nL:1/4\nQ:1/4=100\nK:C\ng|"C"e2 g2|"G7"f4|\n'
    (tmp_path / "pickup.abc").write_text(abc)
    melody = [(0, 1, 79), (1, 2, 76), (3, 2, 79), (5, 4, 77)]
    chords = [(1, "C"), (5, "G7")]
    equivalent_midi(tmp_path / "pickup.mid", pickup=3, melody=melody, chords=chords, end=9)
    reference = read_leadsheet(tmp_path / "pickup.mid")
    song = read_any_leadsheet(tmp_path / "pickup.abc")
    assert_same_leadsheet(song, reference)
    assert song.leadsheet.events[0, 0] == 0 and song.leadsheet.events[0, 1] == 36  # bar 0, beat 4


def test_chord_symbol_voicing_is_bass_rooted_at_48():
    for figure, pitches in VOICED.items():
        assert chord_symbol_voicing(harmony.ChordSymbol(figure)).tolist() == pitches
    # a bass that is not a chord tone is sounded (SPEC 6.2, PIAST rule): D, E, G, C
    assert chord_symbol_voicing(harmony.ChordSymbol("C/D")).tolist() == [50, 52, 55, 60]


def test_lead_sheet_without_chord_symbols_is_an_error(tmp_path):
    part = stream.Part([meter.TimeSignature("4/4"), note.Note("E5", quarterLength=4)])
    part.makeMeasures(inPlace=True)
    stream.Score([part]).write("musicxml", fp=str(tmp_path / "nochords.musicxml"))
    with pytest.raises(MidiError, match=r"nochords.musicxml: .*no chord symbols"):
        read_any_leadsheet(tmp_path / "nochords.musicxml")
    (tmp_path / "nochords.abc").write_text("X:1\nM:4/4\nL:1/4\nK:C\ncdef|\n")
    with pytest.raises(MidiError, match=r"nochords.abc: .*no chord symbols"):
        read_any_leadsheet(tmp_path / "nochords.abc")


def test_lead_sheet_without_melody_is_an_error(tmp_path):
    (tmp_path / "nomelody.abc").write_text('X:1\nM:4/4\nL:1/4\nK:C\n"C"z4|"G"z4|\n')
    with pytest.raises(MidiError, match=r"nomelody.abc: .*no melody"):
        read_any_leadsheet(tmp_path / "nomelody.abc")


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("missing.musicxml", None, "no such lead-sheet file"),
        ("empty.musicxml", b"", "empty"),
        ("empty.abc", b"", "empty"),
        ("corrupt.musicxml", b"<score-partwise><part id='P1'><measure", "corrupt or not a"),
        ("corrupt.mxl", b"PK\x03\x04 not really a zip", "corrupt or not a"),
        ("song.txt", b"hello", "unknown lead-sheet format"),
        ("corrupt.mid", b"MThd\x00\x00", "corrupt or truncated MIDI"),
    ],
)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, name, content, expect):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MidiError) as info:
        read_any_leadsheet(path)
    message = str(info.value)
    assert str(path) in message and expect in message and "\n" not in message, message
