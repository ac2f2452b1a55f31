"""Shared fixtures: the schedules every identity is checked on, and small exact mixtures."""

from __future__ import annotations

import os

import pytest
from shared_setup import SCHEDULES, VP_SCHEDULES, grid_mixture_params

import diffprior as dp

# The command line keeps compiled programs on disk; the tests compile hundreds of small ones and
# must not fill the user's cache (tests/test_compilation_cache.py turns it on in subprocesses).
os.environ.setdefault("DIFFPRIOR_NO_COMPILE_CACHE", "1")


@pytest.fixture(params=list(SCHEDULES))
def schedule(request):
    """Each shipped schedule in turn."""
    return SCHEDULES[request.param]()


@pytest.fixture(params=VP_SCHEDULES)
def vp_schedule(request):
    """Each variance-preserving schedule in turn."""
    return SCHEDULES[request.param]()


@pytest.fixture
def grid_mixture():
    """Factory ``grid_mixture(dim, schedule=None, **prior_options)`` for the four-component
    mixture of :func:`grid_mixture_params`."""

    def make(dim: int, schedule=None, **prior_options) -> dp.GaussianMixture:
        means, weights, scales = grid_mixture_params(dim)
        return dp.GaussianMixture(means, weights, scales, schedule=schedule, **prior_options)

    return make
