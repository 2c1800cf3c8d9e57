"""Two processes on localhost x 4 CPU devices each (jax.distributed, gloo CPU collectives) train
the toy model with the real loop; three steps give the parameters of one process with 8 devices,
and the checkpoint is written collectively (DESIGN "Multi-host")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker

from bossa_jax.train.checkpoint import TrainCheckpointer
from tests.train.toy import flat_params, run_toy, toy_config

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "train.total_steps=3",
    "train.optim.warmup_steps=2",
    "mesh.shape={data: 2, fsdp: 4, tensor: 1}",
]


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    port = portpicker.pick_unused_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    out = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.train.toy",
                str(out),
                f"--coordinator=localhost:{port}",
                "--num-processes=2",
                f"--process-id={i}",
                *ARGS,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text
    two = dict(np.load(out / "final_params.npz"))

    one = flat_params(run_toy(toy_config(str(tmp_path / "one"), ARGS)).state.params)
    assert set(one) == set(two)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-6, err_msg=key)

    # one checkpoint, written by both processes, holding both data-iterator states
    ckpt = TrainCheckpointer(out / "checkpoints", keep=3)
    assert ckpt.all_steps() == [3]
    ckpt.close()
    data = json.loads((out / "checkpoints" / "3" / "data" / "metadata").read_text())
    assert [s["next_index"] for s in data["processes"]] == [3, 3]
