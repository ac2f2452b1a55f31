"""Inverse problems with exact answers, for tests, benchmarks and examples."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from diffprior.diffusion.schedules import VP, Schedule
from diffprior.priors.gaussian_mixture import GaussianMixture
from diffprior.types import Array, PRNGKey

__all__ = ["LinearGaussianProblem", "mixture_problem", "gaussian_problem"]


class LinearGaussianProblem(NamedTuple):
    r""":math:`y = A x + \sigma_y \varepsilon` with a Gaussian-mixture prior on :math:`x`.

    ``posterior`` and ``log_evidence`` are exact; :meth:`model` is the NumPyro model, called as
    ``model(A, sigma_y, y=y)``.
    """

    prior: GaussianMixture
    A: Array
    sigma_y: Array
    y: Array
    x_true: Array

    @property
    def posterior(self) -> GaussianMixture:
        return self.prior.posterior(self.A, self.sigma_y, self.y)

    @property
    def log_evidence(self) -> Array:
        return self.prior.log_evidence(self.A, self.sigma_y, self.y)

    @property
    def model_args(self) -> tuple[Array, Array]:
        return (self.A, self.sigma_y)

    @property
    def model_kwargs(self) -> dict[str, Array]:
        return {"y": self.y}

    def model(self, A: Array, sigma_y: Array, y: Array | None = None) -> None:
        """``x ~ prior``, ``y ~ Normal(A x, sigma_y)``."""
        x = numpyro.sample("x", self.prior)
        numpyro.sample("y", dist.Normal(A @ x, sigma_y).to_event(1), obs=y)


def _operator(key: PRNGKey, dim: int, obs_dim: int) -> tuple[Array, Array]:
    """A from the SVD of a standard normal matrix with singular values sorted U(0, 1); and
    sigma_y = U(0, 1) times the largest of them."""
    key_m, key_s, key_noise = jax.random.split(key, 3)
    matrix = jax.random.normal(key_m, (obs_dim, dim))
    u, _, vt = jnp.linalg.svd(matrix, full_matrices=False)
    singular = jnp.sort(jax.random.uniform(key_s, (min(obs_dim, dim),)))[::-1]
    A = (u * singular) @ vt
    sigma_y = jax.random.uniform(key_noise) * singular[0]
    return A, sigma_y


def mixture_problem(
    key: PRNGKey, dim: int, obs_dim: int, schedule: Schedule | None = None
) -> LinearGaussianProblem:
    r"""The Gaussian-mixture problem of the MCGdiff paper (Cardoso et al., ICLR 2024).

    25 unit-variance components with means :math:`(-8i, -8j)` repeated to dimension ``dim``
    (``i, j`` in ``-2..2``), weights chi-square(1) normalised; :math:`A` from the SVD of a
    standard normal ``(obs_dim, dim)`` matrix with singular values replaced by sorted U(0, 1);
    :math:`\sigma_y` = U(0, 1) times the largest singular value; :math:`y` from a prior draw.
    The schedule defaults to DDPM's discrete linear betas (1e-4 to 0.02 over 1000 steps).

    Examples
    --------
    >>> import jax
    >>> from diffprior.problems import mixture_problem
    >>> problem = mixture_problem(jax.random.key(0), 8, 1)
    >>> problem.prior.means.shape, problem.A.shape, problem.y.shape
    ((25, 8), (1, 8), (1,))
    """
    if dim % 2:
        raise ValueError(f"dim must be even (the 2-D grid is repeated), got {dim}")
    key_w, key_a, key_x, key_e = jax.random.split(key, 4)
    offsets = jnp.arange(-2, 3, dtype=jnp.float32)
    grid = jnp.stack(jnp.meshgrid(offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 2)
    means = jnp.tile(-8.0 * grid, (1, dim // 2))
    weights = jax.random.chisquare(key_w, 1.0, (25,))
    schedule = VP.linear(discrete=True) if schedule is None else schedule
    prior = GaussianMixture(means, weights / jnp.sum(weights), schedule=schedule)
    A, sigma_y = _operator(key_a, dim, obs_dim)
    x_true = prior.sample(key_x)
    y = A @ x_true + sigma_y * jax.random.normal(key_e, (obs_dim,))
    return LinearGaussianProblem(prior, A, sigma_y, y, x_true)


def gaussian_problem(
    key: PRNGKey, dim: int, obs_dim: int, schedule: Schedule | None = None
) -> LinearGaussianProblem:
    """A standard normal prior (a one-component mixture) with the operator and noise of
    :func:`mixture_problem`."""
    key_a, key_x, key_e = jax.random.split(key, 3)
    schedule = VP.linear(discrete=True) if schedule is None else schedule
    prior = GaussianMixture(jnp.zeros((1, dim)), jnp.ones(1), schedule=schedule)
    A, sigma_y = _operator(key_a, dim, obs_dim)
    x_true = prior.sample(key_x)
    y = A @ x_true + sigma_y * jax.random.normal(key_e, (obs_dim,))
    return LinearGaussianProblem(prior, A, sigma_y, y, x_true)
