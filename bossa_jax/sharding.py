"""Meshes, the logical-axis rules, activation constraints, sharded model creation and multi-host
start-up (DESIGN "Sharding is declared next to the parameters", "Multi-host").

Parameters carry logical axis names (``embed``, ``mlp``, ``heads`` ...) given by the layers in
``bossa_jax.layers``; one rules table (``MeshConfig.rules``) maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. Code outside this module never builds a PartitionSpec by hand.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bossa_jax.config import MeshConfig
from bossa_jax.errors import ConfigError

M = TypeVar("M", bound=nnx.Module)
MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)
_reported_replication: set[tuple[str, tuple[int, ...], str]] = set()


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolves the -1 entry of ``cfg.shape`` and checks the product against ``num_devices``."""
    sizes = [cfg.shape[a] for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"config key 'mesh.shape': fixed sizes {sizes} do not divide {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config key 'mesh.shape': {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
            f"devices, but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh with ``AxisType.Auto`` axes over ``devices``.

    Auto axes keep GSPMD propagation (jax 0.10 defaults to Explicit, which logical-rule code does
    not support).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_of(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    return tuple((name, axes) for name, axes in cfg.rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[Mesh]:
    """The one context under which models are created and steps are traced."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
        yield mesh


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """Maps logical names to a PartitionSpec through the active rules table."""
    rules = dict(core_spmd.get_logical_axis_rules())
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
        elif name in rules:
            spec.append(rules[name])
        else:
            raise ConfigError(f"logical axis '{name}' has no entry in mesh.rules")
    return PartitionSpec(*spec)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside a mesh.

    A mesh axis whose size does not divide the dimension is dropped for that dimension, so the
    same model code runs on any mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not core_spmd.get_logical_axis_rules():
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} names for an array of rank {x.ndim}")
    spec = _fit_spec(logical_to_spec(logical_axes), x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def _fit_spec(
    spec: PartitionSpec,
    shape: Sequence[int],
    sizes: dict[str, int],
    name: str | None = None,
) -> PartitionSpec:
    """Keeps, per dimension, the mesh axes of size > 1 that divide it and no earlier dim uses.

    With a parameter ``name``, a dimension left replicated because its mesh axes do not divide it
    is logged (once per parameter, shape and spec), so a silently unsharded weight can be found.
    """
    fitted, used = [], set()
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
        kept = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
        if kept and dim % math.prod(sizes[a] for a in kept) == 0:
            fitted.append(kept if len(kept) > 1 else kept[0])
            used.update(kept)
        else:
            fitted.append(None)
            if kept and name is not None:
                _report_replication(name, tuple(shape), spec, dim, kept, sizes)
    return PartitionSpec(*fitted)


def _report_replication(
    name: str,
    shape: tuple[int, ...],
    spec: PartitionSpec,
    dim: int,
    axes: tuple[str, ...],
    sizes: dict[str, int],
) -> None:
    key = (name, shape, str(spec))
    if key in _reported_replication:
        return
    _reported_replication.add(key)
    split = " x ".join(f"{a}={sizes[a]}" for a in axes)
    log.warning(
        "parameter '%s' %s: dimension of size %d is not divisible by mesh axes %s; "
        "replicated along it instead of sharded",
        name,
        shape,
        dim,
        split,
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a global batch array: leading dim over the ``batch`` rule, the rest replicated.

    Call inside :func:`use_mesh` (the rules come from there)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def named_shardings(state: Any, mesh: Mesh) -> Any:
    """The NamedSharding of every variable in ``state`` under the active rules, fitted to its
    shape: a mesh axis that does not divide a dimension (e.g. a 1237-row vocabulary over
    ``tensor=2``) is dropped for that dimension instead of failing, and logged once naming the
    parameter. Call inside :func:`use_mesh`.
    """
    sizes = dict(mesh.shape)

    def one(path: Any, var: Any) -> Any:
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        spec = nnx.spmd.get_var_pspec(var) or PartitionSpec()
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        return var.replace(NamedSharding(mesh, _fit_spec(spec, var.shape, sizes, name)))

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(ctor: Callable[[], M]) -> M:
    """Creates ``ctor()`` with one jitted init, directly sharded under the active mesh and rules.

    Each parameter is materialised only as its own shards, so a model larger than one device's
    memory never lands on a single device. Outside :func:`use_mesh` it still initialises in one
    compiled program (eager creation dispatches every initialiser op by op, which is slow).
    """
    abstract = nnx.eval_shape(ctor)
    graphdef, abstract_state = nnx.split(abstract)
    mesh = jax.sharding.get_abstract_mesh()
    shardings = None if mesh.empty else named_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's multi-host runtime when more than one process takes part.

    Explicit arguments win; otherwise ``BOSSA_COORDINATOR``, ``BOSSA_NUM_PROCESSES`` and
    ``BOSSA_PROCESS_ID`` are read; otherwise JAX's own auto-detection (TPU pods, SLURM, Open MPI)
    runs when it recognises a cluster. A single process does nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("BOSSA_COORDINATOR")
    if num_processes is None and "BOSSA_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["BOSSA_NUM_PROCESSES"])
    if process_id is None and "BOSSA_PROCESS_ID" in os.environ:
        process_id = int(os.environ["BOSSA_PROCESS_ID"])
    if coordinator_address or num_processes:
        if num_processes is not None and num_processes <= 1:
            return
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return
    if any(
        v in os.environ for v in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")
    ):
        jax.distributed.initialize()
