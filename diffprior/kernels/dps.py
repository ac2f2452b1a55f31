r"""Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky & Ye, ICLR 2023, arXiv 2209.14687,
Algorithm 1).

Each particle takes the unguided reverse step from :math:`x_t` and then a gradient step on the
likelihood at the denoiser's estimate, differentiated through the network:

.. math::
    x_s = \mu(x_t, \hat x_0) + c\, z + \zeta_t \nabla_{x_t} \log p(y \mid \hat x_0(x_t)).

With ``normalize=True`` (the default) the step is the paper's for Gaussian noise,
:math:`-\zeta\, \nabla_{x_t} \lVert y - A(\hat x_0) \rVert^2 / \lVert y - A(\hat x_0)
\rVert`, the norm taken per particle (``residual_fn`` gives :math:`y - A(\hat x_0)`); it uses
the observation's mean only, so the noise model does not enter. ``normalize=False`` steps along
the gradient of whatever likelihood the model has (Gaussian, Student-t, Poisson, ...).
DPS is approximate: particles are independent, with equal weights.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> loglik = lambda x: -0.5 * ((x[0] - 1.0) / 0.5) ** 2
>>> algo = dp.kernels.dps.as_top_level_api(
...     gmm.denoiser, loglik, gmm.timesteps(10), scale=0.1, normalize=False
... )
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
from diffprior.diffusion.transitions import sample_transition
from diffprior.kernels import base
from diffprior.kernels.guidance import potential_and_grad
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["DPSState", "DPSInfo", "init", "build_kernel", "as_top_level_api"]

#: The shared :class:`diffprior.kernels.base.ParticleState`: particles ``(N, *event_shape)``
#: at ``timesteps[step]``.
DPSState = base.ParticleState


class DPSInfo(NamedTuple):
    r"""log_likelihood: :math:`\log p(y \mid \hat x_0)` per particle before the step;
    step_size: the guidance step :math:`\zeta_t` per particle; num_nonfinite: the particles
    whose step was not finite (kept in place, :mod:`diffprior.kernels.base`)."""

    log_likelihood: Array
    step_size: Array
    num_nonfinite: Array


init = base.init


def build_kernel(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    scale: ArrayLike = 1.0,
    normalize: bool = True,
    residual_fn: Callable[[Array], Array] | None = None,
    eta: ArrayLike = 1.0,
) -> Callable[[PRNGKey, DPSState], tuple[DPSState, DPSInfo]]:
    """Build the DPS step (options as in :func:`as_top_level_api`)."""
    if normalize and residual_fn is None:
        raise ValueError(
            "DPS: normalize=True (the default, the paper's step) needs residual_fn(x0) = "
            "y - A(x0); pass residual_fn, or normalize=False to step along log_likelihood_fn"
        )

    def objective(x0_hat, t):
        if normalize:
            residual = residual_fn(x0_hat)
            return -jnp.sum(residual**2)
        return log_likelihood_fn(x0_hat)

    def particle_step(key, x_t, times):
        t, s = times.t, times.s
        potential = potential_and_grad(denoiser, objective, x_t, t)
        transition = denoiser.transition(x_t, potential.x0_hat, t, s, eta)
        if normalize:
            norm = jnp.sqrt(-potential.log_potential)
            step_size = scale / jnp.maximum(norm, 1e-12)
        else:
            step_size = jnp.asarray(scale, dtype=jnp.float32)
        x_s = sample_transition(key, transition) + step_size * potential.grad
        return x_s, (log_likelihood_fn(potential.x0_hat), step_size)

    def make_info(outputs, times, num_nonfinite):
        log_likelihood, step_size = outputs
        return DPSInfo(log_likelihood, step_size, num_nonfinite)

    return base.from_particle_step(particle_step, timesteps, make_info).step


def as_top_level_api(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    scale: ArrayLike = 1.0,
    normalize: bool = True,
    residual_fn: Callable[[Array], Array] | None = None,
    eta: ArrayLike = 1.0,
) -> SamplingAlgorithm:
    r"""DPS as a ``SamplingAlgorithm(init, step)``; see the module docstring.

    Parameters
    ----------
    denoiser
        The prior's denoiser.
    log_likelihood_fn
        :math:`\log p(y \mid x)` for one clean particle (reported in Info; the step follows
        its gradient when ``normalize=False``).
    timesteps
        Decreasing times ending at 0.
    scale
        The step :math:`\zeta` (the paper's :math:`\zeta'` when ``normalize=True``).
    normalize
        The paper's step on the squared residual, divided by its norm (default, as
        :class:`diffprior.DPS`); needs ``residual_fn(x0) = y - A(x0)``. ``False`` steps along
        the gradient of ``log_likelihood_fn``.
    eta
        DDIM stochasticity of the underlying reverse step.
    """
    kernel = build_kernel(
        denoiser,
        log_likelihood_fn,
        timesteps,
        scale=scale,
        normalize=normalize,
        residual_fn=residual_fn,
        eta=eta,
    )
    return SamplingAlgorithm(init, kernel)
