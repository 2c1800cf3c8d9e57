"""Note tables on the 12-ticks-per-beat grid (SPEC 5.2, 6.2, 6.3, 11.1, 11.3).

A note is the octuple row ``(bar, position, instrument, pitch, duration code, velocity code,
time-signature code, tempo code)``. :class:`NoteTable` holds N such rows as an int array (N, 8) plus
each note's onset in seconds (audio clips are placed with them). :class:`BeatGrid` holds the beats
(pretty_midi beats or external annotations) and turns note times into grid fields exactly as the
official extraction scripts do; :class:`Song` bundles an arrangement, a lead sheet and the downbeat
times for segmentation.

Quantisation tables (MusicBERT ``preprocess.py`` with BOSSA's resolution of 12 per beat):

=============== ======================================================================
duration        ticks -> code by FLOORING to the largest representable length (SPEC 11.1):
                codes 0-11 step 1, 12-23 step 2, 24-35 step 4, ... 84-95 step 128;
                >= 3060 ticks -> 95; 0 ticks -> code 0 (kept)
velocity        velocity // 4 (32 codes); decoded as 4 * code + 2
tempo           round(12 * log2(clip(qpm, 16, 256) / 16)) (49 codes); 120 -> 35
time signature  MusicBERT table, denominators 1..64, numerators 1..2*denominator (254 codes);
                BOSSA always writes (beats in bar, 4): (4, 4) -> 9, (3, 4) -> 8, (2, 4) -> 7
=============== ======================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import symusic

from bossa_jax.errors import MidiError
from bossa_jax.symbolic import midi as midi_io

TICKS_PER_BEAT = 12
MAX_BEATS_PER_BAR = 8
MIN_PITCH, MAX_PITCH = 6, 122  # kept: MIN_PITCH <= p < MAX_PITCH (SPEC 11.6)
DRUM_INSTRUMENT = 128
MELODY_INSTRUMENT = 0
CHORD_INSTRUMENT = 4

# Field indices of an octuple row.
BAR, POSITION, INSTRUMENT, PITCH, DURATION, VELOCITY, TIME_SIGNATURE, TEMPO = range(8)
FIELD_NAMES = ("bar", "position", "instrument", "pitch", "duration", "velocity", "ts", "tempo")

# --- quantisation tables (MusicBERT preprocess.py, pos_resolution = 12) ---------------------------
_DURATION_OCTAVES = 8  # duration_max: up to 2**8 beats
_MAX_TS_DENOMINATOR_EXP = 6
_MAX_NOTES_PER_BAR = 2
VELOCITY_QUANT = 4
TEMPO_QUANT = 12
MIN_TEMPO, MAX_TEMPO = 16.0, 256.0


def _duration_tables() -> tuple[np.ndarray, np.ndarray]:
    encode: list[int] = []
    decode: list[int] = []
    for octave in range(_DURATION_OCTAVES):
        for _ in range(TICKS_PER_BEAT):
            decode.append(len(encode))
            encode.extend([len(decode) - 1] * (2**octave))
    return np.array(encode, dtype=np.int64), np.array(decode, dtype=np.int64)


DURATION_ENCODE, DURATION_DECODE = _duration_tables()  # (3060,) ticks->code, (96,) code->ticks
NUM_DURATION_CODES = len(DURATION_DECODE)


def _time_signature_table() -> list[tuple[int, int]]:
    table = []
    for exp in range(_MAX_TS_DENOMINATOR_EXP + 1):
        for numerator in range(1, (2**exp) * _MAX_NOTES_PER_BAR + 1):
            table.append((numerator, 2**exp))
    return table


TIME_SIGNATURES: tuple[tuple[int, int], ...] = tuple(_time_signature_table())  # 254 entries
_TS_CODE = {ts: i for i, ts in enumerate(TIME_SIGNATURES)}


def duration_code(ticks: np.ndarray | int) -> np.ndarray:
    """Grid ticks -> duration code, flooring (13 -> code of 12, >= 3060 -> 95)."""
    t = np.clip(np.asarray(ticks, dtype=np.int64), 0, len(DURATION_ENCODE) - 1)
    return DURATION_ENCODE[t]


def duration_ticks(code: np.ndarray | int) -> np.ndarray:
    """Duration code -> grid ticks (codes past the table give the longest length)."""
    c = np.clip(np.asarray(code, dtype=np.int64), 0, NUM_DURATION_CODES - 1)
    return DURATION_DECODE[c]


def velocity_code(velocity: np.ndarray | int) -> np.ndarray:
    return np.asarray(velocity, dtype=np.int64) // VELOCITY_QUANT


def velocity_value(code: np.ndarray | int) -> np.ndarray:
    return np.asarray(code, dtype=np.int64) * VELOCITY_QUANT + VELOCITY_QUANT // 2


def tempo_code(qpm: np.ndarray | float) -> np.ndarray:
    """round(12 log2(qpm / 16)), qpm clipped to 16..256 (numpy rounding, as the official b2e)."""
    x = np.clip(np.asarray(qpm, dtype=np.float64), MIN_TEMPO, MAX_TEMPO) / MIN_TEMPO
    return np.round(np.log2(x) * TEMPO_QUANT).astype(np.int64)


def tempo_qpm(code: np.ndarray | int) -> np.ndarray:
    return 2.0 ** (np.asarray(code, dtype=np.float64) / TEMPO_QUANT) * MIN_TEMPO


class GridError(MidiError, ValueError):
    """A song whose time signatures or beats give no bar grid (bad data, not a bug)."""


def time_signature_code(numerator: int, denominator: int = 4) -> int:
    """MusicBERT time-signature id; raises GridError for a signature outside the table."""
    try:
        return _TS_CODE[(int(numerator), int(denominator))]
    except KeyError as err:
        raise GridError(f"unsupported time signature {numerator}/{denominator}") from err


def time_signature_of(code: int) -> tuple[int, int]:
    return TIME_SIGNATURES[int(code)]


_BEATS_TS_CODE = np.array([0] + [time_signature_code(n, 4) for n in range(1, 9)], dtype=np.int64)


# --- note tables --------------------------------------------------------------------------------
def _empty_events() -> np.ndarray:
    return np.zeros((0, 8), dtype=np.int64)


@dataclass(frozen=True)
class NoteTable:
    """N notes: ``events`` int64 (N, 8) in octuple field order, ``onsets`` float64 (N,) seconds.

    Tables are treated as immutable: every operation returns a new table (SPEC 11.6: augmentation
    works on copies).
    """

    events: np.ndarray = field(default_factory=_empty_events)
    onsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def __post_init__(self) -> None:
        events = np.asarray(self.events, dtype=np.int64).reshape(-1, 8)
        onsets = np.asarray(self.onsets, dtype=np.float64).reshape(-1)
        if len(onsets) != len(events):
            raise ValueError(f"{len(events)} note rows but {len(onsets)} onset times")
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "onsets", onsets)

    def __len__(self) -> int:
        return len(self.events)

    def column(self, index: int) -> np.ndarray:
        return self.events[:, index]

    def select(self, mask_or_index: np.ndarray) -> NoteTable:
        return NoteTable(self.events[mask_or_index], self.onsets[mask_or_index])

    def sorted(self) -> NoteTable:
        """Sorted by bar, position, instrument, pitch descending (SPEC 6.3 ``high_to_low``); ties as
        the official pipeline (onset time, then the remaining fields)."""
        e = self.events
        order = np.lexsort(
            (e[:, 7], e[:, 6], e[:, 5], e[:, 4], self.onsets, -e[:, 3], e[:, 2], e[:, 1], e[:, 0])
        )
        return self.select(order)

    def bars(self, start: int, stop: int) -> NoteTable:
        """Notes with start <= bar < stop."""
        b = self.events[:, BAR]
        return self.select((b >= start) & (b < stop))

    def concat(self, other: NoteTable) -> NoteTable:
        return NoteTable(
            np.concatenate([self.events, other.events]), np.concatenate([self.onsets, other.onsets])
        )

    def with_events(self, events: np.ndarray) -> NoteTable:
        return NoteTable(events, self.onsets.copy())


@dataclass(frozen=True)
class BeatGrid:
    """Beats in seconds, which of them are downbeats, and the tempo map (SPEC 6.2).

    The grid has 12 ticks per beat, linearly interpolated between beats; the last beat interval is
    extrapolated once. Bars are counted from the first downbeat (earlier beats, pickups, have bar
    -1 and their notes are dropped). A bar longer than 8 beats is split after every 8th beat, which
    also counts as a downbeat. A bar's time signature is (number of beats in it, 4).
    """

    beat_times: np.ndarray
    downbeat_flags: np.ndarray
    tempo: midi_io.TempoMap
    beat_bar: np.ndarray = field(init=False, repr=False)
    beat_in_bar: np.ndarray = field(init=False, repr=False)
    beat_ts: np.ndarray = field(init=False, repr=False)
    tick_times: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        beats = np.asarray(self.beat_times, dtype=np.float64)
        flags = np.asarray(self.downbeat_flags, dtype=bool).copy()
        if beats.ndim != 1 or len(beats) < 2 or len(flags) != len(beats):
            raise GridError("a beat grid needs at least two beats and one flag per beat")
        if np.any(np.diff(beats) <= 0):
            raise GridError("beat times must increase strictly")
        counter = np.zeros(len(beats), dtype=np.int64)
        for i, is_down in enumerate(flags):  # the official beat-table loop, wrap at 8
            if is_down:
                counter[i] = 1
            elif i > 0 and counter[i - 1] > 0:
                counter[i] = counter[i - 1] + 1
                if counter[i] > MAX_BEATS_PER_BAR and counter[i] % MAX_BEATS_PER_BAR == 1:
                    flags[i] = True
                    counter[i] = 1
        bar = np.cumsum(flags) - 1
        beats_in_bar = np.zeros(len(beats), dtype=np.int64)
        valid = bar >= 0
        if valid.any():
            per_bar = np.bincount(bar[valid])
            beats_in_bar[valid] = per_bar[bar[valid]]
        extended = np.append(beats, 2 * beats[-1] - beats[-2])
        n_ticks = len(beats) * TICKS_PER_BEAT
        tick_times = np.interp(
            np.arange(n_ticks + 1) / TICKS_PER_BEAT, np.arange(len(extended)), extended
        )
        object.__setattr__(self, "beat_times", beats)
        object.__setattr__(self, "downbeat_flags", flags)
        object.__setattr__(self, "beat_bar", bar)
        object.__setattr__(self, "beat_in_bar", counter)
        object.__setattr__(self, "beat_ts", beats_in_bar)
        object.__setattr__(self, "tick_times", tick_times)

    @property
    def downbeat_times(self) -> np.ndarray:
        """Times of bar 0, 1, 2, ... (bar-8 splits included, so index k is bar k)."""
        return self.beat_times[self.downbeat_flags]

    @property
    def num_ticks(self) -> int:
        return len(self.beat_times) * TICKS_PER_BEAT

    def snap(self, seconds: np.ndarray, *, include_end: bool = False) -> np.ndarray:
        """Nearest grid tick (ties to the earlier one, as ``np.argmin``). Onsets use ticks
        [0, 12 B); offsets (``include_end``) may also land on the extrapolated beat 12 B, so a note
        ending on the last beat keeps its full length (the official grid stops one tick short)."""
        grid = self.tick_times if include_end else self.tick_times[:-1]
        s = np.asarray(seconds, dtype=np.float64)
        right = np.clip(np.searchsorted(grid, s), 1, len(grid) - 1)
        left = right - 1
        take_left = np.abs(s - grid[left]) <= np.abs(grid[right] - s)
        return np.where(take_left, left, right)

    def quantize(
        self,
        onsets: np.ndarray,
        offsets: np.ndarray,
        pitches: np.ndarray,
        velocities: np.ndarray,
        instruments: np.ndarray,
        *,
        pitch_filter: bool = True,
        drop_zero_length: bool = False,
        snapped_onsets: bool = False,
    ) -> NoteTable:
        """Notes (seconds, MIDI pitch, MIDI velocity, instrument id) -> sorted NoteTable.

        ``pitches`` are the values to store (drums already at 128 + pitch); the pitch filter
        6 <= p < 122 applies to the sounding pitch (p - 128 for drums). Notes before the first
        downbeat are dropped. ``snapped_onsets`` stores the grid time instead of the raw onset
        and reads the tempo there (PIAST chord notes do this). ``drop_zero_length`` drops notes of
        0 ticks (PIAST chords).
        """
        onsets = np.asarray(onsets, dtype=np.float64)
        offsets = np.asarray(offsets, dtype=np.float64)
        pitches = np.asarray(pitches, dtype=np.int64)
        instruments = np.asarray(instruments, dtype=np.int64)
        keep = np.ones(len(onsets), dtype=bool)
        if pitch_filter:
            sounding = np.where(instruments == DRUM_INSTRUMENT, pitches - 128, pitches)
            keep &= (sounding >= MIN_PITCH) & (sounding < MAX_PITCH)
        start = self.snap(onsets)
        end = self.snap(offsets, include_end=True)
        dur = np.maximum(end - start, 0)
        if drop_zero_length:
            keep &= dur > 0
        beat = start // TICKS_PER_BEAT
        bar = self.beat_bar[beat]
        keep &= bar >= 0
        pos = (self.beat_in_bar[beat] - 1) * TICKS_PER_BEAT + start % TICKS_PER_BEAT
        times = self.tick_times[start] if snapped_onsets else onsets
        events = np.stack(
            [
                bar,
                pos,
                instruments,
                pitches,
                duration_code(dur),
                velocity_code(velocities),
                _BEATS_TS_CODE[self.beat_ts[beat]],
                tempo_code(self.tempo.qpm_at_seconds(times)),
            ],
            axis=1,
        )
        return NoteTable(events[keep], times[keep]).sorted()


@dataclass(frozen=True)
class Song:
    """One piece: arrangement and lead-sheet note tables plus downbeat times (SPEC 6.1 ``.npz``).

    ``downbeat_times[k]`` is the time of bar k. Either table may be empty (a lead sheet read for
    inference has no arrangement).
    """

    name: str
    arrangement: NoteTable
    leadsheet: NoteTable
    downbeat_times: np.ndarray

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """The official per-song ``.npz`` layout (SPEC 6.1)."""
        return {
            "note_times": self.arrangement.onsets,
            "note_events": self.arrangement.events,
            "leadsheet_times": self.leadsheet.onsets,
            "leadsheet_events": self.leadsheet.events,
            "downbeat_times": self.downbeat_times,
        }

    @classmethod
    def from_npz_dict(cls, name: str, data: dict[str, np.ndarray]) -> Song:
        return cls(
            name=name,
            arrangement=NoteTable(data["note_events"], data["note_times"]).sorted(),
            leadsheet=NoteTable(data["leadsheet_events"], data["leadsheet_times"]).sorted(),
            downbeat_times=np.asarray(data["downbeat_times"], dtype=np.float64),
        )


# --- from MIDI ----------------------------------------------------------------------------------
def midi_grid(score: symusic.Score, *, ignore_time_signatures: bool = False) -> BeatGrid:
    """pretty_midi beats and downbeats of ``score`` (SPEC 11.3). ``ignore_time_signatures`` builds
    the 4/4 grid PIAST uses (time signatures removed before the beats are computed)."""
    tempo = midi_io.TempoMap.from_score(score)
    ts = [] if ignore_time_signatures else midi_io.time_signature_changes(score)
    end = midi_io.end_tick(score)
    beats = midi_io.pretty_midi_beats(tempo.tpq, ts, end)
    if len(beats) < 2:  # a piece shorter than one beat still needs an interval to extrapolate
        beats = np.array([0.0, float(tempo.tpq)])
    flags = midi_io.pretty_midi_downbeats(beats, ts)
    return BeatGrid(tempo.to_seconds(beats), flags, tempo)


def track_notes(score: symusic.Score, track: symusic.core.TrackTick, tempo: midi_io.TempoMap):
    """(onsets s, offsets s, pitch, velocity) arrays of one track."""
    arr = track.notes.numpy()
    start = arr["time"].astype(np.float64)
    end = start + arr["duration"].astype(np.float64)
    return (
        tempo.to_seconds(start),
        tempo.to_seconds(end),
        arr["pitch"].astype(np.int64),
        arr["velocity"].astype(np.int64),
    )


def arrangement_from_score(
    score: symusic.Score, grid: BeatGrid | None = None
) -> tuple[NoteTable, BeatGrid]:
    """Every track of ``score`` -> NoteTable with the tracks' programs (128 and 128 + pitch for
    drums), as the POP909 arrangement extraction (SPEC 6.2)."""
    grid = grid or midi_grid(score)
    parts = [NoteTable()]
    for track in score.tracks:
        if not len(track.notes):
            continue
        on, off, pitch, vel = track_notes(score, track, grid.tempo)
        inst = DRUM_INSTRUMENT if track.is_drum else int(track.program)
        if track.is_drum:
            pitch = pitch + 128
        parts.append(grid.quantize(on, off, pitch, vel, np.full(len(on), inst)))
    table = parts[0]
    for p in parts[1:]:
        table = table.concat(p)
    return table.sorted(), grid


def read_arrangement(path: str | os.PathLike) -> Song:
    """A MIDI file as an arrangement (all tracks), with its pretty_midi downbeats."""
    score = midi_io.load_midi(path)
    table, grid = arrangement_from_score(score)
    if len(table) == 0:
        raise MidiError(f"{path}: no note lies on or after the first downbeat in the pitch range")
    return Song(str(path), table, NoteTable(), grid.downbeat_times)


# --- back to MIDI -------------------------------------------------------------------------------
def events_to_score(events: np.ndarray, *, tpq: int = 480) -> symusic.Score:
    """Octuple rows -> symusic Score (the official ``encoding_to_MIDI``): a bar's time signature
    is the most common one among its notes (empty bars repeat the previous, 4/4 at the start); a
    bar lasts ``numerator`` quarter notes; the tempo at a grid position is the rounded mean of its
    notes' codes, carried forward (120 bpm at the start); velocity 4 code + 2; a 0-tick note lasts 1
    MIDI tick; one track per instrument (128 = drums, pitch - 128)."""
    events = np.asarray(events, dtype=np.int64).reshape(-1, 8)
    score = symusic.Score(tpq)
    if len(events) == 0:
        return score
    scale = tpq // TICKS_PER_BEAT if tpq % TICKS_PER_BEAT == 0 else None
    if scale is None:
        raise ValueError(f"tpq must be a multiple of {TICKS_PER_BEAT}")
    n_bars = int(events[:, BAR].max()) + 1
    bar_ts = [None] * n_bars
    for b in range(n_bars):
        codes = events[events[:, BAR] == b, TIME_SIGNATURE]
        if len(codes):
            values, counts = np.unique(codes, return_counts=True)
            bar_ts[b] = int(values[np.argmax(counts)])
        else:
            bar_ts[b] = time_signature_code(4, 4) if b == 0 else bar_ts[b - 1]
    bar_len = np.array([time_signature_of(c)[0] * TICKS_PER_BEAT for c in bar_ts])
    bar_start = np.concatenate([[0], np.cumsum(bar_len)[:-1]])
    onset = bar_start[events[:, BAR]] + events[:, POSITION]

    # tempo: mean code of the notes at each grid position, carried forward
    tempo_events = []
    current = None
    order = np.argsort(onset, kind="stable")
    positions, first = np.unique(onset[order], return_index=True)
    groups = np.split(events[order, TEMPO], first[1:])
    if positions[0] != 0:
        current = int(tempo_code(120.0))
        tempo_events.append((0, current))
    for pos, codes in zip(positions, groups, strict=True):
        code = int(round(float(codes.mean())))
        if code != current:
            tempo_events.append((int(pos), code))
            current = code
    for pos, code in tempo_events:
        score.tempos.append(symusic.Tempo(time=int(pos) * scale, qpm=float(tempo_qpm(code))))
    current_ts = None
    for b, code in enumerate(bar_ts):
        if code != current_ts:
            num, den = time_signature_of(code)
            score.time_signatures.append(
                symusic.TimeSignature(
                    time=int(bar_start[b]) * scale, numerator=num, denominator=den
                )
            )
            current_ts = code

    for inst in np.unique(events[:, INSTRUMENT]):
        rows = events[:, INSTRUMENT] == inst
        drum = int(inst) == DRUM_INSTRUMENT
        track = symusic.Track(
            name="drums" if drum else f"program {int(inst)}",
            program=0 if drum else int(inst),
            is_drum=drum,
        )
        pitch = events[rows, PITCH] - (128 if drum else 0)
        dur = np.maximum(duration_ticks(events[rows, DURATION]) * scale, 1)
        vel = np.clip(velocity_value(events[rows, VELOCITY]), 1, 127)
        for t, d, p, v in zip(onset[rows] * scale, dur, pitch, vel, strict=True):
            if 0 <= p <= 127:
                track.notes.append(
                    symusic.Note(time=int(t), duration=int(d), pitch=int(p), velocity=int(v))
                )
        if len(track.notes):
            score.tracks.append(track)
    return score
