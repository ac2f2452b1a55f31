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


def test_mixture_reference_is_the_exact_marginal_at_t_max():
    """GaussianMixture.sample_reference draws the noised mixture at t_max: its mean is
    alpha * E[x0] and its variance alpha^2 Var[x0] + sigma^2 (5 standard errors)."""
    import diffprior as dp

    # means far enough apart that alpha(t_max) * mu (about 2 here) is not lost in the noise
    means = jnp.array([[-300.0, 0.0], [300.0, 100.0]])
    prior = dp.GaussianMixture(means, jnp.array([0.3, 0.7]), schedule=dp.schedules.VP.linear())
    n = 20_000
    x = np.asarray(prior.sample_reference(jax.random.key(1), (n,)))
    assert x.shape == (n, 2)
    t_max = prior.schedule.t_max
    alpha, sigma = float(prior.schedule.alpha(t_max)), float(prior.schedule.sigma(t_max))
    variance = alpha**2 * np.asarray(prior.variance) + sigma**2
    np.testing.assert_array_less(
        np.abs(x.mean(0) - alpha * np.asarray(prior.mean)), 5 * np.sqrt(variance / n)
    )
    np.testing.assert_array_less(np.abs(x.var(0) / variance - 1), 5 * np.sqrt(2 / n))


@pytest.mark.slow
def test_far_apart_components_keep_their_weights_in_high_dimension():
    """d = 800, 25 components up to |mu| ~ 450 apart: started from the exact marginal at t_max
    the 100-step chain puts each component's mass within 5 standard errors of its weight.
    (From the generic N(0, I) start the alpha(t_max) mu_k offsets, a few units long here, shift
    the mass between components by up to 0.09.)"""
    import diffprior as dp

    prior = dp.problems.mixture_problem(jax.random.key(0), 800, 1).prior
    x = np.asarray(prior.reverse_sample(jax.random.key(1), (NUM_SAMPLES,), num_steps=100))
    means = np.asarray(prior.means)
    nearest = ((x**2).sum(1)[:, None] - 2 * x @ means.T + (means**2).sum(1)[None, :]).argmin(axis=1)
    freq = np.bincount(nearest, minlength=means.shape[0]) / NUM_SAMPLES
    weights = np.asarray(prior.weights)
    np.testing.assert_array_less(
        np.abs(freq - weights), 5 * np.sqrt(weights * (1 - weights) / NUM_SAMPLES) + 1e-3
    )
