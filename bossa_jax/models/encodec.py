"""The EnCodec-32kHz encoder: waveform -> SEANet embeddings (50 Hz) -> 4 residual-VQ codes per frame
(SPEC 1.1; DESIGN "The data flow").

Written to reproduce HF ``transformers.EncodecModel.encode`` (and audiocraft's ``SEANetEncoder`` +
``ResidualVectorQuantizer``, which it ports) for the ``facebook/encodec_32khz`` configuration:

* Every convolution pads like ``EncodecConv1d``: the total padding ``(k - 1) * dilation + 1 -
  stride`` is split right = total // 2, left = the rest (or all left when causal), and extra
  right padding makes the last window full, so a strided conv yields ``ceil(n / stride)`` frames
  and the whole encoder ``ceil(samples / hop)``. Reflect padding on an input shorter than the pad
  first appends zeros, as HF/audiocraft's ``pad1d`` does.
* Weight norm is folded into plain kernels by the converter (``convert/encodec.py``).
* Residual blocks: ELU -> conv(k=3, dilation growth**j) -> ELU -> conv(k=1), plus an identity skip
  (``use_conv_shortcut=False``, the 32 kHz model) or a 1x1 conv skip.
* The 2-layer LSTM (PyTorch gate order i, f, g, o) runs through ``lax.scan`` with the four gates in
  one fused matmul; its input projection is hoisted out of the scan. A skip adds its input.
* RVQ: for each codebook, the nearest codeword by HF's own formula
  ``argmax(-(|x|^2 - 2 x.E^T + |E|^2))`` (first index on ties), then the residual is reduced.
  Quantisation always runs in fp32.

Activations are (batch, time, channels) (NWC), the layout XLA's CPU and GPU convolutions prefer;
conv kernels are stored (kernel, in, out). Hot paths use :func:`encode_fn` / :func:`embed_fn`
(plain ``jax.jit`` over ``nnx.split`` state, DESIGN "Flax NNX, used functionally").
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bossa_jax.config import EncodecConfig
from bossa_jax.layers import Linear

CONFIG_SECTION = "encodec"


def _extra_padding(length: int, kernel: int, stride: int, padding_total: int) -> int:
    """Right padding that makes the last window full (HF ``_get_extra_padding_for_conv1d``)."""
    n_frames = -(-(length - kernel + padding_total) // stride)  # ceil((...)/stride) = frames - 1
    ideal_length = n_frames * stride + kernel - padding_total
    return ideal_length - length


def _pad1d(x: jax.Array, left: int, right: int, mode: str) -> jax.Array:
    """Pads the time axis of (B, T, C) like HF/audiocraft ``pad1d`` (zero-extends short inputs
    before a reflection)."""
    if left == 0 and right == 0:
        return x
    if mode != "reflect":
        return jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    length = x.shape[1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return x[:, : x.shape[1] - extra] if extra else x


class Conv1d(nnx.Module):
    """EnCodec's self-padding convolution (HF ``EncodecConv1d``) on (B, T, C) inputs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        causal: bool = False,
        pad_mode: str = "reflect",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.causal = causal
        self.pad_mode = pad_mode
        self.dtype = dtype
        self.kernel = nnx.Param(
            nnx.initializers.lecun_normal()(
                rngs.params(), (kernel_size, in_channels, out_channels), param_dtype
            ),
            out_sharding=(None, "conv_in", "conv_out"),
        )
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype), out_sharding=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        effective_kernel = (self.kernel_size - 1) * self.dilation + 1
        padding_total = effective_kernel - self.stride
        extra = _extra_padding(x.shape[1], effective_kernel, self.stride, padding_total)
        if self.causal:
            left, right = padding_total, extra
        else:
            right = padding_total // 2
            left, right = padding_total - right, right + extra
        dtype = self.dtype or x.dtype
        x = _pad1d(x.astype(dtype), left, right, self.pad_mode)
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(dtype),
            window_strides=(self.stride,),
            padding="VALID",
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(dtype)


class ResidualBlock(nnx.Module):
    """SEANet residual block: ELU, conv k=3 (dilated), ELU, conv k=1 (to dim), plus the skip."""

    def __init__(self, cfg: EncodecConfig, dim: int, dilation: int, **conv_kw: Any):
        hidden = dim // cfg.compress
        self.conv1 = Conv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, **conv_kw)
        self.conv2 = Conv1d(hidden, dim, 1, **conv_kw)
        self.shortcut = Conv1d(dim, dim, 1, **conv_kw) if cfg.use_conv_shortcut else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv2(jax.nn.elu(self.conv1(jax.nn.elu(x))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + y


class DownsamplingStage(nnx.Module):
    """``num_residual_layers`` residual blocks, ELU, then a conv with kernel 2r and stride r."""

    def __init__(self, cfg: EncodecConfig, dim: int, ratio: int, **conv_kw: Any):
        self.res_blocks = nnx.List(
            [
                ResidualBlock(cfg, dim, cfg.dilation_growth_rate**j, **conv_kw)
                for j in range(cfg.num_residual_layers)
            ]
        )
        self.down = Conv1d(dim, 2 * dim, 2 * ratio, stride=ratio, **conv_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.res_blocks:
            x = block(x)
        return self.down(jax.nn.elu(x))


class LSTMLayer(nnx.Module):
    """One PyTorch ``nn.LSTM`` layer; kernels (in, 4H) with the gates i, f, g, o fused, one bias
    (PyTorch's ``bias_ih + bias_hh``)."""

    def __init__(self, dim: int, *, dtype: jnp.dtype | None, param_dtype: jnp.dtype, rngs):
        self.input = Linear(
            dim, 4 * dim, axes=("feature", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.recurrent = Linear(
            dim,
            4 * dim,
            axes=("feature", None),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, T, H) -> (B, T, H), zero initial state."""
        gates_x = jnp.swapaxes(self.input(x), 0, 1)  # (T, B, 4H): one big matmul, not T small ones
        w_hh = self.recurrent.kernel[...].astype(gates_x.dtype)
        batch, hidden = x.shape[0], x.shape[-1]

        def step(carry, gx):
            h, c = carry
            gates = gx + jnp.matmul(h, w_hh)
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((batch, hidden), gates_x.dtype)
        _, hs = jax.lax.scan(step, (zeros, zeros), gates_x)
        return jnp.swapaxes(hs, 0, 1)


class EncodecEncoder(nnx.Module):
    """SEANet encoder + residual VQ of EnCodec (SPEC 1.1). See the module docstring.

    ``dtype`` is the compute dtype of the convolutions and the LSTM (None: the input's); the
    quantiser always computes in fp32. Parameters are stored in ``param_dtype``.
    """

    def __init__(
        self,
        cfg: EncodecConfig,
        *,
        dtype: jnp.dtype | None = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        conv_kw = dict(
            causal=cfg.use_causal_conv,
            pad_mode=cfg.pad_mode,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.conv_in = Conv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size, **conv_kw)
        dim = cfg.num_filters
        stages = []
        for ratio in reversed(cfg.upsampling_ratios):  # the encoder downsamples in reverse order
            stages.append(DownsamplingStage(cfg, dim, ratio, **conv_kw))
            dim *= 2
        self.stages = nnx.List(stages)
        self.lstm = nnx.List(
            [
                LSTMLayer(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_lstm_layers)
            ]
        )
        self.conv_out = Conv1d(dim, cfg.hidden_size, cfg.last_kernel_size, **conv_kw)
        self.codebooks = nnx.Param(
            jax.random.normal(
                rngs.params(), (cfg.num_codebooks, cfg.codebook_size, cfg.codebook_dim)
            ).astype(param_dtype),
            out_sharding=("codebook", None, None),
        )

    def _as_nwc(self, audio: jax.Array) -> jax.Array:
        if audio.ndim == 2:  # (B, samples): mono
            audio = audio[:, None, :]
        if audio.ndim != 3 or audio.shape[1] != self.cfg.audio_channels:
            raise ValueError(
                f"audio must be (batch, samples) or (batch, {self.cfg.audio_channels}, samples), "
                f"got {audio.shape}"
            )
        return jnp.swapaxes(audio, 1, 2)

    def embed(self, audio: jax.Array) -> jax.Array:
        """(B, samples) (or (B, channels, samples)) -> (B, ceil(samples / hop), hidden_size)."""
        x = self._as_nwc(audio)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        skip = x
        for layer in self.lstm:
            x = layer(x)
        x = x + skip
        return self.conv_out(jax.nn.elu(x))

    def quantize(self, embeddings: jax.Array) -> jax.Array:
        """(B, T, D) embeddings -> (B, num_codebooks, T) int32 codes (residual VQ, fp32)."""
        residual = embeddings.astype(jnp.float32)
        codes = []
        for k in range(self.cfg.num_codebooks):
            embed = self.codebooks[k].astype(jnp.float32)  # (size, D)
            # HF's formula and operation order, so near-ties resolve the same way
            dist = -(
                jnp.sum(jnp.square(residual), axis=-1, keepdims=True)
                - 2 * jnp.matmul(residual, embed.T)
                + jnp.sum(jnp.square(embed), axis=-1)
            )
            index = jnp.argmax(dist, axis=-1)
            residual = residual - jnp.take(embed, index, axis=0)
            codes.append(index.astype(jnp.int32))
        return jnp.stack(codes, axis=1)

    def encode(self, audio: jax.Array) -> jax.Array:
        """(B, samples) -> codes (B, num_codebooks, ceil(samples / hop)) int32."""
        return self.quantize(self.embed(audio))


@functools.partial(jax.jit, static_argnums=0)
def encode_fn(graphdef: nnx.GraphDef, state: nnx.State, audio: jax.Array) -> jax.Array:
    """Jitted :meth:`EncodecEncoder.encode` over ``nnx.split(model)``: ``encode_fn(*nnx.split(m),
    audio)``. Retraces only for a new audio shape."""
    return nnx.merge(graphdef, state).encode(audio)


@functools.partial(jax.jit, static_argnums=0)
def embed_fn(graphdef: nnx.GraphDef, state: nnx.State, audio: jax.Array) -> jax.Array:
    """Jitted :meth:`EncodecEncoder.embed` (pre-quantisation embeddings), as :func:`encode_fn`."""
    return nnx.merge(graphdef, state).embed(audio)


def config_section(cfg: EncodecConfig) -> dict[str, Any]:
    """The checkpoint's config (plain data) under :data:`CONFIG_SECTION`."""
    return {CONFIG_SECTION: {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_encodec(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype | None = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
) -> EncodecEncoder:
    """Reads a checkpoint written by ``python -m convert.encodec`` (config + parameters)."""
    from bossa_jax.checkpoint import load_module, read_section

    cfg = read_section(path, CONFIG_SECTION, EncodecConfig)
    return load_module(
        path,
        lambda: EncodecEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
    )
