r"""Pseudoinverse-guided diffusion (Song, Vahdat, Mardani & Kautz, ICLR 2023,
openreview 9_gsMA8MRKQ), noisy version.

With :math:`p(x_0 \mid x_t) \approx N(\hat x_0, r_t^2 I)` the likelihood of a linear Gaussian
observation becomes :math:`p(y \mid x_t) \approx N(y; A \hat x_0, r_t^2 A A^T + \sigma_y^2 I)`,
whose gradient with respect to :math:`x_t` is a vector-Jacobian product through the network,

.. math::
    g = \Big(\frac{\partial \hat x_0}{\partial x_t}\Big)^T A^T (r_t^2 A A^T + \sigma_y^2
    I)^{-1} (y - A \hat x_0),

computed in the SVD of :math:`A` (the paper's eq. 7-8). The guidance is added to the score
(Bayes' rule) and the reverse step is taken from the guided :math:`\hat x_0`
(:func:`diffprior.diffusion.guided_x0`); ``scale`` multiplies it. Approximate: particles are
independent, with equal weights.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> guide = lambda x0, t: -0.5 * (x0[0] - 1.0) ** 2 / (0.25 + dp.diffusion.tweedie_variance(
...     gmm.schedule, t, 1.0))
>>> algo = dp.kernels.pigdm.as_top_level_api(gmm.denoiser, guide, gmm.timesteps(10))
>>> state = algo.init(jax.random.normal(jax.random.key(0), (8, 2)))
>>> state, info = algo.step(jax.random.key(1), state)
>>> state.particles.shape
(8, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import guided_x0, sample_transition
from diffprior.kernels import base
from diffprior.kernels.guidance import TwistFn, potential_and_grad
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["PiGDMState", "PiGDMInfo", "init", "build_kernel", "as_top_level_api"]

#: The shared :class:`diffprior.kernels.base.ParticleState`: particles ``(N, *event_shape)``
#: at ``timesteps[step]``.
PiGDMState = base.ParticleState


class PiGDMInfo(NamedTuple):
    r"""log_guidance: the pseudo-inverse log-likelihood :math:`\log \tilde p(y \mid x_t)` per
    particle before the step; num_nonfinite: the particles whose step was not finite (kept in
    place, :mod:`diffprior.kernels.base`)."""

    log_guidance: Array
    num_nonfinite: Array


init = base.init


def build_kernel(
    denoiser: Denoiser,
    guidance_fn: TwistFn,
    timesteps: Array,
    *,
    scale: ArrayLike = 1.0,
    eta: ArrayLike = 1.0,
) -> Callable[[PRNGKey, PiGDMState], tuple[PiGDMState, PiGDMInfo]]:
    r"""``guidance_fn(x0_hat, t)`` is :math:`\log N(y; A \hat x_0, r_t^2 A A^T + \sigma_y^2 I)`
    (or any differentiable stand-in); its gradient through the network guides each step."""
    schedule = denoiser.schedule

    def particle_step(key, x_t, times):
        t, s = times.t, times.s
        potential = potential_and_grad(denoiser, guidance_fn, x_t, t)
        x0_guided = guided_x0(schedule, potential.x0_hat, scale * potential.grad, t)
        x_s = sample_transition(key, denoiser.transition(x_t, x0_guided, t, s, eta))
        return x_s, potential.log_potential

    def make_info(log_guidance, times, num_nonfinite):
        return PiGDMInfo(log_guidance, num_nonfinite)

    return base.from_particle_step(particle_step, timesteps, make_info).step


def as_top_level_api(
    denoiser: Denoiser,
    guidance_fn: TwistFn,
    timesteps: Array,
    *,
    scale: ArrayLike = 1.0,
    eta: ArrayLike = 1.0,
) -> SamplingAlgorithm:
    """PiGDM as a ``SamplingAlgorithm(init, step)``; see the module docstring. ``scale``
    multiplies the guidance (1 is Bayes' rule); ``eta`` is the DDIM stochasticity."""
    return SamplingAlgorithm(
        init, build_kernel(denoiser, guidance_fn, timesteps, scale=scale, eta=eta)
    )
