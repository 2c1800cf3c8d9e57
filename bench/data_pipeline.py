"""Benchmark: stage-1 / stage-2 grain pipelines on CPU vs what a training step consumes.

Builds a synthetic POP909-layout corpus on the fly (symusic MIDI, beat/chord files, quiet WAV),
its pseudo-EnCodec codes store and a feature cache of (512, D) bf16 features, then times:

* REMI and octuple encoding of whole songs, and stage-1/stage-2 sequence building per window;
* pipeline throughput (samples/s, median of 3 runs, after one warm-up batch) for stage 1 and
  stage 2, audio as codes (cut from the codes store) and as cached features;
* the read path alone, one thread: the audio of random batches of ``--batch`` examples
  (``AudioSource.read_batch``), ms per sample and MB/s: the cost a pipeline thread pays per sample,
  a figure that stays meaningful when other jobs load the machine;
* the ratio to what training consumes: the paper's global batch (128 stage 1, 32 stage 2) divided
  by an ASSUMED step time (``--step-s1``/``--step-s2``; no full BOSSA step runs here). 0.25 s is
  the issue's stage-1 figure; the README derives the per-host need from the step's FLOPs.
  Stage 2 runs the frozen 1.2 B MuseCoco forward and backward over 32 x 1032 tokens (~2.4e14 FLOP
  -> ~1 s).
* One process reads; with P hosts each host needs 1/P of the rate (its share of every batch).

Every figure is printed with the load average (``/proc/loadavg``) at its start, because other jobs
may share the cores. The feature cache is written just before it is read and is far smaller than
the RAM, so all figures are warm page cache (cold-cache reads cannot be measured here).

Wall-clock rates depend on what else runs; CPU time does much less, so each figure also comes as
CPU ms per sample (all threads of the process) and samples per CPU-second: a host with N free
cores reads about N times that ("/core" = that rate over the need).

Usage: .venv/bin/python bench/data_pipeline.py [--songs 50 --bars 32 --feature-dim 2048]
Writes bench/results/data_pipeline.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Dense bf16 peak TFLOP/s per chip (vendor figures) for the step-time estimate of --paper-flops.
PEAK_TFLOPS = {"H100": 989.0, "A100": 312.0, "TPU v5e": 197.0}
ASSUMED_MFU = 0.4


def paper_step_flops() -> float:
    """XLA's FLOP count of the paper-size stage-1 step in features mode (global batch 128, bf16
    compute), from the lowered step: nothing is compiled or allocated."""
    import jax

    from bossa_jax import sharding
    from bossa_jax.config import load_config
    from bossa_jax.train import stage1

    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "paper.yaml",
        [
            'mesh.shape={"data": 1, "fsdp": 1, "tensor": 1}',
            "data.audio_input=features",
            "train.global_batch_size=128",
            "train.compute_dtype=bfloat16",
        ],
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        step = stage1.abstract_step(cfg, mesh, 128)
        return float(step.jitted.lower(*step.args).cost_analysis()["flops"])


def loadavg() -> float:
    """The 1-minute load average (other jobs on the machine)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def batch_bytes(batch) -> int:
    return sum(np.asarray(v).nbytes for v in batch.values())


def pipeline_rate(index, audio, stage, batch, threads, batches) -> dict[str, float]:
    """Samples/s (wall clock), CPU seconds per sample (all threads of this process) and bytes per
    sample over ``batches`` batches after one warm-up batch; median of 3 runs."""
    rates, cpu = [], []
    for run in range(3):
        options = pl.PipelineOptions(
            stage=stage, global_batch_size=batch, seed=run, num_threads=threads
        )
        it = pl.Pipeline(index, audio, options).iterator()
        sample_bytes = batch_bytes(next(it)) / batch
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch / (time.perf_counter() - t0))
        cpu.append((time.process_time() - c0) / (batches * batch))
    return {
        "samples_per_s": statistics.median(rates),
        "cpu_ms_per_sample": statistics.median(cpu) * 1e3,
        "bytes_per_sample": sample_bytes,
    }


def read_cost(audio, num_examples: int, batch: int, batches: int) -> dict[str, float]:
    """Reading the audio of random batches in this thread: wall and CPU (this thread's) ms per
    sample, median over ``batches`` batches after one warm-up batch, and bytes per sample."""
    rng = np.random.default_rng(0)
    wall, cpu, sample_bytes = [], [], 0.0
    for i in range(batches + 1):
        ids = rng.choice(num_examples, size=batch, replace=False)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = audio.read_batch(ids)
        if i:
            wall.append((time.perf_counter() - t0) / batch)
            cpu.append((time.thread_time() - c0) / batch)
        sample_bytes = batch_bytes(out) / batch
    return {
        "ms_per_sample": statistics.median(wall) * 1e3,
        "cpu_ms_per_sample": statistics.median(cpu) * 1e3,
        "bytes_per_sample": sample_bytes,
    }


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
    parser.add_argument("--feature-dtype", default="bfloat16", choices=fc.FEATURE_DTYPES)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: see above)")
    parser.add_argument(
        "--paper-flops",
        action="store_true",
        help="only print the paper-size stage-1 step's FLOPs and the per-host need they imply",
    )
    args = parser.parse_args()
    out_file = args.out or RESULTS / "data_pipeline.json"
    if args.paper_flops:
        flops = paper_step_flops()
        print(f"paper-size stage-1 step, features mode, global batch 128: {flops:.3e} FLOP")
        for chip, tflops in PEAK_TFLOPS.items():
            step_s = flops / (8 * tflops * 1e12 * ASSUMED_MFU)
            print(
                f"  8 x {chip} at {ASSUMED_MFU:.0%} MFU: {step_s:.3f} s/step -> "
                f"{128 / step_s:.0f} samples/s per host"
            )
        return

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
            dtype=args.feature_dtype, shard_size=64, batch_size=16, progress=False,
        )  # fmt: skip
        cache_s = time.perf_counter() - t0
        cache_bytes = sum(s["bytes"] for s in cache.store.manifest["shards"])
        sources = {
            "codes": pl.AudioSource(index, codes=codes),
            "features": pl.AudioSource(index, features=cache),
        }
        reads = []
        for mode, audio in sources.items():
            load = loadavg()
            cost = read_cost(audio, len(index), args.batch, 3 * args.batches)
            ms, cpu_ms = cost["ms_per_sample"], cost["cpu_ms_per_sample"]
            reads.append(
                {
                    "audio": mode,
                    **cost,
                    "samples_per_s": 1e3 / ms,
                    "MB_per_s": cost["bytes_per_sample"] / ms / 1e3,
                    "samples_per_cpu_s": 1e3 / cpu_ms,
                    "loadavg_1min": load,
                }
            )

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
            for mode, audio in sources.items():
                load = loadavg()
                timing = pipeline_rate(index, audio, stage, args.batch, args.threads, args.batches)
                rate, need = timing["samples_per_s"], paper_batch / step
                rows.append(
                    {
                        "stage": stage,
                        "audio": mode,
                        **timing,
                        "MB_per_s": rate * timing["bytes_per_sample"] / 1e6,
                        "samples_per_cpu_s": 1e3 / timing["cpu_ms_per_sample"],
                        "loadavg_1min": load,
                        "paper_global_batch": paper_batch,
                        "assumed_step_s": step,
                        "needed_samples_per_s": need,
                        "ratio": rate / need,
                        "ratio_per_cpu_core": 1e3 / timing["cpu_ms_per_sample"] / need,
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
            "dtype": args.feature_dtype,
            "clips": len(cache),
            "build_clips_per_s": len(cache) / cache_s,
            "bytes": cache_bytes,
        },
        "encode_ms_per_song": {"remi": remi_s * 1e3, "octuple": oct_s * 1e3},
        "sequence_ms_per_window": {"stage1_octuple": s1_seq * 1e3, "stage2_remi": s2_seq * 1e3},
        "threads": args.threads,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "timing_batch": args.batch,
        "page_cache": "warm (the cache was just written; far smaller than the RAM)",
        "single_thread_reads": reads,
        "pipelines": rows,
    }
    print(f"corpus: {len(records)} songs x {args.bars} bars, {len(index)} windows, "
          f"{notes_per_song:.0f} arrangement notes/song; {result['machine']}")  # fmt: skip
    print(f"read songs: {result['read_songs_per_s']:.1f}/s; feature cache (D={dim}): "
          f"{result['feature_cache']['build_clips_per_s']:.0f} clips/s build, "
          f"{cache_bytes / 2**20:.0f} MiB")  # fmt: skip
    print(f"encode per song: REMI {remi_s * 1e3:.2f} ms, octuple {oct_s * 1e3:.2f} ms; per window: "
          f"stage-1 seq {s1_seq * 1e3:.2f} ms, stage-2 seq {s2_seq * 1e3:.2f} ms")  # fmt: skip
    print(f"single-thread read of random batches of {args.batch} (warm page cache):")
    for r in reads:
        print(
            f"  {r['audio']:>9}: {r['ms_per_sample']:.3f} ms/sample wall, "
            f"{r['cpu_ms_per_sample']:.3f} ms CPU = {r['samples_per_cpu_s']:.0f} samples per "
            f"CPU-second; {r['MB_per_s']:.0f} MB/s wall (load {r['loadavg_1min']:.2f})"
        )
    print(
        f"{'stage':>5} {'audio':>9} {'samples/s':>10} {'MB/s':>7} {'CPU ms':>7} {'needed/s':>9} "
        f"{'ratio':>6} {'/core':>6} {'load':>5}  assumption"
    )
    for r in rows:
        print(
            f"{r['stage']:>5} {r['audio']:>9} {r['samples_per_s']:>10.1f} {r['MB_per_s']:>7.0f} "
            f"{r['cpu_ms_per_sample']:>7.3f} {r['needed_samples_per_s']:>9.1f} {r['ratio']:>6.2f} "
            f"{r['ratio_per_cpu_core']:>6.2f} {r['loadavg_1min']:>5.2f}  "
            f"batch {r['paper_global_batch']} / {r['assumed_step_s']} s step"
        )
    with atomic_output(out_file) as tmp_file:
        tmp_file.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
