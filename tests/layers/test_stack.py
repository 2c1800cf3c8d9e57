"""scan_modules: the residual carry alone (MusicGen's use) and with per-layer state in and out;
the same over unstacked blocks (the samplers' decode step)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bossa_jax.layers import Linear, scan_modules, stack_modules, unstack, unstack_modules


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = Linear(6, 6, axes=("embed", "mlp"), rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.proj(x))


def _layer(stack, i):
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_carry_only_equals_a_python_loop():
    stack = stack_modules(Block, 4, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6))
    expected = x
    for i in range(4):
        expected = _layer(stack, i)(expected)
    got = jax.jit(lambda s, x: scan_modules(s, x, lambda b, h: b(h)))(stack, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


def test_per_layer_state_in_and_out():
    stack = stack_modules(Block, 4, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6))
    states = {"sum": jax.random.normal(jax.random.key(2), (4, 2, 6))}

    def step(block, h, state):
        h = block(h) + state["sum"]
        return h, {"sum": state["sum"] + h}

    carry, ys = jax.jit(lambda s, x, st: scan_modules(s, x, step, st, per_layer=True))(
        stack, x, states
    )
    h, expected = x, []
    for i in range(4):
        h, y = step(_layer(stack, i), h, {"sum": states["sum"][i]})
        expected.append(y["sum"])
    np.testing.assert_allclose(np.asarray(carry), np.asarray(h), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ys["sum"]), np.stack(expected), atol=1e-6)
    # no per-layer inputs: each layer gets None, outputs still come back stacked
    _, outs = scan_modules(stack, x, lambda b, h, none: (b(h), h), per_layer=True)
    assert outs.shape == (4, 2, 6)


def test_unstacked_blocks_give_what_the_scan_gives():
    stack = stack_modules(Block, 4, nnx.Rngs(0))
    blocks = unstack_modules(stack)
    assert len(blocks) == 4 and blocks[1].proj.kernel.shape == (6, 6)
    x = jax.random.normal(jax.random.key(1), (2, 6))
    states = {"sum": jax.random.normal(jax.random.key(2), (4, 2, 6))}

    def step(block, h, state):
        h = block(h) + state["sum"]
        return h, {"sum": state["sum"] + h}

    scanned = scan_modules(stack, x, lambda b, h: b(h))
    looped = jax.jit(lambda bs, x: scan_modules(bs, x, lambda b, h: b(h)))(blocks, x)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(scanned), atol=1e-6)
    carry, ys = scan_modules(stack, x, step, states, per_layer=True)
    loop_carry, loop_ys = scan_modules(blocks, x, step, unstack(states), per_layer=True)
    assert isinstance(loop_ys, list) and len(loop_ys) == 4
    np.testing.assert_allclose(np.asarray(loop_carry), np.asarray(carry), atol=1e-6)
    np.testing.assert_allclose(
        np.stack([y["sum"] for y in loop_ys]), np.asarray(ys["sum"]), atol=1e-6
    )
