"""Lead sheets from MIDI, POP909 and PIAST; chord voicings (SPEC 6.2, 11.4, 11.5)."""

import numpy as np
import pytest

from bossa_jax.errors import MidiError
from bossa_jax.symbolic import leadsheet, notes
from bossa_jax.symbolic.midi import write_midi


@pytest.mark.parametrize(
    "label,pitches",
    [
        ("C:maj", [48, 52, 55]),
        ("A:min7/b3", [48, 52, 55, 57]),  # bass C is a chord tone: C E G A from 48
        ("G:7(b9)", [55, 56, 59, 62, 65]),  # extension b9 = Ab added
        ("D:maj/2", [54, 57, 62]),  # bass E not a chord tone, not forced on, 48 + 4 + (2, 5, 10)
        ("C:maj/b7", [48, 52, 55]),  # bass Bb: 10 + 2 > 11 -> register 36: 36 + 10 + (2, 6, 9)
        ("F#:hdim7", [54, 57, 60, 64]),
        ("Eb:sus4", [51, 56, 58]),
        ("C:maj7(*5)", [48, 52, 59]),
    ],
)
def test_pop909_voicing(label, pitches):
    assert leadsheet.pop909_voicing(label).tolist() == pitches


@pytest.mark.parametrize(
    "marker,pitches",
    [
        ("C_M_C", [48, 52, 55]),
        ("A_m7_C", [48, 52, 55, 57]),
        ("G_7_B", [59, 62, 65, 67]),  # bass B forced on: 48 + 11 + (0, 3, 6, 8)
        ("B_/o7_B", [59, 62, 65, 69]),
        ("C_o_E", [52, 54, 60, 63]),  # C Eb Gb over a forced-on E: 52 + (0, 2, 8, 11)
        ("E_+_E", [52, 56, 60]),
    ],
)
def test_piast_voicing(marker, pitches):
    assert leadsheet.piast_voicing(marker).tolist() == pitches


def test_bad_chord_label():
    with pytest.raises(leadsheet.ChordLabelError):
        leadsheet.parse_chord("H:maj")
    with pytest.raises(leadsheet.ChordLabelError):
        leadsheet.parse_chord("C:weird")


def test_two_track_leadsheet_and_drums(make_score, tmp_path):
    score = make_score(
        [
            (0, True, [(0, 120, 36, 100)], "drums"),
            (0, False, [(0, 480, 72, 100)], "melody"),
            (0, False, [(0, 1920, 48, 70)], "chords a"),
            (25, False, [(0, 1920, 55, 70)], "chords b"),
        ]
    )
    song = leadsheet.leadsheet_from_score(score)
    ev = song.leadsheet.events
    assert ev[:, 2].tolist() == [0, 4, 4] and ev[:, 3].tolist() == [72, 55, 48]
    drums = make_score([(0, True, [(0, 120, 36, 100)], "drums")])
    path = write_midi(drums, tmp_path / "drums.mid")
    with pytest.raises(MidiError, match="no melody"):
        leadsheet.read_leadsheet(path)


def test_pop909_folder(make_score, tmp_path):
    folder = tmp_path / "001"
    folder.mkdir()
    q = 480  # 120 qpm: a beat every 0.5 s; beat_midi: 2 pickup beats, then 4/4
    melody = [(0, 480, 67, 90)] + [(2 * q + k * q, q, 60 + k % 5, 80) for k in range(8)]
    score = make_score(
        [(0, False, melody, "MELODY"), (0, False, [(2 * q, 4 * q, 64, 70)], "BRIDGE"),
         (0, False, [(2 * q, 8 * q, 48, 60)], "PIANO")]
    )  # fmt: skip
    write_midi(score, folder / "001.mid")
    beats = [(0.5 * i, 0, 1.0 if (i - 2) % 4 == 0 and i >= 2 else 0) for i in range(12)]
    (folder / "beat_midi.txt").write_text("".join(f"{t} {s} {c}\n" for t, s, c in beats))
    (folder / "chord_midi.txt").write_text(
        "1.0\t2.0\tC:maj\n2.0\t3.0\tN\n3.0\t4.0\tG:7\n4.0\t5.0\tA:min\n"
    )
    song = leadsheet.read_pop909(folder)
    np.testing.assert_allclose(song.downbeat_times, [1.0, 3.0, 5.0])
    arr = song.arrangement.events
    assert 67 not in arr[:, 3]  # the pickup note is dropped
    assert sorted(set(arr[:, 3])) == [48, 60, 61, 62, 63, 64]
    ls = song.leadsheet.events
    chords = ls[ls[:, 2] == 4]
    # C:maj from 1.0 s lasts until the N label at 2.0 s (2 beats = 24 ticks -> code 18);
    # N skipped; G:7 at 3.0 s lasts until 4.0 s; A:min (last label) skipped
    assert sorted(chords[chords[:, 0] == 0, 3].tolist()) == [48, 52, 55]
    assert set(chords[chords[:, 0] == 0, 4]) == {18}
    assert sorted(chords[chords[:, 0] == 1, 3].tolist()) == [55, 59, 62, 65]
    assert len(chords) == 7
    assert (ls[ls[:, 2] == 0, 3] >= 60).all() and (song.leadsheet.events[:, 6] == 9).all()


def test_piast_file(make_score, tmp_path):
    q = 480
    score = make_score(
        [(0, False, [(k * q, q, 50 + k, 80) for k in range(12)], "piano"),
         (0, False, [(k * q, 2 * q, 70 + k, 90) for k in range(0, 12, 2)], "melody")],
        time_signatures=[(0, 3, 4)],  # ignored by PIAST
        markers=[(0, "C_M_C"), (2 * q, "bpm=120"), (4 * q, "N_N_N"), (6 * q, "G_7_B")],
    )  # fmt: skip
    song = leadsheet.read_piast(write_midi(score, tmp_path / "p.mid"))
    assert song.name == "p"
    np.testing.assert_allclose(song.downbeat_times, [0.0, 2.0, 4.0])  # 4/4 from the tempo map
    assert (song.arrangement.events[:, 2] == 0).all() and len(song.arrangement) == 12
    assert (song.leadsheet.events[:, 6] == 9).all() and (song.arrangement.events[:, 6] == 9).all()
    chords = song.leadsheet.events[song.leadsheet.events[:, 2] == 4]
    # C_M_C lasts until the bpm marker (2 beats); G_7_B until the end (6 beats = 72 ticks)
    assert sorted(chords[:, 3].tolist()) == [48, 52, 55, 59, 62, 65, 67]
    assert set(chords[chords[:, 3] < 56, 4]) == {18}
    assert set(chords[chords[:, 3] > 56, 4]) == {notes.duration_code(72)}
