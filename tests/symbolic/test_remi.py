"""MuseCoco REMI codec, stage-2 sequence, decoding and pedal (SPEC 4.3, 5.1, 8.2, 11.2, 11.11)."""

import json

import numpy as np
import pytest

from bossa_jax.errors import DataError
from bossa_jax.symbolic import midi as midi_io
from bossa_jax.symbolic import notes, remi
from bossa_jax.symbolic.leadsheet import leadsheet_from_score
from tests.shared_reference import shared_file


def test_packaged_vocab_equals_reference():
    vocab = shared_file("reference/musecoco-1b/vocab.json")
    assert remi.VOCAB == json.loads(vocab.read_text())


def test_family_id_ranges_spec_5_1():
    table = {  # family: (first id, count) from the SPEC 5.1 table
        "o": (6, 128), "i": (134, 129), "p": (263, 256), "d": (519, 128),
        "v": (647, 32), "s": (679, 254), "t": (933, 49),
    }  # fmt: skip
    for fam, (first, count) in table.items():
        for k in range(count):
            assert remi.VOCAB[f"{fam}-{k}"] == first + k
        assert f"{fam}-{count}" not in remi.VOCAB
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "b-0": 4, "b-1": 5,
                "e-0": 982, "e-1": 983, "<sep>": 984}  # fmt: skip
    for tok, i in specials.items():
        assert remi.VOCAB[tok] == i
    assert len(remi.VOCAB) == 1253
    attrs = [t for t, i in remi.VOCAB.items() if i >= 985]
    assert len(attrs) == 268 and all("_" in t for t in attrs)


def test_attribute_prefix_is_the_spec_sequence():
    spec = "R1_2 R3_3 S2s1_17 B1s1_4 TS1s1_7 K1_2 T1s1_3 P4_12 EM1_4 TM1_5 I1s2_0_0".split()
    spec += [f"I1s2_{i}_2" for i in range(1, 28)] + [f"S4_{i}_2" for i in range(22)]
    assert list(remi.ATTRIBUTE_TOKENS) == spec and len(spec) == 60
    # every value except piano is the last class of its attribute in the vocabulary
    for tok in spec[:10]:
        family, value = tok.rsplit("_", 1)
        classes = [int(t.rsplit("_", 1)[1]) for t in remi.VOCAB if t.rsplit("_", 1)[0] == family]
        assert int(value) == max(classes)
    prefix = remi.PROMPT_PREFIX_IDS
    assert len(prefix) == 62 and prefix[0] == 2 and prefix[61] == 984


def known_piece(make_score):
    return make_score(
        [
            (0, False, [(0, 960, 60, 80), (0, 960, 64, 80), (720, 240, 67, 64),
                        (3840, 520, 62, 81), (3840 + 1440, 480, 60, 81)], "piano"),
            (33, False, [(0, 1920, 36, 90)], "bass"),
        ],
        time_signatures=[(0, 4, 4)],
        tempos=[(0, 120.0), (3840, 100.0)],
    )  # fmt: skip


def test_hand_computed_remi_tokens(make_score):
    table, _ = notes.arrangement_from_score(known_piece(make_score))
    expected = (
        "s-9 t-35 o-0 i-0 p-64 d-18 v-20 p-60 d-18 v-20 i-33 p-36 d-27 v-22 "
        "o-18 i-0 p-67 d-6 v-16 b-1 "  # bar 0
        # bar 1 is empty: nothing. bar 2 at 100 qpm = round(12 log2(6.25)) = 32
        "s-9 t-32 o-0 i-0 p-62 d-12 v-20 o-36 i-0 p-60 d-12 v-20 b-1"
    ).split()
    assert remi.encode_tokens(table) == expected
    ids = [6 if t == "o-0" else None for t in expected]  # spot-check raw ids by hand
    assert remi.encode(table)[:4].tolist() == [688, 968, 6, 134] and ids[2] == 6


def test_leadsheet_redaction(make_score):
    ls = leadsheet_from_score(
        make_score(
            [
                (0, False, [(0, 480, 72, 100), (960, 960, 74, 90)], "melody"),
                (0, False, [(0, 1920, 48, 70), (0, 1920, 52, 70), (0, 1920, 55, 70)], "chords"),
            ],
            time_signatures=[(0, 4, 4)],
        )  # fmt: skip
    ).leadsheet
    expected = (
        "s-9 <unk> o-0 i-0 p-72 d-12 <unk> i-4 p-55 d-27 <unk> p-52 d-27 <unk> p-48 d-27 <unk> "
        "o-24 i-0 p-74 d-18 <unk> b-1"
    ).split()
    assert remi.encode_tokens(ls, redact=True) == expected
    assert remi.encode_tokens(ls)[1] == "t-35" and remi.encode_tokens(ls)[6] == "v-25"


def test_stage2_sequence_layout(make_score):
    arr, _ = notes.arrangement_from_score(known_piece(make_score))
    ls = arr.select(arr.events[:, 2] == 0)
    ids, control, pad = remi.stage2_sequence(arr, ls)
    ls_ids, arr_ids = remi.encode(ls, redact=True), remi.encode(arr)
    n_ls, n_arr = len(ls_ids), len(arr_ids)
    assert ids.shape == control.shape == pad.shape == (1000,)
    assert ids[0] == 2 and ids[61] == 984 and ids[62 + n_ls] == 984
    np.testing.assert_array_equal(ids[1:61], remi.ATTRIBUTE_IDS)
    np.testing.assert_array_equal(ids[62 : 62 + n_ls], ls_ids)
    np.testing.assert_array_equal(ids[63 + n_ls : 63 + n_ls + n_arr], arr_ids)
    end = 63 + n_ls + n_arr
    assert ids[end] == 2 and (ids[end + 1 :] == 1).all()
    assert control[: 63 + n_ls].all() and not control[63 + n_ls :].any()
    assert pad[end + 1 :].all() and not pad[: end + 1].any()


def test_stage2_overflow_keeps_eos_and_control_mask():
    arr = np.array([[b, p, 0, 60 + k, 1, 20, 9, 35] for b in range(40) for p in range(0, 48, 12)
                    for k in range(3)])  # fmt: skip
    ls = np.array([[0, 0, 0, 72, 12, 20, 9, 35]])
    ids, control, pad = remi.stage2_sequence(arr, ls)
    last = int(np.flatnonzero(~pad)[-1])
    assert ids[last] == 2 and ids[last - 1] == 5 and last >= 995  # b-1 closes the cut bar
    n_ctrl = 62 + len(remi.encode(ls, redact=True)) + 1
    assert control.sum() == n_ctrl and ids[n_ctrl - 1] == 984
    body = ids[n_ctrl:-1]
    events, skipped = remi.decode(body)
    assert skipped == 0 and len(events) > 0
    official, ctrl_off, _ = remi.stage2_sequence(arr, ls, keep_eos=False)
    assert official[-1] != 2 and not ctrl_off.any()  # SPEC 11.11: nothing masked as control
    with pytest.raises(DataError):
        remi.stage2_sequence(arr, np.tile(ls, (400, 1)))  # 1200+ prompt tokens


def test_decode_malformed_tokens_counts_without_crashing():
    tokens = (
        "s-9 t-35 o-0 i-0 p-60 d-12 v-20 "  # good note
        "p-61 d-12 v-20 "  # fine: same onset and instrument
        "d-3 v-2 "  # duration and velocity with no pitch: 2 skipped
        "o-12 p-62 d-1 v-1 "  # pitch before i-: p, d, v skipped (3)
        "i-0 p-63 o-24 "  # unfinished note (p-63 abandoned: 1)
        "e-1 b-0 <unk> I1s2_0_0 </s> "  # e-1, b-0, stray <unk>: 3; framing ignored
        "i-128 p-60 d-1 v-1 "  # pitched value on drums: p, d, v skipped (3)
        "i-0 p-64 d-12 <unk> b-1 "  # redacted velocity accepted
        "s-8 <unk> o-0 i-128 p-164 d-2 v-30 b-1 p-65"
    ).split()  # trailing p-65: 1
    events, skipped = remi.decode(tokens)
    assert skipped == 2 + 3 + 1 + 3 + 3 + 1
    np.testing.assert_array_equal(events[:, 3], [60, 61, 64, 164])
    np.testing.assert_array_equal(events[:, 0], [0, 0, 0, 1])
    assert events[2, 5] == remi.DEFAULT_VELOCITY_CODE and events[3, 6] == 8
    score, n = remi.to_score(remi.to_ids(tokens))
    assert n == skipped and score.note_num() == 4
    rng = np.random.default_rng(0)
    for _ in range(200):  # random id soup never raises
        remi.to_score(rng.integers(0, 1253, size=rng.integers(0, 60)))


def test_midi_remi_midi_round_trip(varied_score):
    name, score = varied_score
    table, _ = notes.arrangement_from_score(score)
    events, skipped = remi.decode(remi.encode(table))
    assert skipped == 0
    again, _ = notes.arrangement_from_score(notes.events_to_score(events))
    # REMI drops empty bars: compare bar ranks; tempo is one value per bar (from its first row)
    _, rank = np.unique(table.events[:, 0], return_inverse=True)
    expected = table.events.copy()
    expected[:, 0] = rank
    cols = [0, 1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(again.events[:, cols], expected[:, cols], err_msg=name)


def test_sustain_pedal(make_score):
    # three 4/4 bars, the last note one beat long: the piece ends at beat 9
    score = notes.events_to_score(np.array([[b, 0, 0, 60, 12, 20, 9, 35] for b in range(3)]))
    chords = np.array([[0, 0, 4, 48, 1, 20, 9, 35], [0, 24, 4, 50, 1, 20, 9, 35],
                       [1, 12, 4, 52, 1, 20, 9, 35]])  # fmt: skip
    out = remi.add_sustain_pedal(score, chords)
    cc = [(c.time, c.value) for c in out.tracks[0].controls if c.number == 64]
    tpq = 480
    release = round(0.05 * 120 / 60 * tpq)  # 0.05 s at 120 qpm = 48 ticks
    # pedal beats: every 4 beats (0, 4, 8) and chord onsets at beats 0, 2, 5
    downs = [t for t, v in cc if v == 72]
    ups = [t for t, v in cc if v == 0]
    assert downs == [b * tpq for b in (0, 2, 4, 5, 8)]
    assert ups == [b * tpq - release for b in (2, 4, 5, 8, 9)]  # the last span ends the piece
    assert len(score.tracks[0].controls) == 0  # the input is not modified
    assert midi_io.end_tick(score) == 9 * tpq
