"""MuseCoco REMI tokens (SPEC 4.3, 5.1, 6.5, 8.2, 10.22, 11.2, 11.11).

The vocabulary is MuseCoco-xLarge's ``vocab.json`` (1253 ids), shipped inside the package as
``musecoco_vocab.json`` (a test checks it equals ``shared/reference/musecoco-1b/vocab.json``).

Writer grammar (official ``utils/REMI.py:note2token``), notes sorted by (bar, position, instrument,
pitch descending): each bar is ``s-<ts> t-<tempo>`` (taken from the bar's first note row), then for
every onset ``o-<pos>``, for every instrument at that onset ``i-<inst>``, for every note
``p-<pitch> d-<dur> v-<vel>``, and the bar ends with ``b-1``. Empty bars produce nothing. With
``redact=True`` (lead sheets in training and inference) the ``t-`` and ``v-`` tokens become
``<unk>``. Field values are the octuple codes unchanged (SPEC 5.1).

Stage-2 sequence (``collate_fn_musecoco2``), 1000 ids:
``</s>`` + 60 attribute tokens + ``<sep>`` + lead-sheet REMI + ``<sep>`` + arrangement REMI +
``</s>`` + ``<pad>``... ; ``control_mask`` is True up to and including the second ``<sep>``,
``pad_mask`` True on padding.

Overflow (SPEC 10.22 / 11.11, our defined behaviour): with ``keep_eos=True`` (default) the
arrangement is cut after its last complete note that fits, a ``b-1`` closes the cut bar, and the
final ``</s>`` is always kept, so the control mask stays aligned; a lead-sheet prompt that leaves no
room for one arrangement token and ``</s>`` raises DataError. ``keep_eos=False`` reproduces the
official plain cut at 1000 tokens (``</s>`` lost, control mask computed from the uncut length).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources

import numpy as np
import symusic

from bossa_jax.errors import DataError
from bossa_jax.symbolic import midi as midi_io
from bossa_jax.symbolic.notes import (
    BAR,
    CHORD_INSTRUMENT,
    DRUM_INSTRUMENT,
    DURATION,
    INSTRUMENT,
    MELODY_INSTRUMENT,
    PITCH,
    POSITION,
    TICKS_PER_BEAT,
    NoteTable,
    events_to_score,
    tempo_code,
    time_signature_code,
)

VOCAB_FILE = "musecoco_vocab.json"


def _load_vocab() -> dict[str, int]:
    text = resources.files("bossa_jax.symbolic").joinpath(VOCAB_FILE).read_text(encoding="utf-8")
    return json.loads(text)


VOCAB: dict[str, int] = _load_vocab()
TOKENS: list[str] = [""] * len(VOCAB)
for _tok, _id in VOCAB.items():
    TOKENS[_id] = _tok
VOCAB_SIZE = len(VOCAB)

PAD, EOS, UNK, SEP, BAR_END = (VOCAB[t] for t in ("<pad>", "</s>", "<unk>", "<sep>", "b-1"))
BOS = EOS  # fairseq LM convention: the sequence starts with </s>
MAX_TOKENS = 1000

# id offsets of the value families, read from the vocabulary (not hard-coded)
FAMILIES = ("o", "i", "p", "d", "v", "s", "t")
OFFSET = {f: VOCAB[f"{f}-0"] for f in FAMILIES}
SIZE = {f: sum(1 for t in VOCAB if t.startswith(f"{f}-")) for f in FAMILIES}

# The fixed attribute prefix (official get_musecoco_attributes): piano present, every other
# attribute at its last class ("not specified").
ATTRIBUTE_TOKENS: tuple[str, ...] = (
    ("R1_2", "R3_3", "S2s1_17", "B1s1_4", "TS1s1_7", "K1_2", "T1s1_3", "P4_12", "EM1_4", "TM1_5")
    + ("I1s2_0_0",)
    + tuple(f"I1s2_{i}_2" for i in range(1, 28))
    + tuple(f"S4_{i}_2" for i in range(22))
)
ATTRIBUTE_IDS = np.array([VOCAB[t] for t in ATTRIBUTE_TOKENS], dtype=np.int64)
# MuseCoco's genre attributes S4_<k>_<v> (SPEC 5.1; v: 0 present, 1 absent, 2 not given): the
# prompt carries every S4_<k>_2 at index GENRE_POSITION + k; BOSSA-mini's stage 0 may set one
# S4_<k>_0 to name a song's style (bossa_jax.train.lm)
NUM_GENRES = 22
GENRE_POSITION = 1 + ATTRIBUTE_TOKENS.index("S4_0_2")
GENRE_PRESENT_IDS = np.array([VOCAB[f"S4_{k}_0"] for k in range(NUM_GENRES)], dtype=np.int64)
PROMPT_PREFIX_IDS = np.concatenate([[BOS], ATTRIBUTE_IDS, [SEP]]).astype(np.int64)  # 62 ids

_FIELD_OF_COLUMN = {1: "o", 2: "i", 3: "p", 4: "d", 5: "v", 6: "s", 7: "t"}


def _events(notes: NoteTable | np.ndarray) -> np.ndarray:
    e = notes.events if isinstance(notes, NoteTable) else np.asarray(notes, dtype=np.int64)
    return e.reshape(-1, 8)


def encode(notes: NoteTable | np.ndarray, *, redact: bool = False) -> np.ndarray:
    """Sorted note rows -> REMI ids (int64), pure numpy. ``redact`` = ``redact_performance``."""
    e = _events(notes)
    n = len(e)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    for col, fam in _FIELD_OF_COLUMN.items():
        if e[:, col].min() < 0 or e[:, col].max() >= SIZE[fam]:
            raise ValueError(f"REMI {fam}- value outside 0..{SIZE[fam] - 1}")
    new_bar = np.ones(n, dtype=bool)
    new_bar[1:] = e[1:, BAR] != e[:-1, BAR]
    new_onset = new_bar.copy()
    new_onset[1:] |= e[1:, POSITION] != e[:-1, POSITION]
    new_inst = new_onset.copy()
    new_inst[1:] |= e[1:, INSTRUMENT] != e[:-1, INSTRUMENT]
    always = np.ones(n, dtype=bool)
    cand = np.stack(
        [
            np.full(n, BAR_END),
            OFFSET["s"] + e[:, 6],
            np.full(n, UNK) if redact else OFFSET["t"] + e[:, 7],
            OFFSET["o"] + e[:, 1],
            OFFSET["i"] + e[:, 2],
            OFFSET["p"] + e[:, 3],
            OFFSET["d"] + e[:, 4],
            np.full(n, UNK) if redact else OFFSET["v"] + e[:, 5],
        ],
        axis=1,
    )
    keep = np.stack([new_bar, new_bar, new_bar, new_onset, new_inst, always, always, always], 1)
    ids = cand[keep]
    return np.concatenate([ids[1:], ids[:1]])  # the first b-1 becomes the final bar end


def melody_table(
    leadsheet: NoteTable | np.ndarray, first_bar: int, n_bars: int
) -> tuple[np.ndarray, np.ndarray]:
    """The melody of lead-sheet bars ``first_bar .. first_bar + n_bars - 1`` as token-id tables for
    the sampler's melody lock (:class:`bossa_jax.sampling.MelodyLock`): pitch and duration ids
    (n_bars, onsets) int32 at (bar - first_bar, onset position), -1 where no melody note starts;
    of notes on one onset the highest is kept (the writer puts it first)."""
    e = _events(leadsheet)
    e = e[(e[:, INSTRUMENT] == MELODY_INSTRUMENT) & (e[:, BAR] >= first_bar)]
    e = e[e[:, BAR] < first_bar + n_bars]
    pitch = np.full((n_bars, SIZE["o"]), -1, np.int32)
    duration = np.full((n_bars, SIZE["o"]), -1, np.int32)
    for row in e[np.argsort(e[:, PITCH], kind="stable")]:  # ascending: the highest is written last
        bar, pos = row[BAR] - first_bar, row[POSITION]
        pitch[bar, pos] = OFFSET["p"] + row[PITCH]
        duration[bar, pos] = OFFSET["d"] + row[DURATION]
    return pitch, duration


def to_strings(ids: Sequence[int] | np.ndarray) -> list[str]:
    return [TOKENS[int(i)] if 0 <= int(i) < VOCAB_SIZE else f"<id {int(i)}>" for i in ids]


def to_ids(tokens: Sequence[str]) -> np.ndarray:
    """Token strings -> ids; unknown strings become ``<unk>`` (the MuseCoco tokenizer's rule)."""
    return np.array([VOCAB.get(t, UNK) for t in tokens], dtype=np.int64)


def encode_tokens(notes: NoteTable | np.ndarray, *, redact: bool = False) -> list[str]:
    return to_strings(encode(notes, redact=redact))


def prompt(leadsheet: NoteTable | np.ndarray, *, redact: bool = True) -> np.ndarray:
    """Inference prompt: ``</s>`` + attributes + ``<sep>`` + lead-sheet REMI + ``<sep>``."""
    return np.concatenate([PROMPT_PREFIX_IDS, encode(leadsheet, redact=redact), [SEP]])


def stage2_sequence(
    arrangement: NoteTable | np.ndarray,
    leadsheet: NoteTable | np.ndarray,
    *,
    redact: bool = True,
    max_tokens: int = MAX_TOKENS,
    keep_eos: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage-2 ids (max_tokens,) int64, control_mask (bool, True = prompt), pad_mask (bool, True =
    padding). See the module docstring for the layout and overflow rules."""
    head = prompt(leadsheet, redact=redact)
    body = encode(arrangement)
    if keep_eos:
        room = max_tokens - len(head) - 1
        if room < 1:
            raise DataError(
                f"lead-sheet prompt has {len(head)} tokens; the stage-2 sequence holds "
                f"{max_tokens} with the arrangement and </s>"
            )
        if len(body) > room:
            body = _cut_at_note(body, room)
        seq = np.concatenate([head, body, [EOS]])
        control_len = len(head)
    else:
        seq = np.concatenate([head, body, [EOS]])[:max_tokens]
        pad_len = max_tokens - len(seq)
        control_len = max(0, max_tokens - (len(body) + 1 + pad_len))
    ids = np.full(max_tokens, PAD, dtype=np.int64)
    ids[: len(seq)] = seq
    control = np.zeros(max_tokens, dtype=bool)
    control[:control_len] = True
    pad = np.zeros(max_tokens, dtype=bool)
    pad[len(seq) :] = True
    return ids, control, pad


def _cut_at_note(body: np.ndarray, room: int) -> np.ndarray:
    """The longest prefix of ``body`` ending on a complete note or bar that fits in ``room``
    tokens, with a closing ``b-1`` when it ends inside a bar."""
    is_vel = (body >= OFFSET["v"]) & (body < OFFSET["v"] + SIZE["v"])
    ends_bar = np.flatnonzero(body[:room] == BAR_END) + 1
    ends_note = np.flatnonzero(is_vel[: max(room - 1, 0)]) + 1
    best_bar = ends_bar.max() if ends_bar.size else 0
    best_note = ends_note.max() if ends_note.size else 0
    if best_bar >= best_note:
        return body[:best_bar]
    return np.concatenate([body[:best_note], [BAR_END]])


# --- decoding -----------------------------------------------------------------------------------
_FRAMING = {"<s>", "<pad>", "</s>", "<sep>"}
DEFAULT_VELOCITY_CODE = 20  # velocity 82 for a redacted (<unk>) velocity


def decode(tokens: Sequence[int] | Sequence[str] | np.ndarray) -> tuple[np.ndarray, int]:
    """REMI ids or strings (model output, possibly malformed) -> (octuple rows (N, 8), skipped).

    Framing tokens (``<s> <pad> </s> <sep>``) and attribute tokens are ignored. ``<unk>`` is
    accepted in the tempo slot (right after ``s-``: tempo unchanged) and in the velocity slot
    (velocity code 20). ``skipped`` counts every other token that did not make it into the output:
    tokens out of grammar (a note field out of order, a note before its ``o-``/``i-``, a pitch of
    128+ on a non-drum instrument or below 128 on drums, ``b-0``, ``e-``, unknown ids) and the
    tokens of unfinished notes. Bars are counted by ``b-1`` (an empty bar still takes time); a bar
    without ``s-``/``t-`` keeps the previous values (4/4, 120 bpm at the start).
    """
    if isinstance(tokens, np.ndarray) or (len(tokens) and not isinstance(tokens[0], str)):
        strings = to_strings(np.asarray(tokens, dtype=np.int64).reshape(-1))
    else:
        strings = [str(t) for t in tokens]
    rows: list[list[int]] = []
    skipped = 0
    bar, ts, tempo = 0, time_signature_code(4, 4), int(tempo_code(120.0))
    pos: int | None = None
    inst: int | None = None
    note: list[int] = []  # pitch, duration of the note being assembled
    prev = ""
    for tok in strings:
        if tok in _FRAMING or (tok in VOCAB and "_" in tok):
            continue
        fam, _, val = tok.partition("-")
        if tok == "<unk>":
            kind = "unk"
        elif tok == "b-1":
            kind = "b"
        elif fam in OFFSET and val.isdigit() and int(val) < SIZE[fam]:
            kind = fam
        else:
            skipped += 1
            prev = tok
            continue
        if (
            note
            and not (kind == "d" and len(note) == 1)
            and not (kind in ("v", "unk") and len(note) == 2)
        ):
            skipped += len(note)  # the note is abandoned
            note = []
        v = int(val) if kind not in ("unk", "b") else 0
        used = True
        if kind == "b":
            bar += 1
            pos = inst = None
        elif kind == "unk":
            if note:
                rows.append([bar, pos, inst, note[0], note[1], DEFAULT_VELOCITY_CODE, ts, tempo])
                note = []
            else:
                used = prev.startswith("s-")
        elif kind == "s":
            ts = v
        elif kind == "t":
            tempo = v
        elif kind == "o":
            pos, inst = v, None
        elif kind == "i":
            used = pos is not None
            inst = v if used else inst
        elif kind == "p":
            used = pos is not None and inst is not None and (v >= 128) == (inst == DRUM_INSTRUMENT)
            if used:
                note = [v]  # counted only if the note is abandoned
        elif kind == "d":
            used = bool(note)
            if used:
                note.append(v)
        elif kind == "v":
            if note:
                rows.append([bar, pos, inst, note[0], note[1], v, ts, tempo])
                note = []
            else:
                used = False
        skipped += 0 if used else 1
        prev = tok
    skipped += len(note)
    return np.array(rows, dtype=np.int64).reshape(-1, 8), skipped


def to_score(
    tokens: Sequence[int] | Sequence[str] | np.ndarray, *, tpq: int = 480
) -> tuple[symusic.Score, int]:
    """REMI tokens -> (symusic Score with tempo, time signatures and velocities, skipped count)."""
    events, skipped = decode(tokens)
    return events_to_score(events, tpq=tpq), skipped


def add_sustain_pedal(
    score: symusic.Score,
    chord_events: NoteTable | np.ndarray | None = None,
    *,
    every_beats: int = 4,
    value: int = 72,
    release_s: float = 0.05,
) -> symusic.Score:
    """Rule-based sustain pedal (SPEC 8.2): CC64 = ``value`` at every ``every_beats``-th beat and
    at every beat where a chord (lead-sheet instrument 4) starts, released (CC64 = 0) ``release_s``
    before the next such beat; the last span ends at the end of the piece. Beats are the score's
    pretty_midi beats; ``chord_events`` bars count from the score's bar 0. Returns a copy with the
    controls on the first track."""
    out = score.copy()
    if not len(out.tracks):
        return out
    tempo = midi_io.TempoMap.from_score(out)
    ts = midi_io.time_signature_changes(out)
    end = midi_io.end_tick(out)
    beats = midi_io.pretty_midi_beats(out.ticks_per_quarter, ts, end)
    downbeats = np.flatnonzero(midi_io.pretty_midi_downbeats(beats, ts))
    steps = set(range(0, len(beats), every_beats))
    if chord_events is not None:
        e = _events(chord_events)
        e = e[e[:, INSTRUMENT] == CHORD_INSTRUMENT]
        for bar, pos in zip(e[:, BAR], e[:, POSITION], strict=True):
            if 0 <= bar < len(downbeats):
                step = int(downbeats[bar]) + int(pos) // TICKS_PER_BEAT
                if step < len(beats):
                    steps.add(step)
    order = sorted(steps)
    bounds = [beats[s] for s in order] + [max(float(end), beats[-1])]
    seconds = tempo.to_seconds(np.array(bounds))
    track = out.tracks[0]
    for i in range(len(order)):
        down = int(round(bounds[i]))
        up = int(round(float(tempo.to_ticks(seconds[i + 1] - release_s))))
        if up <= down:
            continue
        track.controls.append(symusic.ControlChange(time=down, number=64, value=value))
        track.controls.append(symusic.ControlChange(time=up, number=64, value=0))
    return out
