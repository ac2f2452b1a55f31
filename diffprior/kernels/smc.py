r"""Particle bookkeeping shared by every SMC kernel: log-weights, adaptive resampling and the
running log-evidence.

The weights are kept normalised in log space, :math:`\sum_i e^{\ell_i} = 1`. A step with
incremental log-weights :math:`g_i` (a transition ratio times a potential ratio) does

.. math::
    \log \hat Z \mathrel{+}= \log \sum_i e^{\ell_i + g_i}, \qquad
    \ell_i \leftarrow \ell_i + g_i - \log \sum_j e^{\ell_j + g_j}.

Resampling replaces :math:`\ell` by :math:`-\log N` and leaves :math:`\hat Z` alone. Because
the increment is weighted by the *current* normalised weights (not by :math:`1/N`), the
estimate stays unbiased whether one resamples every step, adaptively when
:math:`\mathrm{ESS}/N` falls below a threshold, or never (then it is importance sampling on
paths). The initial potential and the final exact-likelihood correction are increments like
any other.

One SMC step
------------
:func:`step` is the step every SMC kernel takes (in the spirit of
``blackjax.smc.base.step``): decide whether to resample (ESS below a threshold), gather the
parents, propose from them (a kernel's ``propose_fn``), keep the proposals finite
(:func:`diffprior.kernels.base.replace_nonfinite`; a replaced particle gets weight zero),
weight them (a kernel's ``weight_fn``), normalise, add the log-evidence increment, and report
an :class:`SMCInfo`. FK (and so TDS, built on it) and MCGdiff are a ``propose_fn`` and a
``weight_fn`` each.

Particle-wide reductions
------------------------
Every operation that looks at all particles at once (the log-sum-exp of the weights, the ESS,
the resampling draw and the gather of parents, the count of particles) lives here and takes an
optional ``axis_name``. With ``None`` (the default, what every kernel passes today) the
particles are the leading axis of local arrays. With the name of a mapped axis (``jax.vmap``
or ``shard_map`` with ``axis_name``) each call sees one block of the particles, the
reductions run over all blocks with collectives, and ancestors are global indices; every block
must then be given the same ``rng_key`` so that the resampling draw agrees.

Per-particle randomness goes through :func:`particle_keys`: the step's key is split into one
key per particle over the *whole* set and each block keeps its slice, so particle ``i`` draws
the same noise whether the particles sit on one device or are split over many.
:func:`particle_normals` makes a step's Gaussian noise from those keys in one batched draw,
outside the map over particles. Together with the reductions above, a run split over ``k``
blocks gives the particles, weights and log-evidence of the unsplit run, up to the order of
floating-point sums.

Resampling schemes and the ESS come from :mod:`blackjax.smc`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.smc import resampling
from blackjax.smc.ess import ess as blackjax_ess
from jax.scipy.special import logsumexp

from diffprior.kernels import base
from diffprior.types import Array, ArrayTree, PRNGKey

__all__ = [
    "RESAMPLING_SCHEMES",
    "resampling_fn",
    "SMCInfo",
    "SMCStep",
    "WeightUpdate",
    "ResampleResult",
    "step",
    "initial_weights",
    "reweight",
    "maybe_resample",
    "ess",
    "log_sum_exp",
    "num_particles",
    "gather",
    "particle_keys",
    "particle_normals",
    "check_ess_threshold",
]

RESAMPLING_SCHEMES: dict[str, Callable] = {
    "systematic": resampling.systematic,
    "stratified": resampling.stratified,
    "multinomial": resampling.multinomial,
    "residual": resampling.residual,
}


def resampling_fn(name: str) -> Callable:
    """The BlackJAX resampling function called ``name``."""
    if name not in RESAMPLING_SCHEMES:
        raise ValueError(f"resampling must be one of {tuple(RESAMPLING_SCHEMES)}, got {name!r}")
    return RESAMPLING_SCHEMES[name]


def check_ess_threshold(ess_threshold: float) -> float:
    """Validate an ESS threshold in ``[0, 1]``."""
    value = float(ess_threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    return value


# -- particle-wide reductions ----------------------------------------------------------------


def num_particles(log_weights: Array, axis_name: str | None = None) -> int:
    """How many particles there are: the leading axis of ``log_weights``, times the size of
    the mapped axis ``axis_name`` when the particles are split over it."""
    count = log_weights.shape[0]
    if axis_name is not None:
        count = count * jax.lax.axis_size(axis_name)
    return count


def log_sum_exp(log_weights: Array, axis_name: str | None = None) -> Array:
    r""":math:`\log \sum_i e^{\ell_i}` over every particle (``-inf`` when all are ``-inf``)."""
    if axis_name is None:
        return logsumexp(log_weights)
    largest = jax.lax.pmax(jnp.max(log_weights), axis_name)
    shift = jnp.where(jnp.isfinite(largest), largest, 0.0)
    total = jax.lax.psum(jnp.sum(jnp.exp(log_weights - shift)), axis_name)
    return jnp.log(total) + shift


def ess(log_weights: Array, axis_name: str | None = None) -> Array:
    """Effective sample size of (possibly unnormalised) log-weights (BlackJAX's)."""
    if axis_name is None:
        return blackjax_ess(log_weights)
    log_ess = 2 * log_sum_exp(log_weights, axis_name) - log_sum_exp(2 * log_weights, axis_name)
    return jnp.exp(log_ess)


def gather(tree: ArrayTree, ancestors: Array, axis_name: str | None = None) -> ArrayTree:
    """Select particles (leading axis) of every leaf of ``tree`` by ``ancestors`` (global
    indices when the particles are split over ``axis_name``)."""
    if axis_name is None:
        return jax.tree.map(lambda leaf: jnp.take(leaf, ancestors, axis=0), tree)

    def take(leaf):
        every = jax.lax.all_gather(leaf, axis_name, axis=0, tiled=True)
        return jnp.take(every, ancestors, axis=0)

    return jax.tree.map(take, tree)


def _local_indices(num_local: int, axis_name: str | None) -> Array:
    # the global index of each particle of this block
    indices = jnp.arange(num_local)
    if axis_name is None:
        return indices
    return indices + jax.lax.axis_index(axis_name) * num_local


def particle_keys(rng_key: PRNGKey, num_local: int, axis_name: str | None = None) -> Array:
    """One key per particle, ``(num_local,)``: ``jax.random.split(rng_key, N)`` over all
    ``N`` particles, and this block's slice of it when the particles are split over
    ``axis_name`` (every block given the same ``rng_key``). A particle's key depends on its
    global index only, not on how many blocks there are.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> key = jax.random.key(0)
    >>> whole = particle_keys(key, 8)
    >>> blocks = jax.vmap(lambda _: particle_keys(key, 4, "p"), axis_name="p")(jnp.arange(2))
    >>> bool(jnp.all(jax.random.key_data(blocks.reshape(8)) == jax.random.key_data(whole)))
    True
    """
    if axis_name is None:
        return jax.random.split(rng_key, num_local)
    keys = jax.random.split(rng_key, num_local * jax.lax.axis_size(axis_name))
    return jax.lax.dynamic_slice_in_dim(keys, _local_indices(num_local, axis_name)[0], num_local)


def particle_normals(
    rng_key: PRNGKey, shape: tuple[int, ...], axis_name: str | None = None, dtype=jnp.float32
) -> Array:
    """Standard normal noise for a block of particles, ``shape = (num_local, *event_shape)``,
    drawn in one batched draw for the step: row ``i`` is ``jax.random.normal(key_i,
    event_shape)`` with ``key_i`` particle ``i``'s key (:func:`particle_keys`), so a particle's
    noise depends on its global index only, not on how many blocks there are.

    Call it once per step, outside any map over particles, and pass the rows to the
    per-particle code. Unsplit it times as one plain ``jax.random.normal(rng_key, shape)``
    (the keys only change the hash's inputs); split over ``k`` blocks each block draws its own
    rows only, where slicing one global draw would make every block draw all ``N`` rows.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> key = jax.random.key(0)
    >>> whole = particle_normals(key, (8, 3))
    >>> blocks = jax.vmap(lambda _: particle_normals(key, (4, 3), "p"), axis_name="p")(
    ...     jnp.arange(2)
    ... )
    >>> bool(jnp.all(blocks.reshape(8, 3) == whole))
    True
    """
    keys = particle_keys(rng_key, shape[0], axis_name)
    return jax.vmap(lambda key: jax.random.normal(key, shape[1:], dtype))(keys)


class SMCInfo(NamedTuple):
    """Diagnostics of one SMC step, shared by the SMC kernels.

    ess
        Effective sample size of the weights on which the resampling decision was made.
    resampled
        Whether the step resampled.
    ancestors
        ``(N,)`` index of each particle's parent.
    log_weights
        ``(N,)`` normalised log-weights after the step.
    log_evidence_increment
        What the step added to the running log-evidence.
    degenerate
        Every particle got weight zero (see :class:`WeightUpdate`).
    num_nonfinite
        Particles whose proposal was not finite: kept at their parent, with weight zero
        (:mod:`diffprior.kernels.base`).
    """

    ess: Array
    resampled: Array
    ancestors: Array
    log_weights: Array
    log_evidence_increment: Array
    degenerate: Array
    num_nonfinite: Array


class WeightUpdate(NamedTuple):
    r"""Result of :func:`reweight`.

    log_weights
        New normalised log-weights ``(N,)``.
    log_evidence_increment
        :math:`\log \sum_i e^{\ell_i + g_i}`; ``-inf`` when every particle got weight zero.
    degenerate
        True when every incremental weight was zero or not finite; the weights are then reset
        to uniform so that sampling can go on, and the evidence becomes ``-inf``.
    """

    log_weights: Array
    log_evidence_increment: Array
    degenerate: Array


def _sanitise(log_increments: Array) -> Array:
    # a particle whose increment is NaN or +inf gets weight zero, never a NaN weight
    return jnp.where(jnp.isfinite(log_increments), log_increments, -jnp.inf)


def initial_weights(log_potentials: Array, axis_name: str | None = None) -> WeightUpdate:
    """Weights of ``N`` particles drawn from the reference and weighted by a first potential."""
    count = num_particles(log_potentials, axis_name)
    uniform = jnp.full(log_potentials.shape[:1], -jnp.log(count), dtype=jnp.float32)
    return reweight(uniform, log_potentials, axis_name)


def reweight(
    log_weights: Array, log_increments: Array, axis_name: str | None = None
) -> WeightUpdate:
    """Multiply normalised weights by incremental weights and normalise (see module doc)."""
    unnormalised = log_weights + _sanitise(log_increments)
    total = log_sum_exp(unnormalised, axis_name)
    degenerate = ~jnp.isfinite(total)
    count = num_particles(log_weights, axis_name)
    uniform = jnp.full_like(log_weights, -jnp.log(count))
    safe_total = jnp.where(degenerate, 0.0, total)
    new_log_weights = jnp.where(degenerate, uniform, unnormalised - safe_total)
    increment = jnp.where(degenerate, -jnp.inf, total)
    return WeightUpdate(new_log_weights, increment, degenerate)


class ResampleResult(NamedTuple):
    """Result of :func:`maybe_resample`.

    ancestors
        ``(N,)`` index of each new particle's parent (``arange(N)`` when not resampled).
    log_weights
        Log-weights after the decision (uniform if resampled).
    resampled
        Whether resampling happened.
    ess
        Effective sample size of the weights on which the decision was made.
    """

    ancestors: Array
    log_weights: Array
    resampled: Array
    ess: Array


def maybe_resample(
    rng_key: PRNGKey,
    log_weights: Array,
    ess_threshold: float,
    resample_fn: Callable = resampling.systematic,
    *,
    allowed: Array | None = None,
    axis_name: str | None = None,
) -> ResampleResult:
    """Resample when ``ESS / N < ess_threshold`` (1.0: every step; 0.0: never) and
    ``allowed`` (a boolean scalar; default always).

    Both branches are computed and selected with ``jnp.where`` so the function stays cheap
    under ``vmap`` over chains.
    """
    num_local = log_weights.shape[0]
    count = num_particles(log_weights, axis_name)
    current_ess = ess(log_weights, axis_name)
    if ess_threshold >= 1.0:
        resampled = jnp.array(True)
    elif ess_threshold <= 0.0:
        resampled = jnp.array(False)
    else:
        resampled = current_ess < ess_threshold * count
    identity = _local_indices(num_local, axis_name)
    if ess_threshold <= 0.0:
        return ResampleResult(identity, log_weights, resampled, current_ess)
    if allowed is not None:
        resampled = resampled & allowed
    if axis_name is None:
        weights = jnp.exp(log_weights - logsumexp(log_weights))
        drawn = resample_fn(rng_key, weights, count)
    else:
        every = jax.lax.all_gather(log_weights, axis_name, axis=0, tiled=True)
        weights = jnp.exp(every - log_sum_exp(every))
        # every block draws the same global ancestors and keeps its own slice
        drawn = jax.lax.dynamic_slice_in_dim(
            resample_fn(rng_key, weights, count), identity[0], num_local
        )
    ancestors = jnp.where(resampled, drawn, identity)
    uniform = jnp.full_like(log_weights, -jnp.log(count))
    new_log_weights = jnp.where(resampled, uniform, log_weights)
    return ResampleResult(ancestors, new_log_weights, resampled, current_ess)


# -- the step ----------------------------------------------------------------------------------

#: ``propose_fn(rng_key, parents, carried) -> (proposals, aux)``: new particles from the
#: gathered parents (``(N, *event_shape)``) and their gathered per-particle ``carried`` tree;
#: ``aux`` is anything ``weight_fn`` needs.
ProposeFn = Callable[[PRNGKey, Array, ArrayTree], tuple[Array, ArrayTree]]
#: ``weight_fn(parents, carried, particles, aux) -> (log_increments, new_carried)``: the
#: ``(N,)`` incremental log-weights of the (finite) proposals, and the per-particle tree the
#: next step carries.
WeightFn = Callable[[Array, ArrayTree, Array, ArrayTree], tuple[Array, ArrayTree]]


class SMCStep(NamedTuple):
    """Result of :func:`step`: what the next state needs.

    particles
        ``(N, *event_shape)`` the proposals, each non-finite one replaced by its parent.
    log_weights
        ``(N,)`` normalised log-weights.
    log_evidence
        The running log-evidence with this step's increment added.
    carried
        The tree ``weight_fn`` returned.
    """

    particles: Array
    log_weights: Array
    log_evidence: Array
    carried: ArrayTree


def step(
    rng_key: PRNGKey,
    particles: Array,
    log_weights: Array,
    log_evidence: Array,
    propose_fn: ProposeFn,
    weight_fn: WeightFn,
    *,
    carried: ArrayTree = (),
    ess_threshold: float = 0.5,
    resample_fn: Callable = resampling.systematic,
    resample_allowed: Array | None = None,
    axis_name: str | None = None,
) -> tuple[SMCStep, SMCInfo]:
    r"""One SMC step (module docstring): resample if the ESS is low, gather the parents and
    their ``carried`` tree, propose, keep the proposals finite, weight, normalise.

    ``rng_key`` is split in two: the first key draws the ancestors, the second goes to
    ``propose_fn``. A proposal that is not finite is replaced by its parent and its
    incremental log-weight by :math:`-\infty` before :func:`reweight`. ``resample_allowed``
    (a boolean scalar) can forbid resampling at this step whatever the ESS.

    Examples
    --------
    A bootstrap filter step for a random walk observed through a Gaussian potential at 1:

    >>> import jax, jax.numpy as jnp
    >>> def propose(key, parents, carried):
    ...     return parents + jax.random.normal(key, parents.shape), None
    >>> def weight(parents, carried, particles, aux):
    ...     return -0.5 * (particles[:, 0] - 1.0) ** 2, carried
    >>> log_weights = jnp.full((8,), -jnp.log(8.0))
    >>> result, info = step(
    ...     jax.random.key(0), jnp.zeros((8, 1)), log_weights, jnp.zeros(()), propose, weight
    ... )
    >>> result.particles.shape, bool(info.resampled), int(info.num_nonfinite)
    ((8, 1), False, 0)
    """
    resample_key, propose_key = jax.random.split(rng_key)
    decision = maybe_resample(
        resample_key,
        log_weights,
        ess_threshold,
        resample_fn,
        allowed=resample_allowed,
        axis_name=axis_name,
    )
    state = (particles, carried)
    if ess_threshold <= 0.0:
        parents, parents_carried = state  # never resamples: every particle is its own parent
    elif axis_name is None or (ess_threshold >= 1.0 and resample_allowed is None):
        # the ancestors are the identity when the step keeps its particles, so one gather is
        # right either way; on one device it is cheaper than the branch below, which under
        # vmap over chains (the Sampler's chains) computes the gather and a select
        parents, parents_carried = gather(state, decision.ancestors, axis_name)
    else:
        # over devices a gather is an all-gather: a step that keeps its particles skips it
        parents, parents_carried = jax.lax.cond(
            decision.resampled,
            lambda: gather(state, decision.ancestors, axis_name),
            lambda: state,
        )
    proposals, aux = propose_fn(propose_key, parents, parents_carried)
    finite = base.replace_nonfinite(proposals, parents, axis_name)
    log_increments, new_carried = weight_fn(parents, parents_carried, finite.particles, aux)
    # a replaced particle is not a draw from the proposal: it must not count, whatever it scores
    log_increments = jnp.where(finite.is_finite, log_increments, -jnp.inf)
    update = reweight(decision.log_weights, log_increments, axis_name)
    result = SMCStep(
        finite.particles,
        update.log_weights,
        log_evidence + update.log_evidence_increment,
        new_carried,
    )
    info = SMCInfo(
        decision.ess,
        decision.resampled,
        decision.ancestors,
        update.log_weights,
        update.log_evidence_increment,
        update.degenerate,
        finite.num_nonfinite,
    )
    return result, info
