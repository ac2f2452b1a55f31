r"""DiffPIR: denoising diffusion models for plug-and-play image restoration (Zhu, Zhang, Liang,
Cao, Wen, Timofte & Van Gool, CVPRW 2023, arXiv 2305.08995, Algorithm 1).

Each step alternates the denoiser and a data-consistency (proximal) step,

.. math::
    \hat x_0^* = \arg\min_x\; -\log p(y \mid x) + \frac{\rho_t}{2}\lVert x - \hat x_0
    \rVert^2, \qquad \rho_t = \lambda / \bar\sigma_t^2, \quad \bar\sigma_t = \sigma_t/\alpha_t,

(for Gaussian noise this is the paper's :math:`\lVert y - A x\rVert^2 + \lambda \sigma_y^2 /
\bar\sigma_t^2 \lVert x - \hat x_0 \rVert^2`), then moves to :math:`s < t` mixing the
implied noise with fresh noise:

.. math::
    x_s = \alpha_s \hat x_0^* + \sigma_s\big(\sqrt{1 - \zeta}\, \hat\varepsilon^* +
    \sqrt{\zeta}\, z\big), \qquad \hat\varepsilon^* = (x_t - \alpha_t \hat x_0^*)/\sigma_t.

The proximal step is a function passed in (``proximal_fn(x0_hat, rho)``): closed form in the
SVD for linear Gaussian problems, a few gradient steps otherwise (see
:class:`diffprior.DiffPIR`). Approximate: particles are independent, with equal weights.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> prox = lambda x0, rho: x0.at[0].set((4.0 * 1.0 + rho * x0[0]) / (4.0 + rho))
>>> algo = dp.kernels.diffpir.as_top_level_api(gmm.denoiser, prox, gmm.timesteps(10))
>>> state = algo.init(jax.random.normal(jax.random.key(0), (8, 2)))
>>> state, info = algo.step(jax.random.key(1), state)
>>> state.particles.shape
(8, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.kernels import base
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["DiffPIRState", "DiffPIRInfo", "init", "build_kernel", "as_top_level_api"]

#: ``proximal_fn(x0_hat, rho) -> argmin_x -log p(y | x) + rho/2 ||x - x0_hat||^2``.
ProximalFn = Callable[[Array, Array], Array]

#: The shared :class:`diffprior.kernels.base.ParticleState`: particles ``(N, *event_shape)``
#: at ``timesteps[step]``.
DiffPIRState = base.ParticleState


class DiffPIRInfo(NamedTuple):
    r"""x0_star: the data-consistent estimates; rho: the proximal weight :math:`\rho_t`;
    num_nonfinite: the particles whose step was not finite, a failed proximal step included
    (kept in place, :mod:`diffprior.kernels.base`)."""

    x0_star: Array
    rho: Array
    num_nonfinite: Array


init = base.init


def build_kernel(
    denoiser: Denoiser,
    proximal_fn: ProximalFn,
    timesteps: Array,
    *,
    lam: ArrayLike = 7.0,
    zeta: ArrayLike = 0.3,
) -> Callable[[PRNGKey, DiffPIRState], tuple[DiffPIRState, DiffPIRInfo]]:
    """Build the DiffPIR step (options as in :func:`as_top_level_api`)."""
    schedule = denoiser.schedule

    def particle_step(key, x_t, times):
        t, s = times.t, times.s
        x0_hat = denoiser.x0(x_t, t)
        alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
        rho = lam * (alpha_t / sigma_t) ** 2
        x0_star = proximal_fn(x0_hat, rho)
        eps_star = (x_t - alpha_t * x0_star) / sigma_t
        noise = jax.random.normal(key, x_t.shape)
        mixed = jnp.sqrt(1.0 - zeta) * eps_star + jnp.sqrt(zeta) * noise
        x_s = schedule.alpha(s) * x0_star + schedule.sigma(s) * mixed
        return x_s, (x0_star, rho)

    def make_info(outputs, times, num_nonfinite):
        x0_star, rho = outputs
        return DiffPIRInfo(x0_star, rho[0], num_nonfinite)

    return base.from_particle_step(particle_step, timesteps, make_info).step


def as_top_level_api(
    denoiser: Denoiser,
    proximal_fn: ProximalFn,
    timesteps: Array,
    *,
    lam: ArrayLike = 7.0,
    zeta: ArrayLike = 0.3,
) -> SamplingAlgorithm:
    r"""DiffPIR as a ``SamplingAlgorithm(init, step)``; ``lam`` and ``zeta`` are the paper's
    :math:`\lambda` and :math:`\zeta`."""
    return SamplingAlgorithm(
        init, build_kernel(denoiser, proximal_fn, timesteps, lam=lam, zeta=zeta)
    )
