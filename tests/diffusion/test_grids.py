"""Timestep grids: decreasing from t_max to exactly 0, with the spacing each name promises."""

from __future__ import annotations

import numpy as np
import pytest

import diffprior as dp
from diffprior.diffusion import SPACINGS, timesteps


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 100])
def test_grid_decreases_from_t_max_to_exactly_zero(schedule, spacing, num_steps):
    grid = np.asarray(timesteps(schedule, num_steps, spacing))
    assert grid.shape == (num_steps + 1,)
    assert grid[0] == np.float32(schedule.t_max)
    assert grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)


def test_uniform_and_quadratic_formulas(schedule):
    num_steps = 20
    frac = np.arange(num_steps, -1, -1) / num_steps
    np.testing.assert_allclose(timesteps(schedule, num_steps), schedule.t_max * frac, atol=1e-6)
    np.testing.assert_allclose(
        timesteps(schedule, num_steps, "quadratic"), schedule.t_max * frac**2, atol=1e-6
    )


@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_edm_grid_is_karras_rho_spacing_of_noise_to_signal(schedule, rho):
    """The first ``num_steps`` noise-to-signal ratios sigma/alpha follow Karras et al.'s rho
    spacing between those at t_max and t_min (eq. 5), whatever the schedule."""
    num_steps, t_min = 12, 1e-3
    grid = timesteps(schedule, num_steps, "edm", rho=rho, t_min=t_min)
    nsr = np.exp(-0.5 * np.asarray(schedule.log_snr(grid[:-1]), np.float64))
    nsr_max, nsr_min = np.exp(-0.5 * np.asarray(schedule.log_snr([schedule.t_max, t_min])))
    i = np.arange(num_steps)
    karras = (
        nsr_max ** (1 / rho) + i / (num_steps - 1) * (nsr_min ** (1 / rho) - nsr_max ** (1 / rho))
    ) ** rho
    np.testing.assert_allclose(nsr, karras, rtol=2e-3)


def test_edm_grid_on_edm_schedule_is_uniform_in_t():
    """With the EDM schedule, Karras spacing is uniform in t (between t_max and t_min)."""
    schedule = dp.schedules.EDM(0.002, 80.0, 7.0)
    grid = np.asarray(timesteps(schedule, 10, "edm", rho=7.0, t_min=1e-3))
    np.testing.assert_allclose(grid[:-1], np.linspace(1.0, 1e-3, 10), atol=1e-5)


def test_ddpm_respacing_hits_training_steps():
    """100 uniform steps on the 1000-step DDPM table land on every tenth training step."""
    grid = np.asarray(timesteps(dp.schedules.VP.linear(), 100))
    np.testing.assert_allclose(grid * 1000, np.arange(1000, -1, -10), atol=1e-3)


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, "10", None])
def test_bad_num_steps_raise(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(dp.schedules.VP.linear(), num_steps)


def test_bad_spacing_raises():
    with pytest.raises(ValueError, match="spacing"):
        timesteps(dp.schedules.VP.linear(), 10, "linear")
