r"""An MLP autoencoder for small images: the first stage of a latent diffusion prior.

The encoder maps an image to a latent vector, the decoder maps it back into ``(-1, 1)`` (a
``tanh`` output, the range of the shipped data). Both work in the *standardised* latent
coordinates :math:`z = (h - m) / s`, with :math:`h` the encoder network's raw output and
:math:`m, s` the per-coordinate mean and standard deviation of the training latents
(``latent_mean``, ``latent_scale``, set once after training), so that a diffusion model trained
on :math:`z` sees data of unit variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["MLPAutoencoder"]


class MLPAutoencoder(eqx.Module):
    """An encoder and a decoder :class:`equinox.nn.MLP` (SiLU) between images of shape
    ``image_shape`` and standardised latents of shape ``(latent_dim,)``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from diffprior.nets import MLPAutoencoder
    >>> ae = MLPAutoencoder((8, 8), 12, width=32, depth=2, key=jax.random.key(0))
    >>> ae.encode(jnp.zeros((8, 8))).shape, ae.decode(jnp.zeros(12)).shape
    ((12,), (8, 8))
    """

    encoder: eqx.nn.MLP
    decoder: eqx.nn.MLP
    latent_mean: Array
    latent_scale: Array
    image_shape: tuple[int, ...] = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        *,
        width: int = 128,
        depth: int = 2,
        key: PRNGKey,
    ):
        self.image_shape = tuple(int(n) for n in image_shape)
        self.latent_dim = int(latent_dim)
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        size = math.prod(self.image_shape)
        enc_key, dec_key = jax.random.split(key)
        self.encoder = eqx.nn.MLP(
            size,
            self.latent_dim,
            width_size=width,
            depth=depth,
            activation=jax.nn.silu,
            key=enc_key,
        )
        self.decoder = eqx.nn.MLP(
            self.latent_dim,
            size,
            width_size=width,
            depth=depth,
            activation=jax.nn.silu,
            key=dec_key,
        )
        self.latent_mean = jnp.zeros(self.latent_dim, jnp.float32)
        self.latent_scale = jnp.ones(self.latent_dim, jnp.float32)

    def encode_raw(self, x: ArrayLike) -> Array:
        """The encoder network's output :math:`h` for one image (before standardisation)."""
        x = jnp.asarray(x, dtype=jnp.float32)
        if x.shape != self.image_shape:
            raise ValueError(
                f"encode: expected one image of shape {self.image_shape}, got {x.shape}"
            )
        return self.encoder(x.reshape(-1))

    def decode_raw(self, h: ArrayLike) -> Array:
        """The image of a raw latent :math:`h` (the decoder network, ``tanh``, reshaped)."""
        return jnp.tanh(self.decoder(jnp.asarray(h, dtype=jnp.float32))).reshape(self.image_shape)

    def encode(self, x: ArrayLike) -> Array:
        """The standardised latent :math:`z = (h(x) - m) / s` of one image."""
        return (self.encode_raw(x) - self.latent_mean) / self.latent_scale

    def decode(self, z: ArrayLike) -> Array:
        """The image of one standardised latent :math:`z`: the decoder at :math:`m + s z`."""
        z = jnp.asarray(z, dtype=jnp.float32)
        if z.shape != (self.latent_dim,):
            raise ValueError(
                f"decode: expected one latent of shape ({self.latent_dim},), got {z.shape}"
            )
        return self.decode_raw(self.latent_mean + self.latent_scale * z)

    def with_standardisation(self, mean: ArrayLike, scale: ArrayLike) -> MLPAutoencoder:
        """A copy whose latents are standardised by ``mean`` and ``scale`` (per coordinate)."""
        mean = jnp.asarray(mean, jnp.float32).reshape(self.latent_dim)
        scale = jnp.asarray(scale, jnp.float32).reshape(self.latent_dim)
        return eqx.tree_at(lambda ae: (ae.latent_mean, ae.latent_scale), self, (mean, scale))
