"""Benchmark: 16-bar arrangements per minute, end to end (issue 10: bossa_jax.arrange).

End to end = what :class:`bossa_jax.arrange.Arranger` does for a list of songs: check and decode
each reference file once, plan the windows, compute each window's log-mel clip features, the
Q-Former style prefix, sample every window (the k-th windows of all songs in one sampler call),
stitch, decode to a symusic Score (MIDI). Timed for 1 song and for 16 songs at once.

Model: stage 2 with a MuseCoco-200m-shaped LM (512 wide, 8 heads, 6 layers, FFN 2048, vocab 1253,
LoRA r16, fp32), a small Q-Former (256 wide, 4 layers, 4 heads, 32 queries) and the ``mel`` front
end (64 mel bands), random weights. Inputs: the demo lead sheet (16 bars) and the demo style
recording (26 s), the same for every song. A random model almost never draws ``b-1``, so every
window runs to its cap, ``--tokens-per-window`` (default 160, about 70 tokens a bar over the 7
windows of 16 bars, a typical piano texture); the token counts are reported.

Each setting is run once untimed (compilation) and then ``--repeats`` times; the table shows the
median. The machine load (``uptime``) is printed and stored: on a shared machine the figures are
lower bounds.

Usage: .venv/bin/python bench/arrange.py [--songs 1 16] [--bars 16] [--tokens-per-window 160]
       [--repeats 2] [--smoke]
Writes bench/results/arrange.json (arrange_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

N_MELS = 64
MUSECOCO_200M = dict(hidden_size=512, num_attention_heads=8, num_hidden_layers=6, ffn_dim=2048)
QFORMER_SMALL = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return Path("/proc/loadavg").read_text().strip()


def build(smoke: bool, tokens_per_window: int):
    from flax import nnx

    from bossa_jax import sharding
    from bossa_jax.arrange import Arranger
    from bossa_jax.config import load_config
    from bossa_jax.models.arranger import Stage2Model

    base = "tiny" if smoke else "paper"
    overrides = [
        "audio.frontend=mel",
        f"audio.n_mels={N_MELS}",
        f"qformer.encoder_width={N_MELS}",
        "data.audio_input=features",
        f"arrange.max_new_tokens={tokens_per_window}",
        "musecoco.dtype=float32",
        "musecoco.vocab_size=1253",
    ]
    if not smoke:
        overrides += [f"musecoco.{k}={v}" for k, v in MUSECOCO_200M.items()]
        overrides += [f"qformer.{k}={v}" for k, v in QFORMER_SMALL.items()]
    cfg = load_config(base, overrides)
    model = sharding.create_sharded(
        lambda: Stage2Model(cfg.qformer, cfg.musecoco, None, rngs=nnx.Rngs(0))
    )
    params = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    return Arranger(model, cfg), cfg, int(params)


def songs(n: int, bars: int):
    from bossa_jax.arrange import SongRequest
    from bossa_jax.assets import DEMO_LEADSHEET, DEMO_STYLE
    from bossa_jax.symbolic.leadsheet import read_leadsheet

    leadsheet = read_leadsheet(DEMO_LEADSHEET)
    return [SongRequest(f"song{i}", leadsheet, DEMO_STYLE, bars=(0, bars)) for i in range(n)]


def run_once(arranger, requests, seed: int) -> dict:
    start = time.perf_counter()
    prepared = [arranger.prepare(r) for r in requests]
    prepared_s = time.perf_counter() - start
    pieces = arranger(prepared, seed=seed)
    for piece in pieces:  # MIDI bytes: what a writer would put on disk
        piece.score.dumps_midi()
    total = time.perf_counter() - start
    return {
        "seconds": total,
        "prepare_seconds": prepared_s,
        "tokens": sum(p.generated_tokens for p in pieces),
        "bars": [p.bars for p in pieces],
        "windows": sum(len(p.windows) for p in pieces),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--songs", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--bars", type=int, default=16)
    parser.add_argument("--tokens-per-window", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model (code-path check)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    load_before = uptime()
    print(f"machine load before: {load_before}")
    arranger, cfg, params = build(args.smoke, args.tokens_per_window)
    print(
        f"model: MuseCoco {cfg.musecoco.hidden_size}x{cfg.musecoco.num_hidden_layers} "
        f"({cfg.musecoco.num_attention_heads} heads, FFN {cfg.musecoco.ffn_dim}), Q-Former "
        f"{cfg.qformer.hidden_size}x{cfg.qformer.num_hidden_layers}, mel front end; "
        f"{params / 1e6:.1f} M parameters, fp32"
    )
    print(
        f"{'songs':>5} {'s/run':>8} {'arr/min':>8} {'tok/s':>8} {'prep s':>7} {'windows':>7}  "
        f"({args.bars} bars, {args.tokens_per_window} tokens a window)"
    )
    rows = []
    for n in args.songs:
        requests = songs(n, args.bars)
        first = time.perf_counter()
        run_once(arranger, requests, seed=0)  # compiles
        first = time.perf_counter() - first
        runs = [run_once(arranger, requests, seed=1 + r) for r in range(args.repeats)]
        seconds = statistics.median(r["seconds"] for r in runs)
        tokens = runs[0]["tokens"]
        row = {
            "songs": n,
            "bars": args.bars,
            "median_seconds": seconds,
            "arrangements_per_minute": 60 * n / seconds,
            "tokens_per_second": tokens / seconds,
            "generated_tokens": tokens,
            "prepare_seconds_median": statistics.median(r["prepare_seconds"] for r in runs),
            "windows": runs[0]["windows"],
            "result_bars": runs[0]["bars"][0],
            "first_call_seconds": first,
            "runs": runs,
        }
        rows.append(row)
        print(
            f"{n:>5} {seconds:>8.2f} {row['arrangements_per_minute']:>8.2f} "
            f"{row['tokens_per_second']:>8.1f} {row['prepare_seconds_median']:>7.2f} "
            f"{row['windows']:>7}"
        )
    load_after = uptime()
    print(f"machine load after: {load_after}")
    result = {
        "rows": rows,
        "settings": {**vars(args), "n_mels": N_MELS, "parameters": params},
        "machine": {
            "platform": platform.platform(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
            "uptime_before": load_before,
            "uptime_after": load_after,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("arrange_smoke.json" if args.smoke else "arrange.json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
