r"""Twisted Diffusion Sampler (Wu, Trippe, Naesseth, Blei & Cunningham, NeurIPS 2023,
arXiv 2306.17775, Algorithm 1).

Sequential Monte Carlo on the reverse diffusion path with twisting potentials
:math:`\tilde p_t(y \mid x_t) = p(y \mid \hat x_0(x_t))`. From :math:`x_t` each particle is
proposed by the guided transition (the reverse step with score
:math:`\nabla \log p_t + \nabla \log \tilde p_t(y \mid x_t)`, see
:func:`diffprior.diffusion.guided_x0`) and weighted by

.. math::
    w = \frac{p(x_s \mid x_t)\, \tilde p_s(y \mid x_s)}{q(x_s \mid x_t, y)\,
    \tilde p_t(y \mid x_t)},

with :math:`\tilde p_0(y \mid x_0) = p(y \mid x_0)` exactly at the last step; the first
weight is :math:`\tilde p_{t_{max}}(y \mid x_{t_{max}})`. The product of the normalising
constants estimates :math:`p(y)` under the discretised prior (see :mod:`diffprior.kernels.smc`).
Each step costs one network value-and-gradient per particle, cached in the state.

TDS is Feynman-Kac steering with the ``"difference"`` potential, the guided proposal and
:math:`\lambda = 1` (:mod:`diffprior.kernels.fk`), and is built from it: the two cannot drift
apart.

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

from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.kernels import fk, smc
from diffprior.kernels.guidance import TwistFn
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["TDSState", "TDSInfo", "init", "build_kernel", "as_top_level_api"]

#: TDS's state is FK's (:class:`diffprior.kernels.fk.FKState`): particles, normalised
#: log-weights, the running log-evidence, the step index and the cached twist value, gradient
#: and :math:`\hat x_0` at the particles.
TDSState = fk.FKState
#: Per-step diagnostics (:class:`diffprior.kernels.fk.FKInfo`): ESS, whether it resampled,
#: ancestors, log-weights, the log-evidence increment, degeneracy and non-finite proposals.
TDSInfo = fk.FKInfo


def init(
    particles: Array,
    denoiser: Denoiser,
    twist_fn: TwistFn,
    timesteps: Array,
    *,
    axis_name: str | None = None,
) -> TDSState:
    """Weight particles drawn from the reference at ``timesteps[0]`` by the first twist
    (``axis_name``: see :func:`diffprior.kernels.fk.build_kernel`)."""
    return fk.init(
        particles,
        denoiser,
        twist_fn,
        timesteps,
        lam=1.0,
        proposal="guided",
        axis_name=axis_name,
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
    any value keeps the sampler exact; ``eta`` is the DDIM stochasticity of the transition.
    The step takes FK's ``axis_name`` keyword (:func:`diffprior.kernels.fk.build_kernel`)."""
    return fk.build_kernel(
        denoiser,
        twist_fn,
        timesteps,
        potential="difference",
        proposal="guided",
        lam=1.0,
        eta=eta,
        scale=scale,
        ess_threshold=ess_threshold,
        resample_fn=resample_fn,
    )


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
    r"""TDS as a ``SamplingAlgorithm(init, step)``.

    ``init`` and ``step`` take an ``axis_name`` keyword for particles split over devices
    (:func:`diffprior.kernels.fk.build_kernel`).

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
        ``log_likelihood_fn(x0_hat)`` (the paper's). It must equal the likelihood at ``t = 0``.
        Widening a Gaussian likelihood by :math:`\mathrm{Var}[A x_0 \mid x_t]` (as
        :class:`diffprior.TDS` does from a model) keeps the weights far less variable when the
        observation is informative.
    eta, scale, ess_threshold, resampling
        See :func:`build_kernel`; ``resampling`` names a :mod:`blackjax.smc.resampling`
        scheme.
    """
    if twist_fn is None:

        def twist_fn(x0_hat, t):
            return log_likelihood_fn(x0_hat)

    return fk.as_top_level_api(
        denoiser,
        twist_fn,
        timesteps,
        potential="difference",
        proposal="guided",
        lam=1.0,
        eta=eta,
        scale=scale,
        ess_threshold=ess_threshold,
        resampling=resampling,
    )
