"""The shared reverse transition: DDPM's posterior at eta = 1, deterministic DDIM at eta = 0, and
the clean end of a VP schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffprior.diffusion import (
    Transition,
    guided_x0,
    reverse_transition,
    sample_transition,
    transition_log_prob,
)

PAIRS = [(0.9, 0.8), (0.5, 0.3), (0.2, 0.19), (0.05, 0.01)]


def _inputs(seed=0, dim=4):
    key_x, key_x0 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(key_x, (dim,)), 1.5 * jax.random.normal(key_x0, (dim,))


def ddpm_posterior(schedule, x_t, x0, t, s):
    """q(x_s | x_t, x_0) of the forward process, written out (Ho et al. 2020, eq. 6-7), in
    float64: with alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2
    sigma_s^2,
    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0,
    variance = sigma_{t|s}^2 sigma_s^2 / sigma_t^2."""
    alpha_t, sigma_t = float(schedule.alpha(t)), float(schedule.sigma(t))
    alpha_s, sigma_s = float(schedule.alpha(s)), float(schedule.sigma(s))
    alpha_ts = alpha_t / alpha_s
    sigma_ts_sq = sigma_t**2 - alpha_ts**2 * sigma_s**2
    x_t, x0 = np.asarray(x_t, np.float64), np.asarray(x0, np.float64)
    mean = alpha_ts * sigma_s**2 / sigma_t**2 * x_t + alpha_s * sigma_ts_sq / sigma_t**2 * x0
    return mean, sigma_ts_sq * sigma_s**2 / sigma_t**2


def _scaled(schedule, t, s):
    """Times as fractions of t_max, so that every schedule is exercised on its own range."""
    return np.float32(t * schedule.t_max), np.float32(s * schedule.t_max)


@pytest.mark.parametrize("t, s", PAIRS)
def test_eta_one_is_the_ddpm_posterior(schedule, t, s):
    t, s = _scaled(schedule, t, s)
    x_t, x0_hat = _inputs()
    transition = reverse_transition(schedule, x_t, x0_hat, t, s, eta=1.0)
    mean, variance = ddpm_posterior(schedule, x_t, x0_hat, t, s)
    size = np.max(np.abs(mean)) + 1.0
    np.testing.assert_allclose(transition.mean, mean, rtol=1e-4, atol=1e-5 * size)
    np.testing.assert_allclose(transition.variance, variance, rtol=1e-4)


@pytest.mark.parametrize("t, s", PAIRS)
def test_eta_zero_is_deterministic_ddim(schedule, t, s):
    t, s = _scaled(schedule, t, s)
    x_t, x0_hat = _inputs(1)
    transition = reverse_transition(schedule, x_t, x0_hat, t, s, eta=0.0)
    assert float(transition.variance) == 0.0
    # DDIM (Song et al. 2021, eq. 12 with sigma = 0): x_s = alpha_s x0_hat + sigma_s eps_hat
    eps_hat = (x_t - schedule.alpha(t) * x0_hat) / schedule.sigma(t)
    expected = schedule.alpha(s) * x0_hat + schedule.sigma(s) * eps_hat
    np.testing.assert_allclose(transition.mean, expected, rtol=1e-5, atol=1e-5)
    sample = sample_transition(jax.random.key(0), transition)
    np.testing.assert_array_equal(sample, transition.mean)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_intermediate_eta_interpolates_variance(schedule, eta):
    t, s = _scaled(schedule, 0.6, 0.4)
    x_t, x0_hat = _inputs(2)
    transition = reverse_transition(schedule, x_t, x0_hat, t, s, eta=eta)
    _, ddpm_variance = ddpm_posterior(schedule, x_t, x0_hat, t, s)
    np.testing.assert_allclose(transition.variance, eta**2 * ddpm_variance, rtol=1e-4)
    # every eta keeps the marginal noise level: eps coefficient^2 + variance = sigma_s^2
    eps_hat = (x_t - schedule.alpha(t) * x0_hat) / schedule.sigma(t)
    eps_coef = (transition.mean - schedule.alpha(s) * x0_hat) / eps_hat
    np.testing.assert_allclose(eps_coef**2 + transition.variance, schedule.sigma(s) ** 2, rtol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [1.0, 0.5, 0.01])
def test_vp_step_to_zero_returns_x0_hat(vp_schedule, eta, t):
    t = np.float32(t * vp_schedule.t_max)
    x_t, x0_hat = _inputs(3)
    transition = reverse_transition(vp_schedule, x_t, x0_hat, t, 0.0, eta=eta)
    np.testing.assert_allclose(transition.mean, x0_hat, rtol=1e-5, atol=1e-5)
    assert float(transition.variance) == 0.0


def test_sample_transition_moments():
    """Draws have the transition's mean and variance (4 standard errors, 20000 draws)."""
    mean, variance = jnp.array([1.0, -2.0, 0.5]), jnp.float32(0.3)
    draws = jax.vmap(lambda k: sample_transition(k, Transition(mean, variance)))(
        jax.random.split(jax.random.key(0), 20_000)
    )
    n = draws.shape[0]
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4 * np.sqrt(variance / n))
    # the sample variance has standard error sqrt(2 / (n - 1)) variance for Gaussian draws
    np.testing.assert_array_less(
        np.abs(draws.var(0, ddof=1) - variance), 4 * np.sqrt(2 / (n - 1)) * variance
    )


def test_transition_log_prob_is_isotropic_gaussian():
    mean, variance = jnp.array([1.0, -2.0, 0.5]), jnp.float32(0.3)
    x = jnp.array([0.2, -1.0, 1.5])
    expected = np.sum(-0.5 * (x - mean) ** 2 / variance - 0.5 * np.log(2 * np.pi * variance))
    np.testing.assert_allclose(
        transition_log_prob(Transition(mean, variance), x), expected, rtol=1e-6
    )


def test_guided_x0_adds_guidance_to_the_score(schedule):
    """By Tweedie, x0_hat = (x_t + sigma^2 score) / alpha, so score + g gives x0_hat + sigma^2 g
    / alpha."""
    t = np.float32(0.4 * schedule.t_max)
    x_t, x0_hat = _inputs(4)
    guidance = jnp.array([0.3, -0.1, 0.0, 2.0])
    score = (schedule.alpha(t) * x0_hat - x_t) / schedule.sigma(t) ** 2
    expected = (x_t + schedule.sigma(t) ** 2 * (score + guidance)) / schedule.alpha(t)
    np.testing.assert_allclose(
        guided_x0(schedule, x0_hat, guidance, t), expected, rtol=1e-4, atol=1e-4
    )
