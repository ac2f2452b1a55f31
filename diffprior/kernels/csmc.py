r"""Conditional twisted SMC with ancestor sampling: the particle Gibbs move on the reverse
diffusion path (Andrieu, Doucet & Holenstein, JRSS B 2010, section 2.4; ancestor sampling of
Lindsten, Jordan & Schön, JMLR 2014, section 3), with the twists and the guided proposal of TDS
(Wu et al., NeurIPS 2023; :mod:`diffprior.kernels.tds`).

On the grid :math:`t_0 = t_{max} > t_1 > \dots > t_K = 0` the target is the path measure

.. math::
    \gamma(x_{0:K}) \propto p_{ref}(x_0) \prod_{k=1}^K p(x_k \mid x_{k-1})\; p(y \mid x_K),

whose last marginal is the posterior of the discretised prior. Twisted SMC approximates it
through the intermediate targets :math:`\gamma_k(x_{0:k}) = p_{ref}(x_0) \prod_{l \le k}
p(x_l \mid x_{l-1})\, e^{r_k(x_k)}`, with the twist :math:`r_k = \log \tilde p_{t_k}(y \mid
x_k)` (:math:`r_K` the exact log-likelihood): particles are proposed by the guided step
:math:`q` and weighted by :math:`w_k = p(x_k \mid x_{k-1})\, e^{r_k(x_k)} / (q(x_k \mid
x_{k-1})\, e^{r_{k-1}(x_{k-1})})`, the first by :math:`e^{r_0(x_0)}`.

One sweep of *conditional* SMC keeps a reference path :math:`x^*_{0:K}` in particle slot 0:
slot 0 holds :math:`x^*_k` at every step and the other :math:`N - 1` particles are resampled
(multinomially, every step) and proposed as usual. Then it draws the new reference from the
final weights and traces it back through the ancestors. This is a Markov kernel that leaves
:math:`\gamma` invariant for any number of particles :math:`N \ge 2`.

**Ancestor sampling.** Without it the reference path only changes where the new one branches
off it, and its early part (high noise) rarely does: the path freezes. Instead, at each step
the reference's ancestor is redrawn among all particles :math:`j` at :math:`t_{k-1}` with
probability proportional to

.. math::
    \tilde w^j \propto w_{k-1}^j\, \frac{\gamma(x^j_{0:k-1}, x^*_{k:K})}
    {\gamma_{k-1}(x^j_{0:k-1})} \propto w_{k-1}^j\, \frac{p(x^*_k \mid x^j_{k-1})}
    {e^{r_{k-1}(x^j_{k-1})}}:

the full-path target of the particle's history joined to the rest of the reference, over the
intermediate target that its weight :math:`w_{k-1}^j` already accounts for. The Markov
structure cancels every factor of :math:`x^*_{k:K}` that does not involve :math:`j`; what is
left is the unguided reverse transition into the reference's next state divided by the twist
(the proposal :math:`q` does not appear). The reference particle's own weight at step
:math:`k` is then computed from its sampled ancestor as for any other particle. A
deterministic step (zero transition variance, e.g. the last DDPM step of a network without
``local_variance``) admits only the reference's own ancestor.

The proposal is TDS's: the reverse transition of :meth:`diffprior.Denoiser.transition` with
:math:`\hat x_0` shifted by the twist's gradient (:func:`diffprior.diffusion.guided_x0`), and
the twist's value and gradient come from :func:`diffprior.kernels.guidance.potential_and_grad`;
weights are kept with :func:`diffprior.kernels.smc.reweight`, and a proposal that is not
finite is kept at its parent with weight zero (:mod:`diffprior.kernels.base`).
``reference=None`` runs the same sweep without a reference: plain twisted SMC with
multinomial resampling every step, which starts a chain (and proposes the marginal moves of
:class:`diffprior.ParticleGibbs`, whose acceptance ratio takes both sweeps' ``log_evidence``).

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> twist = lambda x0, t: -0.5 * ((x0[0] - 1.0) / 0.5) ** 2
>>> csmc = dp.kernels.csmc.as_top_level_api(
...     gmm.denoiser, twist, gmm.timesteps(10), 16, gmm.sample_reference
... )
>>> state = csmc.init(jax.random.key(0))        # an unconditional sweep draws a first path
>>> state, info = csmc.step(jax.random.key(1), state)
>>> state.path.shape, info.reference_ancestors.shape
((11, 2), (10,))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import guided_x0
from diffprior.kernels import base, smc
from diffprior.kernels.guidance import TwistFn, guided_log_ratio, potential_and_grad
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["CSMCState", "CSMCInfo", "init", "sweep", "build_kernel", "as_top_level_api"]

#: ``sample_reference(rng_key, shape) -> (*shape, *event_shape)``: draws at ``timesteps[0]``,
#: e.g. :meth:`diffprior.DiffusionPrior.sample_reference`.
ReferenceSampler = Callable[[PRNGKey, tuple[int, ...]], Array]


class CSMCState(NamedTuple):
    """What the next sweep needs.

    path
        ``(num_steps + 1, *event_shape)`` the reference path :math:`x^*_{t_{max}}, \\dots,
        x^*_0`; ``path[-1]`` is the current draw of :math:`x_0`.
    """

    path: Array


class CSMCInfo(NamedTuple):
    """Diagnostics of one sweep.

    ess
        ``(num_steps + 1,)`` effective sample size of the weights after each step (the first
        entry after the initial weighting).
    reference_ancestors
        ``(num_steps,)`` the ancestor drawn for the reference at each step (0 is the
        reference's own history; other values are where ancestor sampling moved it).
    log_evidence
        The sweep's estimate of :math:`\\log p(y)`, :math:`\\log \\prod_k \\frac1N \\sum_i
        w_k^i` over every particle, the reference's weight computed like any other's. Unbiased
        (in :math:`p(y)`) for an unconditional sweep; for a conditional one without ancestor
        sampling it is the estimate of the state of particle MCMC's extended target that the
        sweep draws, which the marginal moves of :class:`diffprior.ParticleGibbs` use.
    degenerate
        Whether every particle had weight zero at some step.
    num_nonfinite
        Proposals over the sweep that were not finite: kept at their parent with weight zero
        (:func:`diffprior.kernels.base.replace_nonfinite`).
    """

    ess: Array
    reference_ancestors: Array
    log_evidence: Array
    degenerate: Array
    num_nonfinite: Array


class _Particles(NamedTuple):
    x: Array
    reward: Array
    grad: Array
    x0_hat: Array


def _evaluate(denoiser: Denoiser, twist_fn: TwistFn, x: Array, t: Array) -> _Particles:
    potential = jax.vmap(potential_and_grad, in_axes=(None, None, 0, None))(
        denoiser, twist_fn, x, t
    )
    return _Particles(x, potential.log_potential, potential.grad, potential.x0_hat)


def sweep(
    rng_key: PRNGKey,
    reference: Array | None,
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    num_particles: int,
    sample_reference: ReferenceSampler,
    *,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ancestor_sampling: bool = True,
) -> tuple[Array, CSMCInfo]:
    r"""One sweep: conditional twisted SMC given the ``reference`` path (or plain twisted SMC
    when ``reference`` is None), then a new path drawn from the final weights and traced back.

    Returns the new path ``(num_steps + 1, *event_shape)`` and a :class:`CSMCInfo`.
    """
    conditional = reference is not None
    schedule = denoiser.schedule
    # multinomial every step: the other N - 1 particles are i.i.d. given the weights, which
    # is what makes the conditional sweep leave the path posterior invariant
    resample_fn = smc.resampling_fn("multinomial")
    num_steps = timesteps.shape[0] - 1
    key_init, key_steps, key_final = jax.random.split(rng_key, 3)
    log_uniform = -jnp.log(num_particles) * jnp.ones((num_particles,))

    x_init = sample_reference(key_init, (num_particles,))
    if conditional:
        x_init = x_init.at[0].set(reference[0])
    current = _evaluate(denoiser, twist_fn, x_init, timesteps[0])
    first = smc.initial_weights(current.reward)

    def step(carry, inputs):
        particles, log_weights, log_evidence, degenerate, num_nonfinite = carry
        key, t, s, x_ref = inputs
        key_resample, key_ancestor, key_noise = jax.random.split(key, 3)

        prior_step = jax.vmap(denoiser.transition, in_axes=(0, 0, None, None, None))(
            particles.x, particles.x0_hat, t, s, eta
        )
        x0_guided = guided_x0(schedule, particles.x0_hat, scale * particles.grad, t)
        guided_step = jax.vmap(denoiser.transition, in_axes=(0, 0, None, None, None))(
            particles.x, x0_guided, t, s, eta
        )
        # the variance is the same for every particle (it depends on t and s only)
        variance = prior_step.variance[0]
        stochastic = variance > 0
        safe_variance = jnp.where(stochastic, variance, 1.0)

        ancestors = resample_fn(key_resample, jnp.exp(log_weights), num_particles)
        if conditional:
            reference_ancestor = jnp.zeros((), ancestors.dtype)
            if ancestor_sampling:
                # w^j p(x*_s | x_t^j) / twist_t(x_t^j): constants of the Gaussian cancel
                squared = jnp.sum(
                    ((x_ref - prior_step.mean) ** 2).reshape((num_particles, -1)), axis=1
                )
                log_ancestor = log_weights - squared / (2.0 * safe_variance) - particles.reward
                log_ancestor = jnp.where(jnp.isfinite(log_ancestor), log_ancestor, -jnp.inf)
                drawn = jax.random.categorical(key_ancestor, log_ancestor)
                # a deterministic step leads only from the reference's own state to its next
                reference_ancestor = jnp.where(stochastic, drawn, 0).astype(ancestors.dtype)
            ancestors = ancestors.at[0].set(reference_ancestor)
        else:
            reference_ancestor = jnp.zeros((), ancestors.dtype)

        parents = smc.gather(particles, ancestors)
        prior_mean = jnp.take(prior_step.mean, ancestors, axis=0)
        # a deterministic step cannot be guided: follow the prior, as TDS does
        shift = jnp.where(
            stochastic, jnp.take(guided_step.mean, ancestors, axis=0) - prior_mean, 0.0
        )
        noise = jax.random.normal(key_noise, particles.x.shape)
        x_s = prior_mean + shift + jnp.sqrt(variance) * noise
        if conditional:
            x_s = x_s.at[0].set(x_ref)
            # the reference's standardised offset from its guided mean, as if it were drawn
            noise = noise.at[0].set((x_ref - prior_mean[0] - shift[0]) / jnp.sqrt(safe_variance))
        # the package's rule for failed proposals: keep the parent, with weight zero
        finite = base.replace_nonfinite(x_s, parents.x)
        x_s = finite.particles
        # log p(x_s | x_t) - log q(x_s | x_t), as FK's guided proposal
        log_ratio = jax.vmap(guided_log_ratio, in_axes=(0, 0, None))(shift, noise, safe_variance)
        log_ratio = jnp.where(stochastic, log_ratio, 0.0)

        proposed = _evaluate(denoiser, twist_fn, x_s, s)
        log_potential = proposed.reward - parents.reward
        valid = jnp.isfinite(proposed.reward) & finite.is_finite
        log_potential = jnp.where(valid, log_potential, -jnp.inf)
        update = smc.reweight(log_uniform, log_ratio + log_potential)
        carry = (
            proposed,
            update.log_weights,
            log_evidence + update.log_evidence_increment,
            degenerate | update.degenerate,
            num_nonfinite + finite.num_nonfinite,
        )
        return carry, (x_s, ancestors, reference_ancestor, smc.ess(update.log_weights))

    if conditional:
        references = reference[1:]
    else:
        references = jnp.zeros((num_steps, *x_init.shape[1:]), x_init.dtype)
    inputs = (jax.random.split(key_steps, num_steps), timesteps[:-1], timesteps[1:], references)
    init_carry = (
        current,
        first.log_weights,
        first.log_evidence_increment,
        first.degenerate,
        jnp.zeros((), jnp.int32),
    )
    (final, log_weights, log_evidence, degenerate, num_nonfinite), outputs = jax.lax.scan(
        step, init_carry, inputs
    )
    xs, ancestors, reference_ancestors, ess_steps = outputs
    del final

    # the new reference: a particle by its final weight, traced back through its ancestors
    index = jax.random.categorical(key_final, log_weights)

    def trace_back(index, inputs):
        x_k, ancestors_k = inputs
        return ancestors_k[index], x_k[index]

    first_index, later = jax.lax.scan(trace_back, index, (xs, ancestors), reverse=True)
    path = jnp.concatenate([x_init[first_index][None], later], axis=0)
    info = CSMCInfo(
        jnp.concatenate([smc.ess(first.log_weights)[None], ess_steps]),
        reference_ancestors,
        log_evidence,
        degenerate,
        num_nonfinite,
    )
    return path, info


def init(
    rng_key: PRNGKey,
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    num_particles: int,
    sample_reference: ReferenceSampler,
    *,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
) -> CSMCState:
    """A first reference path, drawn by an unconditional sweep (plain twisted SMC)."""
    path, _ = sweep(
        rng_key,
        None,
        denoiser,
        twist_fn,
        timesteps,
        num_particles,
        sample_reference,
        eta=eta,
        scale=scale,
    )
    return CSMCState(path)


def build_kernel(
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    num_particles: int,
    sample_reference: ReferenceSampler,
    *,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ancestor_sampling: bool = True,
) -> Callable[[PRNGKey, CSMCState], tuple[CSMCState, CSMCInfo]]:
    """Build the conditional SMC move ``kernel(rng_key, state) -> (state, info)`` (options as
    in :func:`as_top_level_api`)."""
    _check(num_particles, eta)

    def kernel(rng_key: PRNGKey, state: CSMCState) -> tuple[CSMCState, CSMCInfo]:
        path, info = sweep(
            rng_key,
            state.path,
            denoiser,
            twist_fn,
            timesteps,
            num_particles,
            sample_reference,
            eta=eta,
            scale=scale,
            ancestor_sampling=ancestor_sampling,
        )
        return CSMCState(path), info

    return kernel


def _check(num_particles: int, eta: ArrayLike) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
        raise ValueError(
            f"num_particles must be an integer >= 2 for conditional SMC (one slot holds the "
            f"reference), got {num_particles!r}"
        )
    if not isinstance(eta, jax.core.Tracer) and not float(eta) > 0:
        raise ValueError(
            f"eta must be > 0 for conditional SMC (ancestor sampling needs stochastic reverse "
            f"steps), got {eta}"
        )


def as_top_level_api(
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    num_particles: int,
    sample_reference: ReferenceSampler,
    *,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
    ancestor_sampling: bool = True,
) -> SamplingAlgorithm:
    r"""Conditional twisted SMC as a ``SamplingAlgorithm(init, step)``: ``init(rng_key)``
    draws a first path by plain twisted SMC, ``step(rng_key, state)`` is one particle Gibbs
    move of the path.

    Parameters
    ----------
    denoiser
        The prior's denoiser.
    twist_fn
        ``twist_fn(x0_hat, t)``, the twisting log-potential; it must be the exact
        log-likelihood at ``t = 0`` (e.g. :func:`diffprior.infer.twists.likelihood_twist`).
    timesteps
        Decreasing times ending at 0; ``len(timesteps) - 1`` steps.
    num_particles
        Particles per sweep, at least 2 (slot 0 holds the reference).
    sample_reference
        ``sample_reference(key, shape)``, draws at ``timesteps[0]``
        (:meth:`diffprior.DiffusionPrior.sample_reference`).
    eta, scale
        DDIM stochasticity (> 0) and the weight of the twist gradient in the proposal, as for
        :mod:`diffprior.kernels.tds`.
    ancestor_sampling
        Redraw the reference's ancestor at every step (see the module docstring); without it
        the sampler stays valid but the early part of the path mixes slowly.
    """
    kernel = build_kernel(
        denoiser,
        twist_fn,
        timesteps,
        num_particles,
        sample_reference,
        eta=eta,
        scale=scale,
        ancestor_sampling=ancestor_sampling,
    )

    def init_fn(rng_key: PRNGKey) -> CSMCState:
        return init(
            rng_key,
            denoiser,
            twist_fn,
            timesteps,
            num_particles,
            sample_reference,
            eta=eta,
            scale=scale,
        )

    return SamplingAlgorithm(init_fn, kernel)
