"""Benchmark: the jitted stage-1 train step (bossa_jax.train.stage1) vs a PyTorch reference of the
same step, side by side in one process.

For each config (``tiny``, ``bench_stage1``: the former ``mini``) one global batch is drawn from
a synthetic corpus through the real stage-1 pipeline, then:

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

``--preset official`` (issue 8 item 8) is the comparison with the official PyTorch step at the
official benchmark shapes: Q-Former 256 wide, 4 layers, 4 heads, FFN 1024, 8194 positions,
cross-attention every second layer, 32 queries, projection 256; MusicGen 256 wide, 4 heads, FFN
1024, 6 layers of which 4 are kept, run inside the step (codes mode); batch 8, 226 notes, 508
frames, fp32, dropout on, clipping 1.0, AdamW, the official ITG field mean. The torch side is the
official step as the official code computes it:

* ``torch-official``: HF ``MusicgenModel`` (transformers' default SDPA attention; the zero
  unconditional text state through cross-attention, as ``Blip2Qformer.forward``) under
  ``no_grad``; the Q-Former = the HF-style BERT modules of tests/reference/qformer_torch.py (the
  official ``model_Qformer.py`` module for module: eager attention, explicit softmax + attention
  dropout, additive masks); ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` with their CPU
  defaults (per-tensor loops: torch picks foreach/fused only for CUDA tensors), as the official
  ``train_stage1.py`` calls them;
* ``torch-fast``: the same model with the Q-Former attention through
  ``F.scaled_dot_product_attention`` (dropout inside), ``clip_grad_norm_(foreach=True)`` and
  ``AdamW(fused=True)``: the fastest torch step found for this model on CPU.

The three steps run alternating, ``--rounds`` times ``--steps`` steps each, in one process; the
table shows median seconds per step, samples/s and the load average around each run.

Usage: .venv/bin/python bench/stage1_step.py [--configs tiny bench_stage1] [--batch 8] [--steps 3]
       [--repeats 3] [--gpu]
       .venv/bin/python bench/stage1_step.py --preset official [--rounds 5] [--steps 2]
Writes bench/results/stage1_step_cpu.json (stage1_step_gpu.json with --gpu;
stage1_step_official_cpu.json with --preset official).
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def compile_jax_step(cfg, local):
    """(compiled step, program, global batch, rng, compile seconds, FLOPs per step)."""
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
    return step, program, batch, rng, compile_s, float((cost or {}).get("flops", 0.0))


def jax_step_rate(cfg, local, steps: int, repeats: int) -> dict:
    import jax

    step, program, batch, rng, compile_s, flops = compile_jax_step(cfg, local)
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


def ref_config(q):
    """The torch reference's BertConfig fields from a ``QFormerConfig``."""
    from tests.reference.qformer_torch import RefConfig

    return RefConfig(
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


def torch_batch_args(local) -> tuple:
    """The reference step's inputs after the audio: audio mask, notes, lead-sheet and pad masks,
    and the ITM negatives. The official code draws those with torch.multinomial over the
    similarities; here they are given (seeded, never the positive): the sampling is negligible
    and the reference takes indices."""
    import numpy as np
    import torch

    n = local["notes"].shape[0]
    rng = np.random.default_rng(0)
    return (
        torch.from_numpy(np.asarray(local["audio_mask"], np.float32)),
        torch.from_numpy(np.asarray(local["notes"], np.int64)),
        torch.from_numpy(np.asarray(local["leadsheet_mask"], np.int64)),
        torch.from_numpy(np.asarray(local["pad_mask"], np.int64)),
        torch.from_numpy((np.arange(n) + 1 + rng.integers(0, n - 1, n)) % n),
        torch.from_numpy((np.arange(n) + 1 + rng.integers(0, n - 1, n)) % n),
    )


def torch_step_rate(cfg, local, steps: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from tests.reference.losses_torch import Stage1Torch

    ref = Stage1Torch(ref_config(cfg.qformer))
    ref.train()
    opt = torch.optim.AdamW(
        ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05
    )
    n = local["notes"].shape[0]
    args = (
        torch.from_numpy(np.asarray(local["features"], np.float32)),
        *torch_batch_args(local),
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


# --- the official benchmark shapes (issue 8 item 8) ---------------------------------------------
OFFICIAL_OVERRIDES = (
    "qformer.hidden_size=256",
    "qformer.num_hidden_layers=4",
    "qformer.num_attention_heads=4",
    "qformer.intermediate_size=1024",
    "qformer.max_position_embeddings=8194",
    "qformer.cross_attention_freq=2",
    "qformer.num_query_tokens=32",
    "qformer.encoder_width=256",
    "musicgen.hidden_size=256",
    "musicgen.num_attention_heads=4",
    "musicgen.ffn_dim=1024",
    "musicgen.num_hidden_layers=6",
    "musicgen.keep_layers=4",
    "data.audio_input=codes",
    "stage1.field_mean=official",
    "stage1.dropout=true",
    "train.compute_dtype=float32",
    "train.optim.grad_clip_norm=1.0",
)


def loadavg() -> float:
    """The 1-minute load average (0 where /proc is missing)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return 0.0


def timed_jax_steps(step, program, batch, rng):
    """(run(steps) -> seconds per step, box) for a compiled bossa-jax train step: ``box`` carries
    the advanced state and the last loss between calls (shared by both step benchmarks)."""
    import jax

    box = {"state": program.state}

    def run(steps: int) -> float:
        state = box["state"]
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, program.frozen, batch, rng)
        jax.block_until_ready(metrics)
        box["state"], box["loss"] = state, float(metrics["loss"])
        return (time.perf_counter() - t0) / steps

    return run, box


def jax_official_runner(cfg, local):
    """(run(steps) -> seconds per step, info) for the jitted bossa-jax step."""
    step, program, batch, rng, compile_s, flops = compile_jax_step(cfg, local)
    run, box = timed_jax_steps(step, program, batch, rng)
    info = {"compile_s": compile_s, "flops_per_step": flops}
    return run, info, box


def sdpa_self_attention(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, past_key_value=None):  # fmt: skip
    """``BertSelfAttention.forward`` of tests/reference/qformer_torch.py through torch's fused
    ``scaled_dot_product_attention`` (same masks, attention dropout inside the kernel)."""
    import torch
    from torch.nn import functional as F

    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    key = self.transpose_for_scores(self.key(source))
    value = self.transpose_for_scores(self.value(source))
    if encoder_hidden_states is not None:
        attention_mask = encoder_attention_mask
    elif past_key_value is not None:
        key = torch.cat([past_key_value[0], key], dim=2)
        value = torch.cat([past_key_value[1], value], dim=2)
    query = self.transpose_for_scores(self.query(hidden_states))
    context = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=self.dropout.p if self.training else 0.0,
    )
    context = context.permute(0, 2, 1, 3).reshape(*hidden_states.shape[:2], self.all_head_size)
    return context, (key, value)


def torch_musicgen(mg):
    """The official frozen audio model for a ``MusicgenConfig``: HF ``MusicgenModel`` with the
    first ``keep_layers`` blocks (the official builds L // 2 + 1 of them, SPEC 1.3), eval mode,
    no gradients."""
    from transformers import MusicgenDecoderConfig, MusicgenModel

    musicgen = MusicgenModel(
        MusicgenDecoderConfig(
            vocab_size=mg.vocab_size,
            hidden_size=mg.hidden_size,
            num_attention_heads=mg.num_attention_heads,
            ffn_dim=mg.ffn_dim,
            num_hidden_layers=mg.keep_layers,
            num_codebooks=mg.num_codebooks,
        )
    ).eval()
    musicgen.requires_grad_(False)
    return musicgen


def torch_musicgen_features(musicgen, codes):
    """``Blip2Qformer.forward``'s audio path: delay pattern, the zero unconditional text state with
    its zero mask, the truncated MusicgenModel's last hidden state, under no_grad (SPEC 1.2-1.3).
    ``codes`` (B, K, frames) int64 -> (B, frames + K, width)."""
    import torch

    cfg = musicgen.config
    with torch.no_grad():
        batch, k, frames = codes.shape
        pattern = torch.full((batch, k, frames + k), cfg.vocab_size, dtype=torch.long)
        for i in range(k):
            pattern[:, i, 1 + i : 1 + i + frames] = codes[:, i]
        text = torch.zeros(batch, 1, cfg.hidden_size)
        text_mask = torch.zeros(batch, 1, dtype=torch.long)
        return musicgen(
            input_ids=pattern.reshape(batch * k, frames + k),
            encoder_hidden_states=text,
            encoder_attention_mask=text_mask,
        ).last_hidden_state


def torch_official_runner(cfg, local, *, fast: bool):
    """(run(steps) -> seconds per step, info) for the official stage-1 step in PyTorch (see the
    module docstring: ``fast=False`` as the official code, ``fast=True`` the fastest variant)."""
    import types

    import numpy as np
    import torch

    from tests.reference.losses_torch import Stage1Torch
    from tests.reference.qformer_torch import BertSelfAttention

    torch.manual_seed(0)
    musicgen = torch_musicgen(cfg.musicgen)
    model = Stage1Torch(ref_config(cfg.qformer)).train()
    if fast:
        for module in model.modules():
            if isinstance(module, BertSelfAttention):
                module.forward = types.MethodType(sdpa_self_attention, module)
    o = cfg.train.optim
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=True if fast else None,
    )
    codes = torch.from_numpy(np.asarray(local["codes"], np.int64))
    args = torch_batch_args(local)
    box = {}

    def one() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(torch_musicgen_features(musicgen, codes), *args, official_only=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(
            model.parameters(), o.grad_clip_norm, foreach=True if fast else None
        )
        opt.step()
        return out["loss"].item()

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            box["loss"] = one()
        return (time.perf_counter() - t0) / steps

    return run, {}, box


def official_preset(args) -> None:
    """The alternating comparison at the official shapes (module docstring)."""
    import jax
    import torch

    from bossa_jax.config import load_config
    from bossa_jax.outputs import atomic_output
    from bossa_jax.train import stage1

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            "bench_stage1",
            [
                *OFFICIAL_OVERRIDES,
                f"data.data_dir={Path(tmp) / 'corpus'}",
                "data.synthetic_songs=8",
                f"train.global_batch_size={args.batch}",
            ],
        )
        local = next(stage1.train_data(cfg, stage1.load_split(cfg, "train"))(0, 1))
    shapes = {k: list(np.shape(v)) for k, v in local.items()}
    runners = {"bossa-jax": jax_official_runner(cfg, local)}
    if not args.no_torch:
        runners["torch-official"] = torch_official_runner(cfg, local, fast=False)
        runners["torch-fast"] = torch_official_runner(cfg, local, fast=True)
    for run, _, _ in runners.values():
        run(1)  # warm-up
    times = {name: [] for name in runners}
    loads = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, (run, _, _) in runners.items():
            before = loadavg()
            times[name].append(run(args.steps))
            loads[name].append(0.5 * (before + loadavg()))
        line = "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
        print(f"round {r + 1}/{args.rounds}: {line}  (load {loadavg():.1f})", flush=True)

    n = args.batch
    ref = statistics.median(times["torch-official"]) if "torch-official" in times else None
    rows = {}
    for name, (_, info, box) in runners.items():
        med = statistics.median(times[name])
        rows[name] = {
            "s_per_step": med,
            "samples_per_s": n / med,
            "speedup_vs_torch_official": ref / med if ref else None,
            "runs_s_per_step": times[name],
            "load_1min": loads[name],
            "loss": box.get("loss"),
            **info,
        }
    device = jax.devices()[0]
    low, high = min(min(v) for v in loads.values()), max(max(v) for v in loads.values())
    print(f"\nstage-1 train step at the official benchmark shapes, {device.platform}, batch {n}, "
          f"fp32, dropout on, clip 1.0; median of {args.rounds} alternating runs x {args.steps} "
          f"steps; torch {args.threads} threads; load {low:.1f}-{high:.1f}")  # fmt: skip
    print(f"{'step':16} {'s/step':>8} {'samples/s':>10} {'vs official':>12}")
    for name, row in rows.items():
        speed = row["speedup_vs_torch_official"]
        print(
            f"{name:16} {row['s_per_step']:8.2f} {row['samples_per_s']:10.2f} "
            f"{(f'{speed:.2f}x' if speed else '-'):>12}"
        )
    out = Path(args.out) if args.out else RESULTS / "stage1_step_official_cpu.json"
    payload = {
        "preset": "official",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "device": f"{device.platform} {device.device_kind}",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "overrides": list(OFFICIAL_OVERRIDES),
        "batch": n,
        "shapes": shapes,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp_out:
        tmp_out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=["tiny", "bench_stage1"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU (bf16), report MFU")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--preset", choices=["official"], help="the official benchmark shapes")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (--preset)")
    parser.add_argument("--out", help="JSON path (--preset; default bench/results/...)")
    args = parser.parse_args()
    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.preset:
        if args.steps == parser.get_default("steps"):
            args.steps = 2
        official_preset(args)
        return

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
                f"data.data_dir={corpus}",
                "data.synthetic_songs=8",
                f"train.global_batch_size={args.batch}",
                f"train.compute_dtype={dtype}",
                "data.random_musicgen=true",  # step speed: the weights' values do not matter
            ]
            for mode in ("features", "codes"):
                cfg = load_config(name, [*base, f"data.audio_input={mode}"])
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
