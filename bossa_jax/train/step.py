"""Generic jitted train and eval steps over split NNX state (DESIGN "Flax and JAX idioms").

The model is split once by the one trainable filter (DESIGN "Trainable vs frozen is a filter,
declared once") into a graph definition, the trainable state (fp32 master weights, the only thing
``jax.grad`` and the optimizer see) and the frozen rest. The step is plain ``jax.jit`` over
``(TrainState, frozen, batch, rng)`` with the train state donated; inside, parameters are cast to
the compute dtype (bf16 in production), the model is merged, and ``loss_fn(model, batch, rng)``
returns ``(loss, metrics)``. Gradients come back in fp32 (the cast's transpose), the optimizer
state stays fp32.

Shardings come from the mesh and the logical-axis rules only: parameters carry logical names, the
optimizer state is sharded like the parameter it mirrors, batches use ``batch_sharding``. Steps are
compiled ahead of time (:func:`compile_ahead`) and their memory use is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bossa_jax.sharding import batch_sharding
from bossa_jax.train.optim import path_names

log = logging.getLogger("bossa_jax.train")

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
Filter = Any  # an nnx filter (type, path predicate, nnx.All/Not/Any ...)


def trainable_filter(*frozen_paths: str) -> Filter:
    """``nnx.Param`` minus every parameter whose path contains one of ``frozen_paths``.

    Declare it once per stage and hand the same object to :func:`build_program` (which splits the
    model with it for both the step and the optimizer).
    """
    return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(p)) for p in frozen_paths))


@flax.struct.dataclass
class TrainState:
    """What a training checkpoint holds besides the rng and data state: the number of optimizer
    updates applied, the trainable parameters (fp32) and the optimizer state."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    """Casts floating arrays to ``dtype``; scalars stay as they are, so the contrastive temperature
    stays exactly fp32 0.07 under bf16 (bf16 would round it to 0.06982) and costs nothing to keep.
    Integer buffers and rng keys are untouched."""

    def cast(x: Any) -> Any:
        if (
            hasattr(x, "dtype")
            and jnp.issubdtype(x.dtype, jnp.floating)
            and x.dtype != dtype
            and len(x.shape) > 0
        ):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def opt_state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Shards every optimizer-state leaf like the parameter it mirrors (same path suffix and
    shape); scalars such as the step count are replicated."""
    by_path = {}
    for (path, p), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings)
    ):
        by_path[path_names(path)] = (tuple(p.shape), s)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)

    def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = path_names(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s with the shardings of ``tree``'s arrays (restore targets)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    """Every batch leaf sharded on its leading (global batch) dim by the ``batch`` rule."""
    return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)), batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    state_sharding: Any,
    frozen_sharding: Any,
    batch_sharding: Any,
    mesh: Mesh,
    compute_dtype: jnp.dtype = jnp.float32,
    donate: bool = True,
) -> Any:
    """The jitted train step ``(state, frozen, batch, rng) -> (state, metrics)``.

    ``rng`` is the run's base key; the step's key is ``fold_in(rng, state.step)``, so a resumed
    run draws the same randomness as an uninterrupted one. ``metrics`` holds the loss function's
    metrics plus ``loss`` and ``grad_norm`` (before clipping), all fp32 scalars.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, frozen: nnx.State, batch: Any, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        frozen_c = cast_floating(frozen, compute_dtype)

        def objective(params: nnx.State):
            model = nnx.merge(graphdef, cast_floating(params, compute_dtype), frozen_c)
            loss, metrics = loss_fn(model, batch, step_rng)
            return loss.astype(jnp.float32), metrics

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out["loss"] = loss
        out["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), out

    return jax.jit(
        step,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    *,
    mesh: Mesh,
    compute_dtype: jnp.dtype = jnp.float32,
) -> Any:
    """The jitted eval step ``(params, frozen, batch, rng) -> metrics`` (no gradients)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(params: nnx.State, frozen: nnx.State, batch: Any, rng: jax.Array):
        model = nnx.merge(
            graphdef, cast_floating(params, compute_dtype), cast_floating(frozen, compute_dtype)
        )
        loss, metrics = loss_fn(model, batch, rng)
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out["loss"] = jnp.asarray(loss, jnp.float32)
        return out

    return jax.jit(step, out_shardings=replicated)


def replicated_key(seed: int, mesh: Mesh) -> jax.Array:
    """The run's base rng key as a global replicated array (valid in multi-process runs)."""
    return jax.jit(
        lambda: jax.random.key(seed), out_shardings=NamedSharding(mesh, PartitionSpec())
    )()


def compile_ahead(jitted: Any, *args: Any, name: str = "train_step") -> Any:
    """Lowers and compiles ``jitted`` for ``args`` (arrays or ShapeDtypeStructs with shardings)
    before the loop, and logs what the compiler says the step needs per device."""
    compiled = jitted.lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        fields = ("argument", "output", "temp", "alias", "generated_code")
        sizes = {f: getattr(mem, f"{f}_size_in_bytes", None) for f in fields}
        text = ", ".join(f"{f} {v / 2**20:.1f} MiB" for f, v in sizes.items() if v is not None)
        log.info("%s compiled: per-device memory %s", name, text)
    return compiled


@dataclasses.dataclass
class TrainProgram:
    """A model split for training, its shardings, and its train/eval steps."""

    graphdef: nnx.GraphDef
    frozen: nnx.State
    state: TrainState
    state_sharding: Any
    frozen_sharding: Any
    tx: optax.GradientTransformation
    loss_fn: LossFn
    mesh: Mesh
    compute_dtype: jnp.dtype

    def train_step(self, batch_sharding: Any, donate: bool = True) -> Any:
        return make_train_step(
            self.graphdef,
            self.loss_fn,
            self.tx,
            state_sharding=self.state_sharding,
            frozen_sharding=self.frozen_sharding,
            batch_sharding=batch_sharding,
            mesh=self.mesh,
            compute_dtype=self.compute_dtype,
            donate=donate,
        )

    def eval_step(self) -> Any:
        return make_eval_step(
            self.graphdef, self.loss_fn, mesh=self.mesh, compute_dtype=self.compute_dtype
        )

    def model(self, state: TrainState | None = None) -> nnx.Module:
        """The full model with ``state``'s (default: the current) trainable parameters."""
        state = self.state if state is None else state
        return nnx.merge(self.graphdef, state.params, self.frozen)


def build_program(
    model: nnx.Module,
    trainable: Filter,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    compute_dtype: jnp.dtype = jnp.float32,
) -> TrainProgram:
    """Splits ``model`` (created sharded, e.g. by ``sharding.create_sharded``) by the trainable
    filter and initialises the optimizer state directly in its shardings."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    param_sharding = jax.tree.map(lambda x: x.sharding, params)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
    opt_sharding = opt_state_shardings(tx, params, param_sharding, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sharding = TrainState(replicated, param_sharding, opt_sharding)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    # created by jit so it is a global array in multi-process runs too
    step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)()
    return TrainProgram(
        graphdef=graphdef,
        frozen=frozen,
        state=TrainState(step, params, opt_state),
        state_sharding=state_sharding,
        frozen_sharding=frozen_sharding,
        tx=tx,
        loss_fn=loss_fn,
        mesh=mesh,
        compute_dtype=compute_dtype,
    )
