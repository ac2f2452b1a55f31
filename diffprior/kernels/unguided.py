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

from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.sampling import ancestral_step
from diffprior.kernels import base
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["UnguidedState", "UnguidedInfo", "init", "build_kernel", "as_top_level_api"]

#: The shared :class:`diffprior.kernels.base.ParticleState`: particles ``(N, *event_shape)``
#: at ``timesteps[step]``.
UnguidedState = base.ParticleState


class UnguidedInfo(NamedTuple):
    """x0_hat: the denoiser's estimate at the particles before the step; num_nonfinite: the
    particles whose step was not finite (kept in place, :mod:`diffprior.kernels.base`)."""

    x0_hat: Array
    num_nonfinite: Array


init = base.init


def build_kernel(
    denoiser: Denoiser, timesteps: Array, *, eta: ArrayLike = 1.0
) -> Callable[[PRNGKey, UnguidedState], tuple[UnguidedState, UnguidedInfo]]:
    """Build the unguided step (options as in :func:`as_top_level_api`)."""

    def particle_step(key, x_t, times):
        return ancestral_step(key, denoiser, x_t, times.t, times.s, eta)

    def make_info(x0_hat, times, num_nonfinite):
        return UnguidedInfo(x0_hat, num_nonfinite)

    return base.from_particle_step(particle_step, timesteps, make_info).step


def as_top_level_api(
    denoiser: Denoiser, timesteps: Array, *, eta: ArrayLike = 1.0
) -> SamplingAlgorithm:
    """Unguided reverse diffusion as a ``SamplingAlgorithm(init, step)``; ``eta`` is the DDIM
    stochasticity (1: ancestral DDPM, 0: deterministic DDIM)."""
    return SamplingAlgorithm(init, build_kernel(denoiser, timesteps, eta=eta))
