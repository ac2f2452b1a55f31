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
from diffprior.linear_gaussian import WhitenedSVD
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "DiffPIRState",
    "DiffPIRInfo",
    "init",
    "build_kernel",
    "as_top_level_api",
    "svd_proximal",
    "gradient_proximal",
    "from_linear_gaussian",
]

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


def svd_proximal(svd: WhitenedSVD) -> ProximalFn:
    r"""The data step in closed form for a linear Gaussian observation, in its whitened SVD:
    along each right direction :math:`(V^T x^*)_i = (s_i (U^T \tilde y)_i + \rho (V^T \hat
    x_0)_i) / (s_i^2 + \rho)`, unchanged off the observed directions. One :math:`V^T` and one
    :math:`V` per particle (FFTs for a blur, gathers for inpainting)."""
    s = svd.singular
    data_term = s * svd.coords_y

    def proximal_fn(x0_hat, rho):
        coords = svd.V_T(x0_hat)
        solved = (data_term + rho * coords) / (s**2 + rho)
        return x0_hat + svd.V(jnp.where(svd.observed, solved - coords, 0.0)).reshape(x0_hat.shape)

    return proximal_fn


def gradient_proximal(
    log_likelihood_fn: Callable[[Array], Array], curvature: ArrayLike, num_steps: int = 10
) -> ProximalFn:
    r"""The data step for any differentiable likelihood: ``num_steps`` gradient steps on
    :math:`\log p(y \mid x) - \frac{\rho}{2}\lVert x - \hat x_0\rVert^2` from
    :math:`\hat x_0`, of length :math:`1/(\rho + L)` with ``curvature`` :math:`L` a bound on
    the likelihood's curvature (:math:`\max_i \sum_j J_{ij}^2/\sigma_i^2` for Gaussian
    noise)."""
    grad_fn = jax.grad(log_likelihood_fn)

    def proximal_fn(x0_hat, rho):
        step = 1.0 / (rho + curvature)

        def body(_, x):
            return x + step * (grad_fn(x) - rho * (x - x0_hat))

        return jax.lax.fori_loop(0, num_steps, body, x0_hat)

    return proximal_fn


def from_linear_gaussian(
    denoiser: Denoiser,
    svd: WhitenedSVD,
    timesteps: Array,
    *,
    lam: ArrayLike = 7.0,
    zeta: ArrayLike = 0.3,
) -> SamplingAlgorithm:
    """DiffPIR for a linear Gaussian observation given as its whitened SVD: the closed-form
    :func:`svd_proximal` in :func:`as_top_level_api`.

    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> from diffprior.linear_gaussian import from_operator
    >>> gmm = dp.GaussianMixture(jnp.zeros((1, 4)), jnp.ones(1))
    >>> A = dp.operators.Inpaint(jnp.array([True, True, False, False]))
    >>> svd = from_operator(A, scale=0.05, y=jnp.array([1.0, -1.0]))
    >>> algo = dp.kernels.diffpir.from_linear_gaussian(gmm.denoiser, svd, gmm.timesteps(20))
    >>> state = algo.init(jax.random.normal(jax.random.key(0), (8, 4)))
    >>> for key in jax.random.split(jax.random.key(1), 20):
    ...     state, info = algo.step(key, state)
    >>> bool(jnp.allclose(state.particles[:, :2].mean(0), jnp.array([1.0, -1.0]), atol=0.1))
    True
    """
    return as_top_level_api(denoiser, svd_proximal(svd), timesteps, lam=lam, zeta=zeta)
