"""The sinusoidal time embedding shared by every network."""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffprior.types import Array, ArrayLike

__all__ = ["sinusoidal_embedding"]


def sinusoidal_embedding(t: ArrayLike, dim: int, max_period: float = 10_000.0) -> Array:
    r"""Transformer-style embedding of a scalar time ``t`` in ``[0, 1]``, shape ``(dim,)``.

    With :math:`\tau = 1000 t` (DDPM's integer steps) and :math:`f_i = P^{-i / (dim/2)}`,
    the embedding is :math:`[\sin(\tau f_i), \cos(\tau f_i)]_{i < dim/2}` (Vaswani et al.
    2017; Ho et al. 2020): periods from :math:`2\pi` to :math:`2\pi P` steps, so both the
    fine structure near ``t = 0`` and the coarse position in ``[0, 1]`` are visible.

    Examples
    --------
    >>> from diffprior.nets import sinusoidal_embedding
    >>> sinusoidal_embedding(0.5, 8).shape
    (8,)
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * jnp.asarray(t, dtype=jnp.float32) * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])
