"""A small convolutional U-Net for single-channel images (the shipped digits network)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from diffprior.nets.embeddings import sinusoidal_embedding
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["UNet"]


def _conv_lax(x: Array, weight: Array, stride: int) -> Array:
    pad = weight.shape[0] // 2
    out = jax.lax.conv_general_dilated(
        x[None],
        weight,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return out[0]


def _conv_im2col(x: Array, weight: Array, stride: int) -> Array:
    # the same convolution as one matrix product with the k*k shifted copies of x
    k = weight.shape[0]
    pad = k // 2
    h, w, c = x.shape
    padded = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    patches = jnp.concatenate(
        [padded[i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=-1
    )
    out = patches @ weight.reshape(k * k * c, -1)
    return out[::stride, ::stride]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d(x: Array, weight: Array, stride: int = 1) -> Array:
    """``'same'``-padded 2-d convolution of one channels-last image ``(h, w, c_in)`` with a
    ``(k, k, c_in, c_out)`` kernel (odd ``k``), keeping every ``stride``-th output.

    Values (and derivatives with respect to the kernel, used by training) come from XLA's
    convolution; derivatives with respect to ``x`` from the equal im2col matrix product. Why:
    inside loops (``lax.scan`` over diffusion steps, as every sampler runs) XLA's CPU backend
    computes the transposed convolution that reverse-mode autodiff emits for the ``x``
    gradient five to ten times slower than outside (the same holds for channels-first
    convolutions, hence channels-last throughout), while matrix products and channels-last
    convolutions run at full speed in both places. Guided samplers differentiate the denoiser
    with respect to ``x`` at every step.
    """
    return _conv_lax(x, weight, stride)


def _conv2d_jvp(stride, primals, tangents):
    x, weight = primals
    dx, dweight = tangents
    out = _conv_lax(x, weight, stride)
    d_out = jnp.zeros_like(out)
    if not isinstance(dx, SymbolicZero):
        d_out = d_out + _conv_im2col(dx, weight, stride)
    if not isinstance(dweight, SymbolicZero):
        d_out = d_out + _conv_lax(x, dweight, stride)
    return out, d_out


conv2d.defjvp(_conv2d_jvp, symbolic_zeros=True)


class Conv(eqx.Module):
    """A 2-d convolution layer on one channels-last image ``(h, w, c_in) -> (h', w', c_out)``
    (:func:`conv2d`), initialised like PyTorch's ``Conv2d`` times ``scale``."""

    weight: Array  # (k, k, c_in, c_out)
    bias: Array  # (c_out,)
    stride: int = eqx.field(static=True)

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        *,
        scale: float = 1.0,
        key: PRNGKey,
    ):
        bound = scale / math.sqrt(in_ch * kernel * kernel)
        shape = (kernel, kernel, in_ch, out_ch)
        # one flat draw, then reshaped: JAX compiles 4-d random draws an order of magnitude
        # more slowly than flat ones, and a network has many of them
        values = jax.random.uniform(key, (math.prod(shape) + out_ch,), minval=-bound, maxval=bound)
        self.weight = values[:-out_ch].reshape(shape)
        self.bias = values[-out_ch:]
        self.stride = stride

    def __call__(self, x: Array) -> Array:
        return conv2d(x, self.weight, self.stride) + self.bias


class GroupNorm(eqx.Module):
    """Group normalisation (Wu & He 2018) of one channels-last image ``(h, w, c)``."""

    scale: Array
    offset: Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, groups: int, channels: int):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        self.groups = groups
        self.scale = jnp.ones(channels)
        self.offset = jnp.zeros(channels)

    def __call__(self, x: Array) -> Array:
        h, w, c = x.shape
        grouped = x.reshape(h, w, self.groups, c // self.groups)
        mean = grouped.mean(axis=(0, 1, 3), keepdims=True)
        var = grouped.var(axis=(0, 1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(h, w, c)
        return normed * self.scale + self.offset


class ResBlock(eqx.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding as a per-channel scale and shift after
    the second norm (the "AdaGN" of Dhariwal & Nichol 2021) and a 1x1 skip when the width
    changes."""

    norm1: GroupNorm
    conv1: Conv
    time_proj: eqx.nn.Linear
    norm2: GroupNorm
    conv2: Conv
    skip: Conv | None

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, groups: int, *, key: PRNGKey):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = Conv(in_ch, out_ch, key=k1)
        self.time_proj = eqx.nn.Linear(time_dim, 2 * out_ch, key=k2)
        self.norm2 = GroupNorm(min(groups, out_ch), out_ch)
        # the residual branch starts near zero, so every block starts near the identity
        self.conv2 = Conv(out_ch, out_ch, scale=0.1, key=k3)
        self.skip = Conv(in_ch, out_ch, 1, key=k4) if in_ch != out_ch else None

    def __call__(self, x: Array, time_emb: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.time_proj(time_emb), 2)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(jax.nn.silu(h))
        return h + (x if self.skip is None else self.skip(x))


class UNet(eqx.Module):
    r"""An eps-network for ``(h, w)`` single-channel images, called as ``net(x, t)``.

    ``channels[i]`` is the width at resolution ``(h, w) / 2^i``: each level has
    ``blocks_per_level`` residual blocks (:class:`ResBlock`), a stride-2 convolution goes down
    between levels, the bottom level has one more block, and the way up is nearest-neighbour
    upsampling plus a convolution, concatenation with the skip of the same level and
    ``blocks_per_level`` blocks (Ronneberger et al. 2015; Ho et al. 2020). The time enters every
    block through :func:`~diffprior.nets.sinusoidal_embedding` and a two-layer MLP. The output
    convolution starts at zero, so the untrained network predicts :math:`\hat\varepsilon = 0`.

    ``h`` and ``w`` must be divisible by ``2^(len(channels) - 1)``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from diffprior.nets import UNet
    >>> net = UNet(channels=(8, 16), key=jax.random.key(0))
    >>> net(jnp.zeros((8, 8)), 0.5).shape
    (8, 8)
    """

    conv_in: Conv
    time_mlp: eqx.nn.MLP
    down_blocks: list[list[ResBlock]]
    downsamples: list[Conv]
    mid_block: ResBlock
    upsamples: list[Conv]
    up_blocks: list[list[ResBlock]]
    norm_out: GroupNorm
    conv_out: Conv
    channels: tuple[int, ...] = eqx.field(static=True)
    embed_dim: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        channels: Sequence[int] = (32, 64),
        blocks_per_level: int = 1,
        embed_dim: int = 32,
        time_dim: int = 128,
        groups: int = 8,
        key: PRNGKey,
    ):
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty tuple of widths, got {channels}")
        if blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}")
        self.channels = channels
        self.embed_dim = int(embed_dim)
        keys = iter(jax.random.split(key, 8 + 4 * len(channels) * (blocks_per_level + 1)))

        def block(in_ch, out_ch):
            return ResBlock(in_ch, out_ch, time_dim, groups, key=next(keys))

        self.conv_in = Conv(1, channels[0], key=next(keys))
        self.time_mlp = eqx.nn.MLP(
            self.embed_dim, time_dim, time_dim, 1, activation=jax.nn.silu, key=next(keys)
        )
        self.down_blocks, self.downsamples = [], []
        width = channels[0]
        for level, ch in enumerate(channels):
            blocks = []
            for _ in range(blocks_per_level):
                blocks.append(block(width, ch))
                width = ch
            self.down_blocks.append(blocks)
            if level < len(channels) - 1:
                self.downsamples.append(Conv(ch, channels[level + 1], stride=2, key=next(keys)))
                width = channels[level + 1]
        self.mid_block = block(width, width)
        self.upsamples, self.up_blocks = [], []
        for level in reversed(range(len(channels) - 1)):
            ch = channels[level]
            self.upsamples.append(Conv(width, ch, key=next(keys)))
            blocks = [block(2 * ch, ch)]
            blocks += [block(ch, ch) for _ in range(blocks_per_level - 1)]
            self.up_blocks.append(blocks)
            width = ch
        self.norm_out = GroupNorm(min(groups, width), width)
        self.conv_out = Conv(width, 1, scale=0.0, key=next(keys))

    def __call__(self, x: ArrayLike, t: ArrayLike) -> Array:
        x = jnp.asarray(x, dtype=jnp.float32)
        factor = 2 ** (len(self.channels) - 1)
        if x.ndim != 2 or x.shape[0] % factor or x.shape[1] % factor:
            raise ValueError(
                f"UNet: expected one image of shape (h, w) with h and w divisible by {factor}, "
                f"got {x.shape}"
            )
        time_emb = jax.nn.silu(self.time_mlp(sinusoidal_embedding(t, self.embed_dim)))
        h = self.conv_in(x[..., None])
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for blk in blocks:
                h = blk(h, time_emb)
            if level < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[level](h)
        h = self.mid_block(h, time_emb)
        for upsample, blocks in zip(self.upsamples, self.up_blocks, strict=True):
            h = upsample(jnp.repeat(jnp.repeat(h, 2, axis=0), 2, axis=1))
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            for blk in blocks:
                h = blk(h, time_emb)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))[..., 0]
