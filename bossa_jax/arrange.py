"""Windowed arrangement of lead sheets with a reference recording (SPEC 8.1, 8.2, 10.19,
11.11-11.14; issue 10 item 2).

:class:`Arranger` turns songs (:class:`SongRequest`: a lead sheet, a reference audio file, a bar
range) into piano arrangements (:class:`Arrangement`), many songs at once.

**Windows** (SPEC 8.2). A request of N bars is cut into 4-bar windows moving 2 bars at a time:
window w covers bars [2w, min(2w + 4, N)) of the request; a window exists when it has a bar to
sample (w = 0, or 2w + 2 < N), so 16 bars give the notebook's 7 windows. Window w's prompt is
``remi.prompt`` of its lead-sheet bars (exactly as stage-2 training builds a window's lead sheet:
``Song.leadsheet.bars(b0, b0 + 4)`` with the song's own bar numbers, redacted, since REMI writes no
bar numbers) followed by the carry: the previous window's last 2 bars (tokens after its 2nd ``b-1``
through its 4th). Its style prefix is the stage-2 query branch over the audio clip centred on the
window's lead-sheet downbeat span (SPEC 11.14), fed to :class:`bossa_jax.sampling.Sampler` with
``position_start`` 61 (SPEC 4.3).

**Stops** (SPEC 11.12, our default). A window stops at the end of its lead sheet: the sampler's bar
limit is the window's bars minus the complete bars it carries (window 0: its up to 4 bars; later
windows: the 2, or fewer at the piece's end, after the carried ones), and the stopping ``b-1`` is
kept so every bar is complete (SPEC 10.19 fixed). A window that stops early (``</s>``, or
``max_new_tokens``) gets a defined result (SPEC 11.11): an unfinished last bar is closed with
``b-1`` and missing bars are empty (a lone ``b-1``), so later windows and the stitched piece keep
the bar grid. A window whose lead-sheet bars hold no note (the official code fails there, SPEC
11.11) is prompted with the empty lead sheet. With ``arrange.official_overrun`` every window
samples until its 4th ``b-1`` (past its lead sheet) and the last window is kept whole; with
``arrange.official_carry`` the stopping ``b-1`` is dropped and the carry is the official slice
(end index -1 when the window has fewer than four ``b-1``, dropping its last token; no bar
repair).

**Stitching** (SPEC 8.2): every window but the last contributes its first 2 bars (tokens up to and
including its 2nd ``b-1``), the last one all of its bars; by default the piece has exactly the
requested bars. It is decoded with :func:`bossa_jax.symbolic.remi.decode` (velocities kept), each
bar's time signature and tempo taken from the lead sheet, notes cut at the end of the last bar, and
optionally the rule-based sustain pedal (``arrange.pedal``, SPEC 8.2).

**Audio** (SPEC 1.1, 8.2, 11.14). Each reference file is checked
(:func:`bossa_jax.audio.check_audio`), then decoded and resampled ONCE per song. Front end
``musicgen``: the whole file is encoded with EnCodec in fixed chunks, as the codes store does
(:func:`bossa_jax.data.codes.chunked_encoder`), and each window's 508 codes are cut from it (the
official inference encodes the whole file too) and run through MusicGen inside the style prefix
(MusicGen reads a clip, as in training, not the whole file). Front end ``mel``: each
window's log-mel frames are computed from the decoded samples of its clip, which equals the
training feature cache's clip features exactly (frames at a clip's edges see the clip's zero
padding, so slicing a whole-file spectrogram would not). Clips are clamped into the file and a
file shorter than a clip is padded and masked (:func:`bossa_jax.audio.clip_placement`,
:func:`~bossa_jax.audio.pad_codes`, :func:`~bossa_jax.audio.clip_mask`).

**Batching.** The k-th windows of all songs (of each group of ``arrange.songs_per_batch``) go into
one style-prefix call and one sampler call; songs with fewer windows drop out. The batch is padded
to a power of two (and a multiple of the mesh's batch axes) so few programs compile; with a mesh
the parameters are placed by the rules and the batch is sharded over ``data`` x ``fsdp``. Window w
of every song draws with sequence id w (:func:`bossa_jax.sampling.sequence_keys`), so a song's
tokens depend on its inputs and the seed only, not on the other songs or the device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import symusic
import yaml
from flax import nnx

from bossa_jax import audio, mel, sharding
from bossa_jax.config import Config, build
from bossa_jax.errors import CheckpointError, ConfigError, DataError
from bossa_jax.models.arranger import POSITION_START, Stage2Model, load_stage2
from bossa_jax.sampling import (
    OFFICIAL_MAX_LENGTH,
    STOP_BARS,
    STOP_EOS,
    STOP_LENGTH,
    MelodyLock,
    Sampler,
    SamplingSettings,
)
from bossa_jax.symbolic import remi
from bossa_jax.symbolic.notes import (
    BAR,
    CHORD_INSTRUMENT,
    DURATION,
    INSTRUMENT,
    TEMPO,
    TICKS_PER_BEAT,
    TIME_SIGNATURE,
    Song,
    duration_code,
    duration_ticks,
    events_to_score,
    tempo_code,
    tempo_qpm,
    time_signature_code,
    time_signature_of,
)

WINDOW_BARS = 4
PIANO_INSTRUMENT = 0  # i-0: the arrangement's piano (MIDI program 0)
HOP_BARS = 2
OFFICIAL_BAR_LIMIT = 4
BAR_END = remi.BAR_END
RUN_CONFIG_FILE = "run_config.yaml"  # the full Config stored beside a stage-2 checkpoint
ENCODEC_DIR = "encodec"  # optional converted EnCodec inside a checkpoint directory
TPQ = 480
WHOLE_FILE = 2**40  # clip_frames larger than any file: load_clip returns the whole file
DEFAULT_BAR_SECONDS = 2.0  # bar length assumed past a lead sheet with a single downbeat


# --- requests and results -----------------------------------------------------------------------
@dataclasses.dataclass
class SongRequest:
    """One song to arrange. ``bars``: [first, last) bars of the lead sheet (None: all bars that
    hold lead-sheet notes, from bar 0). ``audio_offset``: seconds cut from the start of the
    reference before lead-sheet times are applied to it (SPEC 1.1 ``read_audio_to_codec``)."""

    name: str
    leadsheet: Song
    audio: str | Path
    bars: tuple[int, int] | None = None
    audio_offset: float = 0.0


@dataclasses.dataclass
class WindowRecord:
    """What happened in one window (for inspection and tests)."""

    index: int
    bars: tuple[int, int]  # [start, end) in the request's bars
    prompt: np.ndarray  # the lead-sheet prompt + the carry
    carry: np.ndarray
    sampled: np.ndarray  # the sampler's new tokens (the stopping token not included)
    stop_reason: int  # sampling.STOP_LENGTH / STOP_EOS / STOP_BARS
    result: np.ndarray  # the window's bars: carry + sampled, completed as the mode says
    clip: tuple[int, int]  # (first frame, valid frames) of its audio clip


@dataclasses.dataclass
class Arrangement:
    name: str
    tokens: np.ndarray  # the stitched REMI ids of the piece
    score: symusic.Score  # the decoded piano arrangement (velocities kept)
    bars: int  # bars in the result (= requested bars by default)
    notes: int
    generated_tokens: int  # tokens sampled in all windows (stopping tokens included)
    seconds: float  # wall time spent on this song's windows (its share)
    skipped_tokens: int = 0  # tokens the decoder could not use (out of grammar)
    first_bar: int = 0  # the lead-sheet bar the piece starts at (its bar 0)
    windows: list[WindowRecord] = dataclasses.field(default_factory=list)

    def write_midi(self, path: str | os.PathLike) -> Path:
        """Writes the score atomically (bossa_jax.symbolic.midi.write_midi)."""
        from bossa_jax.symbolic.midi import write_midi

        return write_midi(self.score, path)


# --- window plan and token logic (pure functions) -------------------------------------------------
def plan_windows(n_bars: int) -> list[tuple[int, int]]:
    """[start, end) bars of each window of an ``n_bars`` request (SPEC 8.2; see module doc)."""
    if n_bars < 1:
        raise ValueError(f"a request needs at least one bar, got {n_bars}")
    windows = [(0, min(WINDOW_BARS, n_bars))]
    start = HOP_BARS
    while start + HOP_BARS < n_bars:
        windows.append((start, min(start + WINDOW_BARS, n_bars)))
        start += HOP_BARS
    return windows


def bar_ends(tokens: np.ndarray) -> np.ndarray:
    """Indices of the ``b-1`` tokens (each ends one bar)."""
    return np.flatnonzero(np.asarray(tokens) == BAR_END)


def complete_bars(tokens: np.ndarray) -> int:
    return len(bar_ends(tokens))


def bar_limit(window_bars: int, carry: np.ndarray, *, official_overrun: bool = False) -> int:
    """How many ``b-1`` the sampler may draw before the window stops: its bars minus the complete
    bars it carries (SPEC 11.12), or the official 4 (``official_overrun``)."""
    if official_overrun:
        return OFFICIAL_BAR_LIMIT
    return window_bars - complete_bars(carry)


def window_result(
    carry: np.ndarray,
    sampled: np.ndarray,
    stop_reason: int,
    target_bars: int,
    *,
    official_carry: bool = False,
) -> np.ndarray:
    """A window's bars: the carry, then what it sampled (SPEC 8.2: the tokens after the last
    ``<sep>``). Ours: the stopping ``b-1`` is kept (SPEC 10.19), an unfinished last bar is closed
    and missing bars are empty, so the result has exactly ``target_bars`` bars when it stopped
    early (SPEC 11.11). ``official_carry``: carry + sampled as the official code returns it."""
    carry = np.asarray(carry, np.int64)
    sampled = np.asarray(sampled, np.int64)
    if official_carry:
        return np.concatenate([carry, sampled])
    tokens = [carry, sampled]
    if stop_reason == STOP_BARS:
        tokens.append(np.array([BAR_END]))
    result = np.concatenate(tokens)
    ends = bar_ends(result)
    unfinished = len(result) > (ends[-1] + 1 if len(ends) else 0)
    if unfinished:
        result = np.append(result, BAR_END)
    missing = target_bars - complete_bars(result)
    if missing > 0:
        result = np.concatenate([result, np.full(missing, BAR_END)])
    return result


def next_carry(result: np.ndarray, *, official_carry: bool = False) -> np.ndarray:
    """The bars the next window is prompted with (SPEC 8.2): the tokens after the 2nd ``b-1``
    through the 4th. ``official_carry``: the official slice ``[after 2nd b-1 : after 4th b-1]``
    whose end falls back to -1 (dropping the last token) when there are fewer than four ``b-1``
    (SPEC 10.19). Fewer than two ``b-1`` (official: an index error, SPEC 11.11): no carry."""
    result = np.asarray(result, np.int64)
    ends = bar_ends(result)
    if len(ends) < HOP_BARS:
        return result[:0]
    start = ends[HOP_BARS - 1] + 1
    if len(ends) >= 2 * HOP_BARS:
        stop = ends[2 * HOP_BARS - 1] + 1
    elif official_carry:
        stop = len(result) - 1
    else:
        stop = len(result)
    return result[start : max(start, stop)]


def stitch(results: Sequence[np.ndarray]) -> np.ndarray:
    """SPEC 8.2: every window but the last up to and including its 2nd ``b-1`` (the whole window
    when it has fewer, SPEC 11.11), then the last window whole."""
    parts = []
    for result in results[:-1]:
        ends = bar_ends(result)
        parts.append(result[: ends[HOP_BARS - 1] + 1] if len(ends) >= HOP_BARS else result)
    parts.append(np.asarray(results[-1]))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


# --- lead-sheet timing and meter ------------------------------------------------------------------
def downbeat_time(downbeats: np.ndarray, bar: int) -> float:
    """Time of bar ``bar``'s downbeat, extrapolated with the last bar's length past the end (the
    official reader extrapolates the last downbeat, SPEC 8.2)."""
    db = np.asarray(downbeats, np.float64)
    if bar < len(db):
        return float(db[bar])
    step = float(db[-1] - db[-2]) if len(db) >= 2 else DEFAULT_BAR_SECONDS
    return float(db[-1] + (bar - len(db) + 1) * step)


def bar_meter(song: Song, first: int, n_bars: int) -> tuple[np.ndarray, np.ndarray]:
    """Per requested bar, the lead sheet's (time-signature code, tempo code): from the bar's first
    note row, as the REMI writer takes them (SPEC 11.2); a bar without notes keeps the previous
    bar's (the first bars take the first known values; 4/4, 120 bpm for an empty range)."""
    events = song.leadsheet.events
    ts = np.full(n_bars, -1, np.int64)
    tempo = np.full(n_bars, -1, np.int64)
    for b in range(n_bars):
        rows = events[events[:, BAR] == first + b]
        if len(rows):
            ts[b], tempo[b] = rows[0, TIME_SIGNATURE], rows[0, TEMPO]
    known = np.flatnonzero(ts >= 0)
    start_ts = ts[known[0]] if len(known) else time_signature_code(4, 4)
    start_tempo = tempo[known[0]] if len(known) else int(tempo_code(120.0))
    for b in range(n_bars):
        if ts[b] < 0:
            ts[b] = ts[b - 1] if b else start_ts
            tempo[b] = tempo[b - 1] if b else start_tempo
    return ts, tempo


def leadsheet_bars(song: Song) -> int:
    """Bars of a lead sheet: up to its last note's bar."""
    if len(song.leadsheet) == 0:
        return 0
    return int(song.leadsheet.events[:, BAR].max()) + 1


def decode_piece(
    tokens: np.ndarray, song: Song, first: int, n_bars: int, *, pedal: bool = False
) -> tuple[symusic.Score, int]:
    """Stitched REMI -> (Score, skipped tokens): bars counted by ``b-1``; each bar's time
    signature and tempo from the lead sheet (:func:`bar_meter`); notes past ``n_bars`` (an
    overrun) keep the last bar's meter; notes cut at the end of the piece, which lasts exactly its
    bars (a closing sustain-off marks the end when the last bars are silent)."""
    events, skipped = remi.decode(tokens)
    last_note_bar = int(events[:, BAR].max()) + 1 if len(events) else 0
    total_bars = max(n_bars, complete_bars(tokens), last_note_bar)
    ts, tempo = bar_meter(song, first, n_bars)
    ts = np.concatenate([ts, np.full(total_bars - n_bars, ts[-1])])
    tempo = np.concatenate([tempo, np.full(total_bars - n_bars, tempo[-1])])
    if len(events):
        events = events.copy()
        events[:, TIME_SIGNATURE] = ts[events[:, BAR]]
        events[:, TEMPO] = tempo[events[:, BAR]]
    bar_ticks = np.array([time_signature_of(c)[0] * TICKS_PER_BEAT for c in ts], np.int64)
    bar_start = np.concatenate([[0], np.cumsum(bar_ticks)])
    if len(events):  # durations cut at the end of the piece (in grid ticks, floored to a code)
        onset = bar_start[events[:, BAR]] + events[:, 1]
        room = np.maximum(bar_start[-1] - onset, 0)
        too_long = duration_ticks(events[:, DURATION]) > room
        events[too_long, DURATION] = duration_code(room[too_long])
    score = events_to_score(events, tpq=TPQ)
    scale = TPQ // TICKS_PER_BEAT
    if not len(score.time_signatures):  # no notes: give the piece its lead sheet's meter
        num, den = time_signature_of(int(ts[0]))
        score.time_signatures.append(symusic.TimeSignature(0, num, den))
        score.tempos.append(symusic.Tempo(0, qpm=float(tempo_qpm(int(tempo[0])))))
    if not len(score.tracks):
        score.tracks.append(symusic.Track(name="program 0", program=0, is_drum=False))
    end = int(bar_start[-1]) * scale
    score.tracks[0].controls.append(symusic.ControlChange(time=end - 1, number=64, value=0))
    if not len(events):  # readers drop a track without notes: an end marker and lyric keep the
        # piece's length for symusic (markers) and pretty_midi (lyrics)
        score.markers.append(symusic.TextMeta(time=end - 1, text="end"))
        score.tracks[0].lyrics.append(symusic.TextMeta(time=end - 1, text="end"))
    if pedal:
        chords = song.leadsheet.bars(first, first + n_bars).events.copy()
        chords = chords[chords[:, INSTRUMENT] == CHORD_INSTRUMENT]
        chords[:, BAR] -= first
        score = remi.add_sustain_pedal(score, chords)
    return score, skipped


# --- audio front ends -----------------------------------------------------------------------------
@dataclasses.dataclass
class SongAudio:
    """A song's reference, decoded once: ``frames`` at 50 Hz; ``samples`` (mel front end) or the
    whole file's EnCodec ``codes`` (4, frames) (musicgen front end)."""

    path: str
    frames: int
    samples: np.ndarray | None = None
    codes: np.ndarray | None = None


@functools.partial(jax.jit, static_argnums=0)
def _style_prefix(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    mask: jax.Array,
    codes: jax.Array | None,
    features: jax.Array | None,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    mask = sharding.constrain(mask, "batch", None)
    return model.style_prefix(mask, codes=codes, features=features).astype(jnp.float32)


@dataclasses.dataclass
class PreparedSong:
    """A checked request with its windows planned and its audio decoded."""

    request: SongRequest
    first: int
    n_bars: int
    windows: list[tuple[int, int]]
    audio: SongAudio
    prompts: list[np.ndarray]  # each window's lead-sheet prompt
    clips: list[tuple[int, int]]  # each window's (first frame, valid frames)
    seconds: float = 0.0
    melody: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)


def _padded_batch(n: int, multiple: int) -> int:
    size = 1 << max(0, n - 1).bit_length()
    return -(-size // multiple) * multiple


# --- the arranger ---------------------------------------------------------------------------------
class Arranger:
    """Arranges songs with a stage-2 model (see the module docstring).

    ``settings`` default: ``arrange.top_k`` / ``temperature`` / ``top_p`` of ``config``. ``mesh``:
    place the parameters by ``config.mesh.rules`` and shard every batch over it. ``encodec``: the
    EnCodec of the ``musicgen`` front end (default: ``arrange.encodec_checkpoint``).

    Usage: ``Arranger.from_checkpoint(path)(songs, seed=0)``. To skip bad songs of a catalogue,
    :meth:`prepare` each request (it raises the song's one-line
    :class:`~bossa_jax.errors.BossaError` before any model work and decodes its audio once), then
    pass the prepared songs to the call.
    """

    def __init__(
        self,
        model: Stage2Model,
        config: Config,
        settings: SamplingSettings | None = None,
        mesh: jax.sharding.Mesh | None = None,
        *,
        encodec: nnx.Module | None = None,
    ):
        self.config = config
        self.options = config.arrange
        self.frontend = config.audio.frontend
        self.mesh = mesh
        self.rules = sharding.rules_of(config.mesh)
        width = model.cfg.encoder_width
        if self.frontend == "mel":
            if width != config.audio.n_mels:
                raise ConfigError(
                    f"config key 'audio.n_mels': the model's Q-Former reads {width}-wide frames, "
                    f"got {config.audio.n_mels}"
                )
        elif model.musicgen is None:
            raise ConfigError(
                "config key 'audio.frontend': the model has no MusicGen (trained on cached "
                "features); use the config it was trained with (audio.frontend=mel?)"
            )
        self.settings = settings or SamplingSettings(
            top_k=self.options.top_k,
            temperature=self.options.temperature,
            top_p=self.options.top_p,
        )
        self.encode = None
        if self.frontend == "musicgen":
            self.encode = self._encoder(encodec)
        with self._context():
            graphdef, state = nnx.split(model)
            if mesh is not None:
                state = jax.device_put(state, sharding.named_shardings(state, mesh))
            self.model = nnx.merge(graphdef, state)
            self.graphdef, self.state = graphdef, state
            self.sampler = Sampler(self.model.musecoco, self.settings)
        self.batch_multiple = 1
        if mesh is not None:
            self.batch_multiple = mesh.shape["data"] * mesh.shape["fsdp"]

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, config: Config | None = None, **kw
    ) -> Arranger:
        """A stage-2 checkpoint (:func:`bossa_jax.models.arranger.save_stage2`) and the config to
        run it with: ``config`` when given, else the checkpoint's ``run_config.yaml``
        (:func:`save_arranger` writes both, e.g. the demo model), else the defaults with the
        checkpoint's model sections (front end ``musicgen``, which needs MusicGen in it). A
        checkpoint folder's ``encodec/`` (a converted EnCodec) serves the musicgen front end.
        ``kw``: ``dtype`` (the Q-Former compute dtype) and the constructor's keywords."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder not found")
        if config is None:
            config = read_run_config(path)
        model = load_stage2(path, dtype=kw.pop("dtype", None))
        if config.audio.frontend == "musicgen" and "encodec" not in kw:
            if not config.arrange.encodec_checkpoint and (path / ENCODEC_DIR).is_dir():
                from bossa_jax.models.encodec import load_encodec

                kw["encodec"] = load_encodec(path / ENCODEC_DIR)
        return cls(model, config, **kw)

    def _encoder(self, encodec: nnx.Module | None) -> Callable[[np.ndarray], np.ndarray]:
        from bossa_jax.data.codes import chunked_encoder
        from bossa_jax.models.encodec import encode_fn, load_encodec

        if encodec is None:
            path = self.options.encodec_checkpoint
            if not path:
                raise ConfigError(
                    "config key 'arrange.encodec_checkpoint': the musicgen front end needs a "
                    "converted EnCodec (python -m convert.encodec) to encode the reference audio"
                )
            encodec = load_encodec(path)
        graphdef, state = nnx.split(encodec)
        hop = self.config.encodec.hop_length
        chunk = max(1, round(self.options.chunk_seconds * audio.FRAME_RATE)) * hop

        def encode(batch: np.ndarray) -> np.ndarray:
            return np.asarray(encode_fn(graphdef, state, jnp.asarray(batch)))

        return chunked_encoder(encode, chunk, hop)

    def _rows(self, ndim: int) -> jax.sharding.NamedSharding:
        return sharding.batch_sharding(self.mesh, ndim)

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh, self.rules)

    # -- per song --------------------------------------------------------------------------------
    def prepare(self, song: SongRequest) -> PreparedSong:
        """Checks a request (bars, lead sheet, audio: one-line errors naming the song or file),
        plans its windows and decodes its audio once."""
        started = time.perf_counter()
        ls = song.leadsheet
        available = max(leadsheet_bars(ls), len(ls.downbeat_times))
        if leadsheet_bars(ls) == 0 or len(ls.downbeat_times) == 0:
            raise DataError(f"{song.name}: the lead sheet has no notes on or after its first bar")
        first, last = (0, leadsheet_bars(ls)) if song.bars is None else map(int, song.bars)
        if not 0 <= first < last <= available:
            raise DataError(
                f"{song.name}: bars {first}:{last} lie outside the lead sheet's {available} bars "
                f"(give A:B with 0 <= A < B <= {available})"
            )
        if len(ls.leadsheet.bars(first, last)) == 0:
            raise DataError(f"{song.name}: bars {first}:{last} hold no lead-sheet note")
        if not (math.isfinite(song.audio_offset) and song.audio_offset >= 0):
            raise DataError(f"{song.name}: audio offset must be >= 0 s, got {song.audio_offset}")
        n_bars = last - first
        windows = plan_windows(n_bars)
        track = self._load_audio(song)
        prompts, clips, melody = [], [], []
        for start, end in windows:
            prompts.append(remi.prompt(ls.leadsheet.bars(first + start, first + end)))
            melody.append(remi.melody_table(ls.leadsheet, first + start, WINDOW_BARS))
            t0 = downbeat_time(ls.downbeat_times, first + start)
            t1 = downbeat_time(ls.downbeat_times, first + end)
            centre = int(round(((t0 + t1) * audio.FRAME_RATE) // 2))
            clips.append(audio.clip_placement(centre, track.frames, self.config.audio.clip_frames))
        seconds = time.perf_counter() - started
        return PreparedSong(song, first, n_bars, windows, track, prompts, clips, seconds, melody)

    def _load_audio(self, song: SongRequest) -> SongAudio:
        rate = self.config.encodec.sampling_rate
        audio.check_audio(song.audio, sample_rate=rate, clip_frames=self.config.audio.clip_frames)
        samples = audio.load_clip(song.audio, sample_rate=rate, clip_frames=WHOLE_FILE).samples
        hop = rate // audio.FRAME_RATE
        samples = samples[int(round(song.audio_offset * audio.FRAME_RATE)) * hop :]
        if samples.size < hop:
            raise DataError(
                f"{song.audio}: nothing is left after the audio offset of {song.audio_offset} s"
            )
        frames = -(-samples.size // hop)
        if self.frontend == "mel":
            return SongAudio(str(song.audio), frames, samples=samples)
        return SongAudio(str(song.audio), frames, codes=self.encode(samples))

    def _clip_inputs(
        self, songs: Sequence[PreparedSong], k: int, batch: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(mask, codes, features) of window ``k`` of ``songs``, padded to ``batch`` rows."""
        cfg = self.config
        clip_frames = cfg.audio.clip_frames
        masks = np.zeros((batch, clip_frames + audio.PATTERN_EXTRA), np.float32)
        codes = features = None
        if self.frontend == "mel":
            features = np.zeros(
                (batch, clip_frames + audio.PATTERN_EXTRA, cfg.audio.n_mels), np.float32
            )
        else:
            special = cfg.musicgen.special_id
            codes = np.full((batch, cfg.musicgen.num_codebooks, clip_frames), special, np.int32)
        hop = cfg.encodec.sampling_rate // audio.FRAME_RATE
        for i, song in enumerate(songs):
            start, valid = song.clips[k]
            masks[i] = audio.clip_mask(valid, clip_frames)
            if features is not None:
                samples = song.audio.samples[start * hop : (start + valid) * hop]
                features[i] = mel.clip_features(samples, valid, cfg)[0]
            else:
                clip = song.audio.codes[:, start : start + valid]
                codes[i] = audio.pad_codes(clip, clip_frames, cfg.musicgen.special_id)
        return masks, codes, features

    # -- the batched windows ---------------------------------------------------------------------
    def __call__(
        self,
        songs: Sequence[SongRequest | PreparedSong],
        *,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
        prefix_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> list[Arrangement]:
        """Arranges ``songs`` (requests are checked and prepared first: a bad one raises before
        any model work). ``progress(done, total)`` counts windows; ``prefix_fn`` maps each sampler
        call's projected query outputs (B, Q, d) (evaluation controls)."""
        prepared = [s if isinstance(s, PreparedSong) else self.prepare(s) for s in songs]
        total = sum(len(s.windows) for s in prepared)
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        out: list[Arrangement] = []
        size = self.options.songs_per_batch
        for start in range(0, len(prepared), size):
            out.extend(self._arrange_group(prepared[start : start + size], seed, step, prefix_fn))
        return out

    def _arrange_group(
        self,
        songs: Sequence[PreparedSong],
        seed: int,
        step: Callable[[int], None],
        prefix_fn: Callable[[np.ndarray], np.ndarray] | None,
    ) -> list[Arrangement]:
        opts = self.options
        records: list[list[WindowRecord]] = [[] for _ in songs]
        carries = [np.zeros(0, np.int64) for _ in songs]
        seconds = [s.seconds for s in songs]
        generated = [0] * len(songs)
        for k in range(max(len(s.windows) for s in songs)):
            started = time.perf_counter()
            active = [i for i, s in enumerate(songs) if k < len(s.windows)]
            batch = _padded_batch(len(active), self.batch_multiple)
            prompts, limits, max_new = [], [], []
            for i in active:
                s = songs[i]
                w_start, w_end = s.windows[k]
                prompt = np.concatenate([s.prompts[k], carries[i]]).astype(np.int32)
                limit = bar_limit(
                    w_end - w_start, carries[i], official_overrun=opts.official_overrun
                )
                cap = OFFICIAL_MAX_LENGTH - len(prompt)
                if opts.max_new_tokens is not None:
                    cap = opts.max_new_tokens
                cap = min(cap, self.sampler.cfg.max_positions - len(prompt))
                prompts.append(prompt)
                limits.append(max(limit, 1))
                max_new.append(max(cap, 0) if limit > 0 else 0)
            lock = None
            if opts.melody_lock:
                lock = MelodyLock(
                    pitch=np.stack([songs[i].melody[k][0] for i in active]),
                    duration=np.stack([songs[i].melody[k][1] for i in active]),
                    first_bar=np.array([complete_bars(carries[i]) for i in active]),
                    onset_id=remi.OFFSET["o"],
                    instrument_id=remi.OFFSET["i"] + PIANO_INSTRUMENT,
                )
            # padding rows: a one-token prompt that samples nothing
            pad_rows = batch - len(active)
            prompts += [prompts[0][:1]] * pad_rows
            limits += [1] * pad_rows
            max_new += [0] * pad_rows
            with self._context():
                mask, codes, features = self._clip_inputs([songs[i] for i in active], k, batch)
                prefix = self._prefix(mask, codes, features)
                if prefix_fn is not None:
                    head = np.asarray(prefix_fn(np.asarray(prefix[: len(active)])), np.float32)
                    if head.shape != prefix[: len(active)].shape:
                        raise ValueError(
                            f"prefix_fn returned shape {head.shape}, expected "
                            f"{prefix[: len(active)].shape}"
                        )
                    prefix = np.concatenate([head, np.asarray(prefix[len(active) :])])
                if self.mesh is not None:
                    prefix = jax.device_put(prefix, self._rows(3))
                samples = self.sampler(
                    prompts,
                    max_new_tokens=max_new,
                    seed=seed,
                    sequence_ids=[k] * batch,
                    prefix_embeddings=prefix,
                    position_start=POSITION_START,
                    bar_limit=limits,
                    melody_lock=lock,
                )
            share = (time.perf_counter() - started) / len(active)
            for row, i in enumerate(active):
                s = songs[i]
                w_start, w_end = s.windows[k]
                sampled = samples.new_tokens(row).astype(np.int64)
                reason = int(samples.stop_reason[row])
                target = w_end - w_start
                if opts.official_overrun:
                    target = complete_bars(carries[i]) + OFFICIAL_BAR_LIMIT
                result = window_result(
                    carries[i], sampled, reason, target, official_carry=opts.official_carry
                )
                records[i].append(
                    WindowRecord(
                        k, (w_start, w_end), prompts[row], carries[i], sampled, reason, result,
                        s.clips[k],
                    )
                )  # fmt: skip
                carries[i] = next_carry(result, official_carry=opts.official_carry)
                generated[i] += len(sampled) + int(reason != STOP_LENGTH)  # + the stop
                seconds[i] += share
            step(len(active))
        out = []
        for i, s in enumerate(songs):
            started = time.perf_counter()
            tokens = stitch([r.result for r in records[i]])
            score, skipped = decode_piece(
                tokens, s.request.leadsheet, s.first, s.n_bars, pedal=opts.pedal
            )
            bars = complete_bars(tokens) + int(len(tokens) > 0 and tokens[-1] != BAR_END)
            out.append(
                Arrangement(
                    name=s.request.name,
                    tokens=tokens,
                    score=score,
                    bars=bars,
                    notes=int(score.note_num()),
                    generated_tokens=generated[i],
                    seconds=seconds[i] + time.perf_counter() - started,
                    skipped_tokens=skipped,
                    first_bar=s.first,
                    windows=records[i],
                )
            )
        return out

    def _prefix(
        self, mask: np.ndarray, codes: np.ndarray | None, features: np.ndarray | None
    ) -> jax.Array:
        if self.mesh is not None:

            def put(x: np.ndarray | None) -> jax.Array | None:
                return None if x is None else jax.device_put(x, self._rows(x.ndim))

            mask, codes, features = put(mask), put(codes), put(features)
        return _style_prefix(self.graphdef, self.state, mask, codes, features)


# --- configs stored with checkpoints --------------------------------------------------------------
def read_run_config(path: str | os.PathLike) -> Config:
    """The run config of a checkpoint folder: its ``run_config.yaml`` when present, else the
    defaults with the checkpoint's model sections (front end ``musicgen`` when it holds MusicGen,
    otherwise an error asking for the config)."""
    from bossa_jax import checkpoint
    from bossa_jax.config import load_config

    path = Path(path)
    stored = path / RUN_CONFIG_FILE
    if stored.is_file():
        return load_config(stored)
    sections = checkpoint.read_config(path)
    if sections.get("musicgen") is None:
        raise ConfigError(
            f"{path}: the checkpoint has no {RUN_CONFIG_FILE} and no MusicGen; give the config "
            "it was trained with (--config)"
        )
    data = Config().to_dict()
    for key in ("qformer", "musecoco", "musicgen"):
        data[key] = sections[key]
    config = build(Config, data)
    config.validate()
    return config


def save_arranger(
    path: str | os.PathLike, model: Stage2Model, config: Config, *, overwrite: bool = False
) -> Path:
    """Writes a stage-2 checkpoint with its run config (``run_config.yaml``), the layout
    :meth:`Arranger.from_checkpoint` reads (the demo model's)."""
    from bossa_jax.models.arranger import CHECKPOINT_KIND, save_stage2
    from bossa_jax.outputs import atomic_output

    with atomic_output(path, kind=CHECKPOINT_KIND, overwrite=overwrite) as tmp:
        save_stage2(tmp, model)
        (tmp / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return Path(path)


__all__ = [
    "Arrangement",
    "Arranger",
    "PreparedSong",
    "SongRequest",
    "WindowRecord",
    "bar_limit",
    "next_carry",
    "plan_windows",
    "read_run_config",
    "save_arranger",
    "stitch",
    "window_result",
    "STOP_EOS",
    "STOP_LENGTH",
    "STOP_BARS",
]
