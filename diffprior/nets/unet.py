"""A small convolutional U-Net for single-channel images (the shipped digits network)."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from diffprior.nets.embeddings import sinusoidal_embedding
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["UNet"]


class ResBlock(eqx.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding as a per-channel scale and shift after
    the second norm (the "AdaGN" of Dhariwal & Nichol 2021) and a 1x1 skip when the width
    changes."""

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    time_proj: eqx.nn.Linear
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, groups: int, *, key: PRNGKey):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = eqx.nn.Conv2d(in_ch, out_ch, 3, padding=1, key=k1)
        self.time_proj = eqx.nn.Linear(time_dim, 2 * out_ch, key=k2)
        self.norm2 = eqx.nn.GroupNorm(min(groups, out_ch), out_ch)
        # the residual branch starts near zero, so every block starts near the identity
        conv2 = eqx.nn.Conv2d(out_ch, out_ch, 3, padding=1, key=k3)
        self.conv2 = eqx.tree_at(lambda c: c.weight, conv2, conv2.weight * 0.1)
        self.skip = eqx.nn.Conv2d(in_ch, out_ch, 1, key=k4) if in_ch != out_ch else None

    def __call__(self, x: Array, time_emb: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.time_proj(time_emb), 2)
        h = self.norm2(h) * (1.0 + scale[:, None, None]) + shift[:, None, None]
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

    conv_in: eqx.nn.Conv2d
    time_mlp: eqx.nn.MLP
    down_blocks: list[list[ResBlock]]
    downsamples: list[eqx.nn.Conv2d]
    mid_block: ResBlock
    upsamples: list[eqx.nn.Conv2d]
    up_blocks: list[list[ResBlock]]
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
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

        self.conv_in = eqx.nn.Conv2d(1, channels[0], 3, padding=1, key=next(keys))
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
                self.downsamples.append(
                    eqx.nn.Conv2d(ch, channels[level + 1], 3, 2, padding=1, key=next(keys))
                )
                width = channels[level + 1]
        self.mid_block = block(width, width)
        self.upsamples, self.up_blocks = [], []
        for level in reversed(range(len(channels) - 1)):
            ch = channels[level]
            self.upsamples.append(eqx.nn.Conv2d(width, ch, 3, padding=1, key=next(keys)))
            blocks = [block(2 * ch, ch)]
            blocks += [block(ch, ch) for _ in range(blocks_per_level - 1)]
            self.up_blocks.append(blocks)
            width = ch
        self.norm_out = eqx.nn.GroupNorm(min(groups, width), width)
        conv_out = eqx.nn.Conv2d(width, 1, 3, padding=1, key=next(keys))
        self.conv_out = eqx.tree_at(
            lambda c: (c.weight, c.bias), conv_out, replace_fn=jnp.zeros_like
        )

    def __call__(self, x: ArrayLike, t: ArrayLike) -> Array:
        x = jnp.asarray(x, dtype=jnp.float32)
        factor = 2 ** (len(self.channels) - 1)
        if x.ndim != 2 or x.shape[0] % factor or x.shape[1] % factor:
            raise ValueError(
                f"UNet: expected one image of shape (h, w) with h and w divisible by {factor}, "
                f"got {x.shape}"
            )
        time_emb = jax.nn.silu(self.time_mlp(sinusoidal_embedding(t, self.embed_dim)))
        h = self.conv_in(x[None])
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for blk in blocks:
                h = blk(h, time_emb)
            if level < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[level](h)
        h = self.mid_block(h, time_emb)
        for upsample, blocks in zip(self.upsamples, self.up_blocks, strict=True):
            h = upsample(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
            h = jnp.concatenate([h, skips.pop()], axis=0)
            for blk in blocks:
                h = blk(h, time_emb)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))[0]
