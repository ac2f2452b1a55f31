r"""Feynman-Kac steering (Singhal, Horvitz, Teehan, Ren, Yu, Cho & Ranganath, 2025,
arXiv 2501.06848).

Particles follow a proposal (the prior's reverse step, or the guided step of TDS) and are
reweighted by potentials built from a reward :math:`r_t = r(\hat x_0(x_t))` scaled by
:math:`\lambda`, so that the final particles target
:math:`p(x_0) \exp(\lambda\, r(x_0)) / Z`. With the reward
:math:`r = \log p(y \mid \cdot)` and :math:`\lambda = 1` that is the posterior and
:math:`Z = p(y)`. Potentials (paper, section 3):

- ``"difference"``: :math:`G_t = \exp(\lambda (r_t - r_{t+1}))`, which telescopes; with the
  guided proposal this is exactly TDS (:mod:`diffprior.kernels.tds` is built on this module);
- ``"max"``: :math:`G_t = \exp(\lambda \max_{u \ge t} r_u)`;
- ``"sum"``: :math:`G_t = \exp(\lambda \sum_{u \ge t} r_u)`.

Whatever the potential, the last step multiplies by
:math:`\exp(\lambda r_0) / \prod_{t > 0} G_t` along each particle's ancestry, so the product
of potentials is always :math:`\exp(\lambda r(x_0))` and the sampler stays consistent, with an
unbiased estimate of :math:`Z`. A guided proposal adds the transition ratio
:math:`p(x_s \mid x_t) / q(x_s \mid x_t)` to each weight. Resampling happens at steps that
are multiples of ``resample_every`` when the ESS is below ``ess_threshold`` times the number of
particles.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> reward = lambda x0, t: -0.5 * ((x0[0] - 1.0) / 0.5) ** 2
>>> fk = dp.kernels.fk.as_top_level_api(gmm.denoiser, reward, gmm.timesteps(10), potential="max")
>>> state = fk.init(jax.random.normal(jax.random.key(0), (32, 2)))
>>> state, info = fk.step(jax.random.key(1), state)
>>> state.particles.shape
(32, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import guided_x0, transition_x0_coefficient
from diffprior.kernels import smc
from diffprior.kernels.guidance import (
    TwistFn,
    guided_log_ratio,
    potential_and_grad,
    potential_value,
)
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "FKState",
    "FKInfo",
    "POTENTIALS",
    "PROPOSALS",
    "init",
    "build_kernel",
    "as_top_level_api",
]

POTENTIALS = ("difference", "max", "sum")
PROPOSALS = ("prior", "guided")


class FKState(NamedTuple):
    r"""What the next step needs.

    particles
        ``(N, *event_shape)`` particles :math:`x_t`.
    log_weights
        ``(N,)`` normalised log-weights.
    log_evidence
        Running :math:`\log \hat Z`.
    step
        Index of the current time in the grid.
    reward
        ``(N,)`` reward :math:`r_t` at the particles (before :math:`\lambda`).
    grad
        ``(N, *event_shape)`` :math:`\nabla_{x_t} r_t` (zero for the prior proposal).
    x0_hat
        ``(N, *event_shape)`` the denoiser's estimate at the particles.
    log_potential_product
        ``(N,)`` :math:`\sum \log G` along each particle's ancestry so far.
    running_reward
        ``(N,)`` the running max or sum of rewards (``"max"`` / ``"sum"`` potentials).
    """

    particles: Array
    log_weights: Array
    log_evidence: Array
    step: Array
    reward: Array
    grad: Array
    x0_hat: Array
    log_potential_product: Array
    running_reward: Array


#: Per-step diagnostics: the shared :class:`diffprior.kernels.smc.SMCInfo` (ESS, resampling,
#: ancestors, log-weights, the log-evidence increment, degeneracy and non-finite proposals).
FKInfo = smc.SMCInfo


def _evaluate(denoiser, reward_fn, particles, t, with_grad):
    fn = potential_and_grad if with_grad else potential_value
    return jax.vmap(fn, in_axes=(None, None, 0, None))(denoiser, reward_fn, particles, t)


def init(
    particles: Array,
    denoiser: Denoiser,
    reward_fn: TwistFn,
    timesteps: Array,
    *,
    lam: ArrayLike = 1.0,
    proposal: str = "guided",
    axis_name: str | None = None,
) -> FKState:
    r"""Weight reference draws at ``timesteps[0]`` by :math:`G = \exp(\lambda r)`
    (``axis_name``: see :func:`build_kernel`)."""
    potential = _evaluate(denoiser, reward_fn, particles, timesteps[0], proposal == "guided")
    log_potential = lam * potential.log_potential
    update = smc.initial_weights(log_potential, axis_name)
    return FKState(
        particles,
        update.log_weights,
        update.log_evidence_increment,
        jnp.zeros((), jnp.int32),
        potential.log_potential,
        potential.grad,
        potential.x0_hat,
        log_potential,
        potential.log_potential,
    )


def build_kernel(
    denoiser: Denoiser,
    reward_fn: TwistFn,
    timesteps: Array,
    *,
    potential: str = "difference",
    proposal: str = "guided",
    lam: ArrayLike = 1.0,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ess_threshold: float = 0.5,
    resample_every: int = 1,
    resample_fn: Callable = smc.RESAMPLING_SCHEMES["systematic"],
) -> Callable[[PRNGKey, FKState], tuple[FKState, FKInfo]]:
    """Build the FK step (options as in :func:`as_top_level_api`).

    The step is ``kernel(rng_key, state, *, axis_name=None)``. With ``axis_name``, the name of
    a mapped axis (``jax.shard_map`` over devices), ``state`` holds one block of the particles
    and every block gets the same ``rng_key``: the weights, the ESS, the log-evidence and the
    resampling are over all particles, and each particle draws the noise it would draw unsplit
    (:mod:`diffprior.kernels.smc`).
    """
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if not isinstance(resample_every, int) or resample_every < 1:
        raise ValueError(f"resample_every must be a positive integer, got {resample_every!r}")
    schedule = denoiser.schedule
    guided = proposal == "guided"
    last_step = timesteps.shape[0] - 2

    def propose(noise, x, x0_hat, grad, t, s, shift_per_grad):
        prior_step = denoiser.transition(x, x0_hat, t, s, eta)
        if not guided:
            return prior_step.mean + jnp.sqrt(prior_step.variance) * noise, jnp.zeros(())
        stochastic = prior_step.variance > 0
        variance = jnp.where(stochastic, prior_step.variance, 1.0)
        # a deterministic step (zero variance) cannot be guided: follow the prior
        shift = jnp.where(stochastic, shift_per_grad * grad, 0.0)
        x_s = prior_step.mean + shift + jnp.sqrt(prior_step.variance) * noise
        return x_s, jnp.where(stochastic, guided_log_ratio(shift, noise, variance), 0.0)

    def kernel(
        rng_key: PRNGKey, state: FKState, *, axis_name: str | None = None
    ) -> tuple[FKState, FKInfo]:
        t, s = timesteps[state.step], timesteps[state.step + 1]
        is_last = state.step == last_step

        def propose_fn(key, x_t, carried):
            _, grad_t, x0_hat_t, _, _ = carried
            # one batched draw for the step, from per-particle keys: the same noise however
            # the particles are split
            noise = smc.particle_normals(key, x_t.shape, axis_name, x_t.dtype)
            # kept apart: fused into each of its uses (the step, the weight's ratio) XLA would
            # recompute the normal transform in both (12-18% of the step on CPU at d = 800)
            noise = jax.lax.optimization_barrier(noise)
            # the step's mean is affine in x0_hat, so the guided step is the prior step
            # shifted by the mean's coefficient of x0_hat times the guided change of x0_hat
            # (diffprior.diffusion.guided_x0), one scalar per step
            x0_coef = transition_x0_coefficient(schedule, t, s, eta)
            shift_per_grad = x0_coef * guided_x0(schedule, 0.0, scale * lam, t)
            return jax.vmap(propose, in_axes=(0, 0, 0, 0, None, None, None))(
                noise, x_t, x0_hat_t, grad_t, t, s, shift_per_grad
            )

        def weight_fn(x_t, carried, x_s, log_transition_ratio):
            reward_t, _, _, log_product, running = carried
            evaluated = _evaluate(denoiser, reward_fn, x_s, s, guided)
            reward_s = evaluated.log_potential
            if potential == "difference":
                running_s = reward_s
                log_g = lam * (reward_s - reward_t)
            elif potential == "max":
                running_s = jnp.maximum(running, reward_s)
                log_g = lam * running_s
            else:
                running_s = running + reward_s
                log_g = lam * running_s
            # the last potential completes the product to exp(lam * r(x_0))
            log_g = jnp.where(is_last, lam * reward_s - log_product, log_g)
            # -inf - (-inf) would be NaN: a particle with a non-finite reward has weight zero
            log_g = jnp.where(jnp.isfinite(reward_s), log_g, -jnp.inf)
            carried_s = (
                reward_s,
                evaluated.grad,
                evaluated.x0_hat,
                log_product + log_g,
                running_s,
            )
            return log_transition_ratio + log_g, carried_s

        # resampling only at multiples of the interval: otherwise keep every particle
        allowed = state.step % resample_every == 0 if resample_every > 1 else None
        result, info = smc.step(
            rng_key,
            state.particles,
            state.log_weights,
            state.log_evidence,
            propose_fn,
            weight_fn,
            carried=(
                state.reward,
                state.grad,
                state.x0_hat,
                state.log_potential_product,
                state.running_reward,
            ),
            ess_threshold=ess_threshold,
            resample_fn=resample_fn,
            resample_allowed=allowed,
            axis_name=axis_name,
        )
        reward, grad, x0_hat, log_product, running = result.carried
        new_state = FKState(
            result.particles,
            result.log_weights,
            result.log_evidence,
            state.step + 1,
            reward,
            grad,
            x0_hat,
            log_product,
            running,
        )
        return new_state, info

    return kernel


def as_top_level_api(
    denoiser: Denoiser,
    reward_fn: TwistFn,
    timesteps: Array,
    *,
    potential: str = "difference",
    proposal: str = "guided",
    lam: ArrayLike = 1.0,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ess_threshold: float = 0.5,
    resample_every: int = 1,
    resampling: str = "systematic",
) -> SamplingAlgorithm:
    r"""FK steering as a ``SamplingAlgorithm(init, step)``.

    ``init`` and ``step`` take an ``axis_name`` keyword: the mapped axis over which the
    particles are split, if they are (see :func:`build_kernel`).

    Parameters
    ----------
    denoiser
        The prior's denoiser.
    reward_fn
        ``reward_fn(x0_hat, t)``, the reward of the denoised estimate; it must be the final
        reward at ``t = 0`` (e.g. ``log p(y | x0)``).
    timesteps
        Decreasing times ending at 0.
    potential, proposal
        See the module docstring.
    lam
        :math:`\lambda`, the reward's inverse temperature.
    eta, scale
        DDIM stochasticity; weight of the reward gradient in the guided proposal.
    ess_threshold, resample_every, resampling
        Adaptive resampling (ESS / N below the threshold, at steps that are multiples of
        ``resample_every``) with a :mod:`blackjax.smc.resampling` scheme.
    """
    ess_threshold = smc.check_ess_threshold(ess_threshold)
    resample_fn = smc.resampling_fn(resampling)
    kernel = build_kernel(
        denoiser,
        reward_fn,
        timesteps,
        potential=potential,
        proposal=proposal,
        lam=lam,
        eta=eta,
        scale=scale,
        ess_threshold=ess_threshold,
        resample_every=resample_every,
        resample_fn=resample_fn,
    )

    def init_fn(
        particles: Array, rng_key: PRNGKey | None = None, *, axis_name: str | None = None
    ) -> FKState:
        return init(
            particles,
            denoiser,
            reward_fn,
            timesteps,
            lam=lam,
            proposal=proposal,
            axis_name=axis_name,
        )

    return SamplingAlgorithm(init_fn, kernel)
