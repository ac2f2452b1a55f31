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

from diffprior.types import Array, ArrayTree, PRNGKey

__all__ = [
    "RESAMPLING_SCHEMES",
    "resampling_fn",
    "SMCInfo",
    "WeightUpdate",
    "ResampleResult",
    "initial_weights",
    "reweight",
    "maybe_resample",
    "ess",
    "gather",
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


def ess(log_weights: Array) -> Array:
    """Effective sample size of (possibly unnormalised) log-weights (BlackJAX's)."""
    return blackjax_ess(log_weights)


class SMCInfo(NamedTuple):
    """Diagnostics of one SMC step, shared by the SMC kernels: ``ess`` (of the weights the
    resampling decision used), ``resampled``, ``ancestors``, ``log_weights`` (after the step),
    ``log_evidence_increment`` and ``degenerate`` (every particle got weight zero)."""

    ess: Array
    resampled: Array
    ancestors: Array
    log_weights: Array
    log_evidence_increment: Array
    degenerate: Array


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


def initial_weights(log_potentials: Array) -> WeightUpdate:
    """Weights of ``N`` particles drawn from the reference and weighted by a first potential."""
    num_particles = log_potentials.shape[0]
    uniform = jnp.full((num_particles,), -jnp.log(num_particles), dtype=jnp.float32)
    return reweight(uniform, log_potentials)


def reweight(log_weights: Array, log_increments: Array) -> WeightUpdate:
    """Multiply normalised weights by incremental weights and normalise (see module doc)."""
    unnormalised = log_weights + _sanitise(log_increments)
    total = logsumexp(unnormalised)
    degenerate = ~jnp.isfinite(total)
    num_particles = log_weights.shape[0]
    uniform = jnp.full_like(log_weights, -jnp.log(num_particles))
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
) -> ResampleResult:
    """Resample when ``ESS / N < ess_threshold`` (1.0: every step; 0.0: never).

    Both branches are computed and selected with ``jnp.where`` so the function stays cheap
    under ``vmap`` over chains.
    """
    num_particles = log_weights.shape[0]
    current_ess = ess(log_weights)
    if ess_threshold >= 1.0:
        resampled = jnp.array(True)
    elif ess_threshold <= 0.0:
        resampled = jnp.array(False)
    else:
        resampled = current_ess < ess_threshold * num_particles
    identity = jnp.arange(num_particles)
    if ess_threshold <= 0.0:
        return ResampleResult(identity, log_weights, resampled, current_ess)
    weights = jnp.exp(log_weights - logsumexp(log_weights))
    drawn = resample_fn(rng_key, weights, num_particles)
    ancestors = jnp.where(resampled, drawn, identity)
    uniform = jnp.full_like(log_weights, -jnp.log(num_particles))
    new_log_weights = jnp.where(resampled, uniform, log_weights)
    return ResampleResult(ancestors, new_log_weights, resampled, current_ess)


def gather(tree: ArrayTree, ancestors: Array) -> ArrayTree:
    """Select particles (leading axis) of every leaf of ``tree`` by ``ancestors``."""
    return jax.tree.map(lambda leaf: jnp.take(leaf, ancestors, axis=0), tree)
