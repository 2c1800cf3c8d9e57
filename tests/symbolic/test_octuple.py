"""Octuple codec and the stage-1 sequence (SPEC 5.2, 6.5, 11.11)."""

import numpy as np
import pytest

from bossa_jax.errors import DataError
from bossa_jax.symbolic import notes, octuple
from bossa_jax.symbolic.leadsheet import leadsheet_from_score


def test_dictionary_ranges_spec_5_2():
    toks = octuple.TOKENS
    assert len(toks) == 1237 and octuple.DEC == 1237 and toks[1236] == "<mask>"
    assert toks[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    ranges = {0: (4, 259), 1: (260, 387), 2: (388, 516), 3: (517, 772), 4: (773, 900),
              5: (901, 932), 6: (933, 1186), 7: (1187, 1235)}  # fmt: skip
    for field, (lo, hi) in ranges.items():
        assert toks[lo] == f"<{field}-0>" and toks[hi].startswith(f"<{field}-")
        assert all(t.startswith(f"<{field}-") for t in toks[lo : hi + 1])


def known_piece(make_score):
    # 4/4, 120 qpm, tpq 480 (40 MIDI ticks per grid tick); bar 1 empty
    return make_score(
        [
            (0, False, [(0, 960, 60, 80), (0, 960, 64, 80), (720, 240, 67, 64),
                        (3840, 520, 62, 81)], "piano"),
            (33, False, [(0, 1920, 36, 90)], "bass"),
        ],
        time_signatures=[(0, 4, 4)],
    )  # fmt: skip


def test_hand_computed_octuple_ids(make_score):
    table, _ = notes.arrangement_from_score(known_piece(make_score))
    # rows (bar, pos, inst, pitch, dur code, vel code, ts, tempo), written out by hand:
    # 960 ticks = 24 grid ticks -> code 18; 1920 = 48 -> 27; 240 = 6 -> 6; 520 = 13 -> 12
    expected = [
        4, 260, 388, 581, 791, 921, 942, 1222,  # bar0 pos0 piano E4 d18 v20 4/4 120bpm
        4, 260, 388, 577, 791, 921, 942, 1222,  # C4
        4, 260, 421, 553, 800, 923, 942, 1222,  # bass C2 d27 v22
        4, 278, 388, 584, 779, 917, 942, 1222,  # pos 18 G4 d6 v16
        6, 260, 388, 579, 785, 921, 940, 1222,  # bar 2 D4 d12 v20, ts (2, 4): see below
    ]  # fmt: skip
    # the file ends 2 beats into bar 2, so that bar has 2 beats: ts (2, 4) = 7 (official ts table)
    ids = octuple.encode(table)
    np.testing.assert_array_equal(ids, [0] * 8 + expected + [2] * 8)
    events, skipped = octuple.decode(ids)
    assert skipped == 0
    np.testing.assert_array_equal(events, table.events)


def test_bar_offset_and_bar_limit():
    ev = np.array([[3, 0, 0, 60, 1, 1, 9, 35], [300, 0, 0, 60, 1, 1, 9, 35]])
    ids = octuple.encode(ev, bar_offset=-3)
    assert len(ids) == 24 and ids[8] == 4  # bar 0; the note at bar 297 is dropped
    with pytest.raises(ValueError):
        octuple.encode(np.array([[0, 200, 0, 60, 1, 1, 9, 35]]))


def _leadsheet(make_score):
    return leadsheet_from_score(
        make_score(
            [
                (0, False, [(0, 480, 72, 100), (960, 960, 74, 90)], "melody"),
                (0, False, [(0, 1920, 48, 70), (0, 1920, 52, 70), (0, 1920, 55, 70)], "chords"),
            ],
            time_signatures=[(0, 4, 4)],
        )  # fmt: skip
    ).leadsheet


def test_stage1_sequence_layout(make_score):
    arrangement, _ = notes.arrangement_from_score(known_piece(make_score))
    ls = _leadsheet(make_score)
    ids, ls_mask, pad_mask = octuple.stage1_sequence(arrangement, ls)
    assert ids.shape == (226 * 8,) and ls_mask.shape == (226,) and pad_mask.shape == (226,)
    rows = ids.reshape(226, 8)
    # lead sheet (5 notes, no SOS/EOS), velocity/tempo <unk>: melody C5 first, then chord tones
    np.testing.assert_array_equal(rows[0], [4, 260, 388, 589, 785, 3, 942, 3])
    np.testing.assert_array_equal(rows[1], [4, 260, 392, 572, 800, 3, 942, 3])  # inst 4, G3
    np.testing.assert_array_equal(rows[4], [4, 284, 388, 591, 791, 3, 942, 3])  # pos 24 D5
    np.testing.assert_array_equal(rows[5], [0] * 8)  # SOS
    np.testing.assert_array_equal(rows[6], [4, 260, 388, 581, 791, 921, 942, 1222])
    np.testing.assert_array_equal(rows[11], [2] * 8)  # EOS
    assert (rows[12:] == 1).all()
    np.testing.assert_array_equal(ls_mask[:6], [0, 0, 0, 0, 0, 1])
    assert ls_mask[6:].all()
    np.testing.assert_array_equal(pad_mask[:13], [1] * 12 + [0])
    assert not pad_mask[12:].any()
    # bars are relative to the earlier first bar; deperf=False keeps velocity and tempo
    shifted = notes.NoteTable(arrangement.events + [2, 0, 0, 0, 0, 0, 0, 0], arrangement.onsets)
    ids2, _, _ = octuple.stage1_sequence(shifted, ls, deperf=False)
    assert ids2.reshape(226, 8)[6, 0] == 6 and ids2.reshape(226, 8)[0, 5] == 901 + 25


def test_stage1_overflow_keeps_eos_or_errors():
    arr = np.tile([[0, 0, 0, 60, 1, 1, 9, 35]], (300, 1))
    ls = np.tile([[0, 0, 0, 72, 1, 1, 9, 35]], (10, 1))
    ids, ls_mask, pad_mask = octuple.stage1_sequence(arr, ls)
    rows = ids.reshape(226, 8)
    assert (rows[10] == 0).all() and (rows[-1] == 2).all() and pad_mask.all()
    assert (ls_mask == 0).sum() == 10
    official, _, _ = octuple.stage1_sequence(arr, ls, keep_eos=False)
    assert not (official.reshape(226, 8)[-1] == 2).all()  # the official cut loses EOS
    with pytest.raises(DataError, match="224"):
        octuple.stage1_sequence(arr, np.tile(ls[:1], (225, 1)))
    ids_full, _, _ = octuple.stage1_sequence(arr, np.tile(ls[:1], (224, 1)))
    assert (ids_full.reshape(226, 8)[-2:] == [[0] * 8, [2] * 8]).all()


def test_decode_malformed_counts_and_does_not_crash():
    good = octuple.encode(np.array([[0, 0, 0, 60, 1, 1, 9, 35]]))
    bad = np.concatenate([good[:8], [4, 260, 388, 9999, 773, 901, 933, 1187], good[8:], [7, 7]])
    events, skipped = octuple.decode(bad)
    assert len(events) == 1 and skipped == 2  # one broken octuple, one incomplete tail
    events, skipped = octuple.decode(np.array([4, 4, 4, 4, 4, 4, 4, 4]))  # all bar tokens
    assert len(events) == 0 and skipped == 1


def test_midi_octuple_midi_round_trip(varied_score):
    name, score = varied_score
    table, _ = notes.arrangement_from_score(score)
    assert len(table) > 0, name
    events, skipped = octuple.decode(octuple.encode(table))
    assert skipped == 0
    again, _ = notes.arrangement_from_score(notes.events_to_score(events))
    np.testing.assert_array_equal(again.events, table.events, err_msg=name)
