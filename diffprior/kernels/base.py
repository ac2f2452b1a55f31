r"""What every kernel shares: the contract with :class:`diffprior.Sampler`, the particle state
of the kernels that move each particle on its own, the builder of those kernels, and the one
rule for particles whose proposal is not finite.

Kernel protocol
---------------
Each module of :mod:`diffprior.kernels` follows BlackJAX: ``as_top_level_api(...)`` returns a
``blackjax.base.SamplingAlgorithm(init, step)``; ``state = init(particles)`` with particles of
shape ``(N, *event_shape)``; ``state, info = step(rng_key, state)`` moves every particle from
``timesteps[state.step]`` to ``timesteps[state.step + 1]``. State and Info are NamedTuples. A
driver (the :class:`diffprior.Sampler`) may rely on these fields and on no others:

================  ============================  ==================================================
where             field                         meaning
================  ============================  ==================================================
State             ``particles``                 ``(N, *event_shape)``, finite
State             ``step``                      index of the current time in the grid
State (SMC)       ``log_weights``               ``(N,)``, normalised (their log-sum-exp is 0)
State (SMC)       ``log_evidence``              running :math:`\log \hat Z`, a scalar
Info              ``num_nonfinite``             particles whose proposal was not finite at this
                                                step (replaced, see below), an int32 scalar
Info (SMC)        ``ess``                       effective sample size of the weights on which
                                                the resampling decision was made
Info (SMC)        ``resampled``                 whether the step resampled, a bool scalar
Info (SMC)        ``log_evidence_increment``    what this step added to ``log_evidence``
Info (SMC)        ``degenerate``                every particle got weight zero at this step
================  ============================  ==================================================

"SMC" are the kernels that weight their particles (:mod:`~diffprior.kernels.tds`,
:mod:`~diffprior.kernels.fk`, :mod:`~diffprior.kernels.mcgdiff`, whose Info is
:class:`diffprior.kernels.smc.SMCInfo`); the others treat particles as independent draws with
equal weights. :class:`KernelState`, :class:`SMCKernelState`, :class:`KernelInfo` and
:class:`SMCKernelInfo` state the same contract as typing protocols, and :data:`INFO_FIELDS`
and :data:`SMC_INFO_FIELDS` name the per-step Info scalars a driver keeps.

How the :class:`diffprior.Sampler` uses a kernel (what a new one must allow):

- it calls ``init(particles)`` with the particles of one chain drawn by the prior's
  ``sample_reference`` at ``timesteps[0]`` (no key), then ``step`` ``len(timesteps) - 1``
  times; the grid ends at exactly 0, so the particles of the last state are the draws;
- it maps ``init`` and ``step`` over chains (``jax.vmap`` or ``lax.map``) and scans ``step``
  over the grid inside one compiled program: both must be pure JAX functions, the state a
  pytree of fixed shapes;
- it keeps from each step's Info the fields :data:`INFO_FIELDS` (and :data:`SMC_INFO_FIELDS`
  for an SMC kernel), one scalar per chain, as the per-step ``sample_stats`` of ``to_arviz()``,
  and stops with a TypeError naming any that is missing; other Info fields are allowed and
  are not kept;
- for an SMC kernel (its method has ``is_smc = True``) it reads ``log_weights`` and
  ``log_evidence`` from the last state, resamples the particles to equal weights and reports
  the evidence; for the others it takes the particles as equally weighted draws;
- with ``shard_particles=True`` (SMC kernels only) it also passes the keyword ``axis_name`` to
  ``init`` and ``step``, which hand it to the particle-wide reductions of
  :mod:`diffprior.kernels.smc`.

:func:`from_particle_step` (for kernels that move each particle on its own) and
:func:`diffprior.kernels.smc.step` (one SMC step) build kernels that keep this contract and the
rule below; :doc:`/write_your_own_kernel` writes one of each and runs them with the Sampler.

Non-finite particles
--------------------
A proposal can fail: a network or likelihood that overflows in float32, a proximal step that
diverges. Every kernel passes its proposals through :func:`replace_nonfinite`, which keeps the
*previous particle* (the particle's parent, for SMC) in place of any proposal with a
non-finite coordinate, and counts them (``Info.num_nonfinite``). Why this rule:

- the previous particle is finite whenever the previous step's output was, so by induction
  from finite starting draws the rule never lets a NaN or an infinity through, without any
  further computation; the other candidates (the transition mean, the denoiser's
  :math:`\hat x_0`) come out of the very network evaluation that failed and may not be finite
  themselves, and zero is not a state of the chain (far from the data at small noise, and
  the same point for every failing particle);
- the whole particle is replaced, never coordinate by coordinate: a proposal with one bad
  coordinate is a draw from nothing, and splicing coordinates would make a point no step
  proposed;
- the SMC kernels also give such a particle weight zero (its incremental log-weight becomes
  :math:`-\infty`), so it leaves every estimate and is dropped at the next resampling; in the
  kernels with equal weights it stays where it was for one step. Either way the count is in
  Info, so a driver can tell the user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.types import Array, PRNGKey

__all__ = [
    "ParticleState",
    "StepTimes",
    "FiniteProposals",
    "KernelState",
    "SMCKernelState",
    "KernelInfo",
    "SMCKernelInfo",
    "INFO_FIELDS",
    "SMC_INFO_FIELDS",
    "init",
    "replace_nonfinite",
    "from_particle_step",
]

#: Per-step Info fields every kernel reports, each one scalar per chain: ``num_nonfinite``, the
#: int32 count of proposals that :func:`replace_nonfinite` replaced at the step. The
#: :class:`diffprior.Sampler` keeps these (and for SMC kernels :data:`SMC_INFO_FIELDS`) and no
#: other Info field, warns with the steps where the count is positive, and stops with a
#: TypeError naming a field that is missing (see the module docstring).
INFO_FIELDS = ("num_nonfinite",)
#: Per-step Info fields every SMC kernel reports besides :data:`INFO_FIELDS`, each one scalar
#: per chain: ``ess``, the effective sample size of the weights on which the resampling
#: decision was made; ``resampled``, whether the step resampled (bool); ``log_evidence_increment``,
#: what the step added to the state's ``log_evidence``; ``degenerate``, whether every particle
#: got weight zero (bool; the Sampler warns). :class:`diffprior.kernels.smc.SMCInfo`, which
#: :func:`diffprior.kernels.smc.step` returns, has them all.
SMC_INFO_FIELDS = ("ess", "resampled", "log_evidence_increment", "degenerate")


class KernelState(Protocol):
    """What a driver reads from any kernel's state."""

    particles: Array
    step: Array


class SMCKernelState(KernelState, Protocol):
    """What a driver reads from an SMC kernel's state, besides :class:`KernelState`."""

    log_weights: Array
    log_evidence: Array


class KernelInfo(Protocol):
    """What a driver reads from any kernel's per-step Info."""

    num_nonfinite: Array


class SMCKernelInfo(KernelInfo, Protocol):
    """What a driver reads from an SMC kernel's per-step Info, besides :class:`KernelInfo`."""

    ess: Array
    resampled: Array
    log_evidence_increment: Array
    degenerate: Array


class ParticleState(NamedTuple):
    """State of the kernels that move each particle on its own (unguided, DPS, PiGDM,
    DiffPIR, ReSample), and of any kernel built with :func:`from_particle_step`.

    It is all a :class:`KernelState` needs and nothing more: such a kernel has no weights (its
    method has ``is_smc = False``), and the driver takes its particles after the last step as
    equally weighted draws.

    particles
        ``(N, *event_shape)`` particles :math:`x_t` at ``t = timesteps[step]``; finite whenever
        the starting particles are (:func:`replace_nonfinite`).
    step
        Index of the current time in the grid, an int32 scalar (0 after :func:`init`).
    """

    particles: Array
    step: Array


class StepTimes(NamedTuple):
    """The step a kernel takes: ``index`` into the grid, from time ``t`` to time ``s < t``."""

    index: Array
    t: Array
    s: Array


class FiniteProposals(NamedTuple):
    """Result of :func:`replace_nonfinite`.

    particles
        ``(N, *event_shape)`` the proposals, each non-finite one replaced by its previous
        particle.
    is_finite
        ``(N,)`` whether the proposal was kept.
    num_nonfinite
        How many were replaced, an int32 scalar.
    """

    particles: Array
    is_finite: Array
    num_nonfinite: Array


def init(particles: Array, rng_key: PRNGKey | None = None) -> ParticleState:
    """The :class:`ParticleState` at the first time of the grid (``rng_key`` is unused; it is
    there for BlackJAX's ``init(position, rng_key)``)."""
    return ParticleState(particles, jnp.zeros((), jnp.int32))


def replace_nonfinite(
    proposals: Array, previous: Array, axis_name: str | None = None
) -> FiniteProposals:
    """Keep each particle of ``proposals`` whose coordinates are all finite; put the one of
    ``previous`` (same shape) in place of every other, and count them (module docstring).

    ``axis_name`` names a mapped axis over which the particles are split; the count is then
    the total over it.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> proposals = jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, jnp.inf]])
    >>> finite = replace_nonfinite(proposals, jnp.zeros((3, 2)) - 1.0)
    >>> finite.particles.tolist(), int(finite.num_nonfinite)
    ([[1.0, 2.0], [-1.0, -1.0], [-1.0, -1.0]], 2)
    """
    if proposals.shape != previous.shape:
        raise ValueError(
            f"replace_nonfinite: proposals and previous particles must have one shape, got "
            f"{proposals.shape} and {previous.shape}"
        )
    num_particles = proposals.shape[0]
    is_finite = jnp.all(jnp.isfinite(proposals.reshape((num_particles, -1))), axis=1)
    keep = is_finite.reshape((num_particles,) + (1,) * (proposals.ndim - 1))
    particles = jnp.where(keep, proposals, previous)
    num_nonfinite = jnp.sum(~is_finite, dtype=jnp.int32)
    if axis_name is not None:
        num_nonfinite = jax.lax.psum(num_nonfinite, axis_name)
    return FiniteProposals(particles, is_finite, num_nonfinite)


#: ``particle_step(rng_key, x_t, times) -> (x_s, outputs)`` for one particle; ``outputs`` is
#: any pytree (per-particle diagnostics, stacked over particles for ``make_info``).
ParticleStepFn = Callable[[PRNGKey, Array, StepTimes], tuple[Array, Any]]
#: ``make_info(outputs, times, num_nonfinite) -> Info`` with ``outputs`` stacked over particles.
MakeInfoFn = Callable[[Any, StepTimes, Array], Any]


def from_particle_step(
    particle_step: ParticleStepFn, timesteps: Array, make_info: MakeInfoFn
) -> SamplingAlgorithm:
    """A ``SamplingAlgorithm(init, step)`` that moves every particle on its own.

    ``step(rng_key, state)`` splits ``rng_key`` into one key per particle, maps
    ``particle_step`` over the particles (``jax.vmap``), passes the proposals through
    :func:`replace_nonfinite` and returns the next :class:`ParticleState` and
    ``make_info(outputs, times, num_nonfinite)``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> def shrink(key, x, times):  # a toy step: x_s = (s / t) x + noise, reporting |x|
    ...     noise = 0.1 * jax.random.normal(key, x.shape)
    ...     return times.s / times.t * x + noise, jnp.linalg.norm(x)
    >>> algo = from_particle_step(shrink, jnp.array([1.0, 0.5, 0.0]), lambda out, times, n: n)
    >>> state = algo.init(jnp.ones((4, 2)))
    >>> state, num_nonfinite = algo.step(jax.random.key(0), state)
    >>> state.particles.shape, int(state.step), int(num_nonfinite)
    ((4, 2), 1, 0)
    """
    step_all = jax.vmap(particle_step, in_axes=(0, 0, None))

    def step(rng_key: PRNGKey, state: ParticleState) -> tuple[ParticleState, Any]:
        times = StepTimes(state.step, timesteps[state.step], timesteps[state.step + 1])
        keys = jax.random.split(rng_key, state.particles.shape[0])
        proposals, outputs = step_all(keys, state.particles, times)
        finite = replace_nonfinite(proposals, state.particles)
        info = make_info(outputs, times, finite.num_nonfinite)
        return ParticleState(finite.particles, state.step + 1), info

    return SamplingAlgorithm(init, step)
