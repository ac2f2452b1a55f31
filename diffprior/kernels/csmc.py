r"""Conditional twisted SMC with ancestor sampling: the particle Gibbs move on the reverse
diffusion path (Andrieu, Doucet & Holenstein, JRSS B 2010, section 2.4; ancestor sampling of
Lindsten, Jordan & Schön, JMLR 2014, section 3), with the twists and proposals of TDS
(Wu et al., NeurIPS 2023; :mod:`diffprior.kernels.tds`): the guided proposal for any
likelihood, or the subspace proposal of MCGdiff for a linear Gaussian one
(:func:`diffprior.kernels.mcgdiff.subspace_proposal`).

On the grid :math:`t_0 = t_{max} > t_1 > \dots > t_K = 0` the target is the path measure

.. math::
    \gamma(x_{0:K}) \propto p_{ref}(x_0) \prod_{k=1}^K p(x_k \mid x_{k-1})\; p(y \mid x_K),

whose last marginal is the posterior of the discretised prior. Twisted SMC approximates it
through the intermediate targets :math:`\gamma_k(x_{0:k}) = p_{ref}(x_0) \prod_{l \le k}
p(x_l \mid x_{l-1})\, e^{r_k(x_k)}`, with a twist :math:`r_k \approx \log p_{t_k}(y \mid
x_k)` (:math:`r_K` the exact log-likelihood): particles are proposed by :math:`q` and weighted
by :math:`w_k = p(x_k \mid x_{k-1})\, e^{r_k(x_k)} / (q(x_k \mid x_{k-1})\,
e^{r_{k-1}(x_{k-1})})`, the first by :math:`e^{r_0(x_0)}`.

One sweep of *conditional* SMC keeps a reference path :math:`x^*_{0:K}` in particle slot 0:
slot 0 holds :math:`x^*_k` at every step and the other :math:`N - 1` particles are resampled
(multinomially, every step) and proposed as usual. Then it draws the new reference from the
final weights and traces it back through the ancestors. This is a Markov kernel that leaves
:math:`\gamma` invariant for any number of particles :math:`N \ge 2`, whatever the proposal,
provided every weight, the reference's included, is the formula above evaluated at the
particle's own :math:`x_k` and parent.

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

**Proposals** (a :class:`Proposal`: the twist, the unguided step, a draw and the
incremental weight):

- *guided* (:func:`guided_proposal`, TDS's): the reverse step :math:`N(m, v I)` of
  :meth:`diffprior.Denoiser.transition` with :math:`\hat x_0` shifted by the twist's gradient
  (:func:`diffprior.diffusion.guided_x0`), i.e. :math:`q = N(m + \delta, v I)` and
  :math:`\log p(x_k \mid x_{k-1}) - \log q(x_k \mid x_{k-1}) = -(\lVert\delta\rVert^2 + 2
  \sqrt v\, \delta \cdot z) / (2 v)` with :math:`z = (x_k - m - \delta)/\sqrt v`
  (:func:`diffprior.kernels.guidance.guided_log_ratio`); the twist's value and gradient come
  from :func:`diffprior.kernels.guidance.potential_and_grad`.
- *subspace* (:func:`diffprior.kernels.mcgdiff.subspace_proposal`, TDS's default for linear
  Gaussian models), for :math:`y = A x + \sigma \varepsilon`. In the right singular basis
  :math:`V` of the whitened operator each observed direction carries a pseudo-observation
  :math:`\tilde y_i = \bar x_{K,i} + c_i \varepsilon_i` of :math:`\bar x = V^T x`. The twist is
  :math:`r_k(x) = \sum_i \log N(\tilde y_i;\ \mu_{k,i}(x),\ e_{k,i})` with :math:`\mu_k` the
  denoiser's :math:`V^T \hat x_0(x)` and :math:`e_{k,i} = c_i^2 + \mathrm{Var}[\bar x_{0,i}
  \mid x_{t_k}]`, and :math:`r_K(x) = \sum_i \log N(\tilde y_i; \bar x_i, c_i^2)`, the
  likelihood up to a constant (the change of variables to :math:`y`, added to the
  log-evidence). With :math:`p(x_k \mid x_{k-1}) = N(m, v I)` (its variance floored at the
  last step, :mod:`diffprior.kernels.mcgdiff`), the proposal is that step times a Gaussian
  potential in the observed coordinates, linear in :math:`\bar x_k`,

  .. math::
      q(x_k \mid x_{k-1}) = \frac{p(x_k \mid x_{k-1})\, g_k(\bar x_k \mid x_{k-1})}
      {Z_k(x_{k-1})}, \quad g_{k,i} = N\big(\tilde y_i;\ \mu_{k-1,i} + a_{k,i} (\bar x_{k,i}
      - \bar m_i),\ e_{k,i}\big), \quad Z_{k,i} = N(\tilde y_i;\ \mu_{k-1,i},\ a_{k,i}^2 v +
      e_{k,i}),

  (:math:`\mu_{k-1}` replaced by :math:`\bar m` at the last step, :math:`a` the slope of a
  Gaussian denoiser): a Kalman update along the observed directions and the reverse step
  itself in the complement, which is what the draw does. So

  .. math::
      \log p(x_k \mid x_{k-1}) - \log q(x_k \mid x_{k-1}) = \log Z_k(x_{k-1}) - \log
      g_k(\bar x_k \mid x_{k-1}), \qquad
      w_k = \frac{Z_k(x_{k-1})}{e^{r_{k-1}(x_{k-1})}}\,
      \frac{e^{r_k(x_k)}}{g_k(\bar x_k \mid x_{k-1})}.

  For a Gaussian prior :math:`g_k` is the twist itself (:math:`e^{r_k(x_k)} = g_k`, the
  exactly twisted case): the weight is the twisted transition's normaliser over the previous
  twist and does not depend on :math:`x_k`, so the reference is weighted like every other
  child of its ancestor. For a mixture or a network the second factor is not 1, and the
  reference's weight is the formula at :math:`\bar x^*_k = V^T x^*_k`. At the last step
  :math:`g_K` and :math:`e^{r_K}` are both the likelihood (for a schedule with
  :math:`\sigma(0) = 0`), and the factor is computed as exactly 1, direction by direction from
  one residual: otherwise float rounding of :math:`\bar x^*_K`, large against a small noise
  :math:`c_i`, would weigh the reference at random.

Weights are kept with :func:`diffprior.kernels.smc.reweight`, and a proposal that is not
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

The same sweep with the subspace proposal, for :math:`y = x_1 + N(0, 0.5^2)`:

>>> from diffprior.linear_gaussian import from_matrix
>>> svd = from_matrix(jnp.array([[1.0, 0.0]]), 0.5, jnp.array([1.0]))
>>> proposal = dp.kernels.mcgdiff.subspace_proposal(gmm.denoiser, gmm.timesteps(10), svd)
>>> path, info = dp.kernels.csmc.sweep_with(
...     jax.random.key(2), state.path, proposal, 16, gmm.sample_reference
... )
>>> path.shape
(11, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import guided_x0, transition_x0_coefficient
from diffprior.kernels import base, smc
from diffprior.kernels.guidance import TwistFn, guided_log_ratio, potential_and_grad
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "CSMCState",
    "CSMCInfo",
    "Particles",
    "Move",
    "Proposal",
    "guided_proposal",
    "sweep_with",
    "init",
    "sweep",
    "build_kernel",
    "as_top_level_api",
]

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
        w_k^i` over every particle, the reference's weight computed like any other's (plus
        the proposal's ``log_evidence_offset``). Unbiased (in :math:`p(y)`) for an
        unconditional sweep; for a conditional one without ancestor sampling it is the
        estimate of the state of particle MCMC's extended target that the sweep draws, which
        the marginal moves of :class:`diffprior.ParticleGibbs` use.
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


class Particles(NamedTuple):
    """Particles at one grid time, as a :class:`Proposal` evaluates them.

    x
        ``(N, *event_shape)`` the particles.
    log_twist
        ``(N,)`` the twist :math:`r_k(x)` (the exact log-likelihood, up to a constant, at the
        last time).
    extra
        What the proposal keeps per particle (leading axis ``N``), e.g. :math:`\\hat x_0`.
    """

    x: Array
    log_twist: Array
    extra: Any


class Move(NamedTuple):
    """The step of a :class:`Proposal` from each particle at :math:`t_{k-1}`.

    mean, variance
        ``(N, *event_shape)`` and ``()``: the *unguided* reverse transition :math:`p(x_k \\mid
        x_{k-1}) = N(\\text{mean}, \\text{variance}\\, I)` of the path measure, which ancestor
        sampling evaluates (the variance is the same for every particle).
    extra
        What the proposal needs to draw and weigh (leading axis ``N``).
    """

    mean: Array
    variance: Array
    extra: Any


class Proposal(NamedTuple):
    """A twisted SMC proposal for :func:`sweep_with`, as pure functions of all particles at
    once (``k`` the grid index of the particles' time, a traced integer):

    evaluate
        ``evaluate(x, k) -> Particles``: the twist (and what the proposal keeps) at ``x``.
    transition
        ``transition(particles, k) -> Move``: the step from ``timesteps[k]`` to
        ``timesteps[k + 1]``.
    sample
        ``sample(rng_key, parents, move, k) -> x``: children of ``parents`` (``move`` taken
        at them).
    log_weight
        ``log_weight(parents, move, children, k) -> (N,)``: the incremental weight
        :math:`\\log p(x_{k+1} \\mid x_k) - \\log q(x_{k+1} \\mid x_k) + r_{k+1}(x_{k+1}) -
        r_k(x_k)` for any children, drawn or not (the reference), written so that what cancels
        does so exactly.
    num_steps
        ``K``, the number of steps.
    log_evidence_offset
        A constant added to the log-evidence (the subspace twist's change of variables).
    """

    evaluate: Callable[[Array, Array], Particles]
    transition: Callable[[Particles, Array], Move]
    sample: Callable[[PRNGKey, Particles, Move, Array], Array]
    log_weight: Callable[[Particles, Move, Particles, Array], Array]
    num_steps: int
    log_evidence_offset: ArrayLike = 0.0


def guided_proposal(
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    *,
    eta: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
) -> Proposal:
    """TDS's guided proposal (module docstring): the reverse step with :math:`\\hat x_0`
    shifted by ``scale`` times the gradient of ``twist_fn(x0_hat, t)``, which must be the exact
    log-likelihood at ``t = 0``."""
    schedule = denoiser.schedule
    step_fn = jax.vmap(denoiser.transition, in_axes=(0, 0, None, None, None))

    def evaluate(x, k):
        potential = jax.vmap(potential_and_grad, in_axes=(None, None, 0, None))(
            denoiser, twist_fn, x, timesteps[k]
        )
        return Particles(x, potential.log_potential, (potential.grad, potential.x0_hat))

    def transition(particles, k):
        t, s = timesteps[k], timesteps[k + 1]
        grad, x0_hat = particles.extra
        prior_step = step_fn(particles.x, x0_hat, t, s, eta)
        # the variance depends on t and s only
        variance = prior_step.variance[0]
        # the mean is affine in x0_hat: the guided step shifts it by the coefficient of x0_hat
        # times the guided change of x0_hat, as in TDS's kernel
        per_grad = transition_x0_coefficient(schedule, t, s, eta) * guided_x0(
            schedule, 0.0, scale, t
        )
        # a deterministic step cannot be guided: follow the prior, as TDS does
        shift = jnp.where(variance > 0, per_grad * grad, 0.0)
        return Move(prior_step.mean, variance, shift)

    def sample(rng_key, parents, move, k):
        noise = jax.random.normal(rng_key, parents.x.shape)
        return move.mean + move.extra + jnp.sqrt(move.variance) * noise

    def log_weight(parents, move, children, k):
        stochastic = move.variance > 0
        safe_variance = jnp.where(stochastic, move.variance, 1.0)
        # each child's standardised offset from its guided mean, as if it were drawn
        noise = (children.x - move.mean - move.extra) / jnp.sqrt(safe_variance)
        ratio = jax.vmap(guided_log_ratio, in_axes=(0, 0, None))(move.extra, noise, safe_variance)
        log_ratio = jnp.where(stochastic, ratio, 0.0)
        return log_ratio + children.log_twist - parents.log_twist

    return Proposal(evaluate, transition, sample, log_weight, timesteps.shape[0] - 1)


def sweep_with(
    rng_key: PRNGKey,
    reference: Array | None,
    proposal: Proposal,
    num_particles: int,
    sample_reference: ReferenceSampler,
    *,
    ancestor_sampling: bool = True,
) -> tuple[Array, CSMCInfo]:
    r"""One sweep with ``proposal``: conditional twisted SMC given the ``reference`` path (or
    plain twisted SMC when ``reference`` is None), then a new path drawn from the final weights
    and traced back.

    Returns the new path ``(num_steps + 1, *event_shape)`` and a :class:`CSMCInfo`.
    """
    conditional = reference is not None
    num_steps = proposal.num_steps
    key_init, key_steps, key_final = jax.random.split(rng_key, 3)
    log_uniform = -jnp.log(num_particles) * jnp.ones((num_particles,))

    x_init = sample_reference(key_init, (num_particles,))
    if conditional:
        x_init = x_init.at[0].set(reference[0])
    current = proposal.evaluate(x_init, jnp.zeros((), jnp.int32))
    first = smc.initial_weights(current.log_twist)

    def step(carry, inputs):
        particles, log_weights, log_evidence, degenerate, num_nonfinite = carry
        key, k, x_ref = inputs
        key_resample, key_ancestor, key_noise = jax.random.split(key, 3)
        move = proposal.transition(particles, k)
        stochastic = move.variance > 0
        safe_variance = jnp.where(stochastic, move.variance, 1.0)

        # multinomial every step, i.i.d. draws in any slot: the other N - 1 particles are then
        # i.i.d. given the weights, which is what makes the conditional sweep leave the path
        # posterior invariant (BlackJAX's multinomial sorts its draws, so that slot 0, which
        # the reference overwrites, would always take the smallest index and bias the others)
        ancestors = jax.random.categorical(key_resample, log_weights, shape=(num_particles,))
        reference_ancestor = jnp.zeros((), ancestors.dtype)
        if conditional:
            if ancestor_sampling:
                # w^j p(x*_s | x_t^j) / twist_t(x_t^j): constants of the Gaussian cancel
                squared = jnp.sum(((x_ref - move.mean) ** 2).reshape((num_particles, -1)), axis=1)
                log_ancestor = log_weights - squared / (2.0 * safe_variance) - particles.log_twist
                log_ancestor = jnp.where(jnp.isfinite(log_ancestor), log_ancestor, -jnp.inf)
                drawn = jax.random.categorical(key_ancestor, log_ancestor)
                # a deterministic step leads only from the reference's own state to its next
                reference_ancestor = jnp.where(stochastic, drawn, 0).astype(ancestors.dtype)
            ancestors = ancestors.at[0].set(reference_ancestor)

        parents = smc.gather(particles, ancestors)
        parent_move = Move(
            jnp.take(move.mean, ancestors, axis=0), move.variance, smc.gather(move.extra, ancestors)
        )
        x_s = proposal.sample(key_noise, parents, parent_move, k)
        if conditional:
            x_s = x_s.at[0].set(x_ref)
        # the package's rule for failed proposals: keep the parent, with weight zero
        finite = base.replace_nonfinite(x_s, parents.x)
        children = proposal.evaluate(finite.particles, k + 1)
        log_increment = proposal.log_weight(parents, parent_move, children, k)
        valid = jnp.isfinite(children.log_twist) & finite.is_finite
        update = smc.reweight(log_uniform, jnp.where(valid, log_increment, -jnp.inf))
        carry = (
            children,
            update.log_weights,
            log_evidence + update.log_evidence_increment,
            degenerate | update.degenerate,
            num_nonfinite + finite.num_nonfinite,
        )
        return carry, (children.x, ancestors, reference_ancestor, smc.ess(update.log_weights))

    if conditional:
        references = reference[1:]
    else:
        references = jnp.zeros((num_steps, *x_init.shape[1:]), x_init.dtype)
    keys = jax.random.split(key_steps, num_steps)
    inputs = (keys, jnp.arange(num_steps, dtype=jnp.int32), references)
    init_carry = (
        current,
        first.log_weights,
        first.log_evidence_increment + jnp.asarray(proposal.log_evidence_offset, jnp.float32),
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
    r"""One sweep with TDS's guided proposal (:func:`sweep_with` and
    :func:`guided_proposal`): conditional twisted SMC given the ``reference`` path (or plain
    twisted SMC when ``reference`` is None), then a new path drawn from the final weights and
    traced back.

    Returns the new path ``(num_steps + 1, *event_shape)`` and a :class:`CSMCInfo`.
    """
    proposal = guided_proposal(denoiser, twist_fn, timesteps, eta=eta, scale=scale)
    return sweep_with(
        rng_key,
        reference,
        proposal,
        num_particles,
        sample_reference,
        ancestor_sampling=ancestor_sampling,
    )


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
