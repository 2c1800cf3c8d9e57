"""The tiny BOSSA-mini recipe that tests/train/test_mini.py checks, built once per test session.

The build runs ``train.py mini`` in the background from the session's start (tests/conftest.py
starts it when a collected test uses the ``recipe`` fixture), so it overlaps other tests instead of
holding a worker; under pytest-xdist the workers share one build in the session's temp root (the
parent of each worker's own), the first to create the build folder starts it. The run folder is
read-only to the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 900
# 8 steps logged as 2 means of 4: with ~8 training windows a batch of 4 sees every window twice in
# each half, so the two means compare the same data (single steps differ by their batch)
LOOP = dict(total_steps=8, global_batch_size=4, log_every=4, eval_every=0, checkpoint_every=0)
TINY = [
    "qformer.hidden_size=32",
    "qformer.num_hidden_layers=2",
    "qformer.num_attention_heads=2",
    "qformer.intermediate_size=64",
    "qformer.num_query_tokens=4",
    "audio.n_mels=16",
    "qformer.encoder_width=16",
    "musecoco.hidden_size=32",
    "musecoco.num_attention_heads=2",
    "musecoco.num_hidden_layers=1",
    "musecoco.ffn_dim=64",
    "stage2.max_tokens=512",
    "train.optim.warmup_steps=1",
    "stage0.train.optim.warmup_steps=1",
    "stage2.train.optim.warmup_steps=1",
    "stage0.train.optim.lr=0.01",
    # a decaying rate over the 8 steps (bossa_mini.yaml holds its rate for the melody look-up,
    # which 8 steps never reach; an LM left at a high rate gave stage 2 a flat loss)
    "stage0.train.optim.min_lr=1.0e-4",
    # stage 2 learns far less than stage 0 on top of a 5-step LM: a high rate and 12 steps (three
    # means of 4) make its decrease clear
    "stage2.train.optim.lr=0.05",
    "musecoco.lora_rank=4",
    *(f"{section}.{k}={v}" for section in ("train", "stage0.train", "stage2.train")
      for k, v in LOOP.items()),
    "stage2.train.total_steps=12",
]  # fmt: skip
RECIPE_ARGS = ("--songs", "6", "--bars", "8", "--seed", "3", *TINY)


def env(tmp: Path) -> dict[str, str]:
    """The environment of a ``train.py mini`` child working in ``tmp``."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        # one device; cheaper LLVM passes (compile time dominates a tiny run on CPU)
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
        PYTHONPATH=str(ROOT),
        # each stage compiles its model's jitted init twice (training, then its export): the
        # second is a cache hit
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
    )


def mini_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "mini", *args]


def build_folder(session_temp: Path) -> Path:
    """The shared build folder of this session (``session_temp``: tmp_path_factory's base)."""
    root = session_temp.parent if os.environ.get("PYTEST_XDIST_WORKER") else session_temp
    return root / "mini-recipe"


def start_build(folder: Path) -> subprocess.Popen | None:
    """Starts the build in the background unless a process of this session already did (the
    folder exists); returns the process when this call started it. Its output goes to files in
    ``folder``, its exit status last (renamed into place) for :func:`wait_for_build`."""
    try:
        folder.mkdir()
    except FileExistsError:
        return None
    cmd = mini_command("--out", str(folder / "run"), *RECIPE_ARGS)
    with open(folder / "stdout.txt", "w") as stdout, open(folder / "stderr.txt", "w") as stderr:
        build = subprocess.Popen(cmd, cwd=folder, env=env(folder), stdout=stdout, stderr=stderr)

    def record_exit() -> None:
        (folder / "returncode.tmp").write_text(str(build.wait()))
        (folder / "returncode.tmp").rename(folder / "returncode")

    threading.Thread(target=record_exit, daemon=True).start()
    return build


def stop_build(build: subprocess.Popen, *, others_may_read: bool) -> None:
    """At the end of the process that started ``build``: lets it finish while another process of
    the session may still wait for it, else stops it."""
    try:
        build.wait(timeout=BUILD_TIMEOUT_S if others_may_read else 0)
    except subprocess.TimeoutExpired:
        build.kill()
        build.wait()


def wait_for_build(folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """(run folder, the command's result) once the build in ``folder`` has ended."""
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while not (folder / "returncode").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: the BOSSA-mini build did not end")
        time.sleep(0.5)
    result = subprocess.CompletedProcess(
        ["train.py", "mini"],
        int((folder / "returncode").read_text()),
        (folder / "stdout.txt").read_text(),
        (folder / "stderr.txt").read_text(),
    )
    return folder / "run", result
