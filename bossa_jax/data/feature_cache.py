"""On-disk stores of per-song EnCodec codes and per-clip frozen MusicGen features (DESIGN "Data";
SPEC 1.1-1.3, 6.1).

Why array_record (and not tensorstore/zarr): every read in training is one whole record picked at
random (one clip's (512, D) features, or one song's codes), never a slice across records, and the
records of the codes store have different lengths. array_record gives exactly that: files of
independent records with an index, random access by record number across a list of files
(``ArrayRecordDataSource``, the source grain itself is built around), readable by any number of
hosts from a shared or object filesystem, and byte-for-byte deterministic output for the same
records (so a resumed build can be checked against an uninterrupted one). With ``group_size:1``
and no compression a record is read with one seek; bf16 features barely compress anyway.
A zarr array would need a fixed shape (the codes are ragged) and chunk-aligned writers.

Layout of a store folder::

    manifest.json            written last: kind, fields, item keys, fingerprint, shards (complete)
    shard-00000.arrayrecord  records [0, K)            + shard-00000.json  (count, bytes, sha256)
    shard-00001.arrayrecord  records [K, 2K) ...

Building is resumable: the items are cut into shards of ``shard_size``; a shard is written under a
temporary name, renamed when complete, and only then gets its ``.json`` receipt. On restart every
shard whose receipt matches its file (record count, size, sha256) is kept and the rest are rebuilt,
so killing a build at any moment and running it again gives the same bytes as one uninterrupted run
(given a deterministic compute function). A store built for other items, fields or compute function
(its ``fingerprint`` differs) is refused rather than mixed.

Records are a small self-describing binary format (no pickle): a 4-byte header length, a JSON header
``[[name, dtype, shape], ...]``, then the raw little-endian arrays. bfloat16 is stored as its
uint16 bits and read back as ``ml_dtypes.bfloat16``.

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
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from bossa_jax import audio
from bossa_jax.errors import DataError
from bossa_jax.outputs import atomic_output

log = logging.getLogger(__name__)

STORE_FORMAT = "bossa-jax-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1,uncompressed"
FEATURES_KIND = "features"
CODES_KIND = "codes"
_BF16 = np.dtype(ml_dtypes.bfloat16)


# --- records ------------------------------------------------------------------------------------
def encode_record(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays -> bytes (header + raw little-endian data; bfloat16 as uint16 bits)."""
    header, payload = [], []
    for name, value in arrays.items():
        arr = np.asarray(value)
        dtype = "bfloat16" if arr.dtype == _BF16 else arr.dtype.newbyteorder("<").str
        raw = arr.view(np.uint16) if arr.dtype == _BF16 else arr.astype(dtype, copy=False)
        header.append([name, dtype, list(arr.shape)])
        payload.append(np.ascontiguousarray(raw).tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(payload)


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_record` (arrays are read-only views of ``data``)."""
    (n,) = struct.unpack_from("<I", data, 0)
    header = json.loads(data[4 : 4 + n])
    out, offset = {}, 4 + n
    for name, dtype, shape in header:
        bf16 = dtype == "bfloat16"
        dt = np.dtype("<u2" if bf16 else dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
        out[name] = arr.view(_BF16) if bf16 else arr
        offset += count * dt.itemsize
    return out


# --- the sharded store --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardReceipt:
    """What a complete shard holds; written after the shard file is in place."""

    index: int
    start: int
    count: int
    bytes: int
    sha256: str
    lengths: list[int]  # last-axis length of each record's first array (a song's code frames)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.arrayrecord"


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
        receipt = ShardReceipt(**json.loads(receipt_file.read_text()))
    except (ValueError, TypeError):
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
    extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Builds (or resumes) a store of ``len(keys)`` records in shards of ``shard_size``.

    ``make_records(indices)`` returns the records of those item indices (called with up to
    ``shard_size`` consecutive indices per call; it may batch internally). Returns the manifest.
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
            receipt = _write_shard(root, index, start, make_records(range(start, start + count)))
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
    root: Path, index: int, start: int, records: list[dict[str, np.ndarray]]
) -> ShardReceipt:
    final = _shard_path(root, index)
    tmp = root / f".{final.name}.tmp"
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(encode_record(record))
    finally:
        writer.close()
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    lengths = [int(np.shape(next(iter(r.values())))[-1]) for r in records]
    receipt = ShardReceipt(
        index, start, len(records), final.stat().st_size, _sha256(final), lengths
    )
    with atomic_output(_receipt_path(root, index)) as out:
        out.write_text(json.dumps(dataclasses.asdict(receipt)))
    return receipt


class Store:
    """Random access to a complete store: ``store[i]`` -> dict of arrays; ``store.key(i)``."""

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
        if kind is not None and self.manifest["kind"] != kind:
            raise DataError(f"{self.root}: a {self.manifest['kind']} store, expected {kind}")
        paths = [_shard_path(self.root, s["index"]) for s in self.manifest["shards"]]
        for path, shard in zip(paths, self.manifest["shards"]):
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise DataError(f"{path}: missing or of the wrong size; rebuild the store")
        self._source = ArrayRecordDataSource([str(p) for p in paths]) if paths else None
        self.keys: list[str] = self.manifest["keys"]
        self._index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self.keys):
            raise IndexError(f"record {index} outside 0..{len(self.keys) - 1}")
        return decode_record(self._source[int(index)])

    def index_of(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError as err:
            raise DataError(f"{self.root}: no record for {key!r}") from err

    def get(self, key: str) -> dict[str, np.ndarray]:
        return self[self.index_of(key)]

    def checksums(self) -> list[str]:
        return [s["sha256"] for s in self.manifest["shards"]]

    def verify(self) -> None:
        """Re-hashes every shard; raises DataError on the first mismatch."""
        for shard in self.manifest["shards"]:
            path = _shard_path(self.root, shard["index"])
            if _sha256(path) != shard["sha256"]:
                raise DataError(f"{path}: checksum mismatch; rebuild the store")


# --- per-song codes -----------------------------------------------------------------------------
class CodesStore:
    """Per-song EnCodec codes (num_codebooks, T) int16, by song id (SPEC 6.1's HDF5, sharded)."""

    def __init__(self, root: str | os.PathLike):
        self.store = Store(root, CODES_KIND)
        shards = self.store.manifest["shards"]
        self._frames = [n for shard in shards for n in shard["lengths"]]

    def __contains__(self, song_id: str) -> bool:
        return song_id in self.store._index

    def codes(self, song_id: str) -> np.ndarray:
        return self.store.get(song_id)["codes"]

    def num_frames(self, song_id: str) -> int:
        return self._frames[self.store.index_of(song_id)]


def build_codes_store(
    root: str | os.PathLike,
    songs: Sequence[tuple[str, Any]],
    encode_fn: Callable[[Any], np.ndarray],
    *,
    compute_id: str,
    shard_size: int = 64,
    progress: bool = True,
) -> CodesStore:
    """Encodes every ``(song_id, audio)`` with ``encode_fn(audio) -> codes (4, T)`` into a store
    (resumable, see the module docstring); the frame counts land in the shard receipts."""
    keys = [s for s, _ in songs]
    if len(set(keys)) != len(keys):
        raise DataError("build_codes_store: duplicate song ids")

    def make_records(indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
        records = []
        for i in indices:
            codes = np.asarray(encode_fn(songs[i][1]))
            if codes.ndim != 2 or codes.min(initial=0) < 0 or codes.max(initial=0) > 32767:
                raise DataError(f"{keys[i]}: encode_fn gave codes of shape {codes.shape}")
            records.append({"codes": codes.astype(np.int16)})
        return records

    build_store(
        root,
        kind=CODES_KIND,
        keys=keys,
        make_records=make_records,
        compute_id=compute_id,
        shard_size=shard_size,
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
    """Precomputed features by clip index: ``cache[i]`` -> {"features" (512, D) bfloat16,
    "audio_mask" (512,) float32}; ``cache.keys[i]`` is the :class:`ClipRef` key."""

    def __init__(self, root: str | os.PathLike):
        self.store = Store(root, FEATURES_KIND)
        self.keys = self.store.keys

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.store[index]

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
    shard_size: int = 256,
    batch_size: int = 8,
    store_codes: bool = False,
    progress: bool = True,
) -> FeatureCache:
    """Computes ``compute_fn(codes (b, 4, 508) int32) -> (b, 512, D)`` for every clip, stored as
    bfloat16 with the clip's audio mask (and its padded codes when ``store_codes``).

    ``song_codes(song_id)`` gives a song's whole codes (e.g. ``CodesStore(...).codes``);
    ``compute_id`` names the compute function and its weights (a different id refuses to resume).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive: {batch_size}")

    def make_records(indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
        indices = list(indices)
        records = []
        for lo in range(0, len(indices), batch_size):
            chunk = [clips[i] for i in indices[lo : lo + batch_size]]
            padded = [clip_codes(song_codes(c.song_id), c) for c in chunk]
            codes = np.stack([p[0] for p in padded]).astype(np.int32)
            features = np.asarray(compute_fn(codes))
            if features.ndim != 3 or features.shape[:2] != (len(chunk), codes.shape[2] + 4):
                raise DataError(
                    f"compute_fn returned features of shape {features.shape}; expected "
                    f"({len(chunk)}, {codes.shape[2] + 4}, D)"
                )
            features = features.astype(_BF16)
            for j, (c, m) in enumerate(padded):
                record = {"features": features[j], "audio_mask": m}
                if store_codes:
                    record["codes"] = c.astype(np.int16)
                records.append(record)
        return records

    build_store(
        root,
        kind=FEATURES_KIND,
        keys=[c.key for c in clips],
        make_records=make_records,
        compute_id=compute_id,
        shard_size=shard_size,
        extra={"store_codes": store_codes},
        progress=progress,
    )
    return FeatureCache(root)
