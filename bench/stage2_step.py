"""Benchmark: the jitted stage-2 train step (bossa_jax.train.stage2) against a faithful PyTorch
re-implementation of the official stage-2 step (``Blip2Musecoco.forward`` + ``train_stage2.py``),
same weights, same batch, same CPU, one process, alternating (issue 9, "What must be shown").

Shapes (SPEC 4, 7): MuseCoco-200m-shaped decoder (512 wide, 8 heads of 64, 6 layers, FFN 2048,
vocab 1253) with LoRA r16 on q/k/v; the official query-only Q-Former (768 wide, 12 layers, 12 heads,
FFN 3072, cross-attention every second layer, 32 queries); projection 768 -> 512; the SPEC 4.3
sequence: 32 projected queries + 1000 tokens (positions from 61); the official trainable set
(SPEC 4.2: Q-Former query branch, audio LayerNorm, LoRA, projection); fp32; AdamW lr 1e-4,
weight decay 0.05 on everything, the official warm-up + cosine schedule, global-norm clipping 1.0.
Batch: ``--batch`` (default 2) rows of one batch drawn from a synthetic corpus through the real
stage-2 pipeline.

* ``features`` mode: cached MusicGen-Large features (B, 512, 2048) in the batch (the official
  encoder width 2048; random values: the step's speed does not depend on them).
* ``codes`` mode: a reduced MusicGen in the step (512 wide, 8 heads, FFN 2048, 4 of 6 blocks kept;
  the Q-Former's encoder width follows it, 512): MusicGen-Large's 25 blocks of 2048 do not fit a
  CPU benchmark.

Sides (weights: the torch model's, copied into ours through ``convert.bossa.stage2_values``, the
converter of the released stage-2 file; MusicGen's too in codes mode):

* ``bossa-jax``: ``stage2.build_stage2_program``'s step (value_and_grad over the trainable set,
  optax AdamW + clipping), compiled ahead, donated state.
* ``torch-official``: ``tests/reference/arranger_torch.Stage2Torch`` (the official module tree:
  the HF-style BERT Q-Former of ``qformer_torch.py`` with eager attention and explicit attention
  dropout; MuseCoco whose causal product is fast-transformers' ``causal_dot_product`` kernel,
  SPEC 4.5), in codes mode HF ``MusicgenModel`` under no_grad; MuseCoco base frozen
  (requires_grad False); ``clip_grad_norm_(1.0, foreach=True)``, ``AdamW(foreach=True)`` (what
  torch picks for the official code on CUDA) and the official LinearLR warm-up stepped per step.
* ``torch-fast``: the same with the Q-Former attention through ``F.scaled_dot_product_attention``
  (bench/stage1_step.py's ``sdpa_self_attention``) and ``AdamW(fused=True)``.

Dropout: the Q-Former's on both sides (official); MuseCoco's (the official frozen-in-train-mode
quirk, SPEC 10.17) on both sides by default, ``--musecoco-dropout off`` turns it off on both.

Before timing, one forward without dropout on each side checks that both compute the same loss
from the same weights (``loss_check``). ``--profile`` adds per-component timings of both sides
(forward; forward + backward; the optimizer update; MuseCoco alone).

Usage: .venv/bin/python bench/stage2_step.py [--modes features codes] [--batch 2] [--rounds 3]
       [--steps 1] [--threads 2] [--musecoco-dropout on|off] [--profile] [--no-torch]
Writes bench/results/stage2_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench.stage1_step import (  # noqa: E402
    loadavg,
    ref_config,
    sdpa_self_attention,
    timed_jax_steps,
    torch_musicgen,
    torch_musicgen_features,
)

MODEL_OVERRIDES = (
    # MuseCoco-200m-shaped, LoRA r16 (the 200m vocabulary would be 3245: ours is the 1b's 1253)
    "musecoco.hidden_size=512",
    "musecoco.num_attention_heads=8",
    "musecoco.num_hidden_layers=6",
    "musecoco.ffn_dim=2048",
    "musecoco.dtype=float32",
    # a reduced MusicGen for codes mode
    "musicgen.num_attention_heads=8",
    "musicgen.ffn_dim=2048",
    "musicgen.num_hidden_layers=6",
    "musicgen.keep_layers=4",
    "musicgen.dtype=float32",
    "stage2.train.compute_dtype=float32",
    "stage2.trainable=official",
    "stage2.dropout=true",
)
FEATURES_WIDTH = 2048  # MusicGen-Large's width: the official Q-Former encoder width


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {loadavg():.2f}"


def make_config(mode: str, args):
    from bossa_jax.config import load_config

    width = FEATURES_WIDTH if mode == "features" else 512
    extra = [
        f"data.audio_input={mode}",
        f"qformer.encoder_width={width}",
        f"musicgen.hidden_size={width}",  # features mode: only the width of the cached features
        f"stage2.train.global_batch_size={args.batch}",
        f"stage2.musecoco_dropout={'true' if args.musecoco_dropout == 'on' else 'false'}",
        f"data.data_dir={args.corpus}",
        "data.dataset=synthetic",
        "data.random_musicgen=true",
        "data.synthetic_songs=4",
        "data.synthetic_bars=16",
        *(f"musecoco.chunk_size={args.chunk}",) * bool(args.chunk),
    ]
    return load_config(ROOT / "configs" / "paper.yaml", [*MODEL_OVERRIDES, *extra])


def local_batch(cfg, mode: str) -> dict[str, np.ndarray]:
    """One batch of the stage-2 pipeline (codes mode); features mode replaces the codes by random
    features of the cached layout (B, pattern steps, encoder width)."""
    import dataclasses

    from bossa_jax.train import stage1, stage2

    codes_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, audio_input="codes"))
    run_cfg = stage2.loop_config(codes_cfg)
    split = stage1.load_split(run_cfg, "train")
    local = dict(next(stage1.train_data(run_cfg, split, 2)(0, 1)))
    if mode == "features":
        codes = local.pop("codes")
        steps = local["audio_mask"].shape[1]
        rng = np.random.default_rng(0)
        local["features"] = rng.normal(size=(codes.shape[0], steps, FEATURES_WIDTH)).astype(
            np.float32
        )
    return local


# --- torch --------------------------------------------------------------------------------------
def torch_model(cfg):
    """(Stage2Torch, MusicGen or None), seeded, every weight off its trivial init (LoRA B too)."""
    import torch

    from tests.reference.arranger_torch import Stage2Torch

    torch.manual_seed(0)
    m = cfg.musecoco
    model = Stage2Torch(
        ref_config(cfg.qformer),
        dict(
            vocab=m.vocab_size,
            d=m.hidden_size,
            heads=m.num_attention_heads,
            layers=m.num_hidden_layers,
            ffn=m.ffn_dim,
            rank=m.lora_rank,
            scaling=m.lora_scale,
            dropout=m.dropout,
            positions=m.max_positions,
            product="fast_transformers",
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapters something to compute
                p.normal_(0, 0.02)
    musicgen = torch_musicgen(cfg.musicgen) if cfg.data.audio_input == "codes" else None
    return model, musicgen


def torch_state_dict(model, musicgen) -> dict[str, np.ndarray]:
    """The official stage-2 layout (SPEC 7): Stage2Torch's names, MusicGen under
    ``blip2qformer.musicgen_decoder.``."""
    out = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if musicgen is not None:
        for k, v in musicgen.state_dict().items():
            out[f"blip2qformer.musicgen_decoder.{k}"] = v.detach().numpy()
    return out


def torch_args(local):
    import torch

    return dict(
        audio_mask=torch.from_numpy(np.asarray(local["audio_mask"], np.float32)),
        tokens=torch.from_numpy(np.asarray(local["tokens"], np.int64)),
        control_mask=torch.from_numpy(np.asarray(local["control_mask"], bool)),
        pad_mask=torch.from_numpy(np.asarray(local["pad_mask"], bool)),
    )


def trainable_torch(model):
    """SPEC 4.2: the MuseCoco base frozen (LoRA trainable), everything else of Stage2Torch
    trainable; returns the trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("musecoco.") or ".lora_" in name)
    return [p for p in model.parameters() if p.requires_grad]


def torch_runner(cfg, local, *, fast: bool, musecoco_dropout: bool, profile: bool):
    """(run(steps) -> s/step, info, box, parts) for the official stage-2 step in torch."""
    import torch

    from tests.reference.qformer_torch import BertSelfAttention

    model, musicgen = torch_model(cfg)
    model.train()
    if not musecoco_dropout:
        model.musecoco.eval()
    if fast:
        for module in model.modules():
            if isinstance(module, BertSelfAttention):
                module.forward = types.MethodType(sdpa_self_attention, module)
    params = trainable_torch(model)
    o = cfg.stage2.train.optim
    opt = torch.optim.AdamW(
        params,
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        **({"fused": True} if fast else {"foreach": True}),
    )
    # OptimizerSchedulerWithWarmUp: LinearLR over the warm-up, then the cosine (SPEC 7)
    sched = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=o.warmup_start_factor, total_iters=o.warmup_steps
    )
    args = torch_args(local)
    codes = torch.from_numpy(np.asarray(local["codes"], np.int64)) if musicgen is not None else None
    features = None if codes is not None else torch.from_numpy(local["features"])

    def audio():
        return torch_musicgen_features(musicgen, codes) if codes is not None else features

    def forward():
        return model(audio(), **args)[2]

    box = {}

    def one() -> float:
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm, foreach=True)
        opt.step()
        sched.step()
        return loss.item()

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            box["loss"] = one()
        return (time.perf_counter() - t0) / steps

    def eval_loss() -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            loss = forward().item()
        model.train(was)
        if not musecoco_dropout:
            model.musecoco.eval()
        return loss

    parts = {}
    if profile:

        def fwd():
            with torch.no_grad():
                forward()

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            forward().backward()

        def update():
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm, foreach=True)
            opt.step()

        mc = model.musecoco
        prefix = torch.randn(
            local["tokens"].shape[0], cfg.qformer.num_query_tokens, cfg.musecoco.hidden_size,
            requires_grad=True,
        )  # fmt: skip
        labels_tokens = args["tokens"]

        def musecoco_fwd_bwd():
            from tests.reference.musecoco_torch import shifted_loss

            logits = mc(labels_tokens, args["pad_mask"], prefix, 61)
            pad = torch.full(prefix.shape[:2], -100)
            shifted_loss(logits, torch.cat([pad, labels_tokens], 1)).backward()

        parts = {
            "audio (MusicGen, no grad)": audio if codes is not None else None,
            "forward (no grad)": fwd,
            "forward+backward": fwd_bwd,
            "clip+AdamW (after a backward)": update,
            "MuseCoco forward+backward": musecoco_fwd_bwd,
        }
        parts = {k: v for k, v in parts.items() if v is not None}
    return run, {"eval_loss": eval_loss}, box, parts, (model, musicgen)


# --- bossa-jax ----------------------------------------------------------------------------------
def jax_runner(cfg, local, torch_models, *, profile: bool):
    """(run(steps) -> s/step, info, box, parts) for the jitted stage-2 step, with the torch
    model's weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bossa_jax import sharding
    from bossa_jax.data.pipeline import to_global
    from bossa_jax.train import stage2
    from bossa_jax.train.optim import make_optimizer
    from bossa_jax.train.step import batch_shardings, build_program, replicated_key
    from convert.bossa import stage2_values
    from convert.common import param_paths

    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    train_cfg = cfg.stage2.train
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        model = sharding.create_sharded(stage2.model_fn(cfg))
        values = stage2_values(torch_state_dict(*torch_models), model, source="torch reference")
        params = param_paths(model)
        missing = sorted(set(params) - set(values))
        if missing:
            raise SystemExit(f"torch weights do not cover {missing[:4]}")
        for path, var in params.items():
            var.set_value(jax.device_put(np.asarray(values[path], var.dtype), var.sharding))
        program = build_program(
            model,
            stage2.trainable(cfg.stage2),
            stage2.make_loss_fn(cfg.stage2),
            make_optimizer(train_cfg.optim, train_cfg.total_steps),
            mesh,
            compute_dtype=jnp.dtype(train_cfg.compute_dtype),
        )
        batch = to_global(local, mesh)
        rng = replicated_key(0, mesh)
        t0 = time.perf_counter()
        step = (
            program.train_step(batch_shardings(mesh, local))
            .lower(program.state, program.frozen, batch, rng)
            .compile()
        )
        compile_s = time.perf_counter() - t0
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    run, box = timed_jax_steps(step, program, batch, rng)

    eval_fn = stage2.make_loss_fn(cfg.stage2, train=False)

    @jax.jit
    def eval_loss_jit(params, frozen, batch):
        return eval_fn(nnx.merge(program.graphdef, params, frozen), batch, None)[0]

    def eval_loss() -> float:
        return float(eval_loss_jit(program.state.params, program.frozen, batch))

    info = {
        "compile_s": compile_s,
        "flops_per_step": float((cost or {}).get("flops", 0.0)),
        "eval_loss": eval_loss,
    }
    parts = {}
    if profile:
        train_loss = stage2.make_loss_fn(cfg.stage2)

        def loss_of(params, frozen, batch, rng):
            return train_loss(nnx.merge(program.graphdef, params, frozen), batch, rng)[0]

        fwd = jax.jit(loss_of)
        grad = jax.jit(jax.grad(loss_of))
        tx = program.tx

        @jax.jit
        def update(grads, opt_state, params):
            import optax

            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        grads = grad(box["state"].params, program.frozen, batch, rng)

        graphdef_mc, mc_params, mc_frozen = nnx.split(
            nnx.merge(program.graphdef, program.state.params, program.frozen).musecoco,
            nnx.LoRAParam,
            ...,
        )
        prefix = jnp.zeros(
            (local["tokens"].shape[0], cfg.qformer.num_query_tokens, cfg.musecoco.hidden_size)
        )

        @jax.jit
        def musecoco_grad(lora, frozen, prefix, batch, rng):
            from bossa_jax.models.arranger import POSITION_START, stage2_labels

            def f(lora, prefix):
                mc = nnx.merge(graphdef_mc, lora, frozen)
                logits = mc(
                    batch["tokens"], batch["pad_mask"], prefix, POSITION_START,
                    deterministic=not cfg.stage2.musecoco_dropout, dropout_rng=rng,
                )  # fmt: skip
                labels = stage2_labels(
                    batch["tokens"], batch["control_mask"], batch["pad_mask"], prefix.shape[1]
                )
                return stage2.stage2_loss(logits, labels)[0]

            return jax.grad(f, argnums=(0, 1))(lora, prefix)

        def sync(x):
            jax.block_until_ready(x)

        parts = {
            "forward (no grad)": lambda: sync(fwd(box["state"].params, program.frozen, batch, rng)),
            "forward+backward": lambda: sync(grad(box["state"].params, program.frozen, batch, rng)),
            "clip+AdamW (after a backward)": lambda: sync(
                update(grads, box["state"].opt_state, box["state"].params)
            ),
            "MuseCoco forward+backward": lambda: sync(
                musecoco_grad(mc_params, mc_frozen, prefix, batch, rng)
            ),
        }
        if cfg.data.audio_input == "codes":
            musicgen_fn = jax.jit(
                lambda frozen, codes: nnx.merge(program.graphdef, program.state.params, frozen)
                .musicgen(codes)
            )  # fmt: skip
            codes = batch["codes"]
            parts = {
                "audio (MusicGen, no grad)": lambda: sync(musicgen_fn(program.frozen, codes)),
                **parts,
            }
    return run, info, box, parts


def time_parts(parts: dict, repeats: int) -> dict[str, float]:
    out = {}
    for name, fn in parts.items():
        fn()  # compile / warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    return out


def bench_mode(mode: str, args) -> dict:
    import torch

    cfg = make_config(mode, args)
    local = local_batch(cfg, mode)
    shapes = {k: list(np.shape(v)) for k, v in local.items()}
    dropout = args.musecoco_dropout == "on"
    runners = {}
    torch_official = torch_runner(cfg, local, fast=False, musecoco_dropout=dropout,
                                  profile=args.profile)  # fmt: skip
    torch_models = torch_official[4]
    runners["bossa-jax"] = jax_runner(cfg, local, torch_models, profile=args.profile)
    if not args.no_torch:
        runners["torch-official"] = torch_official[:4]
        runners["torch-fast"] = torch_runner(
            cfg, local, fast=True, musecoco_dropout=dropout, profile=False
        )[:4]
    # the same numbers from the same weights (no dropout), before any update
    check = {"bossa-jax": runners["bossa-jax"][1]["eval_loss"](),
             "torch": torch_official[1]["eval_loss"]()}  # fmt: skip
    check["abs_diff"] = abs(check["bossa-jax"] - check["torch"])
    print(f"[{mode}] loss check (eval mode, same weights): bossa-jax {check['bossa-jax']:.6f} "
          f"torch {check['torch']:.6f} |d| {check['abs_diff']:.2e}", flush=True)  # fmt: skip
    del torch
    profile = {}
    if args.profile:
        for name in ("bossa-jax", "torch-official"):
            if name in runners:
                profile[name] = time_parts(runners[name][3], 2)
                print(f"[{mode}] profile {name}: " + ", ".join(
                    f"{k} {v:.2f}s" for k, v in profile[name].items()), flush=True)  # fmt: skip
    for run, *_ in runners.values():
        run(1)  # warm-up
    times = {name: [] for name in runners}
    loads = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, (run, *_) in runners.items():
            before = loadavg()
            times[name].append(run(args.steps))
            loads[name].append(0.5 * (before + loadavg()))
        line = "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
        print(f"[{mode}] round {r + 1}/{args.rounds}: {line}  (load {loadavg():.1f})", flush=True)
    ref = statistics.median(times["torch-official"]) if "torch-official" in times else None
    fast = statistics.median(times["torch-fast"]) if "torch-fast" in times else None
    rows = {}
    for name, (_, info, box, _) in runners.items():
        med = statistics.median(times[name])
        rows[name] = {
            "s_per_step": med,
            "samples_per_s": args.batch / med,
            "speedup_vs_torch_official": ref / med if ref else None,
            "speedup_vs_torch_fast": fast / med if fast else None,
            "runs_s_per_step": times[name],
            "load_1min": loads[name],
            "last_train_loss": box.get("loss"),
            **{k: v for k, v in info.items() if not callable(v)},
        }
    return {
        "mode": mode,
        "shapes": shapes,
        "loss_check": check,
        "profile_s": profile,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="*", default=["features", "codes"],
                        choices=["features", "codes"])  # fmt: skip
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=1, help="steps per side per round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--musecoco-dropout", choices=["on", "off"], default="on",
                        help="the official dropout in the frozen MuseCoco, both sides")  # fmt: skip
    parser.add_argument("--chunk", type=int, default=0, help="musecoco.chunk_size (0: config)")
    parser.add_argument("--profile", action="store_true", help="per-component timings")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", help="JSON path (default bench/results/stage2_step.json)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import torch

    from bossa_jax.outputs import atomic_output
    from bossa_jax.train import stage1

    torch.set_num_threads(args.threads)
    start_load = uptime()
    print(f"start: {start_load}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        args.corpus = stage1.write_synthetic_corpus(Path(tmp) / "corpus", songs=4, bars=16)
        for mode in args.modes:
            results.append(bench_mode(mode, args))
    end_load = uptime()

    device = jax.devices()[0]
    print(f"\nstage-2 train step, MuseCoco-200m-shaped + official Q-Former, {device.platform}, "
          f"batch {args.batch}, 1032 positions, fp32, MuseCoco dropout {args.musecoco_dropout}; "
          f"median of {args.rounds} alternating rounds x {args.steps} steps; "
          f"torch {args.threads} threads")  # fmt: skip
    print(f"{'mode':9} {'step':15} {'s/step':>8} {'samples/s':>10} {'vs official':>12} "
          f"{'vs fast':>8}")  # fmt: skip
    for res in results:
        for name, row in res["rows"].items():
            so, sf = row["speedup_vs_torch_official"], row["speedup_vs_torch_fast"]
            print(f"{res['mode']:9} {name:15} {row['s_per_step']:8.2f} "
                  f"{row['samples_per_s']:10.3f} {(f'{so:.2f}x' if so else '-'):>12} "
                  f"{(f'{sf:.2f}x' if sf else '-'):>8}")  # fmt: skip
    print(f"machine load at start: {start_load}\nmachine load at end:   {end_load}")

    out = Path(args.out) if args.out else RESULTS / "stage2_step.json"
    payload = {
        "command": "python bench/stage2_step.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "device": f"{device.platform} {device.device_kind}",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "overrides": list(MODEL_OVERRIDES),
        "features_width": FEATURES_WIDTH,
        "batch": args.batch,
        "musecoco_dropout": args.musecoco_dropout,
        "chunk_size": args.chunk or None,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "uptime_start": start_load,
        "uptime_end": end_load,
        "modes": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp_out:
        tmp_out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
