"""Uniform stacks of blocks: parameters stacked on a leading ``layers`` axis and run with
``lax.scan`` (DESIGN "Scan over layers"), so compile time stays flat as depth grows.

Decoding one token at a time is the exception: inside ``lax.scan`` every matmul reads its kernel
from a per-iteration copy of the layer's slice of the stacked array (XLA cannot hand a
dynamic slice to a dot in place), which doubles the memory traffic of a memory-bound step. A
sampler therefore unstacks once (:func:`unstack_modules`) and gives :func:`scan_modules` the list
of blocks, which it runs in a Python loop (each matmul reads its own kernel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)
T = TypeVar("T")


def stack_modules(make: Callable[[nnx.Rngs], M], num: int, rngs: nnx.Rngs) -> M:
    """Builds ``num`` independent copies of ``make(rngs)`` as one module with stacked parameters."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> M:
        return make(r)

    return create(rngs)


def unstack(tree: T) -> list[T]:
    """A pytree with a leading ``layers`` axis as one pytree per layer (each its own arrays)."""
    num = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(num)]


def unstack_modules(stacked: M) -> list[M]:
    """The blocks of a stacked module as separate modules with their own (unstacked) arrays."""
    graphdef, state = nnx.split(stacked)
    return [nnx.merge(graphdef, layer_state) for layer_state in unstack(state)]


def scan_modules(
    stacked: M | Sequence[M],
    carry: Any,
    step: Callable[..., Any],
    xs: Any = None,
    *,
    per_layer: bool = False,
) -> Any:
    """Runs the stacked blocks in order with ``lax.scan``.

    Default: ``carry = step(block_i, carry)`` for each block; returns the final carry (the residual
    stream). With ``per_layer``: ``carry, y_i = step(block_i, carry, x_i)``, where ``x_i`` is layer
    i's slice of ``xs`` (a pytree with a leading ``layers`` axis, e.g. each layer's decode state or
    dropout key; None gives None) and the ``y_i`` come back stacked: returns ``(carry, ys)``.

    ``stacked`` may instead be a sequence of blocks (:func:`unstack_modules`): they run in a
    Python loop, ``xs`` is then a sequence of per-layer inputs (or None) and the ``y_i`` come back
    as a list.
    """
    if not isinstance(stacked, nnx.Module):
        return _loop_modules(stacked, carry, step, xs, per_layer)
    graphdef, state = nnx.split(stacked)

    if not per_layer:

        def body(c: Any, layer_state: Any) -> tuple[Any, None]:
            return step(nnx.merge(graphdef, layer_state), c), None

        carry, _ = jax.lax.scan(body, carry, state)
        return carry

    def body_per_layer(c: Any, layer: tuple[Any, Any]) -> tuple[Any, Any]:
        layer_state, x = layer
        return step(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(body_per_layer, carry, (state, xs))


def _loop_modules(
    blocks: Sequence[M], carry: Any, step: Callable[..., Any], xs: Any, per_layer: bool
) -> Any:
    if not per_layer:
        for block in blocks:
            carry = step(block, carry)
        return carry
    xs = [None] * len(blocks) if xs is None else xs
    ys = []
    for block, x in zip(blocks, xs, strict=True):
        carry, y = step(block, carry, x)
        ys.append(y)
    return carry, ys
