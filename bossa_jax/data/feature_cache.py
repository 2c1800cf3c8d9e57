"""On-disk stores of per-song EnCodec codes and per-clip frozen MusicGen features (DESIGN "Data";
SPEC 1.1-1.3, 6.1).

Format: plain shard files of raw little-endian arrays, read with ``os.pread`` (fixed-size records)
or ``np.memmap`` (ragged records), no decoding step. A stage-1 batch of cached features is
128 x (512, D) values (2 MiB per clip at D = 2048 in bf16), so reading it is a memory-bandwidth
problem: each record is copied once, straight from the page cache into its row of the batch
(:meth:`Store.read`); a clip's record is one contiguous 2 MiB range, so a random clip is already a
large sequential read and the training order stays a true shuffle of clips. (array_record, used
before, decoded each record into its own buffer and then stacked it: two copies and a page fault
per 4 KiB of fresh memory; 134 samples/s against the 512/s a paper-size host needs.)

Layout of a store folder::

    manifest.json        written last: kind, item keys, fingerprint, shards (complete)
    shard-00000.bin      records [0, K)      + shard-00000.json (receipt: count, bytes, sha256,
    shard-00001.bin      records [K, 2K) ...                     fields and their byte offsets)

A shard file holds one block per field, each starting at a 4 KiB-aligned offset. A fixed-shape
field (features, masks) is the records stacked: ``(count, *shape)``; a ragged field (a song's codes,
whose last axis varies) is the records concatenated along that axis: ``(*shape, sum(lengths))``,
with the per-record lengths in the receipt. bfloat16 is stored as its 16 bits and read back as
``ml_dtypes.bfloat16``; the feature cache stores bfloat16 (default), float16 or float32.

Building is resumable: the items are cut into shards of ``shard_size``; a shard is written under a
temporary name, fsynced and renamed when complete, and only then gets its ``.json`` receipt. On
restart every shard whose receipt matches its file (record count, size, sha256) is kept and the
rest are rebuilt, so killing a build at any moment and running it again gives the same bytes as one
uninterrupted run (given a deterministic compute function). A store built for other items, fields
or compute function (its ``fingerprint`` differs) is refused rather than mixed.

The compute functions are injected: ``encode_fn(audio_path) -> codes (4, T)`` for the codes store
(EnCodec; or the official HDF5 codes), ``compute_fn(codes (b, 4, 508) int32) -> features
(b, 512, D)`` for the feature cache (the frozen MusicGen stack of ``bossa_jax.features``; tests pass
a tiny deterministic function). Audio is never decoded inside the training pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from bossa_jax import audio
from bossa_jax.errors import DataError
from bossa_jax.outputs import atomic_output

log = logging.getLogger(__name__)

STORE_FORMAT = "bossa-jax-store"
STORE_VERSION = 2
MANIFEST = "manifest.json"
ALIGN = 4096  # field blocks start on page boundaries
FEATURES_KIND = "features"
CODES_KIND = "codes"
FEATURE_DTYPES = ("bfloat16", "float16", "float32")
_BF16 = np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype: Any) -> str:
    """A dtype's name in receipts: ``bfloat16`` or numpy's little-endian code (``<f4``)."""
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == _BF16 else dtype.newbyteorder("<").str


def dtype_of(name: str) -> np.dtype:
    """Inverse of :func:`dtype_name`."""
    return _BF16 if name == "bfloat16" else np.dtype(name)


def _raw(array: np.ndarray) -> np.ndarray:
    """The array as it is written: little-endian, bfloat16 as its uint16 bits, C-contiguous."""
    if array.dtype == _BF16:
        return np.ascontiguousarray(array).view(np.uint16)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


# --- the sharded store --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FieldLayout:
    """One field's block in a shard file: record shape (ragged: without its last axis)."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    ragged: bool


@dataclasses.dataclass(frozen=True)
class ShardReceipt:
    """What a complete shard holds; written after the shard file is in place."""

    index: int
    start: int
    count: int
    bytes: int
    sha256: str
    lengths: list[int]  # last-axis length of each record's ragged fields (a song's code frames)
    fields: list[FieldLayout]

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ShardReceipt:
        fields = [FieldLayout(**f) for f in data["fields"]]
        return ShardReceipt(**{**data, "fields": fields})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.bin"


def _receipt_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.json"


def fingerprint(kind: str, keys: Sequence[str], compute_id: str, extra: Mapping[str, Any]) -> str:
    """Identifies what a store holds: its items in order, the compute function and the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps([kind, compute_id, dict(extra)], sort_keys=True).encode())
    for key in keys:
        digest.update(key.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _valid_receipt(root: Path, index: int, start: int, count: int) -> ShardReceipt | None:
    """The shard's receipt if it matches the file on disk and the expected item range."""
    receipt_file, shard_file = _receipt_path(root, index), _shard_path(root, index)
    if not (receipt_file.is_file() and shard_file.is_file()):
        return None
    try:
        receipt = ShardReceipt.from_json(json.loads(receipt_file.read_text()))
    except (ValueError, TypeError, KeyError):
        return None
    if (receipt.index, receipt.start, receipt.count) != (index, start, count):
        return None
    if shard_file.stat().st_size != receipt.bytes or _sha256(shard_file) != receipt.sha256:
        return None
    return receipt


def build_store(
    root: str | os.PathLike,
    *,
    kind: str,
    keys: Sequence[str],
    make_records: Callable[[Sequence[int]], list[dict[str, np.ndarray]]],
    compute_id: str,
    shard_size: int = 256,
    ragged: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Builds (or resumes) a store of ``len(keys)`` records in shards of ``shard_size``.

    ``make_records(indices)`` returns the records of those item indices (called with up to
    ``shard_size`` consecutive indices per call; it may batch internally): dicts of arrays with the
    same fields, shapes and dtypes, except the last axis of the ``ragged`` fields. Returns the
    manifest.
    """
    root = Path(root)
    extra = dict(extra or {})
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive: {shard_size}")
    fp = fingerprint(kind, keys, compute_id, extra)
    root.mkdir(parents=True, exist_ok=True)
    started = root / "building.json"
    if started.is_file():
        previous = json.loads(started.read_text()).get("fingerprint")
        if previous != fp:
            raise DataError(
                f"{root}: holds a {kind} store of other items or another compute function; "
                "delete the folder or choose another one"
            )
    elif (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("fingerprint") == fp:
            return manifest  # already built: nothing to do
        raise DataError(f"{root}: holds a complete store of other items; choose another folder")
    else:
        with atomic_output(started) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fp}))
    for stale in root.glob(".shard-*"):  # temporary files of a killed run
        stale.unlink(missing_ok=True)

    num_items = len(keys)
    num_shards = -(-num_items // shard_size)
    receipts: list[ShardReceipt] = []
    kept = 0
    bar = tqdm(total=num_items, desc=f"{kind} store", unit="item", disable=not progress)
    for index in range(num_shards):
        start = index * shard_size
        count = min(shard_size, num_items - start)
        receipt = _valid_receipt(root, index, start, count)
        if receipt is None:
            records = make_records(range(start, start + count))
            receipt = _write_shard(root, index, start, records, frozenset(ragged))
        else:
            kept += 1
        receipts.append(receipt)
        bar.update(count)
    bar.close()
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "kind": kind,
        "fingerprint": fp,
        "compute_id": compute_id,
        "extra": extra,
        "num_items": num_items,
        "shard_size": shard_size,
        "keys": list(keys),
        "shards": [dataclasses.asdict(r) for r in receipts],
    }
    with atomic_output(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    started.unlink(missing_ok=True)
    summary = f"{kind} store {root}: {num_items} items in {num_shards} shards ({kept} kept)"
    log.info(summary)
    if progress:
        tqdm.write(summary)
    return manifest


def _write_shard(
    root: Path, index: int, start: int, records: list[dict[str, np.ndarray]], ragged: frozenset
) -> ShardReceipt:
    """Writes the records field by field (see the module docstring), then the receipt."""
    final = _shard_path(root, index)
    tmp = root / f".{final.name}.tmp"
    names = list(records[0])
    fields, lengths = [], []
    with open(tmp, "wb") as handle:
        for name in names:
            arrays = [np.asarray(r[name]) for r in records]
            first = arrays[0]
            fixed_shape = first.shape[:-1] if name in ragged else first.shape
            for i, arr in enumerate(arrays):
                shape = arr.shape[:-1] if name in ragged else arr.shape
                if arr.dtype != first.dtype or shape != fixed_shape:
                    raise DataError(
                        f"item {start + i}: field {name!r} is {arr.dtype} {arr.shape}, the shard's "
                        f"first item {first.dtype} {first.shape}"
                    )
            handle.write(b"\0" * (-handle.tell() % ALIGN))
            layout = FieldLayout(
                name, dtype_name(first.dtype), list(fixed_shape), handle.tell(), name in ragged
            )
            fields.append(layout)
            if name in ragged:
                item_lengths = [int(a.shape[-1]) for a in arrays]
                if lengths and lengths != item_lengths:
                    raise DataError(f"shard {index}: ragged fields of different lengths")
                lengths = item_lengths
                rows = [_raw(a).reshape(-1, a.shape[-1]) for a in arrays]
                for row in range(rows[0].shape[0]):  # (*shape, sum of lengths), row-major
                    for r in rows:
                        handle.write(r[row].tobytes())
            else:
                for arr in arrays:
                    handle.write(_raw(arr).tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    receipt = ShardReceipt(
        index, start, len(records), final.stat().st_size, _sha256(final), lengths, fields
    )
    with atomic_output(_receipt_path(root, index)) as out:
        out.write_text(json.dumps(dataclasses.asdict(receipt)))
    return receipt


def _schema(receipt: ShardReceipt) -> list[tuple[str, str, list[int], bool]]:
    return [(f.name, f.dtype, f.shape, f.ragged) for f in receipt.fields]


class Store:
    """Random access to a complete store: ``store[i]`` -> dict of arrays, ``store.read(field,
    indices)`` -> one field of many records stacked, ``store.key(i)``.

    Thread-safe; files are opened on first use in each process (a store can be pickled into
    grain's worker processes)."""

    def __init__(self, root: str | os.PathLike, kind: str | None = None):
        self.root = Path(root)
        manifest_file = self.root / MANIFEST
        if not manifest_file.is_file():
            raise DataError(
                f"{self.root}: no {MANIFEST}; the store is missing or its build did not finish "
                "(run the build again: it resumes)"
            )
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except ValueError as err:
            raise DataError(f"{manifest_file}: unreadable manifest ({err})") from err
        if self.manifest.get("format") != STORE_FORMAT:
            raise DataError(f"{manifest_file}: not a bossa-jax store manifest")
        if self.manifest.get("version") != STORE_VERSION:
            raise DataError(
                f"{manifest_file}: store format version {self.manifest.get('version')}, this "
                f"bossa-jax reads version {STORE_VERSION}; rebuild the store"
            )
        if kind is not None and self.manifest["kind"] != kind:
            raise DataError(f"{self.root}: a {self.manifest['kind']} store, expected {kind}")
        self.shards = [ShardReceipt.from_json(s) for s in self.manifest["shards"]]
        for shard in self.shards:
            path = _shard_path(self.root, shard.index)
            if not path.is_file() or path.stat().st_size != shard.bytes:
                raise DataError(f"{path}: missing or of the wrong size; rebuild the store")
            if _schema(shard) != _schema(self.shards[0]):
                raise DataError(f"{path}: its fields differ from shard 0's; rebuild the store")
        self.fields: dict[str, FieldLayout] = (
            {f.name: f for f in self.shards[0].fields} if self.shards else {}
        )
        self.keys: list[str] = self.manifest["keys"]
        self._index = {k: i for i, k in enumerate(self.keys)}
        counts = [s.count for s in self.shards]
        self._shard_of = np.repeat(np.arange(len(counts)), counts)
        self._ragged_starts = [np.concatenate([[0], np.cumsum(s.lengths)]) for s in self.shards]
        self._offsets = [{f.name: f.offset for f in s.fields} for s in self.shards]
        self._files: dict[int, int] = {}
        self._maps: dict[int, np.memmap] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_maps"], state["_lock"] = {}, {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is None:
            with self._lock:
                fd = self._files.get(shard)
                if fd is None:
                    fd = os.open(_shard_path(self.root, self.shards[shard].index), os.O_RDONLY)
                    self._files[shard] = fd
        return fd

    def __len__(self) -> int:
        return len(self.keys)

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self.keys):
            raise IndexError(f"record {index} outside 0..{len(self.keys) - 1}")
        return int(self._shard_of[index])

    def read(
        self, name: str, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Field ``name`` of records ``indices``, stacked (len(indices), *shape): one ``pread``
        per record, straight into its row of ``out`` (a fresh array when not given)."""
        field = self.fields[name]
        if field.ragged:
            raise ValueError(f"field {name!r} is ragged: read records one by one with ragged()")
        dtype = dtype_of(field.dtype)
        if out is None:
            out = np.empty((len(indices), *field.shape), dtype)
        elif out.shape != (len(indices), *field.shape) or out.dtype != dtype:
            raise ValueError(f"out must be {dtype} {(len(indices), *field.shape)}: {out.shape}")
        nbytes = out[0].nbytes if len(indices) else 0
        rows = out.view(np.uint16) if dtype == _BF16 else out
        for row, index in enumerate(indices):
            shard = self._check_index(int(index))
            offset = self._offsets[shard][name] + (int(index) - self.shards[shard].start) * nbytes
            if os.preadv(self._fd(shard), [rows[row : row + 1]], offset) != nbytes:
                raise DataError(f"{_shard_path(self.root, shard)}: truncated; rebuild the store")
        return out

    def _map(self, shard: int) -> np.memmap:
        mapped = self._maps.get(shard)
        if mapped is None:
            with self._lock:
                mapped = self._maps.get(shard)
                if mapped is None:
                    path = _shard_path(self.root, self.shards[shard].index)
                    mapped = self._maps[shard] = np.memmap(path, np.uint8, mode="r")
        return mapped

    def ragged(self, name: str, index: int) -> np.ndarray:
        """Field ``name`` of record ``index``: a read-only view of the memory-mapped shard (only
        the pages a caller touches are read)."""
        shard = self._check_index(index)
        receipt = self.shards[shard]
        layout = next(f for f in receipt.fields if f.name == name)
        starts = self._ragged_starts[shard]
        dtype = np.dtype("<u2") if layout.dtype == "bfloat16" else dtype_of(layout.dtype)
        shape = (*layout.shape, int(starts[-1]))
        size = int(np.prod(shape)) * dtype.itemsize
        block = self._map(shard)[layout.offset : layout.offset + size].view(dtype).reshape(shape)
        i = index - receipt.start
        view = np.asarray(block[..., starts[i] : starts[i + 1]])
        return view.view(_BF16) if layout.dtype == "bfloat16" else view

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        self._check_index(index)
        return {
            name: self.ragged(name, index) if f.ragged else self.read(name, [index])[0]
            for name, f in self.fields.items()
        }

    def index_of(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError as err:
            raise DataError(f"{self.root}: no record for {key!r}") from err

    def get(self, key: str) -> dict[str, np.ndarray]:
        return self[self.index_of(key)]

    def checksums(self) -> list[str]:
        return [s.sha256 for s in self.shards]

    def verify(self) -> None:
        """Re-hashes every shard; raises DataError on the first mismatch."""
        for shard in self.shards:
            path = _shard_path(self.root, shard.index)
            if _sha256(path) != shard.sha256:
                raise DataError(f"{path}: checksum mismatch; rebuild the store")


# --- per-song codes -----------------------------------------------------------------------------
class CodesStore:
    """Per-song EnCodec codes (num_codebooks, T) int16, by song id (SPEC 6.1's HDF5, sharded)."""

    def __init__(self, root: str | os.PathLike):
        self.store = Store(root, CODES_KIND)
        self._frames = [n for shard in self.store.shards for n in shard.lengths]

    def __contains__(self, song_id: str) -> bool:
        return song_id in self.store._index

    def codes(self, song_id: str) -> np.ndarray:
        """The song's codes (4, T) int16: a read-only view of the memory-mapped shard."""
        return self.store.ragged("codes", self.store.index_of(song_id))

    def metadata(self, song_id: str) -> dict[str, float]:
        """The song's other stored values (e.g. PIAST's ``audio_shift_seconds``)."""
        index = self.store.index_of(song_id)
        return {k: self.store.read(k, [index])[0].item() for k in self.store.fields if k != "codes"}

    def num_frames(self, song_id: str) -> int:
        return self._frames[self.store.index_of(song_id)]


def build_codes_store(
    root: str | os.PathLike,
    songs: Sequence[tuple[str, Any]],
    encode_fn: Callable[[Any], np.ndarray | Mapping[str, np.ndarray]],
    *,
    compute_id: str,
    shard_size: int = 64,
    progress: bool = True,
) -> CodesStore:
    """Encodes every ``(song_id, audio)`` with ``encode_fn(audio) -> codes (4, T)`` into a store
    (resumable, see the module docstring); the frame counts land in the shard receipts.
    ``encode_fn`` may instead return ``{"codes": ..., name: scalar, ...}``: per-song values kept
    beside the codes (every song must give the same names; :meth:`CodesStore.metadata`)."""
    keys = [s for s, _ in songs]
    if len(set(keys)) != len(keys):
        raise DataError("build_codes_store: duplicate song ids")

    def make_records(indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
        records = []
        for i in indices:
            out = encode_fn(songs[i][1])
            record = dict(out) if isinstance(out, Mapping) else {"codes": out}
            codes = np.asarray(record["codes"])
            if codes.ndim != 2 or codes.min(initial=0) < 0 or codes.max(initial=0) > 32767:
                raise DataError(f"{keys[i]}: encode_fn gave codes of shape {codes.shape}")
            records.append({**record, "codes": codes.astype(np.int16)})
        return records

    build_store(
        root,
        kind=CODES_KIND,
        keys=keys,
        make_records=make_records,
        compute_id=compute_id,
        shard_size=shard_size,
        ragged=("codes",),
        progress=progress,
    )
    return CodesStore(root)


# --- per-clip features --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClipRef:
    """One clip of the corpus: its key (``song_id@start``), song and valid frame range."""

    song_id: str
    start: int
    frames: int
    length: int = audio.CLIP_FRAMES  # the padded clip (``audio.clip_frames``)

    @property
    def key(self) -> str:
        suffix = "" if self.length == audio.CLIP_FRAMES else f"/{self.length}"
        return f"{self.song_id}@{self.start}+{self.frames}{suffix}"


def clip_codes(codes: np.ndarray, clip: ClipRef) -> tuple[np.ndarray, np.ndarray]:
    """The clip's codes padded to (4, clip.length) with 2048, and its audio mask (clip.length + 4,)
    (SPEC 1.1, 6.5)."""
    valid = np.asarray(codes)[:, clip.start : clip.start + clip.frames]
    return audio.pad_codes(valid, clip.length), audio.clip_mask(valid.shape[1], clip.length)


class FeatureCache:
    """Precomputed features by clip index: ``cache[i]`` -> {"features" (512, D) in the stored
    dtype, "audio_mask" (512,) float32}; ``cache.read_batch(indices)`` -> the same fields of many
    clips stacked; ``cache.keys[i]`` is the :class:`ClipRef` key."""

    def __init__(self, root: str | os.PathLike):
        self.store = Store(root, FEATURES_KIND)
        self.keys = self.store.keys
        features = self.store.fields.get("features")
        self.dtype = dtype_of(features.dtype if features else "bfloat16")

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.store[index]

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Every field of the clips ``indices``, stacked; each record copied once (Store.read)."""
        return {name: self.store.read(name, indices) for name in self.store.fields}

    def check_clips(self, clips: Sequence[ClipRef]) -> None:
        """Raises DataError unless the cache holds exactly these clips in this order."""
        keys = [c.key for c in clips]
        if keys != self.keys:
            first = next((i for i, (a, b) in enumerate(zip(keys, self.keys)) if a != b), None)
            where = f"first difference at clip {first}" if first is not None else "lengths differ"
            raise DataError(
                f"{self.store.root}: the feature cache was built for other clips "
                f"({len(self.keys)} cached, {len(keys)} in the corpus; {where}); rebuild it"
            )


def build_feature_cache(
    root: str | os.PathLike,
    clips: Sequence[ClipRef],
    song_codes: Callable[[str], np.ndarray],
    compute_fn: Callable[[np.ndarray], np.ndarray],
    *,
    compute_id: str,
    **options: Any,
) -> FeatureCache:
    """Computes ``compute_fn(codes (b, 4, 508) int32) -> (b, 512, D)`` for every clip, stored with
    the clip's audio mask (and its padded codes with ``store_codes=True``).

    ``song_codes(song_id)`` gives a song's whole codes (e.g. ``CodesStore(...).codes``);
    ``compute_id`` names the compute function and its weights (a different id refuses to resume);
    ``options``: ``dtype`` (bfloat16, float16 or float32), ``shard_size``, ``batch_size``,
    ``store_codes``, ``progress`` as :func:`build_clip_feature_cache` takes them.
    """

    def compute(chunk: Sequence[ClipRef]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        padded = [clip_codes(song_codes(c.song_id), c) for c in chunk]
        codes = np.stack([p[0] for p in padded]).astype(np.int32)
        features = np.asarray(compute_fn(codes))
        return features, np.stack([p[1] for p in padded]), codes

    return build_clip_feature_cache(root, clips, compute, compute_id=compute_id, **options)


def build_clip_feature_cache(
    root: str | os.PathLike,
    clips: Sequence[ClipRef],
    compute_clips: Callable[[Sequence[ClipRef]], tuple[np.ndarray, ...]],
    *,
    compute_id: str,
    dtype: str = "bfloat16",
    shard_size: int = 256,
    batch_size: int = 8,
    store_codes: bool = False,
    progress: bool = True,
) -> FeatureCache:
    """The feature cache of any frozen front end: ``compute_clips(clips)`` -> (features
    (b, clip.length + 4, D), audio masks (b, clip.length + 4)[, padded codes (b, 4, clip.length)
    when ``store_codes``]) for up to ``batch_size`` clips (MusicGen from codes:
    :func:`build_feature_cache`; log-mel from the audio: ``bossa_jax.mel.clips_fn``)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive: {batch_size}")
    if dtype not in FEATURE_DTYPES:
        raise DataError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}: {dtype!r}")
    stored = dtype_of(dtype)

    def make_records(indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
        indices = list(indices)
        records = []
        for lo in range(0, len(indices), batch_size):
            chunk = [clips[i] for i in indices[lo : lo + batch_size]]
            features, masks, *codes = compute_clips(chunk)
            features = np.asarray(features)
            steps = chunk[0].length + audio.PATTERN_EXTRA
            if features.ndim != 3 or features.shape[:2] != (len(chunk), steps):
                raise DataError(
                    f"compute_fn returned features of shape {features.shape}; expected "
                    f"({len(chunk)}, {steps}, D)"
                )
            features = features.astype(stored)
            for j in range(len(chunk)):
                record = {"features": features[j], "audio_mask": masks[j]}
                if store_codes:
                    record["codes"] = codes[0][j].astype(np.int16)
                records.append(record)
        return records

    build_store(
        root,
        kind=FEATURES_KIND,
        keys=[c.key for c in clips],
        make_records=make_records,
        compute_id=compute_id,
        shard_size=shard_size,
        extra={"store_codes": store_codes, "dtype": dtype},
        progress=progress,
    )
    return FeatureCache(root)
