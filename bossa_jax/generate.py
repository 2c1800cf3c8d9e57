"""``generate.py``: lead sheet + reference recording -> piano arrangement (issue 10 items 3-4).

One song::

    python generate.py --leadsheet LS --audio REF --out DIR [--checkpoint DIR] [--config FILE]
        [--bars A:B] [--top-k K] [--temperature T] [--top-p P] [--seed N] [--pedal]
        [--no-render] [--soundfont SF2] [--overwrite] [--no-progress] [key=value ...]

writes ``DIR/arrangement.mid``, and unless ``--no-render`` ``arrangement.wav`` (FluidSynth, a
General MIDI piano: :func:`bossa_jax.render.render_wav`) and ``arrangement.png`` (piano roll with
the lead-sheet melody overlaid: :func:`bossa_jax.render.piano_roll_png`), plus ``config.yaml``
(the resolved config), and prints one summary line (bars, notes, seconds, tokens/s).

Many songs (``--manifest FILE`` instead of ``--leadsheet/--audio/--bars``): a JSONL file, one song a
line, ``{"leadsheet": ..., "audio": ..., "id": ..., "bars": "A:B" or [A, B]}`` (``id`` and
``bars`` optional; relative paths are relative to the manifest's folder; ``id`` defaults to the
lead sheet's file stem). All songs are arranged together (the k-th windows of every song share one
sampler call, :class:`bossa_jax.arrange.Arranger`); ``DIR/<id>/`` holds each song's files,
``DIR/summary.json`` and the printed table say how each song went.

Lead sheets: MIDI, MusicXML or ABC
(:func:`bossa_jax.symbolic.leadsheet_formats.read_any_leadsheet`). Reference audio: any format
:mod:`bossa_jax.audio` reads. The model: a stage-2 checkpoint folder (``--checkpoint``, default
the shipped demo model ``bossa_jax/assets/demo_model``) and the config it runs with
(``--config``, else the checkpoint's ``run_config.yaml``); ``--top-k`` / ``--temperature`` /
``--top-p`` / ``--pedal`` set ``arrange.top_k`` / ``temperature`` / ``top_p`` / ``pedal``.

Errors (DESIGN "Errors and output files"): every bad input (a missing, empty, corrupt or non-MIDI
lead sheet, one with no notes or only drums, no melody or no chord symbols; missing, corrupt,
silent or too short audio; a missing folder or one that is not a stage-2 checkpoint, or of the
wrong shape; ``--bars`` outside the piece; a malformed flag) is one line naming the file or flag,
exit status 2, and nothing in the output folder. The output folder is checked before any work and
written atomically (``bossa_jax.outputs``): a crash or Ctrl-C leaves no half-written file, and a
previous arrangement is replaced only with ``--overwrite``.

Batch mode: a manifest that cannot be read (not JSON lines, a line without ``leadsheet`` or
``audio``, an unknown key, a bad ``bars`` or ``id``, a repeated ``id``) is an error before any
work. A song whose files are bad is reported (its line, the one-line reason), skipped, and the
others are arranged; the exit status is then 1 (0 when every song was arranged; 2 and no output
when none could be).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bossa_jax import assets
from bossa_jax.cli import ArgumentParser, UsageError, add_output_options, setup_logging
from bossa_jax.errors import BossaError, CheckpointError, DataError, one_line
from bossa_jax.outputs import atomic_output, check_output

DEFAULT_LEADSHEET = assets.DEMO_LEADSHEET
DEFAULT_AUDIO = assets.DEMO_STYLE
DEFAULT_CHECKPOINT = assets.ASSETS_DIR / "demo_model"
DEFAULT_OUT = "out"
OUTPUT_KIND = "arrangement"
BATCH_KIND = "arrangement batch"
MIDI_NAME, WAV_NAME, PNG_NAME = "arrangement.mid", "arrangement.wav", "arrangement.png"
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
EXIT_SOME_FAILED = 1
MANIFEST_KEYS = ("id", "leadsheet", "audio", "bars")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass
class Job:
    """One song of the run: where it came from (``where``: a flag or ``manifest:line``)."""

    id: str
    leadsheet: Path
    audio: Path
    bars: tuple[int, int] | None
    where: str
    song: object = None  # the lead sheet read (bossa_jax.symbolic.notes.Song)
    error: str | None = None
    result: object = None  # its bossa_jax.arrange.Arrangement


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="generate.py",
        description="Arrange a lead sheet for piano in the style of a reference recording.",
    )
    song = parser.add_argument_group("one song")
    song.add_argument(
        "--leadsheet",
        help=f"lead sheet: MIDI, MusicXML (.musicxml/.mxl) or ABC (default: {DEFAULT_LEADSHEET})",
    )
    song.add_argument("--audio", help=f"reference recording (default: {DEFAULT_AUDIO})")
    song.add_argument("--bars", help="A:B: arrange bars A (included) to B (excluded) only")
    parser.add_argument(
        "--manifest", help="JSONL, one song a line: leadsheet, audio, optional id and bars"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--checkpoint",
        default=str(DEFAULT_CHECKPOINT),
        help="stage-2 checkpoint folder (default: the demo model, %(default)s)",
    )
    parser.add_argument(
        "--config", help="config to run the checkpoint with (default: its run_config.yaml)"
    )
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (config: 15)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (config: 1.0)")
    parser.add_argument("--top-p", type=float, help="nucleus filter in (0, 1] (config: 1.0, off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--pedal", action="store_true", help="add the rule-based sustain pedal (SPEC 8.2)"
    )
    parser.add_argument(
        "--no-render", action="store_true", help="write the MIDI only (no WAV, no piano roll)"
    )
    parser.add_argument("--soundfont", help="General MIDI .sf2 for the WAV (default: found)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_output_options(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


# --- arguments ----------------------------------------------------------------------------------
def parse_bars(text: object, where: str) -> tuple[int, int]:
    """``"A:B"`` (or ``[A, B]``) -> (A, B) with 0 <= A < B; else an error naming ``where``."""
    if isinstance(text, list | tuple) and len(text) == 2:
        text = f"{text[0]}:{text[1]}"
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text)) if isinstance(text, str) else None
    if match is None or int(match[1]) >= int(match[2]):
        raise UsageError(f"{where}: bars must be A:B with 0 <= A < B, got {text!r}")
    return int(match[1]), int(match[2])


def _check_numbers(args) -> None:
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.temperature is not None and not (
        math.isfinite(args.temperature) and args.temperature > 0
    ):
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


def _flag_overrides(args) -> list[str]:
    out = [f"arrange.{key}={value}" for key, value in (
        ("top_k", args.top_k), ("temperature", args.temperature), ("top_p", args.top_p),
    ) if value is not None]  # fmt: skip
    if args.pedal:
        out.append("arrange.pedal=true")
    return out


def single_job(args) -> Job:
    leadsheet = Path(args.leadsheet or DEFAULT_LEADSHEET)
    bars = parse_bars(args.bars, "--bars") if args.bars is not None else None
    return Job(leadsheet.stem, leadsheet, Path(args.audio or DEFAULT_AUDIO), bars, "--leadsheet")


def read_manifest(path: str | os.PathLike) -> list[Job]:
    """The songs of a JSONL manifest (see the module docstring); a malformed manifest is one
    error naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file (--manifest)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the manifest as UTF-8 text ({err})") from err
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not a JSON object ({err.msg})") from err
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a JSON object with leadsheet and audio")
        unknown = sorted(set(entry) - set(MANIFEST_KEYS))
        if unknown:
            raise DataError(
                f"{where}: unknown key {unknown[0]!r} (a line has {', '.join(MANIFEST_KEYS)})"
            )
        for key in ("leadsheet", "audio"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"{where}: '{key}' must be a file path")
        leadsheet, reference = (path.parent / entry[k] for k in ("leadsheet", "audio"))
        song_id = entry.get("id", leadsheet.stem)
        if not isinstance(song_id, str) or not _SAFE_ID.fullmatch(song_id):
            raise DataError(
                f"{where}: id {song_id!r} must be a folder name of letters, digits, '.', '_', '-'"
            )
        if song_id in seen:
            raise DataError(f"{where}: id {song_id!r} is used by {seen[song_id]} too; give an id")
        seen[song_id] = where
        bars = parse_bars(entry["bars"], f"{where} bars") if "bars" in entry else None
        jobs.append(Job(song_id, leadsheet, reference, bars, where))
    if not jobs:
        raise DataError(f"{path}: the manifest lists no song")
    return jobs


# --- checks before the model --------------------------------------------------------------------
def check_job(job: Job, config, bars_flag: str) -> None:
    """Reads the lead sheet and checks the bars and the audio; raises the one-line error."""
    from bossa_jax import audio
    from bossa_jax.arrange import leadsheet_bars
    from bossa_jax.symbolic.leadsheet_formats import read_any_leadsheet

    song = read_any_leadsheet(job.leadsheet)
    if job.bars is not None:
        first, last = job.bars
        available = max(leadsheet_bars(song), len(song.downbeat_times))
        if last > available:
            raise DataError(
                f"{bars_flag} {first}:{last}: outside the piece, {job.leadsheet} has {available} "
                f"bars (give A:B with 0 <= A < B <= {available})"
            )
        if len(song.leadsheet.bars(first, last)) == 0:
            raise DataError(f"{bars_flag} {first}:{last}: {job.leadsheet} has no note in them")
    audio.check_audio(
        job.audio,
        sample_rate=config.encodec.sampling_rate,
        clip_frames=config.audio.clip_frames,
    )
    job.song = song


def resolve_config(checkpoint: Path, config_file: str | None, overrides: Sequence[str]):
    """The config to run ``checkpoint`` with: ``--config``, else its run_config.yaml, else the
    defaults with its model sections; then the overrides."""
    from bossa_jax.arrange import read_run_config
    from bossa_jax.config import apply_overrides, load_config

    if not checkpoint.is_dir():
        raise CheckpointError(
            f"{checkpoint}: no stage-2 checkpoint there (--checkpoint); convert the official one "
            "(python -m convert.bossa bossa_stage2.pt DIR --stage 2) or train the demo model "
            "(python train.py mini), then pass --checkpoint DIR"
        )
    if config_file is not None:
        return load_config(config_file, overrides)
    return apply_overrides(read_run_config(checkpoint), overrides)


# --- outputs ------------------------------------------------------------------------------------
def _piece_leadsheet(job: Job, bars: int):
    """The lead-sheet notes of the arranged bars, renumbered from bar 0 (the piano roll's grid)."""
    from bossa_jax.symbolic.notes import BAR

    first = job.bars[0] if job.bars else 0
    table = job.song.leadsheet.bars(first, first + bars)
    events = table.events.copy()
    events[:, BAR] -= first
    return table.with_events(events)


def write_song(folder: Path, job: Job, *, render: bool, soundfont) -> list[str]:
    """Writes one song's files into ``folder`` (created); returns their names."""
    from bossa_jax import render as rendering

    folder.mkdir(parents=True, exist_ok=True)
    arrangement = job.result
    arrangement.score.dump_midi(str(folder / MIDI_NAME))
    names = [MIDI_NAME]
    if render:
        rendering.render_wav(arrangement.score, folder / WAV_NAME, soundfont)
        rendering.piano_roll_png(
            arrangement.score,
            _piece_leadsheet(job, arrangement.bars),
            folder / PNG_NAME,
            title=f"{job.id}: arrangement (blue) and lead-sheet melody (red)",
        )
        names += [WAV_NAME, PNG_NAME]
    return names


def _rate(job: Job) -> float:
    a = job.result
    return a.generated_tokens / a.seconds if a.seconds > 0 else 0.0


def summary_line(job: Job, where: Path) -> str:
    a = job.result
    return (
        f"{where}: {a.bars} bars, {a.notes} notes, {a.seconds:.1f} s, {_rate(job):.1f} tokens/s "
        f"({a.generated_tokens} tokens sampled)"
    )


def summary_table(jobs: Sequence[Job]) -> str:
    rows = [("id", "status", "bars", "notes", "seconds", "tokens/s", "detail")]
    for job in jobs:
        if job.result is not None:
            a = job.result
            rows.append(
                (job.id, "ok", str(a.bars), str(a.notes), f"{a.seconds:.1f}", f"{_rate(job):.1f}",
                 f"{job.id}/{MIDI_NAME}")
            )  # fmt: skip
        else:
            rows.append((job.id, "failed", "-", "-", "-", "-", job.error or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def _summary_record(job: Job) -> dict:
    record = {"id": job.id, "leadsheet": str(job.leadsheet), "audio": str(job.audio)}
    if job.bars is not None:
        record["bars"] = list(job.bars)
    if job.result is None:
        return {**record, "status": "failed", "error": job.error}
    a = job.result
    return {
        **record,
        "status": "ok",
        "bars_out": a.bars,
        "notes": a.notes,
        "seconds": round(a.seconds, 3),
        "generated_tokens": a.generated_tokens,
        "tokens_per_second": round(_rate(job), 2),
    }


# --- the command --------------------------------------------------------------------------------
def _progress_bar(disable: bool | None, **kw):
    from tqdm import tqdm

    return tqdm(disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def _skip_or_raise(job: Job, err: BossaError, batch: bool) -> None:
    """One song's failure: the error itself for one song; reported and skipped in a batch."""
    if not batch:
        raise err
    job.error = one_line(str(err))
    print(f"skipped {job.id} ({job.where}): {job.error}", file=sys.stderr)


def _no_song_left(manifest: str, jobs: Sequence[Job]) -> DataError:
    first = next(j for j in jobs if j.error)
    return DataError(f"{manifest}: no song could be arranged (first: {first.error})")


def arrange_jobs(
    arranger, jobs: Sequence[Job], *, manifest: str | None, seed: int, disable: bool | None
) -> None:
    """Prepares every checked song (bad ones skipped in a batch), arranges them together and
    stores each result in its job."""
    from bossa_jax.arrange import SongRequest

    batch = manifest is not None
    prepared, ready = [], []
    for job in jobs:
        if job.error:
            continue
        try:
            prepared.append(arranger.prepare(SongRequest(job.id, job.song, job.audio, job.bars)))
            ready.append(job)
        except BossaError as err:
            _skip_or_raise(job, err, batch)
    if not ready:
        raise _no_song_left(str(manifest), jobs)
    with _progress_bar(disable, desc="windows", unit="window") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        results = arranger(prepared, seed=seed, progress=progress)
    for job, result in zip(ready, results, strict=True):
        job.result = result


def write_outputs(out: Path, jobs: Sequence[Job], config, args, *, batch: bool, soundfont) -> None:
    """The output folder, written atomically: config.yaml, each song's files (in ``<id>/`` in a
    batch) and, in a batch, summary.json."""
    done = [j for j in jobs if j.result is not None]
    kind = BATCH_KIND if batch else OUTPUT_KIND
    with atomic_output(out, kind=kind, overwrite=args.overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(config.to_yaml())
        songs_bar = (True if args.no_progress else None) if batch else True
        with _progress_bar(songs_bar, desc="songs", unit="song", total=len(done)) as bar:
            for job in done:
                folder = tmp / job.id if batch else tmp
                write_song(folder, job, render=not args.no_render, soundfont=soundfont)
                bar.update(1)
        if batch:
            records = [_summary_record(j) for j in jobs]
            (tmp / SUMMARY_NAME).write_text(json.dumps(records, indent=1) + "\n")


def batch_summary(out: Path, jobs: Sequence[Job], elapsed: float) -> str:
    done = [j.result for j in jobs if j.result is not None]
    tokens = sum(a.generated_tokens for a in done)
    return (
        f"{out}: {len(done)} of {len(jobs)} songs arranged, {sum(a.bars for a in done)} bars, "
        f"{sum(a.notes for a in done)} notes, {elapsed:.1f} s, "
        f"{tokens / elapsed if elapsed > 0 else 0.0:.1f} tokens/s"
    )


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    setup_logging()
    batch = args.manifest is not None
    if batch and any(v is not None for v in (args.leadsheet, args.audio, args.bars)):
        raise UsageError(
            "--manifest replaces --leadsheet, --audio and --bars; give one or the other"
        )
    _check_numbers(args)
    jobs = read_manifest(args.manifest) if batch else [single_job(args)]
    checkpoint = Path(args.checkpoint)
    sources = [checkpoint, *(p for j in jobs for p in (j.leadsheet, j.audio))]
    if batch:
        sources.append(Path(args.manifest))
    # everything that can be checked is, before the model is loaded
    out = check_output(
        args.out, BATCH_KIND if batch else OUTPUT_KIND, folder=True,
        overwrite=args.overwrite, sources=sources,
    )  # fmt: skip
    soundfont = None
    if not args.no_render:
        from bossa_jax import render as rendering

        soundfont = rendering.find_soundfont(args.soundfont)
        rendering.fluidsynth_binary()
    config = resolve_config(checkpoint, args.config, [*args.overrides, *_flag_overrides(args)])
    for job in jobs:
        try:
            check_job(job, config, f"{job.where} bars" if batch else "--bars")
        except BossaError as err:
            _skip_or_raise(job, err, batch)
    if all(j.error for j in jobs):
        raise _no_song_left(args.manifest, jobs)

    from bossa_jax.arrange import Arranger

    started = time.perf_counter()
    arranger = Arranger.from_checkpoint(checkpoint, config)
    disable = True if args.no_progress else None
    arrange_jobs(arranger, jobs, manifest=args.manifest, seed=args.seed, disable=disable)
    write_outputs(out, jobs, config, args, batch=batch, soundfont=soundfont)
    if not batch:
        print(summary_line(jobs[0], out / MIDI_NAME))
        return 0
    print(summary_table(jobs))
    print(batch_summary(out, jobs, time.perf_counter() - started))
    return EXIT_SOME_FAILED if any(j.error for j in jobs) else 0
