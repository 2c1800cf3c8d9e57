"""Uniform stacks of blocks: parameters stacked on a leading ``layers`` axis and run with
``lax.scan`` (DESIGN "Scan over layers"), so compile time stays flat as depth grows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def stack_modules(make: Callable[[nnx.Rngs], M], num: int, rngs: nnx.Rngs) -> M:
    """Builds ``num`` independent copies of ``make(rngs)`` as one module with stacked parameters."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> M:
        return make(r)

    return create(rngs)


def scan_modules(
    stacked: M,
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
    """
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
