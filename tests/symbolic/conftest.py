"""MIDI builders shared by the symbolic tests (scores are built in memory with symusic)."""

from __future__ import annotations

import pytest
import symusic


def build_score(
    tracks,
    *,
    tpq: int = 480,
    time_signatures=(),
    tempos=((0, 120.0),),
    markers=(),
) -> symusic.Score:
    """tracks: [(program, is_drum, [(start, duration, pitch, velocity), ...], name)]."""
    score = symusic.Score(tpq)
    for program, is_drum, notes, name in tracks:
        track = symusic.Track(name=name, program=program, is_drum=is_drum)
        for start, dur, pitch, vel in notes:
            track.notes.append(symusic.Note(time=start, duration=dur, pitch=pitch, velocity=vel))
        score.tracks.append(track)
    for tick, num, den in time_signatures:
        score.time_signatures.append(
            symusic.TimeSignature(time=tick, numerator=num, denominator=den)
        )
    for tick, qpm in tempos:
        score.tempos.append(symusic.Tempo(time=tick, qpm=qpm))
    for tick, text in markers:
        score.markers.append(symusic.TextMeta(time=tick, text=text))
    return score


@pytest.fixture
def make_score():
    return build_score


def _bar_notes(bar_ticks, n_bars, step, pitch0, *, offset=0, skip_bars=()):
    out = []
    for b in range(n_bars):
        if b in skip_bars:
            continue
        for k, t in enumerate(range(offset, bar_ticks, step)):
            out.append((b * bar_ticks + t, step, pitch0 + (b + k) % 12, 40 + 8 * ((b + k) % 10)))
    return out


def varied_scores() -> dict[str, symusic.Score]:
    """MIDI files on the 12-per-beat grid covering the meters and layouts of SPEC 11.3."""
    q = 480
    cases = {
        "4/4 no time signature": build_score(
            [(0, False, _bar_notes(4 * q, 4, 240, 60), "piano")], tempos=[(0, 100.0)]
        ),
        "3/4": build_score(
            [(0, False, _bar_notes(3 * q, 4, 160, 62), "piano")], time_signatures=[(0, 3, 4)]
        ),
        "5/4": build_score(
            [(0, False, _bar_notes(5 * q, 3, 360, 55), "piano")], time_signatures=[(0, 5, 4)]
        ),
        "7/4 with tempo changes on bar lines": build_score(
            [(0, False, _bar_notes(7 * q, 3, 480, 50), "piano")],
            time_signatures=[(0, 7, 4)],
            tempos=[(0, 90.0), (7 * q, 150.0), (14 * q, 60.0)],
        ),
        "6/8": build_score(
            [(0, False, _bar_notes(6 * 240, 4, 240, 64), "piano")], time_signatures=[(0, 6, 8)]
        ),
        "several instruments and drums": build_score(
            [
                (0, False, _bar_notes(4 * q, 3, 120, 60), "piano"),
                (33, False, _bar_notes(4 * q, 3, 960, 36), "bass"),
                (40, False, _bar_notes(4 * q, 3, 480, 72, offset=40), "violin"),
                (0, True, _bar_notes(4 * q, 3, 240, 36), "drums"),
            ],
            time_signatures=[(0, 4, 4)],
        ),
        "pickup bar (time signature from beat 1) and meter change": build_score(
            [
                (
                    0,
                    False,
                    [(0, 480, 67, 90)]
                    + [(480 + t, 240, 60 + t // 240 % 7, 70) for t in range(0, 8 * q, 240)],
                    "piano",
                )
            ],
            time_signatures=[(480, 4, 4), (480 + 4 * q, 3, 4)],
        ),  # fmt: skip
        "chords sharing onsets, long and zero-length notes": build_score(
            [
                (
                    0,
                    False,
                    [
                        (0, 0, 60, 80),
                        (0, 4 * q, 64, 81),
                        (0, 4 * q, 67, 82),
                        (4 * q, 2 * q + 40, 48, 100),
                        (5 * q, 20, 72, 127),
                        (6 * q, 2 * q, 71, 1),
                    ],
                    "piano",
                ),
            ],
            tempos=[(0, 132.0)],
        ),  # fmt: skip
    }
    return cases


@pytest.fixture(params=sorted(varied_scores()))
def varied_score(request):
    return request.param, varied_scores()[request.param]
