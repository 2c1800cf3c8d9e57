"""Feature cache and codes store: records, random access, resume after SIGKILL, refusals."""

from __future__ import annotations

import json
import os
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


def test_record_round_trip_keeps_dtypes_and_bf16_bits():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    arrays = {"f": feats, "m": np.array([1.0, 0.0], np.float32), "c": np.arange(6, dtype=np.int16)}
    back = fc.decode_record(fc.encode_record(arrays))
    assert list(back) == ["f", "m", "c"]
    assert back["f"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["f"].view(np.uint16), feats.view(np.uint16))
    np.testing.assert_array_equal(back["m"], arrays["m"])
    assert back["c"].dtype == np.int16 and back["c"].tolist() == list(range(6))


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
    for name in [p.name for p in (tmp_path / "reference").glob("shard-*.arrayrecord")]:
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
    shard = out / "shard-00001.arrayrecord"
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
