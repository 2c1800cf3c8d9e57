"""Benchmark: how far the BOSSA-mini stage-0 LM learns to copy the lead-sheet melody with more
steps or a wider model than the 45-minute CPU recipe allows (issue 11: "if a goal is missed, say
why and what would reach it").

The CPU recipe's LM (4 layers x 192, 3 heads of 64, 2400 steps of batch 8) reaches 0.83
teacher-forced accuracy on accompaniment pitches but stalls at 0.25 on the pitches of lead-sheet
melody notes; the shipped model alone plays 14% of the melody. This runs the same stage-0
program on a faster device for longer and wider:

* ``prepare`` (CPU, needs the corpus's audio for the window boundaries): every training window of
  a BOSSA-mini corpus in all 12 transpositions of ``segment.draw_transposition``, as the stage-0
  pipeline makes them (``pipeline.symbolic_sample``: ``remi.stage2_sequence`` with the config's
  ``deperf`` and ``stage2.max_tokens``), with its song's style; and held-out (validation)
  windows for the probes below. Written to one ``.npz`` (small enough to carry to a GPU host).
* ``run``: for each ``--runs SIZE:STEPS:BATCH[:LR]``: the project's stage-0 program
  (``lm.build_lm_program``: MuseCoco with causal linear attention, ``lm_loss_fn`` with the
  style attribute of ``stage0.style_attribute_rate``, AdamW with warm-up and cosine of
  ``stage0.train.optim``) on uniformly drawn batches of the prepared windows (the recipe's
  pipeline draws epochs; the same windows and transpositions). At ``--evals`` points:
  teacher-forced argmax accuracy on the held-out windows' arrangement pitch tokens, split into
  lead-sheet melody notes (same bar, onset and pitch) and accompaniment (the probe in the
  README's BOSSA-mini section). At the end: the LM alone (no audio, no melody lock) arranges
  each held-out window once per meter-compatible style named as the genre attribute
  (``S4_<k>_0``), top-k 15, temperature 1: melody preservation, style accuracy (the rule-based
  classifier) and the chord-tone fraction of the accompaniment.
* ``probe``: the same probes on an exported LM (the CPU recipe's ``RUN/stage0-lm``).

SIZE: ``mini`` (the recipe's LM), ``wide`` (6 layers x 512, 8 heads of 64, FFN 2048: the
MuseCoco-200m shape of ``bench/sampling.py``), or ``LAYERSxWIDTHxHEADS``.

Usage: .venv/bin/python bench/stage0_scale.py prepare --corpus RUN/corpus --out DATA.npz
       .venv/bin/python bench/stage0_scale.py probe --data DATA.npz --lm RUN/stage0-lm
       python bench/stage0_scale.py run --data DATA.npz --runs mini:12000:32 wide:6000:32:1e-3
              [--evals 1000 2000 4000 ...] [--budget-s SECONDS] [--set KEY=VALUE ...]
              [--out JSON]
Writes bench/results/stage0_scale.json (``--out``), rewritten after every probe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
SIZES = {
    "mini": None,  # configs/bossa_mini.yaml's musecoco section
    "wide": (6, 512, 8),
}
MAX_EVAL_WINDOWS = 48  # teacher-forced probe
GENERATION_WINDOWS = 12  # x meter-compatible styles, LM alone


# --- prepare (CPU) ------------------------------------------------------------------------------
def _windows(cfg, split: str) -> list[tuple[object, str]]:
    """(window, song style) of every ``split`` window that fits the stage-2 sequence: the
    recipe's window index (``pipeline.build_index`` over the audio's 50 Hz frames, as
    ``stage1.load_split`` builds it for the mel front end)."""
    from bossa_jax import mel
    from bossa_jax.data import pipeline, readers

    sources, _ = readers.manifest_sources(Path(cfg.data.data_dir) / "manifest.jsonl")
    records, _ = readers.read_songs(sources, split=split, require_audio=True)
    frames = {r.id: mel.audio_frames(r.audio, cfg.encodec.sampling_rate) for r in records}
    index = pipeline.build_index(
        records, frames, clamp=cfg.data.clamp_clips, clip_length=cfg.audio.clip_frames
    )
    return [
        (e.window, records[e.song_index].style)
        for e in index.examples
        if pipeline.fits_stage(e.window, 2, cfg.stage2.max_tokens)
    ]


def _melody_positions(ids, control, pad, leadsheet) -> tuple[np.ndarray, np.ndarray]:
    """Positions t of the arrangement's pitch tokens that are lead-sheet melody notes, and of
    the other (accompaniment) pitch tokens."""
    from bossa_jax.evaluate_style import melody_of, onset_pitch_set
    from bossa_jax.symbolic import remi
    from bossa_jax.symbolic.notes import BAR

    first_bar = int(np.asarray(leadsheet.events)[:, BAR].min())
    melody = {(b - first_bar, o, p) for b, o, p in onset_pitch_set(melody_of(leadsheet))}
    tokens = remi.to_strings(ids)
    mel, acc = [], []
    bar, onset = 0, 0
    for t in range(int(np.argmax(~control & ~pad)), len(tokens)):
        if pad[t]:
            break
        token = tokens[t]
        if token == "b-1":
            bar += 1
        elif token.startswith("o-"):
            onset = int(token[2:])
        elif token.startswith("p-"):
            (mel if (bar, onset, int(token[2:])) in melody else acc).append(t)
    return np.array(mel, np.int32), np.array(acc, np.int32)


def prepare(args) -> None:
    from bossa_jax.config import load_config
    from bossa_jax.data.pipeline import symbolic_sample
    from bossa_jax.symbolic import remi, segment
    from bossa_jax.symbolic.notes import BAR

    cfg = load_config("bossa_mini", [f"data.data_dir={args.corpus}"])
    styles = list(cfg.stage0.styles)
    max_tokens = cfg.stage2.max_tokens

    def sample(window, shift):
        moved = dataclasses.replace(
            window,
            arrangement=segment.transpose(window.arrangement, shift),
            leadsheet=segment.transpose(window.leadsheet, shift),
        )
        s = symbolic_sample(moved, 2, None, deperf=cfg.data.deperf, max_tokens=max_tokens)
        return s["tokens"], s["control_mask"], s["pad_mask"]

    train = _windows(cfg, "train")
    shifts = range(segment.TRANSPOSE_MIN, segment.TRANSPOSE_MAX + 1)
    tokens, control_len, length, style = [], [], [], []
    for window, song_style in train:
        k = styles.index(song_style) if song_style in styles else -1
        for shift in shifts:
            ids, control, pad = sample(window, shift)
            tokens.append(ids.astype(np.int16))
            control_len.append(int(control.sum()))
            length.append(int((~pad).sum()))
            style.append(k)

    held = _windows(cfg, "validation")
    # a fixed random subset of the held-out windows (all songs and styles)
    rng = np.random.default_rng(0)
    held = [held[i] for i in sorted(rng.permutation(len(held))[:MAX_EVAL_WINDOWS])]
    ev_tokens, ev_pad, mel_pos, acc_pos = [], [], [], []
    gen_prompts, gen_style, gen_leadsheet, gen_offset = [], [], [], [0]
    for i, (window, song_style) in enumerate(held):
        ids, control, pad = sample(window, 0)
        ev_tokens.append(ids.astype(np.int16))
        ev_pad.append(pad)
        m, a = _melody_positions(ids, control, pad, window.leadsheet)
        mel_pos.append(np.stack([np.full_like(m, i), m], 1))
        acc_pos.append(np.stack([np.full_like(a, i), a], 1))
        if i < GENERATION_WINDOWS:
            events = np.asarray(window.leadsheet.events).copy()
            events[:, BAR] -= events[:, BAR].min()
            for k, name in enumerate(styles):
                if (name == "waltz") != (song_style == "waltz"):
                    continue
                prompt = remi.prompt(window.leadsheet, redact=cfg.data.deperf).copy()
                prompt[remi.GENRE_POSITION + k] = remi.GENRE_PRESENT_IDS[k]
                gen_prompts.append(
                    np.pad(prompt, (0, max_tokens - len(prompt)), constant_values=-1)
                )
                gen_style.append(k)
                gen_leadsheet.append(events)
                gen_offset.append(gen_offset[-1] + len(events))
    from bossa_jax.outputs import atomic_output

    with atomic_output(Path(args.out)) as tmp, open(tmp, "wb") as f:  # no half-written file
        np.savez_compressed(
            f,
            tokens=np.stack(tokens),
            control_len=np.array(control_len, np.int32),
            length=np.array(length, np.int32),
            style=np.array(style, np.int32),
            eval_tokens=np.stack(ev_tokens),
            eval_pad=np.stack(ev_pad),
            melody_positions=np.concatenate(mel_pos),
            accompaniment_positions=np.concatenate(acc_pos),
            gen_prompts=np.stack(gen_prompts).astype(np.int16),
            gen_style=np.array(gen_style, np.int32),
            gen_leadsheet=np.concatenate(gen_leadsheet).astype(np.int32),
            gen_offset=np.array(gen_offset, np.int64),
            styles=np.array(styles),
        )
    print(
        f"wrote {args.out}: {len(train)} train windows x {len(shifts)} transpositions, "
        f"{len(held)} held-out windows, {len(gen_prompts)} generation prompts"
    )


# --- run (any device) ---------------------------------------------------------------------------
def _masks(length: np.ndarray, control_len: np.ndarray, max_tokens: int):
    position = np.arange(max_tokens)[None]
    return position < control_len[:, None], position >= length[:, None]


def parse_run(spec: str) -> tuple[str, int, int, float | None]:
    """``SIZE:STEPS:BATCH[:LR]`` -> (size, steps, batch, lr or None); a BossaError names a bad
    one."""
    from bossa_jax.errors import BossaError

    parts = spec.split(":")
    try:
        size, steps, batch = parts[0], int(parts[1]), int(parts[2])
        lr = float(parts[3]) if len(parts) == 4 else None
        if len(parts) > 4 or steps < 1 or batch < 1:
            raise ValueError
        if size not in SIZES:
            dims = [int(x) for x in size.split("x")]
            if len(dims) != 3 or min(dims) < 1:
                raise ValueError
    except (IndexError, ValueError):
        raise BossaError(
            f"--runs {spec!r}: expected SIZE:STEPS:BATCH[:LR], SIZE one of {sorted(SIZES)} or "
            "LAYERSxWIDTHxHEADS, positive STEPS and BATCH"
        ) from None
    return size, steps, batch, lr


def load_data(path: str) -> dict[str, np.ndarray]:
    from bossa_jax.errors import BossaError

    try:
        return dict(np.load(path))
    except (OSError, ValueError) as err:
        raise BossaError(f"--data {path}: cannot read it ({err}); make it with `prepare`") from None


def _config(size: str, steps: int, batch: int, lr: float | None, extra: list[str]):
    from bossa_jax.config import load_config

    over = [
        *extra,
        f"stage0.train.total_steps={steps}",
        f"stage0.train.global_batch_size={batch}",
        "stage0.train.compute_dtype=float32",
    ]
    dims = SIZES[size] if size in SIZES else tuple(int(x) for x in size.split("x"))
    if dims is not None:
        layers, width, heads = dims
        over += [
            f"musecoco.num_hidden_layers={layers}",
            f"musecoco.hidden_size={width}",
            f"musecoco.num_attention_heads={heads}",
            f"musecoco.ffn_dim={4 * width}",
        ]
    if lr is not None:
        over.append(f"stage0.train.optim.lr={lr}")
    return load_config("bossa_mini", over)


def make_probe(graphdef):
    """The jitted teacher-forced argmax ``(params, tokens, pad) -> (B, L)`` (split once)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bossa_jax.models.arranger import POSITION_START

    def predict(params, tokens, pad):
        return jnp.argmax(nnx.merge(graphdef, params)(tokens, pad, None, POSITION_START), -1)

    return jax.jit(predict)


def teacher_forced(probe, params, data) -> dict:
    tokens = data["eval_tokens"].astype(np.int32)
    pad = data["eval_pad"]
    hits = np.zeros(tokens.shape, bool)
    for b in range(0, len(tokens), 16):
        predicted = np.asarray(probe(params, tokens[b : b + 16], pad[b : b + 16]))
        hits[b : b + 16, 1:] = predicted[:, :-1] == tokens[b : b + 16, 1:]
    out = {}
    for kind in ("melody", "accompaniment"):
        pos = data[f"{kind}_positions"]
        out[f"{kind}_pitch_accuracy"] = float(hits[pos[:, 0], pos[:, 1]].mean())
        out[f"{kind}_pitch_tokens"] = int(len(pos))
    return out


def generate_alone(model, data) -> dict:
    from bossa_jax.data import style_classifier
    from bossa_jax.evaluate_style import chord_tone_fraction, melody_preservation
    from bossa_jax.models.arranger import POSITION_START
    from bossa_jax.sampling import Sampler, SamplingSettings
    from bossa_jax.symbolic import remi

    prompts = [p[p >= 0].astype(np.int32) for p in data["gen_prompts"]]
    styles = [str(s) for s in data["styles"]]
    offset = data["gen_offset"]
    sampler = Sampler(model, SamplingSettings(top_k=15, temperature=1.0))
    t0 = time.perf_counter()
    out = sampler(prompts, max_new_tokens=800, seed=0, bar_limit=4, position_start=POSITION_START)
    seconds = time.perf_counter() - t0
    melody, chord, right = [], [], 0
    for i in range(len(prompts)):
        leadsheet = data["gen_leadsheet"][offset[i] : offset[i + 1]]
        arrangement = remi.decode(out.new_tokens(i))[0]
        melody.append(melody_preservation(arrangement, leadsheet))
        chord.append(chord_tone_fraction(arrangement, leadsheet)[0])
        right += style_classifier.classify(arrangement, leadsheet) == styles[data["gen_style"][i]]
    return {
        "arrangements": len(prompts),
        "melody_preservation": float(np.nanmean(melody)),
        "style_accuracy": right / len(prompts),
        "chord_tone_fraction": float(np.nanmean(chord)),
        "sampling_s": seconds,
    }


def train_run(spec: str, data, evals: list[int], deadline: float, record, extra: list[str]) -> None:
    import jax
    from flax import nnx

    from bossa_jax import sharding
    from bossa_jax.train import lm
    from bossa_jax.train.step import batch_shardings, replicated_key

    size, steps, batch, lr = parse_run(spec)
    name = spec
    cfg = _config(size, steps, batch, lr, extra)
    mc = cfg.musecoco
    result = {
        "spec": spec,
        "layers": mc.num_hidden_layers,
        "width": mc.hidden_size,
        "heads": mc.num_attention_heads,
        "steps_planned": steps,
        "batch": batch,
        "lr": cfg.stage0.train.optim.lr,
        "min_lr": cfg.stage0.train.optim.min_lr,
        "overrides": extra,
        "probes": [],
    }
    record(name, result)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    max_tokens = data["tokens"].shape[1]
    rng_np = np.random.default_rng(0)

    def draw():
        rows = rng_np.integers(0, len(data["tokens"]), batch)
        control, pad = _masks(data["length"][rows], data["control_len"][rows], max_tokens)
        return {
            "tokens": data["tokens"][rows].astype(np.int32),
            "control_mask": control,
            "pad_mask": pad,
            "style": data["style"][rows],
        }

    with sharding.use_mesh(mesh, sharding.rules_of(cfg.mesh)):
        program = lm.build_lm_program(cfg, mesh)
        result["parameters"] = int(sum(x.size for x in jax.tree.leaves(program.state.params)))
        example = draw()
        t0 = time.perf_counter()
        step_fn = (
            program.train_step(batch_shardings(mesh, example))
            .lower(program.state, program.frozen, example, replicated_key(0, mesh))
            .compile()
        )
        result["compile_s"] = time.perf_counter() - t0
        rng = replicated_key(cfg.stage0.train.seed, mesh)
        graphdef, _ = nnx.split(program.model())
        probe_fn = make_probe(graphdef)
        state, train_s, done, metrics = program.state, 0.0, 0, {"loss": math.nan}
        for target in sorted(set(e for e in evals if e < steps) | {steps}):
            t0 = time.perf_counter()
            while done < target and time.perf_counter() < deadline:
                state, metrics = step_fn(state, program.frozen, draw(), rng)
                done += 1
                if done % 100 == 0:  # keep dispatch from running far past the deadline
                    jax.block_until_ready(metrics["loss"])
            jax.block_until_ready(state)
            train_s += time.perf_counter() - t0
            probe = {"step": done, "train_s": train_s, "loss": float(metrics["loss"])}
            probe.update(teacher_forced(probe_fn, nnx.state(program.model(state)), data))
            result["probes"].append(probe)
            record(name, result)
            print(f"{name} {json.dumps(probe)}", flush=True)
            if done < target:
                result["stopped_by_budget"] = True
                break
        result["steps_done"] = done
        result["step_ms"] = 1000 * train_s / max(done, 1)
        result["alone"] = generate_alone(program.model(state), data)
        print(f"{name} alone {json.dumps(result['alone'])}", flush=True)
        record(name, result)


def probe(args) -> None:
    """The probes on an exported LM (``save_musecoco``: the recipe's ``RUN/stage0-lm``)."""
    from flax import nnx

    from bossa_jax.models.musecoco import load_musecoco

    data = load_data(args.data)
    model = load_musecoco(args.lm)
    graphdef, params = nnx.split(model)
    result = {"lm": str(args.lm), **teacher_forced(make_probe(graphdef), params, data)}
    result["alone"] = generate_alone(model, data)
    print(json.dumps(result, indent=1))
    if args.out:
        from bossa_jax.outputs import atomic_output

        with atomic_output(Path(args.out)) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")


def run(args) -> None:
    import jax

    from bossa_jax.outputs import atomic_output

    data = load_data(args.data)
    device = jax.devices()[0]
    out = Path(args.out)
    payload = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "device": f"{device.platform} {device.device_kind}",
        "jax": jax.__version__,
        "train_windows": int(len(data["tokens"])),
        "held_out_windows": int(len(data["eval_tokens"])),
        "runs": {},
    }

    def record(name, result):
        payload["runs"][name] = result
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(payload, indent=1) + "\n")

    start = time.perf_counter()
    for i, spec in enumerate(args.runs):
        # each run may use what the earlier ones left of the budget, split evenly
        left = args.budget_s - (time.perf_counter() - start)
        deadline = time.perf_counter() + left / (len(args.runs) - i)
        train_run(spec, data, args.evals, deadline, record, args.set)
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    from bossa_jax.cli import ArgumentParser

    parser = ArgumentParser(
        prog="python bench/stage0_scale.py", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    q = sub.add_parser("probe")
    q.add_argument("--data", required=True)
    q.add_argument("--lm", required=True)
    q.add_argument("--out", help="JSON path")
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--runs", nargs="+", default=["mini:2400:8"])
    r.add_argument("--evals", type=int, nargs="+", default=[400, 1000, 2400, 4000, 8000, 16000])
    r.add_argument(
        "--budget-s",
        type=float,
        default=math.inf,
        help="wall clock of all runs' compiles and steps",
    )
    r.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    r.add_argument("--out", default=str(RESULTS / "stage0_scale.json"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        prepare(args)
    elif args.command == "probe":
        probe(args)
    else:
        for spec in args.runs:  # every spec checked before the first run trains
            parse_run(spec)
        run(args)
    return 0


if __name__ == "__main__":
    from bossa_jax.errors import run_cli

    run_cli(main, sys.argv[1:])
