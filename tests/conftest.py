"""Shared fixtures: the schedules every identity is checked on, and small exact mixtures."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import diffprior as dp


def _discrete_vp():
    # the DDPM table is built in float64 where JAX allows it; without x64 JAX warns and uses
    # float32, which the tolerances below allow for
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dp.schedules.VP.linear(discrete=True)


#: Every schedule the package ships, with the settings of the papers that introduced them.
SCHEDULES = {
    "vp_linear": lambda: dp.schedules.VP.linear(),
    "vp_discrete": _discrete_vp,
    "vp_cosine": lambda: dp.schedules.VP.cosine(),
    "ve": lambda: dp.schedules.VE(0.01, 50.0),
    "edm": lambda: dp.schedules.EDM(0.002, 80.0, 7.0),
}
VP_SCHEDULES = ("vp_linear", "vp_discrete", "vp_cosine")


@pytest.fixture(params=list(SCHEDULES))
def schedule(request):
    """Each shipped schedule in turn."""
    return SCHEDULES[request.param]()


@pytest.fixture(params=VP_SCHEDULES)
def vp_schedule(request):
    """Each variance-preserving schedule in turn."""
    return SCHEDULES[request.param]()


def grid_mixture_params(dim: int):
    """Four well separated components on a 2-d grid (means 4 apart, scales <= 0.8) embedded in
    ``dim`` dimensions, with unequal weights and unequal scales."""
    means = np.zeros((4, dim), np.float32)
    means[:, 0] = [-2.0, 2.0, -2.0, 2.0]
    means[:, 1] = [-2.0, -2.0, 2.0, 2.0]
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    scales = np.array([0.5, 0.7, 0.6, 0.8], np.float32)
    return means, weights, scales


@pytest.fixture
def grid_mixture():
    """Factory ``grid_mixture(dim, schedule=None, **prior_options)`` for the four-component
    mixture of :func:`grid_mixture_params`."""

    def make(dim: int, schedule=None, **prior_options) -> dp.GaussianMixture:
        means, weights, scales = grid_mixture_params(dim)
        return dp.GaussianMixture(means, weights, scales, schedule=schedule, **prior_options)

    return make
