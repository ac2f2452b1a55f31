"""Reverse diffusion with the exact mixture denoiser reproduces the prior, measured by the sliced
Wasserstein distance against exact draws (diffprior.diagnostics.sliced_wasserstein)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffprior.diagnostics import sliced_wasserstein

NUM_SAMPLES = 2000
NUM_SEEDS = 3


def test_sliced_wasserstein_of_a_translate():
    """Shifting a sample set by delta moves every projection theta by theta . delta, so SW_2 is
    sqrt(E (theta . delta)^2) = |delta| / sqrt(d) for theta uniform on the sphere; with 1000
    directions the Monte Carlo relative error is about sqrt(2 / 1000) ~ 5%: allow 15%."""
    x = jax.random.normal(jax.random.key(0), (300, 4))
    delta = jnp.array([3.0, 0.0, -4.0, 0.0])
    distance = float(sliced_wasserstein(jax.random.key(1), x, x + delta))
    assert abs(distance - 5.0 / 2.0) < 0.15 * 2.5
    assert float(sliced_wasserstein(jax.random.key(1), x, x)) == 0.0
    # sample sizes may differ: repeating every point three times leaves an empirical measure
    # unchanged, so the unequal-size path (300 vs 900) must agree with the equal-size one
    y = jax.random.normal(jax.random.key(2), (300, 4)) + 1.0
    np.testing.assert_allclose(
        sliced_wasserstein(jax.random.key(3), x, jnp.tile(y, (3, 1))),
        sliced_wasserstein(jax.random.key(3), x, y),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="event size"):
        sliced_wasserstein(jax.random.key(0), x, x[:, :3])


@pytest.mark.slow
def test_reverse_diffusion_reproduces_the_mixture(grid_mixture):
    """d = 8, four well separated components with unequal weights and scales. Over NUM_SEEDS
    seeds, the mean sliced Wasserstein distance (1000 projections) between 2000 reverse-diffusion
    draws (100 steps) and 2000 exact draws must be within 1.5 times the mean distance between two
    independent sets of 2000 exact draws: the noise floor of the statistic at this sample size.
    Averaging over seeds steadies the floor (single-seed ratios spread by ~10%); a sampler with
    the component weights off by 0.15 is ~6 times the floor."""
    gmm = grid_mixture(8)

    @jax.jit
    def distances(key):
        key_rev, key_a, key_b, key_proj = jax.random.split(key, 4)
        reverse = gmm.reverse_sample(key_rev, (NUM_SAMPLES,), num_steps=100)
        exact_a = gmm.sample(key_a, (NUM_SAMPLES,))
        exact_b = gmm.sample(key_b, (NUM_SAMPLES,))
        return (
            sliced_wasserstein(key_proj, reverse, exact_a),
            sliced_wasserstein(key_proj, exact_b, exact_a),
        )

    results = np.array([distances(jax.random.key(seed)) for seed in range(NUM_SEEDS)])
    reverse_distance, floor = results.mean(axis=0)
    assert reverse_distance < 1.5 * floor, (
        f"SW(reverse, exact) = {reverse_distance:.4f}, floor SW(exact, exact) = {floor:.4f}"
    )
