"""Twisted Diffusion Sampler (Wu, Trippe, Naesseth, Blei & Cunningham, NeurIPS 2023,
arXiv 2306.17775, Algorithm 1).

Sequential Monte Carlo on the reverse diffusion path with twisting potentials
:math:`\\tilde p_t(y \\mid x_t) = p(y \\mid \\hat x_0(x_t))`. From :math:`x_t` each particle is
proposed by the guided transition (the reverse step with score
:math:`\\nabla \\log p_t + \\nabla \\log \\tilde p_t(y \\mid x_t)`, see
:func:`diffprior.diffusion.guided_x0`) and weighted by

.. math::
    w = \\frac{p(x_s \\mid x_t)\\, \\tilde p_s(y \\mid x_s)}{q(x_s \\mid x_t, y)\\,
    \\tilde p_t(y \\mid x_t)},

with :math:`\\tilde p_0(y \\mid x_0) = p(y \\mid x_0)` exactly at the last step; the first
weight is :math:`\\tilde p_{t_{max}}(y \\mid x_{t_{max}})`. The product of the normalising
constants estimates :math:`p(y)` under the discretised prior (see :mod:`diffprior.kernels.smc`).
Each step costs one network value-and-gradient per particle, cached in the state.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> loglik = lambda x: -0.5 * ((x[0] - 1.0) / 0.5) ** 2
>>> times = gmm.timesteps(20)
>>> tds = dp.kernels.tds.as_top_level_api(gmm.denoiser, loglik, times)
>>> state = tds.init(jax.random.normal(jax.random.key(0), (64, 2)))
>>> state, info = tds.step(jax.random.key(1), state)
>>> state.particles.shape, info.ess.shape
((64, 2), ())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import guided_x0
from diffprior.kernels import smc
from diffprior.kernels.guidance import TwistFn, potential_and_grad
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["TDSState", "TDSInfo", "init", "build_kernel", "as_top_level_api"]


class TDSState(NamedTuple):
    """What the next step needs.

    particles
        ``(N, *event_shape)`` particles :math:`x_t` at the current time.
    log_weights
        ``(N,)`` normalised log-weights.
    log_evidence
        Running estimate of :math:`\\log p(y)`.
    step
        Index into the time grid of the current time.
    log_potential, grad, x0_hat
        Cached :class:`diffprior.kernels.guidance.Potential` at the particles.
    """

    particles: Array
    log_weights: Array
    log_evidence: Array
    step: Array
    log_potential: Array
    grad: Array
    x0_hat: Array


class TDSInfo(NamedTuple):
    """Diagnostics of one step.

    ess
        ESS of the weights at the start of the step (the resampling decision).
    resampled
        Whether the particles were resampled at the start of the step.
    ancestors
        ``(N,)`` parent of each particle.
    log_weights
        ``(N,)`` normalised log-weights after the step.
    log_evidence_increment
        This step's contribution to :math:`\\log \\hat Z`.
    degenerate
        True when every particle got weight zero in this step.
    """

    ess: Array
    resampled: Array
    ancestors: Array
    log_weights: Array
    log_evidence_increment: Array
    degenerate: Array


def _potentials(denoiser: Denoiser, twist_fn: TwistFn, particles: Array, t: Array):
    return jax.vmap(potential_and_grad, in_axes=(None, None, 0, None))(
        denoiser, twist_fn, particles, t
    )


def init(particles: Array, denoiser: Denoiser, twist_fn: TwistFn, timesteps: Array) -> TDSState:
    """Weight particles drawn from the reference at ``timesteps[0]`` by the first twist."""
    t = timesteps[0]
    potential = _potentials(denoiser, twist_fn, particles, t)
    update = smc.initial_weights(potential.log_potential)
    return TDSState(
        particles,
        update.log_weights,
        update.log_evidence_increment,
        jnp.zeros((), jnp.int32),
        potential.log_potential,
        potential.grad,
        potential.x0_hat,
    )


def build_kernel(
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    *,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ess_threshold: float = 0.5,
    resample_fn: Callable = smc.RESAMPLING_SCHEMES["systematic"],
) -> Callable[[PRNGKey, TDSState], tuple[TDSState, TDSInfo]]:
    """Build the TDS step. ``scale`` multiplies the twist gradient in the proposal only, so
    any value keeps the sampler exact; ``eta`` is the DDIM stochasticity of the transition."""
    schedule = denoiser.schedule

    def kernel(rng_key: PRNGKey, state: TDSState) -> tuple[TDSState, TDSInfo]:
        resample_key, noise_key = jax.random.split(rng_key)
        t = timesteps[state.step]
        s = timesteps[state.step + 1]
        num_particles = state.particles.shape[0]

        decision = smc.maybe_resample(resample_key, state.log_weights, ess_threshold, resample_fn)
        x_t, log_potential_t, grad_t, x0_hat_t = smc.gather(
            (state.particles, state.log_potential, state.grad, state.x0_hat),
            decision.ancestors,
        )

        def propose(key, x, x0_hat, grad):
            prior_step = denoiser.transition(x, x0_hat, t, s, eta)
            x0_guided = guided_x0(schedule, x0_hat, scale * grad, t)
            guided_step = denoiser.transition(x, x0_guided, t, s, eta)
            stochastic = prior_step.variance > 0
            variance = jnp.where(stochastic, prior_step.variance, 1.0)
            # a deterministic step (sigma_s = 0 or eta = 0) cannot be guided: follow the prior
            shift = jnp.where(stochastic, guided_step.mean - prior_step.mean, 0.0)
            noise = jax.random.normal(key, x.shape)
            x_s = prior_step.mean + shift + jnp.sqrt(prior_step.variance) * noise
            # log N(x_s; m_prior, v) - log N(x_s; m_guided, v), with x_s = m_guided + sqrt(v) z,
            # written without the cancelling squares for float32 accuracy
            log_ratio = -(jnp.sum(shift**2) + 2.0 * jnp.sqrt(variance) * jnp.sum(shift * noise))
            log_ratio = jnp.where(stochastic, log_ratio / (2.0 * variance), 0.0)
            return x_s, log_ratio

        keys = jax.random.split(noise_key, num_particles)
        x_s, log_transition_ratio = jax.vmap(propose)(keys, x_t, x0_hat_t, grad_t)
        x_s = jnp.where(jnp.isfinite(x_s), x_s, 0.0)
        potential = _potentials(denoiser, twist_fn, x_s, s)
        log_increments = log_transition_ratio + potential.log_potential - log_potential_t
        update = smc.reweight(decision.log_weights, log_increments)

        new_state = TDSState(
            x_s,
            update.log_weights,
            state.log_evidence + update.log_evidence_increment,
            state.step + 1,
            potential.log_potential,
            potential.grad,
            potential.x0_hat,
        )
        info = TDSInfo(
            decision.ess,
            decision.resampled,
            decision.ancestors,
            update.log_weights,
            update.log_evidence_increment,
            update.degenerate,
        )
        return new_state, info

    return kernel


def as_top_level_api(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    twist_fn: TwistFn | None = None,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
) -> SamplingAlgorithm:
    """TDS as a ``SamplingAlgorithm(init, step)``.

    Parameters
    ----------
    denoiser
        The prior's denoiser.
    log_likelihood_fn
        ``log p(y | x)`` for one clean particle.
    timesteps
        Decreasing times ending at 0; ``len(timesteps) - 1`` steps.
    twist_fn
        ``twist_fn(x0_hat, t)``, the twisting log-potential; default
        ``log_likelihood_fn(x0_hat)``. It must equal the likelihood at ``t = 0``.
    eta, scale, ess_threshold, resampling
        See :func:`build_kernel`; ``resampling`` names a :mod:`blackjax.smc.resampling`
        scheme.
    """
    ess_threshold = smc.check_ess_threshold(ess_threshold)
    resample_fn = smc.resampling_fn(resampling)
    if twist_fn is None:

        def twist_fn(x0_hat, t):
            return log_likelihood_fn(x0_hat)

    kernel = build_kernel(
        denoiser,
        twist_fn,
        timesteps,
        eta=eta,
        scale=scale,
        ess_threshold=ess_threshold,
        resample_fn=resample_fn,
    )

    def init_fn(particles: Array, rng_key: PRNGKey | None = None) -> TDSState:
        return init(particles, denoiser, twist_fn, timesteps)

    return SamplingAlgorithm(init_fn, kernel)
