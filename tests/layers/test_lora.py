"""LoRA on a Linear (SPEC 4.4): initialisation, the delta, the variable filter, merge export."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bossa_jax.layers import LoRA, LoRALinear, merge_lora, stack_modules


def _layer(rank=4, scale=1.0, seed=0):
    return LoRALinear(12, 10, axes=("embed", "qkv"), rank=rank, scale=scale, rngs=nnx.Rngs(seed))


def test_initialisation_follows_spec():
    lora = LoRA(2048, 2040, 16, axes=("embed", "qkv"), rngs=nnx.Rngs(0))
    assert lora.a.shape == (2048, 16) and lora.b.shape == (16, 2040)
    # A ~ N(0, 1) / rank, B = 0
    np.testing.assert_allclose(np.std(np.asarray(lora.a[...])), 1 / 16, rtol=0.02)
    assert not np.any(np.asarray(lora.b[...]))
    assert isinstance(lora.a, nnx.LoRAParam) and isinstance(lora.b, nnx.LoRAParam)
    assert lora.a.get_metadata()["out_sharding"] == ("embed", "lora")
    assert lora.b.get_metadata()["out_sharding"] == ("lora", "qkv")


def test_zero_b_leaves_the_output_unchanged():
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (3, 12))
    base = x @ layer.kernel[...] + layer.bias[...]
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base))


def test_delta_is_scaled_b_a_x():
    layer = _layer(scale=0.5)
    layer.lora.b.set_value(jax.random.normal(jax.random.key(2), (4, 10)))
    x = jax.random.normal(jax.random.key(1), (3, 12))
    a, b = np.asarray(layer.lora.a[...]), np.asarray(layer.lora.b[...])
    expected = np.asarray(x @ layer.kernel[...] + layer.bias[...]) + 0.5 * (np.asarray(x) @ a @ b)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=1e-5)


def test_filter_selects_only_the_adapters():
    layer = _layer()
    lora = nnx.state(layer, nnx.LoRAParam)
    base = nnx.state(layer, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(lora)) == [
        "lora.a",
        "lora.b",
    ]
    assert sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(base)) == ["bias", "kernel"]
    assert _layer(rank=0).lora is None


def test_merged_equals_unmerged_on_stacked_layers():
    stacked = stack_modules(lambda r: _layer(seed=0), 3, nnx.Rngs(0))
    stacked.lora.b.set_value(jax.random.normal(jax.random.key(3), stacked.lora.b.shape))
    x = jax.random.normal(jax.random.key(4), (3, 5, 12))
    unmerged = jnp.einsum("lbi,lio->lbo", x, stacked.kernel[...]) + stacked.bias[...][:, None]
    unmerged += jnp.einsum("lbi,lir,lro->lbo", x, stacked.lora.a[...], stacked.lora.b[...])
    merged = merge_lora(stacked)
    assert merged.lora is None and stacked.lora is not None  # the input is left as it was
    assert not nnx.state(merged, nnx.LoRAParam)
    out = jnp.einsum("lbi,lio->lbo", x, merged.kernel[...]) + merged.bias[...][:, None]
    np.testing.assert_allclose(np.asarray(out), np.asarray(unmerged), atol=1e-5)
    single = _layer()
    single.lora.b.set_value(jax.random.normal(jax.random.key(5), (4, 10)))
    np.testing.assert_allclose(merge_lora(single)(x[0]), single(x[0]), atol=1e-5)
