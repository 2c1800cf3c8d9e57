"""Inspect what the models see of a MIDI file.

    python -m bossa_jax.symbolic tokens FILE --codec remi|octuple [--leadsheet] [--bars A:B]
                                        [--json]
    python -m bossa_jax.symbolic segments FILE [--leadsheet LS.mid] [--audio WAV] [--json]

``tokens`` prints the tokens bar by bar. FILE is read as an arrangement (every track), or with
``--leadsheet`` as a lead sheet (first track melody, others chords; tempo/velocity redacted as the
models get them). ``--bars A:B`` keeps bars A..B-1. ``--json`` prints one object
``{"ids": [...], "tokens": [...]}`` with the framing the models get: REMI lead sheet = the inference
prompt ``</s> attributes <sep> ... <sep>``, REMI arrangement = tokens + ``</s>``; octuple lead
sheet = its octuples without SOS/EOS (velocity/tempo ``<unk>``), octuple arrangement = 8x``<s>``
... 8x``</s>``; octuple bars count from the first selected bar.

``segments`` lists the 4-bar training windows of FILE (a MIDI file: arrangement = every track, lead
sheet = FILE's own first track + chords unless ``--leadsheet`` names another file; or a POP909 song
folder) with bar ranges, note counts and audio clip frames. ``--audio`` clamps the clips into that
file (its length from ``soundfile.info``; 50 code frames per second).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bossa_jax.audio import FRAME_RATE, check_audio
from bossa_jax.cli import ArgumentParser
from bossa_jax.errors import ConfigError, run_cli
from bossa_jax.symbolic import octuple, remi
from bossa_jax.symbolic.leadsheet import leadsheet_from_score, read_leadsheet, read_pop909
from bossa_jax.symbolic.midi import load_midi
from bossa_jax.symbolic.notes import (
    BAR,
    FIELD_NAMES,
    NoteTable,
    Song,
    arrangement_from_score,
    read_arrangement,
)
from bossa_jax.symbolic.segment import segment_song


def _parse_bars(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError as err:
        raise ConfigError(f"--bars {text!r}: expected A:B with integers") from err
    if b <= a or a < 0:
        raise ConfigError(f"--bars {text!r}: need 0 <= A < B")
    return a, b


def _tokens(args: argparse.Namespace) -> int:
    song = read_leadsheet(args.file) if args.leadsheet else read_arrangement(args.file)
    table = song.leadsheet if args.leadsheet else song.arrangement
    bars = _parse_bars(args.bars)
    if bars is not None:
        table = table.bars(*bars)
        if len(table) == 0:
            raise ConfigError(f"{args.file}: no notes in bars {args.bars}")
    if args.codec == "remi":
        ids = remi.encode(table, redact=args.leadsheet)
        framed = remi.prompt(table) if args.leadsheet else np.append(ids, remi.EOS)
        if args.json:
            print(json.dumps({"ids": framed.tolist(), "tokens": remi.to_strings(framed)}))
            return 0
        _print_remi_bars(ids, int(table.events[0, BAR]), table)
    else:
        offset = -int(table.events[0, BAR])
        if args.leadsheet:
            framed = octuple.note_ids(table, offset)
            framed[:, 5] = octuple.UNK
            framed[:, 7] = octuple.UNK
            framed = framed.reshape(-1)
        else:
            framed = octuple.encode(table, offset)
        if args.json:
            print(json.dumps({"ids": framed.tolist(), "tokens": octuple.tokens_to_strings(framed)}))
            return 0
        _print_octuple_bars(framed)
    return 0


def _print_remi_bars(ids: np.ndarray, first_bar: int, table: NoteTable) -> None:
    bar_numbers = np.unique(table.events[:, BAR])  # REMI drops empty bars
    tokens = remi.to_strings(ids)
    current: list[str] = []
    k = 0
    for tok in tokens:
        current.append(tok)
        if tok == "b-1":
            label = int(bar_numbers[k]) if k < len(bar_numbers) else first_bar + k
            print(f"bar {label}: {' '.join(current)}")
            current, k = [], k + 1
    if current:
        print(f"(unterminated): {' '.join(current)}")


def _print_octuple_bars(ids: np.ndarray) -> None:
    rows = ids.reshape(-1, 8)
    header = "  ".join(f"{n:>8}" for n in FIELD_NAMES)
    print(f"{'':>8}  {header}")
    last_bar = None
    for row in rows:
        strings = octuple.tokens_to_strings(row)
        bar = strings[0]
        if bar != last_bar and bar.startswith("<0-"):
            print(f"bar {bar[3:-1]}:")
            last_bar = bar
        print(f"{'':>8}  " + "  ".join(f"{s:>8}" for s in strings))


def _audio_frames(path: str) -> int:
    """Code frames of the audio, which passes the features command's rule (audio.check_audio)."""
    return math.ceil(check_audio(path) * FRAME_RATE)


def _segments(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.is_dir():
        song = read_pop909(path)
    else:
        score = load_midi(path)
        arrangement, grid = arrangement_from_score(score)
        ls_song = read_leadsheet(args.leadsheet) if args.leadsheet else None
        if ls_song is None:
            ls_song = leadsheet_from_score(score, str(path))
        song = Song(path.stem, arrangement, ls_song.leadsheet, grid.downbeat_times)
    n_frames = _audio_frames(args.audio) if args.audio else None
    windows = segment_song(song, n_frames)
    if args.json:
        out = [
            {
                "bars": list(w.bar_range),
                "downbeat_index": w.downbeat_index,
                "time": [w.t_start, w.t_end],
                "arrangement_notes": len(w.arrangement),
                "leadsheet_notes": len(w.leadsheet),
                "clip_frames": [w.clip_start, w.clip_start + w.clip_frames],
            }
            for w in windows
        ]
        print(json.dumps(out))
        return 0
    print(f"{song.name}: {len(song.downbeat_times)} downbeats, {len(windows)} windows")
    for i, w in enumerate(windows):
        a, b = w.bar_range
        s0, s1 = w.clip_start, w.clip_start + w.clip_frames
        print(
            f"{i:4d}  bars {a}-{b - 1}  {w.t_start:8.2f}-{w.t_end:8.2f} s  "
            f"arrangement {len(w.arrangement):4d}  lead sheet {len(w.leadsheet):4d}  "
            f"clip frames {s0}-{s1} ({s0 / FRAME_RATE:.2f}-{s1 / FRAME_RATE:.2f} s)"
        )
    return 0


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m bossa_jax.symbolic", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    tok = sub.add_parser("tokens", help="print a MIDI file's tokens")
    tok.add_argument("file")
    tok.add_argument("--codec", choices=("remi", "octuple"), required=True)
    tok.add_argument("--leadsheet", action="store_true", help="read FILE as a lead sheet")
    tok.add_argument("--bars", help="A:B, bars A to B-1")
    tok.add_argument("--json", action="store_true")
    seg = sub.add_parser("segments", help="list the 4-bar windows of a MIDI file")
    seg.add_argument("file")
    seg.add_argument("--leadsheet", help="lead-sheet MIDI (default: FILE's own tracks)")
    seg.add_argument("--audio", help="audio file the clips are cut from")
    seg.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv))
    return _tokens(args) if args.command == "tokens" else _segments(args)


if __name__ == "__main__":
    run_cli(main)
