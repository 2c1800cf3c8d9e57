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


def scan_modules(stacked: M, carry: Any, step: Callable[[M, Any], Any]) -> Any:
    """Runs ``carry = step(block_i, carry)`` over the stacked blocks with ``lax.scan``."""
    graphdef, state = nnx.split(stacked)

    def body(c: Any, layer_state: Any) -> tuple[Any, None]:
        return step(nnx.merge(graphdef, layer_state), c), None

    carry, _ = jax.lax.scan(body, carry, state)
    return carry
