"""Benchmark: the audio feature path (EnCodec encode + the truncated MusicGen stack), bossa-jax
(Flax/XLA) against HF transformers PyTorch, same weights, same machine, one process.

CPU mode (default), fp32 on both sides:

* EnCodec-32kHz encode (paper config, random weights converted HF -> Flax with convert.encodec):
  batches of 1 and 4 clips of 10.16 s (325120 samples);
* the MusicGen stack at musicgen-small width (d 1024, 16 heads, FFN 4096) with 25 blocks over
  512 pattern steps (508 frames + 4), HF ``MusicgenModel`` without cross-attention inputs (BOSSA's
  cross-attention adds exactly zero, SPEC 1.2), weights converted with convert.musicgen.

Runs alternate between the two frameworks (so load from other processes hits both alike); the
figure is the median over ``--repeats`` runs after a warm-up. Prints clips/s and the ratio
(bossa-jax / PyTorch: > 1 = faster) and writes bench/results/audio_features_cpu.json.

GPU mode (``--gpu``): the paper-width stack (d 2048, 32 heads, FFN 8192, 25 blocks, 512 steps) in
bf16 against HF ``MusicgenModel`` in torch bf16 with SDPA attention; reports clips/s, achieved
TFLOP/s (matmul FLOPs of :func:`bossa_jax.models.musicgen.forward_flops`) and MFU against a
measured bf16 matmul peak (an 8192^3 matmul in JAX). Writes bench/results/audio_features_gpu.json.

Usage: .venv/bin/python bench/audio_features.py [--repeats 5] [--gpu] [--skip-encodec]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

GPU = "--gpu" in sys.argv
if GPU:  # JAX and PyTorch share the GPU: no up-front grab of 75% of its memory by XLA
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bossa_jax.audio import CLIP_FRAMES, PATTERN_EXTRA  # noqa: E402
from bossa_jax.config import EncodecConfig, MusicgenConfig  # noqa: E402
from bossa_jax.models.encodec import encode_fn  # noqa: E402
from bossa_jax.models.musicgen import apply_features, delay_pattern, forward_flops  # noqa: E402
from bossa_jax.outputs import atomic_output  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from convert.encodec import convert_encodec  # noqa: E402
from convert.musicgen import convert_musicgen  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS = CLIP_FRAMES + PATTERN_EXTRA
CLIP_SAMPLES = CLIP_FRAMES * 640
SMALL = dict(hidden_size=1024, num_attention_heads=16, ffn_dim=4096)
PAPER = dict(hidden_size=2048, num_attention_heads=32, ffn_dim=8192)
BLOCKS = 25


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    ours: Callable[[], object], theirs: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``theirs``, alternating, after one warm-up each."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours))
        b.append(timed(theirs))
    return statistics.median(a), statistics.median(b)


def random_codes(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (batch, 4, CLIP_FRAMES)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# MusicGen stack


def hf_musicgen(width: dict, *, dtype: torch.dtype, device: str):
    from transformers import MusicgenDecoderConfig, MusicgenModel

    config = MusicgenDecoderConfig(
        vocab_size=2048,
        num_codebooks=4,
        num_hidden_layers=BLOCKS,
        dropout=0.0,
        max_position_embeddings=2048,
        **width,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return MusicgenModel(config).eval().to(device=device, dtype=dtype)


def musicgen_pair(width: dict, *, dtype: str, device: str):
    """(HF model, Flax model converted from its weights)."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    hf = hf_musicgen(width, dtype=torch_dtype, device=device)
    state = {k: v.float().cpu().numpy() for k, v in hf.state_dict().items()}
    flax_model = convert_musicgen(
        state, keep_layers=BLOCKS, num_heads=width["num_attention_heads"], dtype=dtype
    )
    del state
    return hf, flax_model


def musicgen_runners(hf, flax_model, batch: int, device: str):
    codes = random_codes(batch)
    graphdef, state = nnx.split(flax_model)
    state = jax.device_put(state)
    run = jax.jit(apply_features, static_argnums=0)
    codes_jax = jax.device_put(jnp.asarray(codes))

    def ours():
        run(graphdef, state, codes_jax).block_until_ready()

    pattern = np.asarray(delay_pattern(jnp.asarray(codes), 2048))
    ids = torch.from_numpy(pattern).long().reshape(batch * 4, STEPS).to(device)

    def theirs():
        with torch.inference_mode():
            out = hf(input_ids=ids, use_cache=False).last_hidden_state
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return ours, theirs


def check_close(ours_out: np.ndarray, theirs_out: np.ndarray, tol: float, what: str) -> float:
    err = float(np.max(np.abs(ours_out.astype(np.float32) - theirs_out.astype(np.float32))))
    if not err <= tol:
        raise SystemExit(f"{what}: outputs differ by {err} (> {tol}); timings would be meaningless")
    return err


# ---------------------------------------------------------------------------------------------
# EnCodec


def encodec_pair():
    from transformers import EncodecConfig as HFEncodecConfig
    from transformers import EncodecModel

    cfg = EncodecConfig()  # EnCodec-32kHz (SPEC 1.1)
    hf_cfg = HFEncodecConfig(
        sampling_rate=cfg.sampling_rate,
        audio_channels=1,
        num_filters=cfg.num_filters,
        upsampling_ratios=list(cfg.upsampling_ratios),
        hidden_size=cfg.hidden_size,
        codebook_dim=cfg.codebook_dim,
        codebook_size=cfg.codebook_size,
        num_lstm_layers=cfg.num_lstm_layers,
        target_bandwidths=[2.2],
        normalize=False,
        chunk_length_s=None,
        use_causal_conv=False,
        use_conv_shortcut=False,
        pad_mode="reflect",
    )
    torch.manual_seed(0)
    hf = EncodecModel(hf_cfg).eval()
    with torch.no_grad():  # random codebooks, so the nearest-code search is not degenerate
        for name, buf in hf.named_buffers():
            if name.endswith("embed"):
                buf.copy_(torch.randn_like(buf))
    flax_model = convert_encodec({k: v for k, v in hf.state_dict().items()}, fmt="hf", config=cfg)
    return hf, flax_model


def encodec_runners(hf, flax_model, batch: int):
    t = np.arange(CLIP_SAMPLES) / 32000
    rng = np.random.default_rng(batch)
    audio = np.stack(
        [0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.standard_normal(t.size)
         for i in range(batch)]
    ).astype(np.float32)  # fmt: skip
    graphdef, state = nnx.split(flax_model)
    audio_jax = jnp.asarray(audio)

    def ours():
        return encode_fn(graphdef, state, audio_jax).block_until_ready()

    audio_torch = torch.from_numpy(audio)[:, None]

    def theirs():
        with torch.inference_mode():
            return hf.encode(audio_torch, bandwidth=2.2).audio_codes

    return ours, theirs


# ---------------------------------------------------------------------------------------------


def cpu_benchmark(args) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor()})",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "repeats": args.repeats,
        "precision": "float32 both",
        "rows": [],
    }
    rows = results["rows"]

    if not args.skip_encodec:
        hf, flax_model = encodec_pair()
        for batch in (1, 4):
            ours, theirs = encodec_runners(hf, flax_model, batch)
            agree = float(np.mean(np.asarray(ours()) == theirs()[0].numpy()))
            a, b = compare(ours, theirs, args.repeats)
            rows.append(_row("encodec_encode", batch, a, b, codes_agree=agree))
            _print(rows[-1])
        del hf, flax_model

    hf, flax_model = musicgen_pair(SMALL, dtype="float32", device="cpu")
    for batch in (1, 4):
        ours, theirs = musicgen_runners(hf, flax_model, batch, "cpu")
        codes = random_codes(batch)
        mine = np.asarray(jax.jit(apply_features, static_argnums=0)(*nnx.split(flax_model), codes))
        err = check_close(mine, theirs().numpy(), 1e-3, "musicgen stack")
        a, b = compare(ours, theirs, args.repeats)
        rows.append(_row("musicgen_small_25_blocks_512_steps", batch, a, b, max_abs_diff=err))
        _print(rows[-1])
    return results


def _row(name: str, batch: int, ours_s: float, theirs_s: float, **extra) -> dict:
    return {
        "case": name,
        "batch": batch,
        "bossa_jax_s": ours_s,
        "pytorch_s": theirs_s,
        "bossa_jax_clips_per_s": batch / ours_s,
        "pytorch_clips_per_s": batch / theirs_s,
        "speedup": theirs_s / ours_s,
        **extra,
    }


def _print(row: dict) -> None:
    extra = {k: v for k, v in row.items() if k in ("codes_agree", "max_abs_diff", "mfu_bossa")}
    print(
        f"{row['case']:<38} B={row['batch']:<3} bossa-jax {row['bossa_jax_clips_per_s']:8.3f} "
        f"clips/s  PyTorch {row['pytorch_clips_per_s']:8.3f} clips/s  ratio "
        f"{row['speedup']:.2f}x  {extra}",
        flush=True,
    )


def bf16_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul FLOP/s on the default JAX device."""
    a = jnp.ones((n, n), jnp.bfloat16)
    b = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    times = [timed(lambda: mm(a, b).block_until_ready()) for _ in range(repeats)]
    return 2 * n**3 / min(times)


def gpu_benchmark(args) -> dict:
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU visible to both JAX and PyTorch")
    peak = bf16_matmul_peak()
    cfg = MusicgenConfig(**PAPER, num_hidden_layers=48, keep_layers=BLOCKS, dtype="bfloat16")
    results: dict = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "bf16_matmul_peak_tflops": peak / 1e12,
        "precision": "bfloat16 params and matmuls both (fp32 LayerNorm statistics in bossa-jax)",
        "repeats": args.repeats,
        "rows": [],
    }
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    hf, flax_model = musicgen_pair(PAPER, dtype="bfloat16", device="cuda")
    for batch in args.gpu_batches:
        ours, theirs = musicgen_runners(hf, flax_model, batch, "cuda")
        a, b = compare(ours, theirs, args.repeats)
        flops = forward_flops(cfg, batch, STEPS)
        row = _row(
            "musicgen_paper_25_blocks_512_steps_bf16",
            batch,
            a,
            b,
            flops=flops,
            tflops_bossa=flops / a / 1e12,
            tflops_pytorch=flops / b / 1e12,
            mfu_bossa=flops / a / peak,
            mfu_pytorch=flops / b / peak,
        )
        results["rows"].append(row)
        _print(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--skip-encodec", action="store_true")
    args = parser.parse_args()
    results = gpu_benchmark(args) if args.gpu else cpu_benchmark(args)
    out = RESULTS / ("audio_features_gpu.json" if args.gpu else "audio_features_cpu.json")
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
