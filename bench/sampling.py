"""Benchmark: the jitted sampler (bossa_jax.sampling) vs the official generation loop re-implemented
in PyTorch, same weights, side by side in one process (issue 10).

* bossa-jax: :class:`bossa_jax.sampling.Sampler`: the prompt through the parallel form, then one
  compiled ``lax.while_loop`` of O(1) recurrent steps; batch 1 and 8 (compiled before timing).
* official (PyTorch, batch 1, Python loop), SPEC 4.5 "KV cache" and 8.1: the first call runs the
  whole prompt; then every step embeds the new token, and in every block appends its post-LN input
  to the cache, re-projects K and V for the whole prefix, pads the new query with zeros to the full
  length, recomputes the full causal linear-attention product (fast-transformers'
  ``causal_dot_product``, the kernel the official code calls, in fp32) and keeps the last row; top-k
  15 on the last logits, ``torch.multinomial``. Weights are tests/reference/musecoco_torch.py's
  model loaded from the Flax model (``convert.musecoco.to_hf_state_dict``).

Both sides get the stage-2 layout: 32 prefix vectors, a 64-token prompt with positions from index
61, then new tokens up to each total length (stops disabled, so the length is forced). Figures:
new tokens per second (prompt pass included), ms per token, and for the official loop also the
marginal ms per token over the last 10% of its steps (how per-token time grows with length).
``--official-steps N`` times only the official loop's last N steps before each length (its prompt
extended with random tokens, the prompt pass untimed): the per-token rate at that length, for
machines too slow or too busy to wait for whole official runs.
``--product torch`` (or ``auto`` where fast-transformers is not installed, e.g. a GPU host without
its compiled CUDA extension) runs the official loop's causal product in torch's own ops instead
(the cumulative sum of outer products; the JSON records which). Repeats alternate torch and JAX;
the table shows medians. Torch runs with the faster of one
thread and its default (measured on a warm-up).

CPU (default): a MuseCoco-200m-shaped model (512 wide, 8 heads, 6 layers, FFN 2048, vocab 1253),
fp32. ``--gpu``: the paper-size model (2048 wide, 24 heads, 24 layers, FFN 8192), random weights,
bf16 (torch on CUDA when available); ``--gpu --smoke`` runs that code path at a tiny size on CPU.

Usage: .venv/bin/python bench/sampling.py [--lengths 256 512 1000] [--batches 1 8] [--repeats 3]
       [--jax-repeats 3] [--official-steps N] [--gpu] [--smoke]
Writes bench/results/sampling_cpu.json (sampling_gpu.json; ``_smoke`` appended with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

PROMPT_LENGTH = 64
PREFIX_LENGTH = 32  # stage 2's projected query vectors
POSITION_START = 61  # SPEC 4.3
TOP_K = 15
SIZES = {
    # MuseCoco-200m-shaped (SPEC 4.5: 512-d, 8 heads, 6 layers; the 1B's vocab and LoRA)
    "200m": dict(hidden_size=512, num_attention_heads=8, num_hidden_layers=6, ffn_dim=2048),
    "paper": dict(hidden_size=2048, num_attention_heads=24, num_hidden_layers=24, ffn_dim=8192),
    "tiny": dict(hidden_size=64, num_attention_heads=3, num_hidden_layers=2, ffn_dim=128),
}


def model_config(size: str, dtype: str):
    from bossa_jax.config import MuseCocoConfig

    return MuseCocoConfig(vocab_size=1253, lora_rank=16, dtype=dtype, **SIZES[size])


class OfficialLoop:
    """``generate_nucleus2`` at batch 1 with the HF port's recompute-per-step "cache" (SPEC 4.5)."""

    def __init__(self, lm, dtype, device, product: str = "fast_transformers"):
        import torch

        from tests.reference.musecoco_torch import causal_product

        self.torch = torch
        self.lm = lm.to(device=device, dtype=dtype).eval()
        self.dtype, self.device = dtype, device
        self.product = causal_product(product)

    def attention(self, layer, cache, h_new):
        """Re-projects K/V over the cached inputs, zero-pads Q, full causal product, last row."""
        torch = self.torch
        length = cache.shape[1]
        heads, dim = layer.heads, layer.head_dim
        k = layer.k_proj(cache) + layer.lora_k(cache)
        v = layer.v_proj(cache) + layer.lora_v(cache)
        q_new = layer.q_proj(h_new) + layer.lora_q(h_new)
        q = torch.zeros(1, length, heads * dim, dtype=q_new.dtype, device=q_new.device)
        q[:, -q_new.shape[1] :] = q_new

        def split(t):
            return t.reshape(1, length, heads, dim)

        q = torch.nn.functional.elu(split(q)) + 1
        k = torch.nn.functional.elu(split(k)) + 1
        v = split(v)
        z = 1 / (torch.einsum("nlhi,nlhi->nlh", q, k.cumsum(1)) + layer.eps)
        numerator = self.product(
            q.permute(0, 2, 1, 3).float().contiguous(),
            k.permute(0, 2, 1, 3).float().contiguous(),
            v.permute(0, 2, 1, 3).float().contiguous(),
        ).permute(0, 2, 1, 3)
        out = (numerator * z[..., None].float()).to(q_new.dtype)
        out = out[:, -h_new.shape[1] :].reshape(1, h_new.shape[1], heads * dim)
        return layer.out_proj(out)

    def blocks(self, x, caches):
        for i, block in enumerate(self.lm.decoder.layers):
            h = block.self_attn_layer_norm(x)
            caches[i] = h if caches[i] is None else self.torch.cat([caches[i], h], dim=1)
            x = x + self.attention(block.self_attn, caches[i], h)
            x = x + block.fc2(self.torch.nn.functional.gelu(block.fc1(block.final_layer_norm(x))))
        return self.lm.lm_head(self.lm.decoder.layer_norm(x[:, -1])).float()

    def embed_one(self, token: int, index: int):
        dec = self.lm.decoder
        ids = self.torch.tensor([[token]], device=self.device)
        position = index - POSITION_START + 2 if index >= POSITION_START else 1
        return (dec.embed_scale * dec.embed_tokens(ids) + dec.table[position]).to(self.dtype)

    def generate(self, prompt, prefix, max_new: int, generator) -> tuple[list[int], list[float]]:
        """Returns the new tokens and the wall times after the prompt pass and after each step."""
        torch = self.torch
        with torch.no_grad():
            ids = torch.tensor([prompt], device=self.device)
            x = self.lm.decoder.encode_input_ids(ids, POSITION_START).to(self.dtype)
            x = torch.cat([prefix.to(self.dtype), x], dim=1)
            caches = [None] * len(self.lm.decoder.layers)
            logits = self.blocks(x, caches)
            tokens, times = [], [time.perf_counter()]
            for step in range(max_new):
                values, indices = torch.topk(logits[0], TOP_K)
                probs = torch.softmax(values, dim=-1)
                token = int(indices[torch.multinomial(probs, 1, generator=generator)])
                tokens.append(token)
                logits = self.blocks(self.embed_one(token, len(prompt) + step), caches)
                times.append(time.perf_counter())
        return tokens, times


def time_official(official, prompt, prefix, total: int, steps: int | None, gen, rng) -> dict:
    """The official loop up to ``total`` tokens. ``steps`` None: the whole generation from the
    64-token prompt (prompt pass included). Otherwise only the last ``steps`` steps: the prompt is
    extended with random tokens to ``total - steps`` (prompt pass not timed), which measures the
    per-token rate at that length without waiting for the whole run on a slow machine."""
    if steps is not None:
        filler = rng.integers(6, 1253, total - steps - len(prompt)).tolist()
        _, times = official.generate(prompt + filler, prefix, steps, gen)
        seconds = (times[-1] - times[0]) / steps
        return {"tokens_per_s": 1 / seconds, "s_per_token": seconds, "marginal": seconds}
    new = total - len(prompt)
    t0 = time.perf_counter()
    _, times = official.generate(prompt, prefix, new, gen)
    tail = max(1, new // 10)
    return {
        "tokens_per_s": new / (times[-1] - t0),
        "s_per_token": (times[-1] - t0) / new,
        "marginal": (times[-1] - times[-1 - tail]) / tail,
    }


def official_product(choice: str) -> str:
    """The official loop's causal product: fast-transformers' kernel (what the official code
    calls), or with ``auto`` torch's own ops where fast-transformers is not installed (a GPU host
    without its compiled CUDA extension)."""
    if choice != "auto":
        return choice
    try:
        import fast_transformers.causal_product  # noqa: F401
    except ImportError:
        return "torch"
    return "fast_transformers"


def build(size: str, dtype: str, torch_dtype, device, product: str):
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from bossa_jax.models.musecoco import MuseCoco
    from bossa_jax.sharding import create_sharded
    from convert.musecoco import to_hf_state_dict
    from tests.reference.musecoco_torch import MuseCocoLM

    cfg = model_config(size, dtype)
    model = create_sharded(lambda: MuseCoco(cfg, rngs=nnx.Rngs(0)))
    # LoRA B starts at zero: give the adapters weight so both sides really compute them
    adapters = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(adapters))))
    nnx.update(
        model, jax.tree.map(lambda a: a + 0.01 * jax.random.normal(next(keys), a.shape), adapters)
    )
    lm = MuseCocoLM.from_config(cfg, product=product)
    weights = {
        k: torch.from_numpy(np.array(v, np.float32)) for k, v in to_hf_state_dict(model).items()
    }
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"decoder.embed_positions._float_tensor"}, missing
    return model, OfficialLoop(lm, torch_dtype, device, product)


def best_torch_threads(official, prompt, prefix) -> int:
    """Gives torch its faster thread count (1 or its default) on a short warm-up: on a busy machine
    its default threads can be ten times slower than one."""
    import torch

    timings = {}
    for threads in sorted({1, torch.get_num_threads()}, reverse=True):
        torch.set_num_threads(threads)
        _, times = official.generate(prompt, prefix.to(official.device), 6, None)
        timings[threads] = statistics.median(b - a for a, b in zip(times[1:], times[2:]))
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def time_jax(sampler, prompts, prefix, max_new: int) -> float:
    import jax

    t0 = time.perf_counter()
    out = sampler(
        prompts,
        max_new_tokens=max_new,
        seed=0,
        prefix_embeddings=prefix,
        position_start=POSITION_START,
    )
    jax.block_until_ready(out.generated)
    seconds = time.perf_counter() - t0
    assert (out.count == max_new).all(), "stops are disabled: every row must reach the length"
    return seconds


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from bossa_jax.sampling import Sampler, SamplingSettings

    gpu = args.gpu
    size = "tiny" if args.smoke else ("paper" if gpu else "200m")
    dtype = "bfloat16" if gpu else "float32"
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if gpu else torch.float32
    product = official_product(args.product)
    model, official = build(size, dtype, torch_dtype, device, product)
    settings = SamplingSettings(top_k=TOP_K, eos_id=None, bar_id=None, bar_limit=None)
    sampler = Sampler(model, settings)
    rng = np.random.default_rng(0)
    d = model.cfg.hidden_size
    prompt = [2, *rng.integers(6, model.cfg.vocab_size, PROMPT_LENGTH - 1).tolist()]
    prefix_np = rng.standard_normal((max(args.batches), PREFIX_LENGTH, d)).astype(np.float32)

    # same weights: the prompt's last logits on both sides
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        x = official.lm.decoder.encode_input_ids(ids, POSITION_START).to(torch_dtype)
        x = torch.cat([torch.from_numpy(prefix_np[:1]).to(device, torch_dtype), x], dim=1)
        torch_logits = official.blocks(x, [None] * model.cfg.num_hidden_layers).cpu().numpy()
    from flax import nnx

    from bossa_jax.sampling import prompt_logits_and_state

    @jax.jit
    def prompt_logits(params, tokens, lengths, prefix):
        merged = nnx.merge(sampler.graphdef, params)
        return prompt_logits_and_state(merged, tokens, lengths, prefix, POSITION_START)[0]

    jax_logits = prompt_logits(
        sampler.params, jnp.asarray([prompt]), jnp.asarray([PROMPT_LENGTH]), prefix_np[:1]
    )
    logits_diff = float(np.abs(np.asarray(jax_logits) - torch_logits).max())

    torch_threads = best_torch_threads(official, prompt, torch.from_numpy(prefix_np[:1]))
    rows = []
    for total in args.lengths:
        new = total - PROMPT_LENGTH
        batches = {b: ([prompt] * b, jnp.asarray(prefix_np[:b])) for b in args.batches}
        compile_s = {}
        for b, (ps, prefix) in batches.items():
            compile_s[b] = time_jax(sampler, ps, prefix, new)  # compile + first run
        jax_s = {b: [] for b in batches}
        official_runs = []
        gen = torch.Generator(device=device).manual_seed(0)
        prefix_t = torch.from_numpy(prefix_np[:1]).to(device)
        for _ in range(args.repeats):  # alternating
            official_runs.append(
                time_official(official, prompt, prefix_t, total, args.official_steps, gen, rng)
            )
            for b, (ps, prefix) in batches.items():
                runs = [time_jax(sampler, ps, prefix, new) for _ in range(args.jax_repeats)]
                jax_s[b].append(statistics.median(runs))

        median = {k: statistics.median(r[k] for r in official_runs) for k in official_runs[0]}
        row = {
            "total_length": total,
            "new_tokens": new,
            "official_timed": "whole run"
            if args.official_steps is None
            else f"last {args.official_steps} steps",
            "official_b1_tokens_per_s": median["tokens_per_s"],
            "official_b1_ms_per_token": 1e3 * median["s_per_token"],
            "official_b1_marginal_ms_per_token": 1e3 * median["marginal"],
            "official_runs": official_runs,
        }
        for b in batches:
            med = statistics.median(jax_s[b])
            row[f"jax_b{b}_tokens_per_s"] = b * new / med
            row[f"jax_b{b}_ms_per_step"] = 1e3 * med / new
            row[f"jax_b{b}_runs_s"] = jax_s[b]
            row[f"jax_b{b}_first_call_s"] = compile_s[b]
        row["speedup_b1"] = row["jax_b1_tokens_per_s"] / row["official_b1_tokens_per_s"]
        rows.append(row)
        print_row(row, args.batches)
    return {
        "rows": rows,
        "prompt_vs_torch_max_abs_logit_diff": logits_diff,
        "size": size,
        "torch_threads": torch_threads,
        "official_product": product,
    }


def print_row(row: dict, batches) -> None:
    cells = [
        f"{row['total_length']:>6}",
        f"{row['official_b1_tokens_per_s']:>10.1f}",
        f"{row['official_b1_marginal_ms_per_token']:>9.2f}",
    ]
    cells += [f"{row[f'jax_b{b}_tokens_per_s']:>10.1f}" for b in batches]
    cells.append(f"{row['speedup_b1']:>7.1f}x")
    print(" ".join(cells), flush=True)


def summary(rows: list[dict], batches) -> dict:
    first, last = rows[0], rows[-1]
    out = {
        "jax_b1_ms_per_token_growth": last["jax_b1_ms_per_step"] / first["jax_b1_ms_per_step"],
        "official_ms_per_token_growth": last["official_b1_ms_per_token"]
        / first["official_b1_ms_per_token"],
        "official_marginal_ms_per_token_growth": last["official_b1_marginal_ms_per_token"]
        / first["official_b1_marginal_ms_per_token"],
        "min_speedup_b1": min(r["speedup_b1"] for r in rows),
    }
    if 1 in batches and len(batches) > 1:
        big = max(batches)
        out[f"b{big}_over_b1_tokens_per_s"] = [
            r[f"jax_b{big}_tokens_per_s"] / r["jax_b1_tokens_per_s"] for r in rows
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--jax-repeats", type=int, default=3, help="JAX runs per alternation (median kept)"
    )
    parser.add_argument(
        "--official-steps",
        type=int,
        default=None,
        help="time only the official loop's last N steps before each length (default: all)",
    )
    parser.add_argument(
        "--product",
        choices=["fast_transformers", "torch", "auto"],
        default="fast_transformers",
        help="the official loop's causal product (auto: torch's ops without fast-transformers)",
    )
    parser.add_argument("--gpu", action="store_true", help="paper-size model, bf16")
    parser.add_argument("--smoke", action="store_true", help="tiny model (code-path check)")
    args = parser.parse_args()
    if 1 not in args.batches:
        parser.error("--batches must include 1 (the official loop's batch)")
    if min(args.lengths) <= PROMPT_LENGTH:
        parser.error(f"--lengths must exceed the {PROMPT_LENGTH}-token prompt")
    if not args.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    print(
        f"{'length':>6} {'official':>10} {'ms/tok@end':>9} "
        + " ".join(f"{'jax b' + str(b):>10}" for b in args.batches)
        + f" {'b1 x':>8}   (new tokens/s; official = torch batch 1)"
    )
    result = run(args)
    result["summary"] = summary(result["rows"], args.batches)
    result["settings"] = {**vars(args), "prompt_length": PROMPT_LENGTH, "prefix": PREFIX_LENGTH}
    result["machine"] = {
        "platform": platform.platform(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3]
        if Path("/proc/loadavg").exists()
        else None,
    }
    print(json.dumps(result["summary"], indent=1))
    diff = result["prompt_vs_torch_max_abs_logit_diff"]
    print(f"prompt logits, jax vs torch: max |diff| {diff:.2e}")
    name = ("gpu" if args.gpu else "cpu") + ("_smoke" if args.smoke else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"sampling_{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
