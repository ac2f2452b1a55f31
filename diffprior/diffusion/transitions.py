r"""The reverse transition shared by every sampler: one DDPM/DDIM step from ``t`` to ``s < t``.

Given :math:`\hat x_0` at :math:`(x_t, t)` and :math:`\hat\varepsilon = (x_t - \alpha_t \hat
x_0)/\sigma_t`, the step of Song et al. (DDIM, 2021, eq. 12) is

.. math::
    x_s \sim N\big(\alpha_s \hat x_0 + \sqrt{\sigma_s^2 - c^2}\, \hat\varepsilon,\; c^2 I\big),
    \qquad c^2 = \eta^2\, \tilde\sigma^2_{s|t},
    \qquad \tilde\sigma^2_{s|t} = \frac{\sigma_s^2}{\sigma_t^2}\Big(\sigma_t^2 -
    \frac{\alpha_t^2}{\alpha_s^2}\sigma_s^2\Big).

``eta = 1`` is DDPM's ancestral step (the mean equals the DDPM posterior mean of
:math:`q(x_s \mid x_t, \hat x_0)`), ``eta = 0`` the deterministic DDIM step. The mean is affine in
:math:`\hat x_0` at fixed :math:`x_t`; guidance enters by shifting :math:`\hat x_0` (see
:func:`guided_x0`), so every method uses this one formula.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffprior.diffusion.schedules import Schedule
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "Transition",
    "reverse_transition",
    "guided_x0",
    "transition_x0_coefficient",
    "sample_transition",
    "transition_log_prob",
    "tweedie_variance",
]


class Transition(NamedTuple):
    r"""A Gaussian reverse transition :math:`N(\text{mean}, \text{variance}\, I)`.

    mean
        Shaped like ``x_t``.
    variance
        A scalar (isotropic); zero for the deterministic DDIM step.
    """

    mean: Array
    variance: Array


def _coefficients(
    schedule: Schedule, t: ArrayLike, s: ArrayLike, eta: ArrayLike, data_variance: ArrayLike
):
    alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
    alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
    # sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2, the forward noise from s to t
    sigma_ts_sq = jnp.maximum(sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2, 0.0)
    posterior_var = sigma_s**2 * sigma_ts_sq / sigma_t**2
    noise_var = jnp.asarray(eta, dtype=jnp.float32) ** 2 * posterior_var
    eps_coef = jnp.sqrt(jnp.maximum(sigma_s**2 - noise_var, 0.0))
    # the mean is affine in x0_hat; the spread of x0 around x0_hat adds x0_coef^2 Var[x0 | x_t]
    x0_coef = alpha_s - eps_coef * alpha_t / sigma_t
    variance = noise_var + x0_coef**2 * tweedie_variance(schedule, t, data_variance)
    return alpha_t, sigma_t, alpha_s, eps_coef, variance


def transition_x0_coefficient(
    schedule: Schedule, t: ArrayLike, s: ArrayLike, eta: ArrayLike = 1.0
) -> Array:
    """The coefficient of ``x0_hat`` in the mean of :func:`reverse_transition` (the mean is
    affine in ``x0_hat``): a change ``delta`` of ``x0_hat`` moves the mean by this times
    ``delta``, which is how FK and TDS make their guided step.

    Examples
    --------
    >>> import diffprior as dp
    >>> sched = dp.schedules.VP.linear()
    >>> a = dp.diffusion.transitions.reverse_transition(sched, 0.3, 1.0, 0.5, 0.4).mean
    >>> b = dp.diffusion.transitions.reverse_transition(sched, 0.3, 0.0, 0.5, 0.4).mean
    >>> c = dp.diffusion.transitions.transition_x0_coefficient(sched, 0.5, 0.4)
    >>> bool(abs((a - b) - c) < 1e-6)
    True
    """
    alpha_t, sigma_t, alpha_s, eps_coef, _ = _coefficients(schedule, t, s, eta, 0.0)
    return alpha_s - eps_coef * alpha_t / sigma_t


def tweedie_variance(schedule: Schedule, t: ArrayLike, data_variance: ArrayLike) -> Array:
    r""":math:`\mathrm{Var}[x_0 \mid x_t] = v \sigma_t^2 / (\alpha_t^2 v + \sigma_t^2)` per
    coordinate for data :math:`N(m, v I)`; zero when ``data_variance`` is zero."""
    alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
    v = jnp.asarray(data_variance, dtype=jnp.float32)
    denom = alpha_t**2 * v + sigma_t**2
    return jnp.where(v > 0, v * sigma_t**2 / jnp.where(denom > 0, denom, 1.0), 0.0)


def reverse_transition(
    schedule: Schedule,
    x_t: Array,
    x0_hat: Array,
    t: ArrayLike,
    s: ArrayLike,
    eta: ArrayLike = 1.0,
    data_variance: ArrayLike = 0.0,
) -> Transition:
    r"""Mean and variance of the step from ``x_t`` at ``t`` to ``s < t`` given ``x0_hat``.

    ``data_variance`` :math:`v > 0` adds back the spread of :math:`x_0` around
    :math:`\hat x_0` that the step ignores: the variance becomes :math:`c^2 + b^2
    \mathrm{Var}[x_0 \mid x_t]`, with :math:`b` the coefficient of :math:`\hat x_0` in the
    mean and the variance of :func:`tweedie_variance`. For data :math:`N(m, v I)` the step is
    then the exact reverse conditional at any step size; for data made of well separated
    components of variance :math:`v` it removes most of the discretisation error at low
    noise. ``0`` (the default) is the usual DDPM/DDIM step.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import diffprior as dp
    >>> sched = dp.schedules.VP.linear()
    >>> tr = dp.diffusion.reverse_transition(sched, jnp.zeros(2), jnp.ones(2), 0.5, 0.0)
    >>> tr.mean.tolist(), float(tr.variance)
    ([1.0, 1.0], 0.0)
    """
    alpha_t, sigma_t, alpha_s, eps_coef, variance = _coefficients(
        schedule, t, s, eta, data_variance
    )
    eps_hat = (x_t - alpha_t * x0_hat) / sigma_t
    mean = alpha_s * x0_hat + eps_coef * eps_hat
    return Transition(mean=mean, variance=variance)


def guided_x0(schedule: Schedule, x0_hat: Array, guidance: Array, t: ArrayLike) -> Array:
    r""":math:`\hat x_0` after adding ``guidance`` :math:`g` to the score at time ``t``.

    By Tweedie, :math:`\hat x_0 = (x_t + \sigma_t^2 \nabla \log p_t(x_t)) / \alpha_t`, so a
    score :math:`\nabla \log p_t + g` gives :math:`\hat x_0 + \sigma_t^2 g / \alpha_t`. Feeding
    the result to :func:`reverse_transition` is the conditional (guided) step of TDS and FK.
    """
    t = jnp.asarray(t, dtype=jnp.float32)
    return x0_hat + (schedule.sigma(t) ** 2 / schedule.alpha(t)) * guidance


def sample_transition(rng_key: PRNGKey, transition: Transition) -> Array:
    """Draw from the transition (returns the mean when the variance is zero)."""
    noise = jax.random.normal(rng_key, jnp.shape(transition.mean), jnp.result_type(transition.mean))
    return transition.mean + jnp.sqrt(transition.variance) * noise


def transition_log_prob(transition: Transition, x_s: Array) -> Array:
    """Log density of ``x_s`` under the transition, summed over all axes of ``x_s``."""
    diff = x_s - transition.mean
    dim = diff.size
    return -0.5 * (
        jnp.sum(diff**2) / transition.variance + dim * jnp.log(2 * jnp.pi * transition.variance)
    )
