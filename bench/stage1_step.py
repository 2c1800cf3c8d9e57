"""Benchmark: the jitted stage-1 train step (bossa_jax.train.stage1) vs a PyTorch reference of the
same step, side by side in one process.

For each config (``tiny``, ``mini``) one global batch is drawn from a synthetic corpus through the
real stage-1 pipeline, then:

* bossa-jax, ``features`` (cached MusicGen features in the batch) and ``codes`` (the frozen
  MusicGen inside the step): the step of ``stage1.build_stage1_program`` (ITC + ITM + ITG forward,
  backward, AdamW), compiled ahead, donated state; fp32 on CPU (``--gpu``: bf16);
* PyTorch reference (features only: the reference has no MusicGen): the plain-torch official
  ``Blip2Qformer`` of tests/reference (Q-Former + losses, same shapes, fp32), forward, backward and
  ``torch.optim.AdamW`` step; dropout on in both; its ITM negatives are given indices (the
  sampling is negligible).

Each measurement is ``--steps`` steps after a warm-up, repeated ``--repeats`` times; the table shows
the median samples/s and the ratio. On a GPU (``--gpu``) it also reports achieved TFLOP/s (the
compiled step's ``cost_analysis`` FLOPs) and MFU against a measured bf16 matmul peak.

Usage: .venv/bin/python bench/stage1_step.py [--configs tiny mini] [--batch 8] [--steps 3]
       [--repeats 3] [--gpu]
Writes bench/results/stage1_step_cpu.json (stage1_step_gpu.json with --gpu).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def jax_step_rate(cfg, local, steps: int, repeats: int) -> dict:
    import jax

    from bossa_jax import sharding
    from bossa_jax.data.pipeline import to_global
    from bossa_jax.train import stage1
    from bossa_jax.train.step import batch_shardings, replicated_key

    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        program = stage1.build_stage1_program(cfg, mesh)
        batch = to_global(local, mesh)
        rng = replicated_key(0, mesh)
        t0 = time.perf_counter()
        lowered = program.train_step(batch_shardings(mesh, local)).lower(
            program.state, program.frozen, batch, rng
        )
        step = lowered.compile()
        compile_s = time.perf_counter() - t0
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float((cost or {}).get("flops", 0.0))
        state = program.state
        state, metrics = step(state, program.frozen, batch, rng)  # warm-up
        jax.block_until_ready(metrics)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, program.frozen, batch, rng)
            jax.block_until_ready(metrics)
            rates.append(steps / (time.perf_counter() - t0))
    n = local["notes"].shape[0]
    steps_per_s = statistics.median(rates)
    return {
        "samples_per_s": steps_per_s * n,
        "steps_per_s": steps_per_s,
        "runs_samples_per_s": [r * n for r in rates],
        "compile_s": compile_s,
        "flops_per_step": flops,
        "loss": float(metrics["loss"]),
    }


def torch_step_rate(cfg, local, steps: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from tests.reference.losses_torch import Stage1Torch
    from tests.reference.qformer_torch import RefConfig

    q = cfg.qformer
    ref = Stage1Torch(
        RefConfig(
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_hidden_layers,
            num_attention_heads=q.num_attention_heads,
            intermediate_size=q.intermediate_size,
            layer_norm_eps=q.layer_norm_eps,
            vocab_size=q.vocab_size,
            max_position_embeddings=q.max_position_embeddings,
            pad_token_id=q.pad_token_id,
            encoder_width=q.encoder_width,
            cross_attention_freq=q.cross_attention_freq,
            query_length=q.num_query_tokens,
            hidden_dropout_prob=q.hidden_dropout,
            attention_probs_dropout_prob=q.attention_dropout,
        )
    )
    ref.train()
    opt = torch.optim.AdamW(
        ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05
    )
    n = local["notes"].shape[0]
    rng = np.random.default_rng(0)
    args = (
        torch.from_numpy(np.asarray(local["features"], np.float32)),
        torch.from_numpy(np.asarray(local["audio_mask"], np.float32)),
        torch.from_numpy(np.asarray(local["notes"], np.int64)),
        torch.from_numpy(np.asarray(local["leadsheet_mask"], np.int64)),
        torch.from_numpy(np.asarray(local["pad_mask"], np.int64)),
        torch.from_numpy((np.arange(n) + 1 + rng.integers(0, n - 1, n)) % n),
        torch.from_numpy((np.arange(n) + 1 + rng.integers(0, n - 1, n)) % n),
    )

    def one() -> float:
        opt.zero_grad(set_to_none=True)
        loss = ref(*args)["loss"]
        loss.backward()
        opt.step()
        return loss.item()

    one()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = one()
        rates.append(steps / (time.perf_counter() - t0))
    steps_per_s = statistics.median(rates)
    return {
        "samples_per_s": steps_per_s * n,
        "steps_per_s": steps_per_s,
        "runs_samples_per_s": [r * n for r in rates],
        "loss": loss,
    }


def matmul_peak_tflops() -> float:
    """Measured bf16 matmul throughput of the default device (TFLOP/s)."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=["tiny", "mini"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (bf16), report MFU")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import torch

    from bossa_jax.config import load_config
    from bossa_jax.train import stage1

    torch.set_num_threads(args.threads)
    device = jax.devices()[0]
    peak = matmul_peak_tflops() if args.gpu else None
    dtype = "bfloat16" if args.gpu else "float32"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            corpus = Path(tmp) / "corpus"
            base = [
                f"stage1.data_dir={corpus}",
                "stage1.synthetic_songs=8",
                f"train.global_batch_size={args.batch}",
                f"train.compute_dtype={dtype}",
                "stage1.random_musicgen=true",  # step speed: the weights' values do not matter
            ]
            for mode in ("features", "codes"):
                cfg = load_config(name, [*base, f"stage1.audio_input={mode}"])
                split = stage1.load_split(cfg, "train")
                local = next(stage1.train_data(cfg, split)(0, 1))
                result = jax_step_rate(cfg, local, args.steps, args.repeats)
                row = {"config": name, "audio_input": mode, "batch": args.batch, "jax": result}
                if mode == "features" and not args.no_torch:
                    row["torch"] = torch_step_rate(cfg, local, args.steps, args.repeats)
                    row["ratio_jax_over_torch"] = (
                        result["samples_per_s"] / row["torch"]["samples_per_s"]
                    )
                if peak:
                    achieved = result["flops_per_step"] * result["steps_per_s"] / 1e12
                    row["tflops"] = achieved
                    row["mfu"] = achieved / peak
                rows.append(row)
                print(
                    f"{name}/{mode}: jax {result['samples_per_s']:.2f} samples/s "
                    f"(compile {result['compile_s']:.0f} s)",
                    flush=True,
                )

    print(f"\nstage-1 train step, {device.platform} ({device.device_kind}), batch {args.batch}, "
          f"{dtype}, median of {args.repeats} x {args.steps} steps")  # fmt: skip
    print(
        f"{'config':8} {'audio':9} {'jax samples/s':>14} {'torch samples/s':>16} {'jax/torch':>10}"
    )
    for r in rows:
        t = r.get("torch", {}).get("samples_per_s")
        ratio = r.get("ratio_jax_over_torch")
        print(
            f"{r['config']:8} {r['audio_input']:9} {r['jax']['samples_per_s']:14.2f} "
            f"{(f'{t:.2f}' if t else '-'):>16} {(f'{ratio:.2f}x' if ratio else '-'):>10}"
        )

    from bossa_jax.outputs import atomic_output

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("stage1_step_gpu.json" if args.gpu else "stage1_step_cpu.json")
    payload = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "device": f"{device.platform} {device.device_kind}",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "compute_dtype": dtype,
        "matmul_peak_tflops": peak,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    with atomic_output(out) as tmp_out:
        tmp_out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
