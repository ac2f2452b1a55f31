r"""Plain reverse diffusion (the seed's first algorithm): each particle follows the reverse
DDPM/DDIM step with the denoiser's :math:`\hat x_0`, ignoring the observation.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> algo = dp.kernels.unguided.as_top_level_api(gmm.denoiser, gmm.timesteps(10))
>>> state = algo.init(jax.random.normal(jax.random.key(0), (8, 2)))
>>> state, info = algo.step(jax.random.key(1), state)
>>> int(state.step)
1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.sampling import ancestral_step
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["UnguidedState", "UnguidedInfo", "init", "build_kernel", "as_top_level_api"]


class UnguidedState(NamedTuple):
    """particles ``(N, *event_shape)`` at ``timesteps[step]``."""

    particles: Array
    step: Array


class UnguidedInfo(NamedTuple):
    """x0_hat: the denoiser's estimate at the particles before the step."""

    x0_hat: Array


def init(particles: Array) -> UnguidedState:
    return UnguidedState(particles, jnp.zeros((), jnp.int32))


def build_kernel(
    denoiser: Denoiser, timesteps: Array, *, eta: ArrayLike = 1.0
) -> Callable[[PRNGKey, UnguidedState], tuple[UnguidedState, UnguidedInfo]]:
    step_fn = jax.vmap(ancestral_step, in_axes=(0, None, 0, None, None, None))

    def kernel(rng_key: PRNGKey, state: UnguidedState):
        t, s = timesteps[state.step], timesteps[state.step + 1]
        keys = jax.random.split(rng_key, state.particles.shape[0])
        x_s, x0_hat = step_fn(keys, denoiser, state.particles, t, s, eta)
        return UnguidedState(x_s, state.step + 1), UnguidedInfo(x0_hat)

    return kernel


def as_top_level_api(
    denoiser: Denoiser, timesteps: Array, *, eta: ArrayLike = 1.0
) -> SamplingAlgorithm:
    """Unguided reverse diffusion as a ``SamplingAlgorithm(init, step)``."""
    kernel = build_kernel(denoiser, timesteps, eta=eta)

    def init_fn(particles: Array, rng_key: PRNGKey | None = None) -> UnguidedState:
        return init(particles)

    return SamplingAlgorithm(init_fn, kernel)
