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

import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import guided_x0, sample_transition, tweedie_variance
from diffprior.kernels import base
from diffprior.kernels.guidance import TwistFn, potential_and_grad
from diffprior.linear_gaussian import WhitenedSVD
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "PiGDMState",
    "PiGDMInfo",
    "init",
    "build_kernel",
    "as_top_level_api",
    "svd_guidance",
    "from_linear_gaussian",
]

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


def svd_guidance(denoiser: Denoiser, svd: WhitenedSVD, data_variance: ArrayLike = 1.0) -> TwistFn:
    r"""The paper's guidance for a linear Gaussian observation, in its whitened SVD:
    :math:`\log N(\tilde y;\ \tilde A \hat x_0,\ r_t^2 \tilde A \tilde A^T + I)` with
    :math:`r_t^2 = \mathrm{Var}[x_0 \mid x_t]` for data of variance ``data_variance``,
    diagonal in the SVD: :math:`\sum_i \log N((U^T\tilde y)_i;\ s_i (V^T \hat x_0)_i,\
    r_t^2 s_i^2 + 1)` over the observed directions (the rest of :math:`\tilde y` is a constant
    in :math:`x` and left out). Costs one :math:`V^T` per particle (an FFT for a blur)."""
    schedule = denoiser.schedule
    data_variance = jnp.asarray(data_variance, jnp.float32)

    def guidance_fn(x0_hat, t):
        r2 = jnp.where(t > 0, tweedie_variance(schedule, t, data_variance), 0.0)
        predicted = svd.singular * svd.V_T(x0_hat)
        variance = r2 * svd.singular**2 + 1.0
        terms = (svd.coords_y - predicted) ** 2 / variance + jnp.log(2 * jnp.pi * variance)
        return -0.5 * jnp.sum(jnp.where(svd.observed, terms, 0.0))

    return guidance_fn


def from_linear_gaussian(
    denoiser: Denoiser,
    svd: WhitenedSVD,
    timesteps: Array,
    *,
    data_variance: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    eta: ArrayLike = 1.0,
) -> SamplingAlgorithm:
    """PiGDM for a linear Gaussian observation given as its whitened SVD
    (:meth:`diffprior.model.ObservationModel.linear_gaussian`, or
    :func:`diffprior.linear_gaussian.from_operator` on plain arrays): :func:`svd_guidance` in
    :func:`as_top_level_api`.

    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> from diffprior.linear_gaussian import from_operator
    >>> gmm = dp.GaussianMixture(jnp.zeros((1, 4)), jnp.ones(1))
    >>> A = dp.operators.Inpaint(jnp.array([True, True, False, False]))
    >>> svd = from_operator(A, scale=0.1, y=jnp.array([1.0, -1.0]))
    >>> algo = dp.kernels.pigdm.from_linear_gaussian(gmm.denoiser, svd, gmm.timesteps(20))
    >>> state = algo.init(jax.random.normal(jax.random.key(0), (64, 4)))
    >>> for key in jax.random.split(jax.random.key(1), 20):
    ...     state, info = algo.step(key, state)
    >>> bool(jnp.allclose(state.particles[:, :2].mean(0), jnp.array([0.99, -0.99]), atol=0.1))
    True
    """
    guidance_fn = svd_guidance(denoiser, svd, data_variance)
    return as_top_level_api(denoiser, guidance_fn, timesteps, scale=scale, eta=eta)
