"""Benchmark: stage-1 / stage-2 grain pipelines on CPU vs what a training step consumes.

Builds a synthetic POP909-layout corpus on the fly (symusic MIDI, beat/chord files, quiet WAV),
its pseudo-EnCodec codes store and a feature cache of (512, D) bf16 features, then times:

* REMI and octuple encoding of whole songs, and stage-1/stage-2 sequence building per window;
* pipeline throughput (samples/s, median of 3 runs, after one warm-up batch) for stage 1 and
  stage 2, audio as codes (cut from the codes store) and as cached features;
* the ratio to what training consumes: the paper's global batch (128 stage 1, 32 stage 2) divided
  by an ASSUMED step time (``--step-s1``/``--step-s2``; no full BOSSA step runs here yet). Defaults
  are FLOP estimates for one H100-class host: stage 1 with cached features trains only the Q-Former
  (~186 M params x 6 x 128 x 258 tokens ~ 4e13 FLOP -> ~0.25 s); stage 2 runs the frozen 1.2 B
  MuseCoco forward and backward over 32 x 1032 tokens (~2.4e14 FLOP -> ~1 s).
* One process reads; with P hosts each host needs 1/P of the rate (its share of every batch).

Memory: each cached-features sample is 2 MiB (512 x 2048 bf16). glibc serves such buffers with
fresh mmaps, so every read page-faults its pages in; on this VM a fault costs ~20 us (10 ms per
record). The benchmark therefore re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` raised so freed buffers are reused (set the same two variables for a
training run); ``--no-malloc-tuning`` measures without them.

Usage: .venv/bin/python bench/data_pipeline.py [--songs 50 --bars 32 --feature-dim 2048]
Writes bench/results/data_pipeline.json (data_pipeline_untuned.json with --no-malloc-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from bossa_jax.data import feature_cache as fc  # noqa: E402
from bossa_jax.data import pipeline as pl  # noqa: E402
from bossa_jax.data import readers, synthetic  # noqa: E402
from bossa_jax.outputs import atomic_output  # noqa: E402
from bossa_jax.symbolic import octuple, remi  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pipeline_rate(index, audio, stage, batch, threads, batches) -> float:
    """Samples/s over ``batches`` batches (after one warm-up batch), median of 3 runs."""
    rates = []
    for run in range(3):
        options = pl.PipelineOptions(
            stage=stage, global_batch_size=batch, seed=run, num_threads=threads
        )
        it = pl.Pipeline(index, audio, options).iterator()
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--songs", type=int, default=50)
    parser.add_argument("--bars", type=int, default=32)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="batch size used for timing")
    parser.add_argument("--step-s1", type=float, default=0.25, help="assumed stage-1 step (s)")
    parser.add_argument("--step-s2", type=float, default=1.0, help="assumed stage-2 step (s)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-malloc-tuning", action="store_true")
    args = parser.parse_args()
    tuned = not args.no_malloc_tuning
    if tuned and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})
    out_file = RESULTS / ("data_pipeline.json" if tuned else "data_pipeline_untuned.json")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        for i in range(args.songs):
            synthetic.write_pop909_song(
                root / "pop909", f"{i + 1:03d}", bars=args.bars, seed=i, audio_root=root / "audio"
            )
        write_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        sources = readers.pop909_sources(root / "pop909", root / "audio")
        records, summary = readers.read_songs(sources)
        read_s = time.perf_counter() - t0
        codes = fc.build_codes_store(
            root / "codes", [(r.id, r.audio) for r in records], synthetic.fake_codes,
            compute_id="fake", progress=False,
        )  # fmt: skip
        index = pl.build_index(records, codes)

        dim = args.feature_dim
        table = np.random.default_rng(0).standard_normal((2049, dim)).astype(np.float32)

        def compute(batch_codes):  # cheap stand-in for MusicGen: one embedding lookup
            steps = np.pad(batch_codes[:, 0], ((0, 0), (1, 3)), constant_values=2048)
            return table[steps]

        t0 = time.perf_counter()
        cache = fc.build_feature_cache(
            root / "features", index.clips, codes.codes, compute, compute_id=f"bench{dim}",
            shard_size=64, batch_size=16, progress=False,
        )  # fmt: skip
        cache_s = time.perf_counter() - t0
        cache_bytes = sum(s["bytes"] for s in cache.store.manifest["shards"])

        songs = [r.song for r in records]
        windows = [e.window for e in index.examples]
        remi_s = median_time(lambda: [remi.encode(s.arrangement) for s in songs], 5) / len(songs)
        oct_s = median_time(lambda: [octuple.encode(s.arrangement) for s in songs], 5) / len(songs)
        s1_seq = median_time(
            lambda: [octuple.stage1_sequence(w.arrangement, w.leadsheet) for w in windows], 3
        ) / len(windows)
        s2_seq = median_time(
            lambda: [remi.stage2_sequence(w.arrangement, w.leadsheet) for w in windows], 3
        ) / len(windows)

        rows = []
        for stage, paper_batch, step in ((1, 128, args.step_s1), (2, 32, args.step_s2)):
            for mode, audio in (
                ("codes", pl.AudioSource(index, codes=codes)),
                ("features", pl.AudioSource(index, features=cache)),
            ):
                rate = pipeline_rate(index, audio, stage, args.batch, args.threads, args.batches)
                need = paper_batch / step
                rows.append(
                    {
                        "stage": stage,
                        "audio": mode,
                        "samples_per_s": rate,
                        "paper_global_batch": paper_batch,
                        "assumed_step_s": step,
                        "needed_samples_per_s": need,
                        "ratio": rate / need,
                    }
                )

    notes_per_song = float(np.mean([len(s.arrangement) for s in songs]))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "corpus": {
            "songs": len(records),
            "bars": args.bars,
            "windows": len(index),
            "notes_per_song": notes_per_song,
            "skipped": summary.num_skipped,
        },
        "write_corpus_s": write_s,
        "read_songs_per_s": len(records) / read_s,
        "feature_cache": {
            "dim": dim,
            "clips": len(cache),
            "build_clips_per_s": len(cache) / cache_s,
            "bytes": cache_bytes,
        },
        "encode_ms_per_song": {"remi": remi_s * 1e3, "octuple": oct_s * 1e3},
        "sequence_ms_per_window": {"stage1_octuple": s1_seq * 1e3, "stage2_remi": s2_seq * 1e3},
        "threads": args.threads,
        "malloc_tuning": {k: os.environ.get(k) for k in MALLOC_TUNING},
        "timing_batch": args.batch,
        "pipelines": rows,
    }
    print(f"malloc tuning: {'on' if tuned else 'off'}")
    print(f"corpus: {len(records)} songs x {args.bars} bars, {len(index)} windows, "
          f"{notes_per_song:.0f} arrangement notes/song; {result['machine']}")  # fmt: skip
    print(f"read songs: {result['read_songs_per_s']:.1f}/s; feature cache (D={dim}): "
          f"{result['feature_cache']['build_clips_per_s']:.0f} clips/s build, "
          f"{cache_bytes / 2**20:.0f} MiB")  # fmt: skip
    print(f"encode per song: REMI {remi_s * 1e3:.2f} ms, octuple {oct_s * 1e3:.2f} ms; per window: "
          f"stage-1 seq {s1_seq * 1e3:.2f} ms, stage-2 seq {s2_seq * 1e3:.2f} ms")  # fmt: skip
    print(f"{'stage':>5} {'audio':>9} {'samples/s':>10} {'needed/s':>9} {'ratio':>7}  assumption")
    for r in rows:
        print(
            f"{r['stage']:>5} {r['audio']:>9} {r['samples_per_s']:>10.1f} "
            f"{r['needed_samples_per_s']:>9.1f} {r['ratio']:>7.2f}  "
            f"batch {r['paper_global_batch']} / {r['assumed_step_s']} s step"
        )
    with atomic_output(out_file) as tmp_file:
        tmp_file.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
