"""Memory plan: the paper-size stage-1 step compiled ahead of time for each mesh preset, with
abstract arguments only (nothing allocated), on fake CPU devices.

For every preset in configs/mesh/ and both audio inputs (``codes``: the frozen MusicGen-Large
(25 blocks, bf16) runs inside the step; ``features``: cached features in the batch), the step of
bossa_jax.train.stage1 (global batch 128, bf16 compute, fp32 master weights and AdamW state) is
lowered from ``jax.ShapeDtypeStruct``s with their shardings (``stage1.abstract_step``) and
compiled; the report gives, per device:

* parameters (trainable, fp32), optimizer state (AdamW mu + nu, fp32), frozen weights (MusicGen),
  from each array's shard shape under the preset's rules;
* the batch, and the compiler's ``memory_analysis()``: arguments, outputs, aliased (donated) bytes
  and temporaries (activations kept for the backward pass, gradients, workspace);
* peak ~ arguments + outputs - aliased + temporaries, against 80 GB (8 x H100/A100-80GB) and
  16 GB (TPU v5e chip).

The CPU compiler's temporaries are a proxy: GPU/TPU compilers fuse and schedule differently (a
GPU build with cuDNN flash attention keeps less), so treat the temp figure as an estimate within
tens of percent; the parameter / optimizer / frozen figures are exact.

Each preset runs in its own process with as many fake devices as the preset's target machine
(8 for single/gpu8_fsdp, 16 for the 2-host and TPU v5e-16 presets).

``--stage 2`` plans the paper-size stage-2 step (bossa_jax.train.stage2) the same way: the
query-only Q-Former (768, 12 layers) + audio LayerNorm + projection 768 -> 2048 (fp32 master
weights, the official trainable set with the LoRA matrices, AdamW state fp32), MuseCoco-xLarge
(24 x 2048, 24 heads of 85, FFN 8192, LoRA r16 on q/k/v; frozen, bf16) and in codes mode the frozen
MusicGen-Large (25 blocks, bf16); global batch 32 (SPEC 7), 32 queries + 1000 tokens, bf16
compute. ``--remat`` sets ``qformer.remat`` only (MuseCoco has no remat option: at batch 32 every
preset fits without it, see bench/results/memory_plan_stage2.json).

Usage: .venv/bin/python bench/memory_plan.py [--presets single gpu8_fsdp ...]
                                              [--modes codes features] [--stage 2] [--remat]
Writes bench/results/memory_plan.json (stage 2: memory_plan_stage2.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PRESET_DEVICES = {"single": 8, "gpu8_fsdp": 8, "hosts2_gpu8_tp2": 16, "tpu_v5e16": 16}
GB = 1e9
BUDGETS = {"gpu_80GB": 80 * GB, "tpu_v5e_16GB": 16 * GB}


def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def stage2_abstract_step(config, mesh, global_batch: int):
    """The stage-2 step with abstract (shape, dtype, sharding) arguments, as
    ``stage1.abstract_step`` builds stage 1's: nothing is allocated (call inside
    ``sharding.use_mesh``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from bossa_jax import sharding
    from bossa_jax.train import stage1, stage2
    from bossa_jax.train.optim import make_optimizer
    from bossa_jax.train.step import (
        TrainState,
        batch_shardings,
        make_train_step,
        opt_state_shardings,
    )

    train_cfg = config.stage2.train
    abstract = stage1._sharded_abstract
    model = nnx.eval_shape(stage2.model_fn(config))
    graphdef, params, frozen = nnx.split(model, stage2.trainable(config.stage2), ...)
    param_sharding = sharding.named_shardings(params, mesh)
    frozen_sharding = sharding.named_shardings(frozen, mesh)
    params, frozen = abstract(params, param_sharding), abstract(frozen, frozen_sharding)
    tx = make_optimizer(train_cfg.optim, train_cfg.total_steps)
    opt_sharding = opt_state_shardings(tx, params, param_sharding, mesh)
    opt_state = abstract(jax.eval_shape(tx.init, params), opt_sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params, opt_state)
    state_sharding = TrainState(replicated, param_sharding, opt_sharding)
    # the stage-2 pipeline's batch (bossa_jax.data.pipeline: SPEC 4.3, 6.5)
    tokens = 1000
    batch = {
        "tokens": jax.ShapeDtypeStruct((global_batch, tokens), jnp.int32),
        "control_mask": jax.ShapeDtypeStruct((global_batch, tokens), jnp.bool_),
        "pad_mask": jax.ShapeDtypeStruct((global_batch, tokens), jnp.bool_),
        "audio_mask": jax.ShapeDtypeStruct((global_batch, config.audio.pattern_steps), jnp.float32),
    }
    audio = stage1.batch_spec(config, global_batch)
    batch.update({k: audio[k] for k in ("codes", "features") if k in audio})
    b_sharding = batch_shardings(mesh, batch)
    batch = abstract(batch, b_sharding)
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    jitted = make_train_step(
        graphdef,
        stage2.make_loss_fn(config.stage2),
        tx,
        state_sharding=state_sharding,
        frozen_sharding=frozen_sharding,
        batch_sharding=b_sharding,
        mesh=mesh,
        compute_dtype=jnp.dtype(train_cfg.compute_dtype),
    )
    nbytes = stage1._bytes
    return stage1.AbstractStep(
        jitted, (state, frozen, batch, rng), nbytes(params), nbytes(opt_state), nbytes(frozen)
    )


def worker(preset: str, mode: str, batch: int, remat: bool, stage: int = 1) -> dict:
    import jax

    from bossa_jax import sharding
    from bossa_jax.config import load_config
    from bossa_jax.train import stage1

    shape = dict(load_config(ROOT / "configs" / "mesh" / f"{preset}.yaml").mesh.shape)
    overrides = [
        f"mesh.shape={json.dumps(shape)}",
        f"data.audio_input={mode}",
        f"qformer.remat={str(remat).lower()}",
    ]
    if stage == 1:
        overrides += [f"train.global_batch_size={batch}", "train.compute_dtype=bfloat16"]
    else:
        overrides += [
            f"stage2.train.global_batch_size={batch}",
            "stage2.train.compute_dtype=bfloat16",
        ]
    cfg = load_config(ROOT / "configs" / "paper.yaml", overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        if stage == 1:
            step = stage1.abstract_step(cfg, mesh, batch)
        else:
            step = stage2_abstract_step(cfg, mesh, batch)
        state, frozen, batch_args, _ = step.args
        t0 = time.perf_counter()
        lowered = step.jitted.lower(*step.args)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_device = {
        "params": _shard_bytes(state.params),
        "opt_state": _shard_bytes(state.opt_state),
        "frozen": _shard_bytes(frozen),
        "batch": _shard_bytes(batch_args),
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes),
    }
    per_device["peak_estimate"] = (
        per_device["arguments"]
        + per_device["outputs"]
        - per_device["aliased"]
        + per_device["temporaries"]
    )
    return {
        "stage": stage,
        "preset": preset,
        "mode": mode,
        "remat": remat,
        "devices": len(jax.devices()),
        "mesh": dict(mesh.shape),
        "global_batch": batch,
        "global_bytes": {
            "params": step.param_bytes,
            "opt_state": step.opt_bytes,
            "frozen": step.frozen_bytes,
        },
        "per_device_bytes": per_device,
        "fits": {k: per_device["peak_estimate"] <= v for k, v in BUDGETS.items()},
        "compile_s": compile_s,
    }


def _key(row: dict) -> tuple:
    return row["preset"], row["mode"], row.get("remat", False)


def _mode(row: dict) -> str:
    return row["mode"] + ("+remat" if row.get("remat") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESET_DEVICES))
    parser.add_argument("--modes", nargs="*", default=["codes", "features"])
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--batch", type=int, help="global batch (default: 128, stage 2: 32)")
    parser.add_argument("--append", action="store_true", help="merge into the existing JSON")
    parser.add_argument("--remat", action="store_true", help="qformer.remat=true (recompute)")
    parser.add_argument("--worker", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.batch is None:
        args.batch = 128 if args.stage == 1 else 32
    if args.worker:
        result = worker(*args.worker, args.batch, args.remat, args.stage)
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = []
    for preset in args.presets:
        for mode in args.modes:
            env = dict(os.environ)
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={PRESET_DEVICES[preset]}"
            env["PYTHONPATH"] = str(ROOT)
            cmd = [sys.executable, __file__, "--worker", preset, mode, "--batch", str(args.batch)]
            cmd += ["--stage", str(args.stage)]
            cmd += ["--remat"] if args.remat else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # recorded, not hidden: e.g. a rule that cannot shard a dimension
                errors = [x for x in proc.stderr.splitlines() if "Error" in x]
                reason = errors[-1] if errors else proc.stderr[-500:]
                print(f"{preset}/{mode}: failed: {reason}", file=sys.stderr, flush=True)
                rows.append({"preset": preset, "mode": mode, "remat": args.remat, "error": reason})
                continue
            rows.append(json.loads(line[len("RESULT ") :]))
            r = rows[-1]
            print(f"{preset}/{mode}: compiled in {r['compile_s']:.0f} s", flush=True)

    cols = ("params", "opt_state", "frozen", "batch", "temporaries", "peak_estimate")
    header = f"{'preset':16} {'mode':14} {'dev':>3} " + " ".join(f"{c:>13}" for c in cols)
    print(
        f"\nper-device GB (paper-size stage {args.stage}, global batch {args.batch}, bf16 compute)"
    )
    print(header + "  fits 80GB / 16GB")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:16} {_mode(r):14} compile failed: {r['error'][:120]}")
            continue
        d = r["per_device_bytes"]
        vals = " ".join(f"{d[c] / GB:13.2f}" for c in cols)
        fits = f"{'yes' if r['fits']['gpu_80GB'] else 'no'} / "
        fits += "yes" if r["fits"]["tpu_v5e_16GB"] else "no"
        print(f"{r['preset']:16} {_mode(r):14} {r['devices']:3d} {vals}  {fits}")

    from bossa_jax.outputs import atomic_output

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("memory_plan.json" if args.stage == 1 else "memory_plan_stage2.json")
    if args.append and out.is_file():  # keep the other presets' rows of an earlier run
        done = {_key(r) for r in rows}
        old_rows = json.loads(out.read_text())["rows"]
        rows = [r for r in old_rows if _key(r) not in done] + rows
    payload = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} (CPU compile)",
        "note": "temporaries from the XLA:CPU compile of the step (a proxy for GPU/TPU)",
        "rows": rows,
    }
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
