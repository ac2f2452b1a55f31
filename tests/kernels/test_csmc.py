"""Conditional twisted SMC with ancestor sampling: it leaves the path posterior invariant for any
number of particles, and ancestor sampling keeps the reference path moving.

The prior is Gaussian, whose reverse steps (with ``local_variance`` its variance, as
:class:`diffprior.GaussianMixture` sets it) are exact at any step size: the discretised path
measure has the exact posterior as its last marginal, so the chains are checked against
:meth:`diffprior.GaussianMixture.posterior` with no discretisation allowance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.diagnostics import effective_sample_size

import diffprior as dp
from diffprior.kernels import csmc

A = jnp.array([[1.0, 0.5]])
Y = jnp.array([1.2])
SIGMA_Y = 0.15


def _twist(prior):
    def twist(x0_hat, t):
        # the likelihood widened by Var[A x0 | x_t] (what dp.TDS builds from a model); at
        # t = 0 it is the exact likelihood
        r2 = dp.diffusion.tweedie_variance(prior.schedule, t, jnp.mean(prior.variance))
        scale = jnp.sqrt(SIGMA_Y**2 + r2 * jnp.sum(A**2))
        return jax.scipy.stats.norm.logpdf(Y, A @ x0_hat, scale).sum()

    return twist


def _chains(prior, num_particles, num_steps, num_chains, num_iterations, ancestor_sampling=True):
    """``num_chains`` independent particle Gibbs chains on the path alone: the reference paths
    ``(chains, iterations, num_steps + 1, d)`` and the reference-ancestor choices."""
    algorithm = csmc.as_top_level_api(
        prior.denoiser,
        _twist(prior),
        prior.timesteps(num_steps),
        num_particles,
        prior.sample_reference,
        ancestor_sampling=ancestor_sampling,
    )

    def chain(key):
        key_init, key_run = jax.random.split(key)

        def body(state, step_key):
            state, info = algorithm.step(step_key, state)
            return state, (state.path, info.reference_ancestors)

        keys = jax.random.split(key_run, num_iterations)
        return jax.lax.scan(body, algorithm.init(key_init), keys)[1]

    keys = jax.random.split(jax.random.key(0), num_chains)
    return jax.jit(jax.vmap(chain))(keys)


NUM_STEPS = 10


@pytest.fixture(scope="module")
def gaussian_chains():
    prior = dp.GaussianMixture(jnp.array([[0.5, -0.5]]), jnp.ones(1), scale=1.0)
    return prior, _chains(prior, 4, NUM_STEPS, 512, 50)


def test_few_particles_target_the_exact_path_posterior(gaussian_chains):
    """With 4 particles (a conditional SMC bug shows strongly with few), the reference paths
    of 512 chains x 30 kept iterations have the exact posterior marginals at every time of
    the grid: x_t = alpha_t x_0 + sigma_t eps with x_0 from the exact posterior (the reverse
    steps of a Gaussian prior are exact, so the path measure is the forward process given
    y). Means and variances are within 4 Monte Carlo standard errors (from the effective
    sample size, which accounts for autocorrelation). Mid-path marginals are where wrong
    ancestor weights show (the last one alone can look right)."""
    prior, (paths, _) = gaussian_chains
    paths = np.asarray(paths[:, 20:])  # (chains, iterations, steps + 1, d)
    post = prior.posterior(A, SIGMA_Y, Y)
    post_mean = np.asarray(post.mean)
    post_var = np.diag(np.asarray(post.covariance))
    times = prior.timesteps(NUM_STEPS)
    for k in range(NUM_STEPS + 1):
        alpha, sigma = float(prior.schedule.alpha(times[k])), float(prior.schedule.sigma(times[k]))
        exact_mean = alpha * post_mean
        exact_var = alpha**2 * post_var + sigma**2
        for i in range(2):
            draws = paths[:, :, k, i]
            ess = float(effective_sample_size(draws))
            assert ess > 1000, f"step {k}, coordinate {i}: ESS {ess:.0f}"
            mean_error = (draws.mean() - exact_mean[i]) / np.sqrt(exact_var[i] / ess)
            assert abs(mean_error) < 4, f"step {k}, coordinate {i}: mean off by {mean_error:.1f} SE"
            # the variance of a sample variance of Gaussian draws is 2 v^2 / n
            var_error = (draws.var() - exact_var[i]) / (exact_var[i] * np.sqrt(2 / ess))
            assert abs(var_error) < 4, (
                f"step {k}, coordinate {i}: variance off by {var_error:.1f} SE"
            )


def test_ancestor_sampling_moves_the_reference(gaussian_chains):
    """Ancestor sampling redraws the reference's ancestors (most steps move it), so the
    first state of the path, x_{t_max}, decorrelates between iterations; without it the
    reference keeps its own history at every step and x_{t_max} sticks."""
    prior, (paths, ancestors) = gaussian_chains
    assert float(jnp.mean(ancestors != 0)) > 0.3

    paths_plain, ancestors_plain = _chains(prior, 4, NUM_STEPS, 16, 30, ancestor_sampling=False)
    assert int(jnp.sum(ancestors_plain != 0)) == 0

    def lag_one(x):
        x = np.asarray(x[:, :, 0, 0])
        centred = x - x.mean(axis=1, keepdims=True)
        return float(np.mean(centred[:, 1:] * centred[:, :-1]) / np.mean(centred**2))

    assert lag_one(paths) < 0.5 < lag_one(paths_plain)


def test_sweep_keeps_the_reference_in_slot_zero_and_returns_a_path():
    """One sweep returns a path of the grid's length; with the reference's ancestors fixed
    and two particles whose other one has zero weight everywhere (a likelihood that is -inf
    away from the reference), the new path is the reference itself."""
    prior = dp.GaussianMixture(jnp.array([[0.0, 0.0]]), jnp.ones(1))
    times = prior.timesteps(5)
    reference = jax.random.normal(jax.random.key(0), (6, 2))

    def twist(x0_hat, t):
        return jnp.zeros(())

    path, info = csmc.sweep(
        jax.random.key(1), reference, prior.denoiser, twist, times, 8, prior.sample_reference
    )
    assert path.shape == (6, 2)
    assert info.ess.shape == (6,) and info.reference_ancestors.shape == (5,)
    assert bool(jnp.all(jnp.isfinite(path)))

    def only_at_end(x0_hat, t):
        # zero weight for every particle but the reference at the last step
        return jnp.where(t > 0, 0.0, jnp.where(jnp.allclose(x0_hat, reference[-1]), 0.0, -jnp.inf))

    path, _ = csmc.sweep(
        jax.random.key(2),
        reference,
        prior.denoiser,
        only_at_end,
        times,
        8,
        prior.sample_reference,
        ancestor_sampling=False,
    )
    np.testing.assert_allclose(np.asarray(path), np.asarray(reference), rtol=1e-6)


def test_rejects_one_particle_and_deterministic_steps():
    prior = dp.GaussianMixture(jnp.array([[0.0, 0.0]]), jnp.ones(1))
    args = (prior.denoiser, lambda x0, t: jnp.zeros(()), prior.timesteps(5))
    with pytest.raises(ValueError, match="num_particles must be an integer >= 2"):
        csmc.as_top_level_api(*args, 1, prior.sample_reference)
    with pytest.raises(ValueError, match="eta must be > 0"):
        csmc.as_top_level_api(*args, 8, prior.sample_reference, eta=0.0)
