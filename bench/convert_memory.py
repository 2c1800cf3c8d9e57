"""Benchmark: peak host memory of ``python -m convert.musecoco`` on a synthetic paper-shape
MuseCoco-xLarge checkpoint (issue 9: at most 1.5x the file size).

Writes random bf16 weights in the HF-port layout (the 389 keys of
``shared/reference/musecoco-1b/state_dict_keys.json``: 1,212,161,472 parameters, about 2.4 GB) as
one ``.safetensors`` file, then runs the converter in a child process (``--num-heads 24``, source
dtype kept) and reads that child's peak resident set size (``ru_maxrss``). Prints the figure and the
ratio to the file size and writes bench/results/convert_memory.json.

Usage: .venv/bin/python bench/convert_memory.py [--workdir /tmp/musecoco-mem] [--keep]
[--layers 6] (a smaller variant for iterating; the issue's figure is the default 24 layers)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_checkpoint(path: Path, layers: int | None = None) -> int:
    """Random bf16 tensors of the paper shapes, in the HF-port layout (one tensor at a time in
    numpy, then one safetensors write)."""
    import ml_dtypes
    import numpy as np
    import torch
    from flax import nnx
    from safetensors.torch import save_file

    from bossa_jax.config import MuseCocoConfig
    from bossa_jax.models.musecoco import MuseCoco
    from convert.common import param_paths
    from convert.musecoco import BLOCK_TABLE, IGNORED, LAYER, TOP_TABLE

    cfg = MuseCocoConfig(lora=False, dtype="bfloat16")
    if layers is not None:  # a smaller variant for iterating on the converter
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    abstract = nnx.eval_shape(lambda: MuseCoco(cfg, rngs=nnx.Rngs(0)))
    shapes = {name: var.shape for name, var in param_paths(abstract).items()}
    rng = np.random.default_rng(0)

    def tensor(shape, kernel):
        shape = tuple(shape[::-1]) if kernel else tuple(shape)
        values = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)

    tensors = {hf: tensor(shapes[flax], kernel) for flax, hf, kernel in TOP_TABLE}
    for flax, hf, kernel in BLOCK_TABLE:
        for i in range(cfg.num_hidden_layers):
            tensors[LAYER.format(i=i) + hf] = tensor(shapes[f"layers.{flax}"][1:], kernel)
    tensors[IGNORED[0]] = torch.zeros(1)
    save_file(tensors, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/musecoco-mem")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic file and output")
    parser.add_argument(
        "--layers", type=int, default=None, help="fewer layers than the paper's 24 (iteration)"
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "model.safetensors", work / "converted"
    shutil.rmtree(out, ignore_errors=True)
    if not src.exists():
        print("writing the synthetic checkpoint ...", flush=True)
        write_checkpoint(src, args.layers)
    size = src.stat().st_size
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "convert.musecoco", str(src), str(out), "--num-heads", "24"],
        check=True,
        cwd=ROOT,
        env=env,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    result = {
        "file_bytes": size,
        "peak_rss_bytes": peak,
        "ratio": peak / size,
        "seconds": seconds,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "load_average_1min": os.getloadavg()[0],
    }
    print(
        f"file {size / 1e9:.2f} GB, converter peak RSS {peak / 1e9:.2f} GB = "
        f"{peak / size:.2f}x the file, {seconds:.0f} s (load average {os.getloadavg()[0]:.1f})"
    )
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "convert_memory.json").write_text(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
