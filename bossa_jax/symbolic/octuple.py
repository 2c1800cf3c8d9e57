"""Octuple tokens for the Q-Former, MusicBERT dictionary (SPEC 5.2, 6.5, 11.11).

Dictionary (1237 ids, MusicBERT order; BOSSA adds [DEC] = 1237):

=========== ============ =====
token       ids          count
=========== ============ =====
<s> <pad> </s> <unk>  0-3   4
<0-b> bar   4-259        256
<1-p> pos   260-387      128
<2-i> inst  388-516      129
<3-p> pitch 517-772      256
<4-d> dur   773-900      128
<5-v> vel   901-932      32
<6-t> ts    933-1186     254
<7-t> tempo 1187-1235    49
<mask>      1236         1
=========== ============ =====

Stage-1 sequence (``collate_fn_musicbert``): lead-sheet octuples without SOS/EOS, then the
arrangement framed by 8x``<s>`` and 8x``</s>``; bars relative to the earlier of the two first bars;
``deperf`` puts ``<unk>`` in the lead sheet's velocity and tempo slots; 226 octuples, padded with
``<pad>`` octuples.

Overflow (SPEC 11.11, our defined behaviour): by default (``keep_eos=True``) the arrangement is cut
to the notes that fit and the EOS octuple is always the last valid one; a lead sheet of more than
224 notes (which leaves no room for SOS and EOS) raises DataError. ``keep_eos=False`` reproduces the
official plain cut at 226 octuples (EOS lost).
"""

from __future__ import annotations

import numpy as np

from bossa_jax.errors import DataError
from bossa_jax.symbolic.notes import BAR, TEMPO, VELOCITY, NoteTable

SOS, PAD, EOS, UNK = 0, 1, 2, 3
MASK = 1236
DEC = 1237
VOCAB_SIZE = 1237
FIELD_SIZES = (256, 128, 129, 256, 128, 32, 254, 49)
FIELD_OFFSETS = tuple(int(x) for x in 4 + np.concatenate([[0], np.cumsum(FIELD_SIZES)[:-1]]))
BAR_MAX = FIELD_SIZES[0]
MAX_NOTES = 226  # 224 notes + SOS + EOS octuples
TOKENS_PER_NOTE = 8
_OFFSETS = np.array(FIELD_OFFSETS, dtype=np.int64)
_SIZES = np.array(FIELD_SIZES, dtype=np.int64)


def dictionary() -> list[str]:
    """Token strings by id (MusicBERT's ``<field-value>`` names), 1237 entries."""
    tokens = ["<s>", "<pad>", "</s>", "<unk>"]
    for f, size in enumerate(FIELD_SIZES):
        tokens.extend(f"<{f}-{v}>" for v in range(size))
    tokens.append("<mask>")
    return tokens


TOKENS = dictionary()


def _as_events(notes: NoteTable | np.ndarray) -> np.ndarray:
    events = notes.events if isinstance(notes, NoteTable) else np.asarray(notes, dtype=np.int64)
    return events.reshape(-1, 8)


def note_ids(notes: NoteTable | np.ndarray, bar_offset: int = 0) -> np.ndarray:
    """(N', 8) ids of the notes, bars shifted by ``bar_offset``; notes whose shifted bar is >= 256
    are dropped (official ``encoding_to_str``). Other out-of-range fields raise ValueError."""
    events = _as_events(notes).copy()
    events[:, BAR] += bar_offset
    events = events[events[:, BAR] < BAR_MAX]
    bad = (events < 0) | (events >= _SIZES)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"octuple field {col} value {events[row, col]} outside 0..{_SIZES[col] - 1}"
        )
    return events + _OFFSETS


def encode(notes: NoteTable | np.ndarray, bar_offset: int = 0) -> np.ndarray:
    """Official ``note_encode``: 8x<s>, the notes' 8 ids each, 8x</s>; flat int64 array."""
    body = note_ids(notes, bar_offset).reshape(-1)
    return np.concatenate([np.full(8, SOS), body, np.full(8, EOS)]).astype(np.int64)


def stage1_sequence(
    arrangement: NoteTable | np.ndarray,
    leadsheet: NoteTable | np.ndarray,
    *,
    deperf: bool = True,
    max_notes: int = MAX_NOTES,
    keep_eos: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stage-1 octuple sequence of one window (SPEC 5.2, 6.5).

    Returns ``ids`` int64 (max_notes * 8,), ``leadsheet_mask`` float32 (max_notes,) 0 on lead-sheet
    octuples and 1 elsewhere, ``pad_mask`` float32 (max_notes,) 0 on padding. Both tables must be
    non-empty and sorted. See the module docstring for overflow.
    """
    arr = _as_events(arrangement)
    ls = _as_events(leadsheet)
    if len(arr) == 0 or len(ls) == 0:
        raise DataError("stage-1 sequence needs at least one arrangement and one lead-sheet note")
    offset = -min(int(ls[0, BAR]), int(arr[0, BAR]))
    ls_ids = note_ids(ls, offset)
    if deperf:
        ls_ids[:, VELOCITY] = UNK
        ls_ids[:, TEMPO] = UNK
    arr_ids = note_ids(arr, offset)
    n_ls = len(ls_ids)
    if keep_eos:
        room = max_notes - 2 - n_ls
        if room < 0:
            raise DataError(
                f"lead-sheet window has {n_ls} notes; the stage-1 sequence holds at most "
                f"{max_notes - 2} besides the SOS and EOS octuples"
            )
        arr_ids = arr_ids[:room]
    rows = np.concatenate([ls_ids, np.full((1, 8), SOS), arr_ids, np.full((1, 8), EOS)], axis=0)[
        :max_notes
    ]
    n = len(rows)
    ids = np.full((max_notes, 8), PAD, dtype=np.int64)
    ids[:n] = rows
    leadsheet_mask = np.ones(max_notes, dtype=np.float32)
    leadsheet_mask[: min(n_ls, max_notes)] = 0
    pad_mask = np.zeros(max_notes, dtype=np.float32)
    pad_mask[:n] = 1
    return ids.reshape(-1), leadsheet_mask, pad_mask


def decode(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Octuple ids -> (events (N, 8), skipped) with absolute field values.

    The flat id array is read in groups of 8; groups of special tokens (SOS, EOS, PAD) are framing
    and ignored; a group whose 8 ids are not one valid id of each field in order (``<unk>``
    included) is skipped and counted.
    """
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(flat) // TOKENS_PER_NOTE
    skipped = int(len(flat) % TOKENS_PER_NOTE != 0)
    groups = flat[: n * TOKENS_PER_NOTE].reshape(n, TOKENS_PER_NOTE)
    values = groups - _OFFSETS
    special = np.all(np.isin(groups, (SOS, PAD, EOS)), axis=1)
    valid = np.all((values >= 0) & (values < _SIZES), axis=1)
    skipped += int(np.count_nonzero(~special & ~valid))
    return values[valid], skipped


def tokens_to_strings(ids: np.ndarray) -> list[str]:
    return [TOKENS[i] if 0 <= i < len(TOKENS) else ("[DEC]" if i == DEC else "?") for i in ids]
