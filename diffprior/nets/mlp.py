"""An MLP denoising network for vectors."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from diffprior.nets.embeddings import sinusoidal_embedding
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["TimeMLP"]


class TimeMLP(eqx.Module):
    """``net(x, t)`` for ``x`` of shape ``(dim,)``: an :class:`equinox.nn.MLP` (SiLU) applied to
    the concatenation of ``x`` and the sinusoidal embedding of ``t``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from diffprior.nets import TimeMLP
    >>> net = TimeMLP(2, width=32, depth=2, key=jax.random.key(0))
    >>> net(jnp.ones(2), 0.3).shape
    (2,)
    """

    mlp: eqx.nn.MLP
    dim: int = eqx.field(static=True)
    embed_dim: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        width: int = 128,
        depth: int = 3,
        embed_dim: int = 32,
        key: PRNGKey,
    ):
        self.dim = int(dim)
        self.embed_dim = int(embed_dim)
        self.mlp = eqx.nn.MLP(
            self.dim + self.embed_dim,
            self.dim,
            width_size=width,
            depth=depth,
            activation=jax.nn.silu,
            key=key,
        )

    def __call__(self, x: ArrayLike, t: ArrayLike) -> Array:
        x = jnp.asarray(x, dtype=jnp.float32)
        if x.shape != (self.dim,):
            raise ValueError(f"TimeMLP: expected one x of shape ({self.dim},), got {x.shape}")
        return self.mlp(jnp.concatenate([x, sinusoidal_embedding(t, self.embed_dim)]))
