r"""Likelihood at the denoiser's estimate, and its gradient through the network: the quantity
that DPS steps along and that TDS and FK use as a twisting potential.

.. math::  \log \tilde p_t(y \mid x_t) = \log p(y \mid \hat x_0(x_t, t)),

with :math:`\hat x_0` from :class:`diffprior.Denoiser` (Tweedie). At ``t = 0`` the particle is
clean, so :math:`\hat x_0 = x_0` and the potential is the exact likelihood.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffprior.diffusion.denoiser import Denoiser
from diffprior.types import Array, ArrayLike

__all__ = ["Potential", "guided_log_ratio", "potential_and_grad", "potential_value", "TwistFn"]

#: ``twist_fn(x0_hat, t) -> log p~(y | x0_hat)`` (a scalar), for one particle.
TwistFn = Callable[[Array, Array], Array]

# times below this are treated as clean: the network is not trusted (or defined) at t = 0
_T_CLEAN = 1e-6


class Potential(NamedTuple):
    r"""Value and gradient of the potential at one particle.

    log_potential
        :math:`\log p(y \mid \hat x_0(x_t))`, ``-inf`` where not finite.
    grad
        Its gradient with respect to :math:`x_t` (zero where not finite).
    x0_hat
        The denoiser's estimate :math:`\hat x_0(x_t)` (:math:`x_t` itself at ``t = 0``).
    """

    log_potential: Array
    grad: Array
    x0_hat: Array


def potential_and_grad(
    denoiser: Denoiser, twist_fn: TwistFn, x_t: Array, t: ArrayLike
) -> Potential:
    r"""One network value-and-gradient: :math:`\log p(y \mid \hat x_0(x_t))` and
    :math:`\nabla_{x_t}` of it, for one particle."""
    t = jnp.asarray(t, dtype=jnp.float32)
    clean = t <= _T_CLEAN

    def fn(x):
        x0_net = denoiser.x0(x, jnp.maximum(t, _T_CLEAN))
        x0_hat = jnp.where(clean, x, x0_net)
        return twist_fn(x0_hat, t), x0_hat

    (value, x0_hat), grad = jax.value_and_grad(fn, has_aux=True)(x_t)
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))
    value = jnp.where(jnp.isfinite(value), value, -jnp.inf)
    grad = jnp.where(finite, grad, 0.0)
    return Potential(value, grad, x0_hat)


def potential_value(denoiser: Denoiser, twist_fn: TwistFn, x_t: Array, t: ArrayLike) -> Potential:
    """As :func:`potential_and_grad` without the gradient (one forward pass; ``grad`` is
    zero), for methods whose proposal does not use it."""
    t = jnp.asarray(t, dtype=jnp.float32)
    clean = t <= _T_CLEAN
    x0_hat = jnp.where(clean, x_t, denoiser.x0(x_t, jnp.maximum(t, _T_CLEAN)))
    value = twist_fn(x0_hat, t)
    value = jnp.where(jnp.isfinite(value), value, -jnp.inf)
    return Potential(value, jnp.zeros_like(x_t), x0_hat)


def guided_log_ratio(shift: Array, noise: Array, variance: Array) -> Array:
    r""":math:`\log N(x_s; m, v) - \log N(x_s; m + \delta, v)` for one particle proposed as
    :math:`x_s = m + \delta + \sqrt{v}\, z`, written without the cancelling squares for float32
    accuracy: :math:`-(\lVert\delta\rVert^2 + 2 \sqrt{v}\, \delta \cdot z) / (2 v)`. The prior
    step over the guided step, the weight factor of every guided SMC proposal (FK, TDS, CSMC);
    ``variance`` must be positive (a deterministic step has no guided proposal)."""
    return -(jnp.sum(shift**2) + 2.0 * jnp.sqrt(variance) * jnp.sum(shift * noise)) / (
        2.0 * variance
    )
