"""4-bar training windows, their audio clips, and transposition (SPEC 1.1, 6.3, 6.4, 6.5, 10.12).

Windows (official ``AudioSymbolicDataset.load_data``): for downbeat index idx = 0, 2, 4, ...
< len(downbeats) - 4, stop when downbeat idx+4 lies beyond the audio (int(t * 50) > frames) or
beyond the last arrangement onset; the window's bars are [b0, b0 + 4) where b0 is the bar of the
first arrangement note with onset >= downbeat[idx]; windows with no arrangement or no lead-sheet
note are skipped.

Audio clip: centre frame = round(((t_start + t_end) * 50) // 2) with t_start/t_end the downbeats
idx and idx+4; clip = frames [centre - 254, centre + 254) for the default 508-frame clip
(``clip_frames``; the constants live in :mod:`bossa_jax.audio`). By default the clip is CLAMPED
into the file, as at inference (:func:`bossa_jax.audio.clip_placement`; fixes SPEC 10.12: the
official training loader wraps a negative start and usually gets an empty clip); audio shorter
than the clip gives start 0 and its whole length, to be right-padded with code 2048
(:func:`bossa_jax.audio.pad_codes`). ``clamp=False`` reproduces the official slice.

Transposition: one integer shift per draw, uniform in [-6, +5], applied to the arrangement (drums,
instrument 128, excluded) and the lead sheet; the audio is untouched. Tables are copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bossa_jax.audio import CLIP_FRAMES, FRAME_RATE, clip_placement
from bossa_jax.symbolic.notes import BAR, DRUM_INSTRUMENT, INSTRUMENT, PITCH, NoteTable, Song

WINDOW_BARS = 4
HOP_BARS = 2
TRANSPOSE_MIN, TRANSPOSE_MAX = -6, 5


@dataclass(frozen=True)
class Window:
    """One training window: bars [start_bar, start_bar + 4), its notes and its audio clip."""

    downbeat_index: int
    start_bar: int
    t_start: float
    t_end: float
    clip_start: int  # first audio frame
    clip_frames: int  # valid frames (the clip length, 508, unless the audio is shorter)
    arrangement: NoteTable
    leadsheet: NoteTable

    @property
    def bar_range(self) -> tuple[int, int]:
        return self.start_bar, self.start_bar + WINDOW_BARS

    @property
    def clip_centre(self) -> int:
        return clip_centre(self.t_start, self.t_end)


def clip_centre(t_start: float, t_end: float) -> int:
    """The official centre frame round(((t_start + t_end) * 50) // 2)."""
    return int(round(((t_start + t_end) * FRAME_RATE) // 2))


def clip_frames(
    t_start: float,
    t_end: float,
    n_frames: int | None,
    *,
    clamp: bool = True,
    length: int = CLIP_FRAMES,
) -> tuple[int, int]:
    """(first frame, number of valid frames) of the ``length``-frame clip (508: 10.16 s) centred
    on [t_start, t_end).

    ``clamp``: shifted into [0, n_frames) like inference (:func:`bossa_jax.audio.clip_placement`);
    whole file when it is shorter than the clip. Otherwise the official training slice
    ``codes[:, c-254 : min(c+254, T)]`` with Python's wrap-around of a negative start.
    ``n_frames=None``: no audio known, the start clamped at 0.
    """
    centre = clip_centre(t_start, t_end)
    start, end = centre - length // 2, centre + length // 2
    if n_frames is None:
        return max(start, 0), length
    if clamp:
        return clip_placement(centre, n_frames, length)
    s, e, _ = slice(start, min(end, n_frames)).indices(n_frames)
    return s, max(0, e - s)


def segment_song(
    song: Song,
    n_frames: int | None = None,
    *,
    clamp: bool = True,
    bars: int = WINDOW_BARS,
    hop: int = HOP_BARS,
    clip_length: int = CLIP_FRAMES,
) -> list[Window]:
    """The song's windows (see the module docstring). ``n_frames``: length of its audio codes at
    50 Hz (None: no audio check, clip start only clamped at 0); ``clip_length``: the clip's frames
    (``audio.clip_frames``)."""
    db = np.asarray(song.downbeat_times, dtype=np.float64)
    arr, ls = song.arrangement, song.leadsheet
    if len(arr) == 0:
        return []
    last_onset = float(arr.onsets.max())
    windows = []
    for idx in range(0, len(db) - bars, hop):
        t0, t1 = float(db[idx]), float(db[idx + bars])
        if n_frames is not None and int(t1 * FRAME_RATE) > n_frames:
            break
        if t1 > last_onset:
            break
        after = np.flatnonzero(arr.onsets >= t0)
        first = after[np.lexsort((arr.events[after, BAR], arr.onsets[after]))[0]]
        b0 = int(arr.events[first, BAR])
        arr_w, ls_w = arr.bars(b0, b0 + bars), ls.bars(b0, b0 + bars)
        if len(arr_w) == 0 or len(ls_w) == 0:
            continue
        start, length = clip_frames(t0, t1, n_frames, clamp=clamp, length=clip_length)
        windows.append(Window(idx, b0, t0, t1, start, length, arr_w, ls_w))
    return windows


def draw_transposition(rng: np.random.Generator) -> int:
    """One shift, uniform over the 12 integers -6..+5 (official ``np.random.randint(-6, 6)``)."""
    return int(rng.integers(TRANSPOSE_MIN, TRANSPOSE_MAX + 1))


def transpose(table: NoteTable, shift: int) -> NoteTable:
    """A copy with every non-drum pitch moved by ``shift`` semitones."""
    events = table.events.copy()
    pitched = events[:, INSTRUMENT] != DRUM_INSTRUMENT
    events[pitched, PITCH] += int(shift)
    return table.with_events(events)


def augment(
    arrangement: NoteTable, leadsheet: NoteTable, rng: np.random.Generator
) -> tuple[NoteTable, NoteTable, int]:
    """One random transposition applied to both tables (copies); returns the shift too."""
    shift = draw_transposition(rng)
    return transpose(arrangement, shift), transpose(leadsheet, shift), shift
