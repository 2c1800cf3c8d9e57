"""Feature cache and codes store: records, random access, resume after SIGKILL, refusals."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bossa_jax.data import feature_cache as fc
from bossa_jax.data import synthetic
from bossa_jax.errors import DataError
from tests.data.data_fixtures import load_index, write_corpus

HERE = Path(__file__).parent
SHARD = 4  # 18 clips -> 5 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_store_round_trip_keeps_dtypes_bf16_bits_and_ragged_records(tmp_path):
    rng = np.random.default_rng(0)
    records = [
        {
            "f": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
            "m": rng.standard_normal(7).astype(np.float32),
            "c": rng.integers(-9, 9, size=(2, 1 + 3 * i)).astype(np.int16),
        }
        for i in range(7)
    ]
    fc.build_store(
        tmp_path / "s", kind="test", keys=[f"k{i}" for i in range(7)], shard_size=3,
        make_records=lambda idx: [records[i] for i in idx], compute_id="t", ragged=("c",),
        progress=False,
    )  # fmt: skip
    store = fc.Store(tmp_path / "s", "test")
    assert len(store.shards) == 3 and list(store.fields) == ["f", "m", "c"]
    for shard in store.shards:  # blocks start on page boundaries
        assert all(f.offset % fc.ALIGN == 0 for f in shard.fields)
    for i in range(7):
        back = store.get(f"k{i}")
        assert back["f"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(back["f"].view(np.uint16), records[i]["f"].view(np.uint16))
        np.testing.assert_array_equal(back["m"], records[i]["m"])
        assert back["c"].dtype == np.int16
        np.testing.assert_array_equal(back["c"], records[i]["c"])
    order = [6, 0, 4, 4, 2]  # across shards, repeated, out of order
    out = np.zeros((5, 7), np.float32)
    assert store.read("m", order, out=out) is out
    np.testing.assert_array_equal(out, np.stack([records[i]["m"] for i in order]))
    feats = store.read("f", order)
    np.testing.assert_array_equal(
        feats.view(np.uint16), np.stack([records[i]["f"] for i in order]).view(np.uint16)
    )
    copy = pickle.loads(pickle.dumps(store))  # as grain's worker processes receive it
    np.testing.assert_array_equal(copy.read("m", order), out)
    np.testing.assert_array_equal(copy.get("k5")["c"], records[5]["c"])
    with pytest.raises(IndexError):
        store.read("m", [7])
    with pytest.raises(ValueError, match="ragged"):
        store.read("c", [0])
    with pytest.raises(DataError, match="expected features"):
        fc.FeatureCache(tmp_path / "s")


def test_codes_store_matches_encoder(corpus):
    index, codes = load_index(corpus)
    for record in index.records:
        expected = synthetic.fake_codes(record.audio)
        np.testing.assert_array_equal(codes.codes(record.id), expected)
        assert codes.num_frames(record.id) == expected.shape[1]


def test_feature_cache_values_and_masks(corpus, tmp_path):
    index, codes = load_index(corpus)
    clips = index.clips
    cache = fc.build_feature_cache(
        tmp_path / "c", clips, codes.codes, synthetic.fake_features, compute_id="f", progress=False
    )
    assert len(cache) == len(clips) == 18
    for i in (0, 7, 17):
        clip = clips[i]
        song = codes.codes(clip.song_id)
        raw = song[:, clip.start : clip.start + clip.frames]
        padded = np.full((4, 508), 2048, np.int64)
        padded[:, : raw.shape[1]] = raw
        expected = synthetic.fake_features(padded[None])[0].astype(ml_dtypes.bfloat16)
        record = cache[i]
        assert record["features"].shape == (512, 16)
        np.testing.assert_array_equal(record["features"].view(np.uint16), expected.view(np.uint16))
        assert record["audio_mask"].sum() == clip.frames + 4


def _build(out: Path, corpus: Path, compute=synthetic.fake_features) -> fc.FeatureCache:
    index, codes = load_index(corpus)
    return fc.build_feature_cache(
        out, index.clips, codes.codes, compute, compute_id="fake16", shard_size=SHARD,
        batch_size=2, progress=False,
    )  # fmt: skip


def test_sigkilled_build_resumes_to_identical_store(corpus, tmp_path):
    reference = _build(tmp_path / "reference", corpus)
    out, marker = tmp_path / "killed", tmp_path / "marker"
    hang_after = 10  # shards 0 and 1 complete, shard 2 half computed when it hangs
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "cache_worker.py"), str(corpus), str(out), str(SHARD),
         str(hang_after), str(marker)],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "worker exited before reaching the hang point"
            assert time.monotonic() < deadline, "worker never reached the hang point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / fc.MANIFEST).exists()
    assert sorted(p.name for p in out.glob("shard-*.json")) == [
        "shard-00000.json",
        "shard-00001.json",
    ]

    with pytest.raises(DataError, match="did not finish"):
        fc.FeatureCache(out)

    computed = []

    def counting(batch):
        computed.append(len(batch))
        return synthetic.fake_features(batch)

    resumed = _build(out, corpus, counting)
    assert sum(computed) == 18 - 2 * SHARD  # the two complete shards were kept
    assert resumed.store.checksums() == reference.store.checksums()
    for name in [p.name for p in (tmp_path / "reference").glob("shard-*.bin")]:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert not list(out.glob(".shard-*"))
    resumed.store.verify()


def test_corrupt_shard_is_rebuilt_and_other_compute_refused(corpus, tmp_path):
    out = tmp_path / "c"
    first = _build(out, corpus)
    sums = first.store.checksums()
    # Simulate a crash after shard 1's receipt, with shard 1 damaged, before the manifest.
    (out / fc.MANIFEST).unlink()
    (out / "building.json").write_text(
        json.dumps({"fingerprint": first.store.manifest["fingerprint"]})
    )
    shard = out / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    computed = []

    def counting(batch):
        computed.append(len(batch))
        return synthetic.fake_features(batch)

    assert _build(out, corpus, counting).store.checksums() == sums
    assert sum(computed) == SHARD
    _build(out, corpus, counting)  # a complete store: running the build again computes nothing
    assert sum(computed) == SHARD
    index, codes = load_index(corpus)
    with pytest.raises(DataError, match="choose another folder"):
        fc.build_feature_cache(
            out, index.clips, codes.codes, synthetic.fake_features, compute_id="other",
            progress=False,
        )  # fmt: skip
    with pytest.raises(DataError, match="other clips"):
        first.check_clips(index.clips[:-1])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_feature_dtype_option_stores_and_reads_that_dtype(corpus, tmp_path, dtype):
    index, codes = load_index(corpus)
    clips = index.clips[:5]
    cache = fc.build_feature_cache(
        tmp_path / dtype, clips, codes.codes, synthetic.fake_features, compute_id="f",
        dtype=dtype, shard_size=2, progress=False,
    )  # fmt: skip
    assert cache.dtype == np.dtype(dtype)
    padded = np.stack([fc.clip_codes(codes.codes(c.song_id), c)[0] for c in clips])
    expected = synthetic.fake_features(padded).astype(dtype)
    batch = cache.read_batch([4, 1, 3])
    assert batch["features"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(batch["features"], expected[[4, 1, 3]])
    with pytest.raises(DataError, match="feature dtype"):
        fc.build_feature_cache(
            tmp_path / "x", clips, codes.codes, synthetic.fake_features, compute_id="f",
            dtype="int8", progress=False,
        )  # fmt: skip
