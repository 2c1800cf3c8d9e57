"""Test-wide settings: 8 fake CPU devices for sharding tests, fp32 'highest' matmuls for parity."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch references: fp32, few threads (the CI machine has 2 cores)
    import torch

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover - torch is a dev dependency
    pass
