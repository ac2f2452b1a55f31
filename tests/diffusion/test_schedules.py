"""Identities every noise schedule must satisfy, at a fixed random set of times plus the ends."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprior as dp


def random_times(schedule, num: int = 2000, seed: int = 0) -> np.ndarray:
    """Sorted uniform times on ``(0, t_max)`` (float32, distinct) with both ends appended."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, schedule.t_max, num)).astype(np.float32)
    return np.unique(np.concatenate([t, np.float32([0.0, schedule.t_max])]))


def test_alpha_sigma_positive_and_finite(schedule):
    t = random_times(schedule)[1:]  # t > 0
    alpha, sigma = np.asarray(schedule.alpha(t)), np.asarray(schedule.sigma(t))
    assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma))
    assert np.all(alpha > 0) and np.all(sigma > 0)


def test_variance_preserving(vp_schedule):
    t = random_times(vp_schedule)
    alpha, sigma = vp_schedule.alpha(t), vp_schedule.sigma(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=2e-6)


@pytest.mark.parametrize("s", [0.002, 0.005, 0.008, 0.02])
def test_vp_cosine_clean_end(s):
    """Nichol & Dhariwal's cosine schedule has alpha_bar(0) = f(0) / f(0) = 1 exactly, so the
    clean end must have alpha = 1 and sigma = 0 (finite), like the linear schedules."""
    schedule = dp.schedules.VP.cosine(s=s)
    assert float(schedule.alpha(0.0)) == 1.0
    sigma_0 = float(schedule.sigma(0.0))
    assert np.isfinite(sigma_0), f"sigma(0) is {sigma_0} for s={s}"
    assert sigma_0 == 0.0


def test_vp_linear_clean_end():
    for schedule in (dp.schedules.VP.linear(), dp.schedules.VP.linear(0.05, 10.0)):
        assert float(schedule.alpha(0.0)) == 1.0
        assert float(schedule.sigma(0.0)) == 0.0


def test_log_snr_is_twice_log_alpha_over_sigma(schedule):
    t = random_times(schedule)[1:]
    alpha = np.asarray(schedule.alpha(t), np.float64)
    sigma = np.asarray(schedule.sigma(t), np.float64)
    expected = 2.0 * np.log(alpha / sigma)
    np.testing.assert_allclose(schedule.log_snr(t), expected, rtol=1e-5, atol=1e-4)


def test_log_snr_strictly_decreasing(schedule):
    t = np.linspace(0.0, schedule.t_max, 2001, dtype=np.float32)[1:]
    log_snr = np.asarray(schedule.log_snr(t))
    assert np.all(np.isfinite(log_snr))
    assert np.all(np.diff(log_snr) < 0)


def test_t_from_log_snr_inverts_log_snr(schedule):
    t = random_times(schedule, seed=1)[1:]
    recovered = np.asarray(schedule.t_from_log_snr(schedule.log_snr(t)))
    np.testing.assert_allclose(recovered, t, atol=1e-5)
    # and the other way round, over the log-SNR range the schedule spans; below t = 1e-2 the
    # float32 log-SNR of the cosine schedule is itself only good to ~1e-7 / sigma^2
    log_snr_range = np.asarray(schedule.log_snr(np.float32([schedule.t_max, 1e-2])))
    targets = np.linspace(*log_snr_range, 500, dtype=np.float32)
    back = np.asarray(schedule.log_snr(schedule.t_from_log_snr(targets)))
    np.testing.assert_allclose(back, targets, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("beta_min, beta_max", [(0.1, 20.0), (0.05, 10.0)])
def test_vp_linear_closed_form(beta_min, beta_max):
    """Song et al. (2021): beta(t) = b0 + t (b1 - b0), alpha(t) = exp(-int_0^t beta / 2)."""
    schedule = dp.schedules.VP.linear(beta_min, beta_max)
    t = random_times(schedule).astype(np.float64)
    expected = np.exp(-0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t**2))
    np.testing.assert_allclose(schedule.alpha(t.astype(np.float32)), expected, rtol=1e-5)
    # beta(t) = -2 d log alpha / dt is the SDE's drift coefficient
    beta = -2.0 * np.asarray(schedule.d_log_alpha(t.astype(np.float32)))
    np.testing.assert_allclose(beta, beta_min + t * (beta_max - beta_min), rtol=1e-5)


def test_vp_discrete_matches_ddpm_table():
    """Ho et al. (2020): betas linear from 1e-4 to 0.02 over 1000 steps and
    alpha(n / 1000) = sqrt(prod_{i <= n} (1 - beta_i))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        schedule = dp.schedules.VP.linear(discrete=True)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha_bar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    n = np.arange(1001)
    t = (n / 1000).astype(np.float32)
    np.testing.assert_allclose(schedule.alpha(t), np.sqrt(alpha_bar), rtol=2e-5)
    np.testing.assert_allclose(schedule.sigma(t[1:]), np.sqrt(1.0 - alpha_bar[1:]), rtol=2e-5)


def test_vp_cosine_closed_form():
    schedule = dp.schedules.VP.cosine()
    s = 0.008
    t = random_times(schedule).astype(np.float64)
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f / np.cos(s / (1 + s) * np.pi / 2) ** 2
    # near t_max, cos is evaluated close to pi/2 in float32: absolute error ~ 1e-7 there
    np.testing.assert_allclose(
        schedule.alpha(t.astype(np.float32)) ** 2, alpha_bar, rtol=1e-5, atol=1e-7
    )


def test_ve_closed_form():
    schedule = dp.schedules.VE(0.01, 50.0)
    t = random_times(schedule).astype(np.float64)
    np.testing.assert_allclose(schedule.alpha(t.astype(np.float32)), 1.0)
    np.testing.assert_allclose(
        schedule.sigma(t.astype(np.float32)), 0.01 * (50.0 / 0.01) ** t, rtol=1e-5
    )


@pytest.mark.parametrize("num_levels", [2, 18, 256])
def test_edm_uniform_times_give_karras_spacing(num_levels):
    """Karras et al. (2022, eq. 5): sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) -
    s_max^(1/rho)))^rho, i = 0..N-1, is sigma at uniform times from 1 down to 0."""
    sigma_min, sigma_max, rho = 0.002, 80.0, 7.0
    schedule = dp.schedules.EDM(sigma_min, sigma_max, rho)
    i = np.arange(num_levels)
    karras = (
        sigma_max ** (1 / rho)
        + i / (num_levels - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t = np.linspace(1.0, 0.0, num_levels, dtype=np.float32)
    np.testing.assert_allclose(schedule.sigma(t), karras, rtol=1e-5)
    np.testing.assert_allclose(schedule.alpha(t), 1.0)


def test_schedules_pass_through_jit(schedule):
    t = jnp.float32(0.3)
    jitted = jax.jit(lambda sched, t: (sched.alpha(t), sched.sigma(t)))(schedule, t)
    np.testing.assert_allclose(jitted, (schedule.alpha(t), schedule.sigma(t)), rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: dp.schedules.VE(50.0, 0.01),
        lambda: dp.schedules.VE(0.0, 50.0),
        lambda: dp.schedules.VE(-1.0, 50.0),
        lambda: dp.schedules.EDM(80.0, 0.002),
        lambda: dp.schedules.EDM(0.0, 80.0),
        lambda: dp.schedules.EDM(0.002, 80.0, 0.0),
        lambda: dp.schedules.EDM(0.002, 80.0, -7.0),
    ],
    ids=[
        "ve-swapped",
        "ve-zero",
        "ve-negative",
        "edm-swapped",
        "edm-zero",
        "edm-rho0",
        "edm-rho<0",
    ],
)
def test_ve_edm_bad_arguments_raise(make):
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: dp.schedules.VP.linear(-1.0, 20.0),
        lambda: dp.schedules.VP.linear(0.1, -20.0),
        lambda: dp.schedules.VP.cosine(s=-0.5),
        lambda: dp.schedules.VP.cosine(t_max=1.5),
        lambda: dp.schedules.VP.linear(discrete=True, num_train_steps=0),
        lambda: dp.schedules.VP(kind="quadratic"),
        lambda: dp.schedules.VE(0.01, 50.0, t_max=0.0),
    ],
    ids=[
        "vp-negative-beta-min",
        "vp-negative-beta-max",
        "cosine-negative-s",
        "cosine-t-max-past-1",
        "ddpm-no-steps",
        "vp-unknown-kind",
        "t-max-zero",
    ],
)
def test_vp_bad_arguments_raise(make):
    """Each of these gives NaN alpha or sigma somewhere in [0, t_max] (or an AttributeError at
    the first call), so the constructor must refuse it (DESIGN: bad input fails early)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError):
            make()


def test_t_max_is_the_largest_time():
    assert math.isclose(dp.schedules.VP.cosine().t_max, 0.999)
    for make in (dp.schedules.VP.linear, lambda: dp.schedules.VE(0.01, 50.0)):
        assert make().t_max == 1.0
