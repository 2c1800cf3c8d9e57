"""grain pipelines for stage 1 and stage 2 (DESIGN "Data", "Multi-host", "Checkpoints";
SPEC 6.3-6.5, 7, 11.6-11.7, 11.11).

The corpus index (:func:`build_index`) lists every 4-bar window of every song, in song order, with
its clip (``bossa_jax.symbolic.segment``; clip clamped into the audio, SPEC 10.12). Example ``i`` of
the index is clip ``i`` of the feature cache built from :attr:`CorpusIndex.clips`.

The pipeline, per process::

    MapDataset.source(example ids)          windows usable for this stage
      .shuffle(seed)                        a new permutation every epoch (seed + epoch)
      [: steps_per_epoch * global_batch]    drop_last per epoch (as the official sampler)
      [process_index :: process_count]      this process's share of every global batch
      .map_with_index(make_sample)          one transposition per draw, audio from a store
      .batch(global_batch // process_count, drop_remainder=True)
      .repeat(num_epochs)
      .to_iter_dataset(ReadOptions(num_threads, prefetch))   -> iterator with get_state/set_state

Global batch ``k`` is the examples at shuffled positions ``[k G, (k + 1) G)`` whatever the number of
processes; each process holds the ones at its own stride, and :func:`to_global` turns the local
pieces into one global ``jax.Array`` per field (``jax.make_array_from_process_local_data`` with
``sharding.batch_sharding``), so the loss sees the whole global batch (SPEC 11.7).

Randomness: the transposition of example ``e`` in epoch ``t`` comes from
``np.random.default_rng([seed, t, e])``: independent of process count, thread scheduling and
restarts, so a restored iterator (``get_state`` saved in the checkpoint, ``set_state`` on restore)
continues with exactly the batches an uninterrupted run would have produced. Cached arrays are never
modified (transposition returns copies, SPEC 11.6).

Audio comes from precomputed stores, never from decoding inside the pipeline: ``codes`` mode reads a
song's codes from a :class:`~bossa_jax.data.feature_cache.CodesStore` (or any ``song_id -> (4, T)``
callable) and cuts the clip; ``features`` mode reads the clip's cached MusicGen features.

Batches (numpy, per process; B = global batch / process count):

* stage 1: ``notes`` int32 (B, 226*8), ``leadsheet_mask`` float32 (B, 226) (0 on lead-sheet notes),
  ``pad_mask`` float32 (B, 226) (0 on padding);
* stage 2: ``tokens`` int32 (B, 1000), ``control_mask`` bool (B, 1000), ``pad_mask`` bool (B, 1000);
* both: ``audio_mask`` float32 (B, 512) and either ``codes`` int32 (B, 4, 508) (padded with 2048)
  or ``features`` bfloat16 (B, 512, D); ``example_id`` int32 (B,), ``transposition`` int32 (B,).

Windows that no sequence can hold (a lead sheet of more than 224 notes in stage 1, a lead-sheet
prompt that leaves no room in stage 2: SPEC 11.11) are left out of that stage's pipeline when it is
built, and counted in :attr:`Pipeline.dropped`, so batches always have their full size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bossa_jax import sharding
from bossa_jax.audio import CLIP_FRAMES, PATTERN_EXTRA
from bossa_jax.data.feature_cache import ClipRef, CodesStore, FeatureCache, clip_codes
from bossa_jax.data.readers import SongRecord
from bossa_jax.errors import DataError
from bossa_jax.symbolic import octuple, remi, segment

log = logging.getLogger(__name__)


# --- the corpus index ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Example:
    """One window of one song; ``example_id`` is its position in the index (= its clip index)."""

    example_id: int
    song_index: int
    window: segment.Window


@dataclasses.dataclass(frozen=True)
class CorpusIndex:
    """Songs and their windows, in a fixed order (the feature cache's clip order)."""

    records: tuple[SongRecord, ...]
    examples: tuple[Example, ...]
    clip_length: int = CLIP_FRAMES  # frames of every padded clip (``audio.clip_frames``)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def clips(self) -> list[ClipRef]:
        return [
            ClipRef(
                self.records[e.song_index].id,
                int(e.window.clip_start),
                int(e.window.clip_frames),
                self.clip_length,
            )
            for e in self.examples
        ]

    def song_id(self, example_id: int) -> str:
        return self.records[self.examples[example_id].song_index].id


def build_index(
    records: Sequence[SongRecord],
    num_frames: Callable[[str], int] | Mapping[str, int] | CodesStore,
    *,
    clamp: bool = True,
    clip_length: int = CLIP_FRAMES,
) -> CorpusIndex:
    """All windows of ``records`` (SPEC 6.3). ``num_frames(song_id)``: length of the song's codes
    at 50 Hz (a CodesStore or a mapping works); ``clamp=False`` reproduces the official clip slice
    (SPEC 10.12); ``clip_length``: frames per clip (``audio.clip_frames``, 508)."""
    if isinstance(num_frames, CodesStore):
        frames_of = num_frames.num_frames
    elif isinstance(num_frames, Mapping):
        frames_of = num_frames.__getitem__
    else:
        frames_of = num_frames
    examples = []
    for song_index, record in enumerate(records):
        try:
            frames = int(frames_of(record.id))
        except KeyError as err:
            raise DataError(f"no audio codes for song {record.id!r}") from err
        windows = segment.segment_song(record.song, frames, clamp=clamp, clip_length=clip_length)
        for window in windows:
            examples.append(Example(len(examples), song_index, window))
    return CorpusIndex(tuple(records), tuple(examples), clip_length)


# --- samples ------------------------------------------------------------------------------------
def fits_stage(window: segment.Window, stage: int, max_tokens: int = remi.MAX_TOKENS) -> bool:
    """Whether the window's lead sheet leaves room for a sequence (SPEC 11.11); ``max_tokens``:
    the stage-2 sequence length."""
    if stage == 1:
        return len(window.leadsheet) <= octuple.MAX_NOTES - 2
    return len(remi.prompt(window.leadsheet)) <= max_tokens - 2


def symbolic_sample(
    window: segment.Window,
    stage: int,
    rng: np.random.Generator | None,
    *,
    deperf: bool = True,
    keep_eos: bool = True,
    max_tokens: int = remi.MAX_TOKENS,
) -> dict[str, np.ndarray]:
    """The window's token arrays for ``stage``; one random transposition when ``rng`` is given.
    ``keep_eos=False``: the official plain cut of an overflowing sequence (SPEC 11.11);
    ``max_tokens``: the stage-2 sequence length."""
    arrangement, leadsheet, shift = window.arrangement, window.leadsheet, 0
    if rng is not None:
        arrangement, leadsheet, shift = segment.augment(arrangement, leadsheet, rng)
    if stage == 1:
        ids, ls_mask, pad_mask = octuple.stage1_sequence(
            arrangement, leadsheet, deperf=deperf, keep_eos=keep_eos
        )
        out = {"notes": ids.astype(np.int32), "leadsheet_mask": ls_mask, "pad_mask": pad_mask}
    else:
        ids, control, pad = remi.stage2_sequence(
            arrangement, leadsheet, redact=deperf, keep_eos=keep_eos, max_tokens=max_tokens
        )
        out = {"tokens": ids.astype(np.int32), "control_mask": control, "pad_mask": pad}
    out["transposition"] = np.int32(shift)
    return out


class AudioSource:
    """Audio arrays of an example: from song codes (cut per clip) or from the feature cache."""

    def __init__(
        self,
        index: CorpusIndex,
        *,
        codes: CodesStore | Callable[[str], np.ndarray] | None = None,
        features: FeatureCache | None = None,
    ):
        if (codes is None) == (features is None):
            raise ValueError("give exactly one of codes= or features=")
        self.index = index
        self.mode = "codes" if codes is not None else "features"
        self._codes = codes.codes if isinstance(codes, CodesStore) else codes
        self._features = features
        self._clips = index.clips
        if features is not None:
            features.check_clips(self._clips)

    def __call__(self, example_id: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.read_batch([example_id]).items()}

    def read_batch(self, example_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The audio fields of these examples, stacked: ``features`` (B, 512, D) and
        ``audio_mask`` (B, 512) read straight into the batch, or ``codes`` (B, 4, 508) cut from
        the songs' codes (508: the index's clip length, ``audio.clip_frames``)."""
        if self._features is not None:
            return self._features.read_batch(example_ids)
        length = self.index.clip_length
        codes = np.empty((len(example_ids), 4, length), np.int32)
        masks = np.empty((len(example_ids), length + PATTERN_EXTRA), np.float32)
        for row, example_id in enumerate(example_ids):
            clip = self._clips[int(example_id)]
            codes[row], masks[row] = clip_codes(self._codes(clip.song_id), clip)
        return {"codes": codes, "audio_mask": masks}


# --- the pipeline -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How batches are drawn. ``global_batch_size``: the paper's 128 (stage 1) / 32 (stage 2);
    ``process_index``/``process_count`` default to JAX's; ``num_epochs=None`` repeats forever."""

    stage: int = 1
    global_batch_size: int = 128
    seed: int = 0
    num_epochs: int | None = None
    transpose: bool = True
    deperf: bool = True
    keep_eos: bool = True
    max_tokens: int = remi.MAX_TOKENS  # stage-2 sequence length (SPEC 6.5)
    process_index: int | None = None
    process_count: int | None = None
    num_threads: int = 2
    prefetch_buffer_size: int = 4

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise DataError(f"pipeline stage must be 1 or 2, got {self.stage}")
        if self.global_batch_size <= 0:
            raise DataError(f"global batch size must be positive, got {self.global_batch_size}")
        if not 0 <= self.seed < 2**32:
            raise DataError(f"seed must be in 0..2**32-1, got {self.seed}")


class Pipeline:
    """One process's batches of a stage-1 or stage-2 corpus (see the module docstring)."""

    def __init__(self, index: CorpusIndex, audio: AudioSource, options: PipelineOptions):
        options.validate()
        self.index, self.audio, self.options = index, audio, options
        self.process_index = (
            jax.process_index() if options.process_index is None else options.process_index
        )
        self.process_count = (
            jax.process_count() if options.process_count is None else options.process_count
        )
        if not 0 <= self.process_index < self.process_count:
            raise DataError(
                f"process index {self.process_index} not in 0..{self.process_count - 1}"
            )
        if options.global_batch_size % self.process_count:
            raise DataError(
                f"global batch size {options.global_batch_size} does not divide over "
                f"{self.process_count} processes"
            )
        self.local_batch_size = options.global_batch_size // self.process_count
        usable = [
            e.example_id
            for e in index.examples
            if fits_stage(e.window, options.stage, options.max_tokens)
        ]
        self.dropped = len(index) - len(usable)
        if self.dropped:
            log.warning(
                "stage %d: %d of %d windows have a lead sheet too long for the sequence; left out",
                options.stage,
                self.dropped,
                len(index),
            )
        self.steps_per_epoch = len(usable) // options.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(usable)} usable windows do not fill one global batch of "
                f"{options.global_batch_size}"
            )
        per_epoch = self.steps_per_epoch * options.global_batch_size
        self._local_len = per_epoch // self.process_count

        ds = grain.MapDataset.source(usable).shuffle(seed=options.seed)
        ds = ds[:per_epoch][self.process_index :: self.process_count]
        ds = ds.map_with_index(self._make_sample)
        ds = ds.batch(self.local_batch_size, drop_remainder=True).map(self._add_audio)
        self.dataset = ds.repeat(options.num_epochs)

    def _make_sample(self, index: int, example_id: int) -> dict[str, np.ndarray]:
        epoch = index // self._local_len
        example = self.index.examples[example_id]
        rng = (
            np.random.default_rng([self.options.seed, epoch, example_id])
            if self.options.transpose
            else None
        )
        sample = symbolic_sample(
            example.window,
            self.options.stage,
            rng,
            deperf=self.options.deperf,
            keep_eos=self.options.keep_eos,
            max_tokens=self.options.max_tokens,
        )
        sample["example_id"] = np.int32(example_id)
        return sample

    def _add_audio(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Audio is read per batch: each cached clip is copied once, into its row of the batch."""
        return {**batch, **self.audio.read_batch(batch["example_id"])}

    def iterator(self) -> grain.DatasetIterator:
        """A checkpointable iterator (``get_state()`` / ``set_state(state)``) over local batches."""
        read = grain.ReadOptions(
            num_threads=self.options.num_threads,
            prefetch_buffer_size=self.options.prefetch_buffer_size,
        )
        return self.dataset.to_iter_dataset(read).__iter__()


def to_global(
    batch: Mapping[str, np.ndarray],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> dict[str, jax.Array]:
    """Process-local batch -> global arrays sharded over the batch axis (``batch_sharding``).

    Call inside ``sharding.use_mesh`` or give ``rules`` (the config's ``mesh.rules``)."""

    def convert() -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(
                sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v)
            )
            for k, v in batch.items()
        }

    if rules is None:
        return convert()
    with nnx.logical_axis_rules(tuple(rules)):
        return convert()
