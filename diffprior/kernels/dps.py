r"""Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky & Ye, ICLR 2023, arXiv 2209.14687,
Algorithm 1).

Each particle takes the unguided reverse step from :math:`x_t` and then a gradient step on the
likelihood at the denoiser's estimate, differentiated through the network:

.. math::
    x_s = \mu(x_t, \hat x_0) + c\, z + \zeta_t \nabla_{x_t} \log p(y \mid \hat x_0(x_t)).

With ``normalize=True`` the step is the paper's for Gaussian noise,
:math:`-\zeta\, \nabla_{x_t} \lVert y - A(\hat x_0) \rVert^2 / \lVert y - A(\hat x_0)
\rVert`, the norm taken per particle (``residual_fn`` gives :math:`y - A(\hat x_0)`); it uses
the observation's mean only, so the noise model does not enter. The default steps along the
gradient of whatever likelihood the model has (Gaussian, Student-t, Poisson, ...).
DPS is approximate: particles are independent, with equal weights.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> loglik = lambda x: -0.5 * ((x[0] - 1.0) / 0.5) ** 2
>>> algo = dp.kernels.dps.as_top_level_api(gmm.denoiser, loglik, gmm.timesteps(10), scale=0.1)
>>> state = algo.init(jax.random.normal(jax.random.key(0), (8, 2)))
>>> state, info = algo.step(jax.random.key(1), state)
>>> state.particles.shape
(8, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import sample_transition
from diffprior.kernels.guidance import potential_and_grad
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["DPSState", "DPSInfo", "init", "build_kernel", "as_top_level_api"]


class DPSState(NamedTuple):
    """particles ``(N, *event_shape)`` at ``timesteps[step]``."""

    particles: Array
    step: Array


class DPSInfo(NamedTuple):
    r"""log_likelihood: :math:`\log p(y \mid \hat x_0)` per particle before the step;
    step_size: the guidance step :math:`\zeta_t` per particle."""

    log_likelihood: Array
    step_size: Array


def init(particles: Array) -> DPSState:
    return DPSState(particles, jnp.zeros((), jnp.int32))


def build_kernel(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    scale: ArrayLike = 1.0,
    normalize: bool = False,
    residual_fn: Callable[[Array], Array] | None = None,
    eta: ArrayLike = 1.0,
) -> Callable[[PRNGKey, DPSState], tuple[DPSState, DPSInfo]]:
    if normalize and residual_fn is None:
        raise ValueError("normalize=True needs residual_fn(x0) = y - A(x0)")

    def objective(x0_hat, t):
        if normalize:
            residual = residual_fn(x0_hat)
            return -jnp.sum(residual**2)
        return log_likelihood_fn(x0_hat)

    def one_particle(key, x_t, t, s):
        potential = potential_and_grad(denoiser, objective, x_t, t)
        transition = denoiser.transition(x_t, potential.x0_hat, t, s, eta)
        if normalize:
            norm = jnp.sqrt(-potential.log_potential)
            step_size = scale / jnp.maximum(norm, 1e-12)
        else:
            step_size = jnp.asarray(scale, dtype=jnp.float32)
        x_s = sample_transition(key, transition) + step_size * potential.grad
        x_s = jnp.where(jnp.isfinite(x_s), x_s, transition.mean)
        return x_s, log_likelihood_fn(potential.x0_hat), step_size

    def kernel(rng_key: PRNGKey, state: DPSState):
        t, s = timesteps[state.step], timesteps[state.step + 1]
        keys = jax.random.split(rng_key, state.particles.shape[0])
        x_s, log_likelihood, step_size = jax.vmap(one_particle, in_axes=(0, 0, None, None))(
            keys, state.particles, t, s
        )
        return DPSState(x_s, state.step + 1), DPSInfo(log_likelihood, step_size)

    return kernel


def as_top_level_api(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    scale: ArrayLike = 1.0,
    normalize: bool = False,
    residual_fn: Callable[[Array], Array] | None = None,
    eta: ArrayLike = 1.0,
) -> SamplingAlgorithm:
    """DPS as a ``SamplingAlgorithm(init, step)``; see the module docstring."""
    kernel = build_kernel(
        denoiser,
        log_likelihood_fn,
        timesteps,
        scale=scale,
        normalize=normalize,
        residual_fn=residual_fn,
        eta=eta,
    )

    def init_fn(particles: Array, rng_key: PRNGKey | None = None) -> DPSState:
        return init(particles)

    return SamplingAlgorithm(init_fn, kernel)
