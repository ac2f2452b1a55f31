"""A small convolutional U-Net for single-channel images (the shipped digits network)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from diffprior.nets.embeddings import sinusoidal_embedding
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["UNet"]


def _conv_xla(x: Array, weight: Array, *, stride: int) -> Array:
    # channels-last images (n, h, w, c_in), kernel (k, k, c_in, c_out), 'same' padding
    pad = weight.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x,
        weight,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


#: :func:`conv2d` as a JAX primitive: XLA's convolution, with derivative rules of its own.
conv2d_p = Primitive("diffprior_conv2d")
conv2d_p.def_impl(_conv_xla)
mlir.register_lowering(conv2d_p, mlir.lower_fun(_conv_xla, multiple_results=False))


@conv2d_p.def_abstract_eval
def _conv2d_abstract(x, weight, *, stride):
    # x's abstract value with the output's shape, so that what it carries besides (how it
    # varies over the devices of a shard_map, as the particles do) carries over
    n, h, w, _ = x.shape
    return x.update(shape=(n, -(-h // stride), -(-w // stride), weight.shape[-1]))


def _conv2d_transpose_x(cotangent, x, weight, *, stride):
    # the adjoint of a 'same' convolution in x: zeros between the rows and columns of the
    # cotangent (undoing the stride), then a stride-1 convolution with the kernel flipped in
    # space and its channels swapped, laid out (k, k, c_in, c_out) as XLA's fast path wants
    _, h, w, _ = x.aval.shape
    if stride > 1:
        ho, wo = cotangent.shape[1:3]
        cotangent = jax.lax.pad(
            cotangent,
            jnp.zeros((), cotangent.dtype),
            (
                (0, 0, 0),
                (0, h - 1 - (ho - 1) * stride, stride - 1),
                (0, w - 1 - (wo - 1) * stride, stride - 1),
                (0, 0, 0),
            ),
        )
    flipped = jnp.flip(weight, (0, 1)).transpose(0, 1, 3, 2)
    return conv2d_p.bind(cotangent, flipped, stride=1)


def _conv2d_transpose_weight(cotangent, x, weight, *, stride):
    zero = jnp.zeros(weight.aval.shape, cotangent.dtype)
    _, pullback = jax.vjp(lambda w: _conv_xla(x, w, stride=stride), zero)
    return pullback(cotangent)[0]


ad.defbilinear(conv2d_p, _conv2d_transpose_x, _conv2d_transpose_weight)


def _conv2d_batch(args, dims, *, stride):
    x, weight = args
    x_dim, weight_dim = dims
    if weight_dim is None:  # images batched (particles): fold the batch into n
        x = jnp.moveaxis(x, x_dim, 0)
        out = conv2d_p.bind(x.reshape((-1, *x.shape[2:])), weight, stride=stride)
        return out.reshape((*x.shape[:2], *out.shape[1:])), 0
    # kernels batched too (rare: e.g. an ensemble of networks): XLA's own batched convolution
    x_axis = None if x_dim is None else 0
    x = x if x_dim is None else jnp.moveaxis(x, x_dim, 0)
    weight = jnp.moveaxis(weight, weight_dim, 0)
    conv = functools.partial(_conv_xla, stride=stride)
    return jax.vmap(conv, (x_axis, 0))(x, weight), 0


batching.primitive_batchers[conv2d_p] = _conv2d_batch


def conv2d(x: Array, weight: Array, stride: int = 1) -> Array:
    """``'same'``-padded 2-d convolution of one channels-last image ``(h, w, c_in)`` with a
    ``(k, k, c_in, c_out)`` kernel (odd ``k``), keeping every ``stride``-th output.

    Values are XLA's convolution. Derivatives come from rules of our own (:data:`conv2d_p`):
    the adjoint in ``x`` is written as a stride-1 convolution with the kernel flipped and
    transposed into ``(k, k, c_in, c_out)`` order, where JAX's rule for convolutions gives one
    with its kernel read as ``(k, k, c_out, c_in)``. Why: inside loops (``lax.scan`` over
    diffusion steps, as every sampler runs) XLA's CPU backend computes a convolution with that
    kernel order as a plain loop, five to ten times slower than its fast path, and guided
    samplers differentiate the denoiser with respect to ``x`` at every step. Forward-mode
    derivatives (``jax.jvp``, ``jax.jacfwd``) are convolutions in the fast order already.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from diffprior.nets.unet import conv2d
    >>> x, weight = jnp.ones((4, 4, 2)), jnp.ones((3, 3, 2, 5))
    >>> conv2d(x, weight).shape, conv2d(x, weight, 2).shape
    ((4, 4, 5), (2, 2, 5))
    >>> float(jax.grad(lambda x: conv2d(x, weight).sum())(x)[1, 1, 0])
    45.0
    """
    return conv2d_p.bind(x[None], weight, stride=stride)[0]


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
