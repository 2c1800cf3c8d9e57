"""MIDI files in and out (DESIGN "symbolic/"; SPEC 6.2, 8.2, 11.3).

symusic parses and writes the files. This module adds what the rest of ``symbolic`` needs on top:

* :func:`load_midi` turns every way a file can be unusable (missing, zero bytes, not MIDI,
  truncated, no notes) into one :class:`~bossa_jax.errors.MidiError` line that names the file.
* :class:`TempoMap` converts ticks to seconds the way pretty_midi does (only the tempo events count,
  120 bpm until the first one, float64 throughout).
* :func:`pretty_midi_beats` / :func:`pretty_midi_downbeats` reproduce pretty_midi ``get_beats`` /
  ``get_downbeats`` (SPEC 11.3), computed on ticks so they are exact, then mapped to seconds.
* :func:`write_midi` writes atomically (``bossa_jax.outputs.atomic_output``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic

from bossa_jax.errors import MidiError, one_line
from bossa_jax.outputs import atomic_output

DEFAULT_QPM = 120.0
_MIDI_MAGIC = b"MThd"
_TICK_EPS = 1e-6


def load_midi(path: str | os.PathLike, *, require_notes: bool = True) -> symusic.Score:
    """Reads a standard MIDI file (type 0/1, any resolution) into a tick-based symusic Score.

    Raises MidiError (one line naming ``path``) for a missing, empty, non-MIDI, corrupt or truncated
    file, and, when ``require_notes``, for a file without a single note.
    """
    p = Path(path)
    if not p.is_file():
        raise MidiError(f"{p}: no such MIDI file")
    size = p.stat().st_size
    if size == 0:
        raise MidiError(f"{p}: the file is empty (0 bytes), not a MIDI file")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != _MIDI_MAGIC:
        raise MidiError(f"{p}: not a standard MIDI file (it does not start with 'MThd')")
    try:
        score = symusic.Score.from_file(str(p))
    except (RuntimeError, ValueError) as err:  # symusic's parser errors, with its internals
        detail = one_line(str(err)).replace("MiniMidi: ", "").replace(": iostream error", "")
        raise MidiError(f"{p}: corrupt or truncated MIDI file ({detail})") from err
    if require_notes and score.note_num() == 0:
        raise MidiError(f"{p}: the MIDI file contains no notes")
    return score


def write_midi(score: symusic.Score, path: str | os.PathLike) -> Path:
    """Writes ``score`` to ``path`` atomically (never a half-written file); returns the path."""
    final = Path(path)
    with atomic_output(final) as tmp:
        score.dump_midi(str(tmp))
    return final


@dataclass(frozen=True)
class TempoMap:
    """Piecewise-constant tempo: ``ticks[i]`` (ascending, ``ticks[0] == 0``) starts ``qpm[i]``.

    ``seconds[i]`` is the time of ``ticks[i]``. Tick positions may be fractional.
    """

    tpq: int
    ticks: np.ndarray
    qpm: np.ndarray
    seconds: np.ndarray

    @classmethod
    def from_score(cls, score: symusic.Score) -> TempoMap:
        """pretty_midi semantics: 120 bpm until the first tempo event, the last event at a tick
        wins, repeated identical tempos are merged."""
        ticks = [0.0]
        qpms = [DEFAULT_QPM]
        for tempo in sorted(score.tempos, key=lambda t: t.time):
            qpm = 6e7 / tempo.mspq if tempo.mspq > 0 else DEFAULT_QPM
            if tempo.time == ticks[-1]:
                qpms[-1] = qpm
            elif qpm != qpms[-1]:
                ticks.append(float(tempo.time))
                qpms.append(qpm)
        return cls.build(int(score.ticks_per_quarter), np.array(ticks), np.array(qpms))

    @classmethod
    def build(cls, tpq: int, ticks: np.ndarray, qpm: np.ndarray) -> TempoMap:
        ticks = np.asarray(ticks, dtype=np.float64)
        qpm = np.asarray(qpm, dtype=np.float64)
        sec_per_tick = 60.0 / (qpm * tpq)
        seconds = np.concatenate([[0.0], np.cumsum(np.diff(ticks) * sec_per_tick[:-1])])
        return cls(tpq=tpq, ticks=ticks, qpm=qpm, seconds=seconds)

    def to_seconds(self, ticks: np.ndarray | float) -> np.ndarray:
        t = np.asarray(ticks, dtype=np.float64)
        i = np.clip(np.searchsorted(self.ticks, t, side="right") - 1, 0, len(self.ticks) - 1)
        return self.seconds[i] + (t - self.ticks[i]) * 60.0 / (self.qpm[i] * self.tpq)

    def to_ticks(self, seconds: np.ndarray | float) -> np.ndarray:
        s = np.asarray(seconds, dtype=np.float64)
        i = np.clip(np.searchsorted(self.seconds, s, side="right") - 1, 0, len(self.seconds) - 1)
        return self.ticks[i] + (s - self.seconds[i]) * self.qpm[i] * self.tpq / 60.0

    def qpm_at_seconds(self, seconds: np.ndarray) -> np.ndarray:
        """Tempo in force at each time (the last change at or before it), as pretty_midi's
        ``get_tempo_changes`` lookup in the official extraction scripts."""
        s = np.asarray(seconds, dtype=np.float64)
        i = np.clip(np.searchsorted(self.seconds, s, side="right") - 1, 0, len(self.seconds) - 1)
        return self.qpm[i]


def time_signature_changes(score: symusic.Score) -> list[tuple[int, int, int]]:
    """(tick, numerator, denominator) sorted by tick; the last event at a tick wins."""
    out: dict[int, tuple[int, int, int]] = {}
    for ts in sorted(score.time_signatures, key=lambda t: t.time):
        if ts.numerator > 0 and ts.denominator > 0:
            out[int(ts.time)] = (int(ts.time), int(ts.numerator), int(ts.denominator))
    return [out[k] for k in sorted(out)]


def end_tick(score: symusic.Score) -> int:
    """pretty_midi ``get_end_time`` on ticks: note ends, controls, pitch bends, meta events."""
    ends = [0]
    for track in score.tracks:
        if len(track.notes):
            arr = track.notes.numpy()
            ends.append(int((arr["time"] + arr["duration"]).max()))
        for events in (track.controls, track.pitch_bends, track.lyrics):
            if len(events):
                ends.append(int(max(e.time for e in events)))
    for events in (score.time_signatures, score.key_signatures, score.tempos):
        if len(events):
            ends.append(int(max(e.time for e in events)))
    return max(ends)


def _beat_length(tpq: int, numerator: int, denominator: int) -> float:
    """Ticks per pretty_midi beat (``qpm_to_bpm``): the denominator note, a dotted one in compound
    meters (numerator a multiple of 3 other than 3); quarter notes for unusual denominators."""
    if denominator in (1, 2, 4, 8, 16, 32):
        factor = 3.0 if (numerator % 3 == 0 and numerator != 3) else 1.0
        return tpq * 4.0 / denominator * factor
    return float(tpq)


def pretty_midi_beats(tpq: int, ts_changes: list[tuple[int, int, int]], end: float) -> np.ndarray:
    """Beat positions in (float) ticks, exactly pretty_midi ``get_beats(start_time=0)``.

    Beats start at 0 and advance by the beat length of the current time signature (the first one's
    before it starts); a beat that would pass a time-signature change lands on it instead. Beats at
    or after ``end`` are not returned (except beat 0).
    """
    beats = [0.0]
    ts_idx = 0

    def length() -> float:
        if not ts_changes:
            return float(tpq)
        _, num, den = ts_changes[ts_idx]
        return _beat_length(tpq, num, den)

    while beats[-1] < end:
        nxt = beats[-1] + length()
        if ts_changes and ts_idx == 0:
            first = ts_changes[0][0]
            if first > beats[-1] and nxt >= first - _TICK_EPS:
                nxt = float(first)
        if ts_idx < len(ts_changes) - 1:
            next_ts = ts_changes[ts_idx + 1][0]
            if nxt >= next_ts - _TICK_EPS:
                nxt = float(next_ts)
                ts_idx += 1
        beats.append(nxt)
    return np.array(beats[:-1] if len(beats) > 1 else beats, dtype=np.float64)


def pretty_midi_downbeats(beats: np.ndarray, ts_changes: list[tuple[int, int, int]]) -> np.ndarray:
    """Boolean flags over ``beats``: pretty_midi ``get_downbeats`` (4/4 assumed before the first
    time signature; every numerator-th beat, every numerator/3-th in compound meters)."""
    changes = list(ts_changes)
    if not changes or changes[0][0] > 0:
        changes.insert(0, (0, 4, 4))

    def index(tick: float, default: int) -> int:
        hit = np.flatnonzero(np.abs(beats - tick) <= _TICK_EPS)
        return int(hit[0]) if hit.size else default

    def step(num: int) -> int:
        return num // 3 if (num % 3 == 0 and num != 3) else num

    flags = np.zeros(len(beats), dtype=bool)
    end_idx = 0
    for (t0, num, _), (t1, _, _) in zip(changes[:-1], changes[1:], strict=True):
        start_idx = index(t0, 0)
        end_idx = index(t1, start_idx)
        flags[start_idx : end_idx : step(num)] = True
    t_last, num_last, _ = changes[-1]
    start_idx = index(t_last, end_idx)
    flags[start_idx :: step(num_last)] = True
    return flags
