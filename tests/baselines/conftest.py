"""The problem the baseline tests share, and one run of each baseline on it.

A two-component Gaussian mixture observed through y = A x + N(0, sigma_y^2): its posterior and
evidence are exact. One NUTS run and one tempered SMC run serve the NUTS, tempered SMC and
comparison tests (compilation dominates their cost), so they are session fixtures (visible to
the tests of this folder only).

Tolerances are Monte Carlo errors: NUTS from ArviZ's ESS of the quantity estimated, tempered
SMC from the spread between independent chains (a t statistic with num_chains - 1 degrees of
freedom).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from baseline_setup import (
    NUTS_CHAINS,
    NUTS_SAMPLES,
    PRIOR,
    SIGMA_Y,
    SMC_CHAINS,
    SMC_PARTICLES,
    A,
    Y,
    model,
)

import diffprior as dp


@pytest.fixture(scope="session")
def posterior():
    return PRIOR.posterior(A, SIGMA_Y, Y)


@pytest.fixture(scope="session")
def exact_moments(posterior):
    """Mean, variance and the variance of (x - mean)^2 (for the error of a variance
    estimate), from many exact draws (their own error is negligible next to the samplers')."""
    draws = np.asarray(posterior.sample(jax.random.key(99), (200_000,)))
    mean = np.asarray(posterior.mean)
    variance = np.asarray(posterior.variance)
    return mean, variance, np.var((draws - mean) ** 2, axis=0)


@pytest.fixture(scope="session")
def nuts():
    sampler = dp.baselines.NUTS(
        model,
        num_warmup=300,
        num_samples=NUTS_SAMPLES,
        num_chains=NUTS_CHAINS,
        progress_bar=False,
    )
    sampler.run(jax.random.key(0), y=Y)
    return sampler


@pytest.fixture(scope="session")
def smc():
    sampler = dp.baselines.TemperedSMC(
        model, num_particles=SMC_PARTICLES, num_chains=SMC_CHAINS, progress_bar=False
    )
    sampler.run(jax.random.key(1), y=Y)
    return sampler
