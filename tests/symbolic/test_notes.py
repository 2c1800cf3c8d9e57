"""Grid and quantisation tables (SPEC 5.2, 6.2, 11.1, 11.3)."""

import dataclasses

import numpy as np
import pytest

from bossa_jax.symbolic import midi as midi_io
from bossa_jax.symbolic import notes


def test_duration_flooring_examples_spec_11_1():
    # ticks -> code -> ticks: floored to the largest representable length
    for ticks, expected in [(13, 12), (35, 34), (39, 36), (0, 0), (11, 11), (12, 12), (36, 36)]:
        assert notes.DURATION_DECODE[notes.duration_code(ticks)] == expected
    assert notes.duration_code(0) == 0
    for ticks in (3060, 3061, 10_000):
        assert notes.duration_code(ticks) == 95
    assert notes.duration_code(3059) == 95
    assert len(notes.DURATION_DECODE) == 96 and len(notes.DURATION_ENCODE) == 3060
    # steps: codes 0-11 by 1 tick, 12-23 by 2, 24-35 by 4 ...
    assert list(notes.DURATION_DECODE[:14]) == list(range(12)) + [12, 14]
    assert list(notes.DURATION_DECODE[24:26]) == [36, 40]


def test_time_signature_tempo_velocity_tables():
    assert notes.time_signature_code(4, 4) == 9
    assert notes.time_signature_code(3, 4) == 8
    assert notes.time_signature_code(2, 4) == 7
    assert notes.time_signature_code(1, 1) == 0
    assert len(notes.TIME_SIGNATURES) == 254
    assert notes.TIME_SIGNATURES[-1] == (128, 64)
    assert notes.tempo_code(120.0) == 35
    assert notes.tempo_code(16.0) == 0 and notes.tempo_code(256.0) == 48
    assert notes.tempo_code(5.0) == 0 and notes.tempo_code(400.0) == 48
    assert notes.velocity_code(127) == 31 and notes.velocity_code(3) == 0
    assert notes.velocity_value(20) == 82
    assert notes.time_signature_code(8, 4) == 13
    with pytest.raises(ValueError):
        notes.time_signature_code(3, 1)  # numerators go up to 2 x denominator


@pytest.mark.parametrize(
    "ts",
    [[], [(0, 3, 4)], [(0, 5, 4)], [(0, 7, 4)], [(0, 6, 8)], [(0, 2, 2)], [(0, 12, 8)],
     [(0, 4, 4), (3840, 3, 4)], [(480, 4, 4)], [(0, 7, 8), (1680 * 2, 6, 8)]],
)  # fmt: skip
def test_beats_match_symusic_pretty_midi_port(make_score, ts):
    """Our pretty_midi get_beats/get_downbeats on ticks vs symusic's independent port."""
    score = make_score(
        [(0, False, [(0, 480, 60, 80), (9000, 600, 62, 80)], "p")],
        time_signatures=ts,
        tempos=[(0, 100.0), (2000, 140.0)],
    )
    ts_changes = midi_io.time_signature_changes(score)
    beats = midi_io.pretty_midi_beats(480, ts_changes, midi_io.end_tick(score))
    np.testing.assert_allclose(beats, np.asarray(score.get_beats()), atol=1)
    flags = midi_io.pretty_midi_downbeats(beats, ts_changes)
    np.testing.assert_allclose(beats[flags], np.asarray(score.get_downbeats()), atol=1)


def test_compound_meter_grid_6_8(make_score):
    # 6/8 at 120 qpm: beats are dotted quarters (720 ticks), 2 per bar, ts (2, 4) = code 7
    score = make_score(
        [(0, False, [(0, 720, 60, 80), (1800, 60, 64, 80), (2880, 1440, 67, 80)], "p")],
        time_signatures=[(0, 6, 8)],
    )
    table, grid = notes.arrangement_from_score(score)
    np.testing.assert_allclose(np.diff(grid.beat_times), 0.75)
    np.testing.assert_array_equal(table.events[:, notes.BAR], [0, 1, 2])
    np.testing.assert_array_equal(table.events[:, notes.POSITION], [0, 6, 0])  # 360 = 6/12 beat
    np.testing.assert_array_equal(table.events[:, notes.DURATION], [12, 1, 18])  # 24 ticks
    np.testing.assert_array_equal(table.events[:, notes.TIME_SIGNATURE], [7, 7, 7])
    np.testing.assert_allclose(table.onsets, [0.0, 1.875, 3.0])


def test_last_bar_time_signature_counts_the_beats_present(make_score):
    # official ts table: a final bar cut by the end of the file has fewer beats -> (1, 4) = code 6
    score = make_score([(0, False, [(0, 1920, 60, 80), (1920, 300, 62, 80)], "p")])
    table, _ = notes.arrangement_from_score(score)
    np.testing.assert_array_equal(table.events[:, notes.TIME_SIGNATURE], [9, 6])


def _grid(beats, downbeats, qpm=120.0):
    tempo = midi_io.TempoMap.build(480, np.array([0.0]), np.array([qpm]))
    flags = np.isin(np.arange(len(beats)), downbeats)
    return notes.BeatGrid(np.asarray(beats, float), flags, tempo)


def test_external_beats_pickup_dropped_and_nearest_tick():
    # beats every 0.5 s, first downbeat at beat 2 (a 2-beat pickup), 4 beats per bar
    grid = _grid(np.arange(12) * 0.5, [2, 6, 10])
    on = np.array([0.2, 1.0, 1.02, 1.0 + 0.5 / 24, 3.3])
    off = on + 0.5
    table = grid.quantize(on, off, np.array([60, 61, 62, 63, 64]), np.full(5, 80), np.zeros(5))
    # 0.2 s lies in the pickup -> dropped; 1.02 s is 0.48 tick after the downbeat -> tick 0;
    # 1.0 + half a tick -> tie -> the earlier tick (np.argmin)
    ev = table.events[np.argsort(table.onsets)]
    np.testing.assert_array_equal(ev[:, notes.PITCH], [61, 62, 63, 64])
    np.testing.assert_array_equal(ev[:, notes.BAR], [0, 0, 0, 1])
    np.testing.assert_array_equal(ev[:, notes.POSITION], [0, 0, 0, 7])  # 0.6 beat into bar 1
    np.testing.assert_allclose(grid.downbeat_times, [1.0, 3.0, 5.0])


def test_bar_wraps_after_8_beats_and_last_bar_keeps_its_beat_count():
    grid = _grid(np.arange(12) * 0.5, [0])  # one annotated downbeat, 12 beats
    np.testing.assert_array_equal(grid.beat_bar, [0] * 8 + [1] * 4)
    np.testing.assert_array_equal(grid.beat_ts, [8] * 8 + [4] * 4)
    np.testing.assert_allclose(grid.downbeat_times, [0.0, 4.0])


def test_pitch_filter_and_drums(make_score):
    score = make_score(
        [
            (
                0,
                False,
                [(0, 480, 5, 80), (0, 480, 6, 80), (0, 480, 121, 80), (0, 480, 122, 80)],
                "p",
            ),
            (0, True, [(0, 120, 36, 100), (0, 120, 5, 100)], "d"),
        ]
    )
    table, _ = notes.arrangement_from_score(score)
    assert sorted(map(tuple, table.events[:, 2:4].tolist())) == [(0, 6), (0, 121), (128, 164)]


def test_note_table_sort_order_and_immutability():
    ev = np.array(
        [[1, 0, 0, 60, 1, 1, 9, 35], [0, 12, 0, 50, 1, 1, 9, 35], [0, 12, 0, 70, 1, 1, 9, 35],
         [0, 12, 4, 80, 1, 1, 9, 35], [0, 0, 33, 40, 1, 1, 9, 35]]
    )  # fmt: skip
    t = notes.NoteTable(ev, np.arange(5.0)).sorted()
    np.testing.assert_array_equal(t.events[:, 3], [40, 70, 50, 80, 60])
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.events = ev
