"""Test-wide settings: 8 fake CPU devices for sharding tests, fp32 'highest' matmuls for parity."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch references: fp32, few threads (the CI machine has 2 cores)
    import torch

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover - torch is a dev dependency
    pass


@pytest.fixture(scope="session", autouse=True)
def _mini_recipe_in_background(request, tmp_path_factory):
    """Starts the tiny BOSSA-mini build of tests/train/test_mini.py (tests/train/mini_recipe.py)
    when a collected test needs it, so that it runs beside the tests before it instead of holding
    a worker."""
    build = None
    if any("recipe" in getattr(item, "fixturenames", ()) for item in request.session.items):
        from tests.train import mini_recipe

        build = mini_recipe.start_build(mini_recipe.build_folder(tmp_path_factory.getbasetemp()))
    yield
    if build is not None:
        mini_recipe.stop_build(build, others_may_read="PYTEST_XDIST_WORKER" in os.environ)
