"""DPS: finite on the mixture problems with Gaussian and Student-t likelihoods, reduces to
unguided sampling at zero step, and pulls samples toward the data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp


def _sample(method, problem, num_particles=256, num_steps=50, seed=0):
    sampler = dp.Sampler(
        method, num_particles=num_particles, num_steps=num_steps, progress_bar=False
    )
    sampler.run(jax.random.key(seed), *problem.model_args, **problem.model_kwargs)
    return np.asarray(sampler.get_samples()["x"])


@pytest.mark.parametrize(
    ("dim", "obs_dim", "likelihood", "normalize"),
    [
        (8, 1, "normal", True),
        (8, 1, "student-t", False),
        (80, 2, "normal", False),
        (80, 2, "student-t", True),
    ],
)
def test_finite_on_mixture_problems(dim, obs_dim, likelihood, normalize):
    problem = dp.problems.mixture_problem(jax.random.key(0), dim, obs_dim)

    def model(A, sigma_y, y=None):
        x = numpyro.sample("x", problem.prior)
        if likelihood == "normal":
            noise = dist.Normal(A @ x, sigma_y)
        else:
            noise = dist.StudentT(3.0, A @ x, sigma_y)
        numpyro.sample("y", noise.to_event(1), obs=y)

    samples = _sample(dp.DPS(model, scale=0.5, normalize=normalize), problem)
    assert samples.shape == (256, dim)
    assert np.all(np.isfinite(samples))


def test_zero_step_is_unguided():
    """With scale=0 DPS takes exactly the unguided reverse steps (same key, same draws)."""
    problem = dp.problems.mixture_problem(jax.random.key(1), 8, 1)
    dps = _sample(dp.DPS(problem.model, scale=0.0, normalize=False), problem)
    unguided = _sample(dp.Unguided(problem.model), problem)
    np.testing.assert_allclose(dps, unguided, rtol=1e-5, atol=1e-5)


def test_guidance_moves_samples_toward_the_data():
    """Residuals |y - A x| shrink relative to unguided samples on a Gaussian problem."""
    problem = dp.problems.gaussian_problem(jax.random.key(4), 4, 2)
    A, y = np.asarray(problem.A), np.asarray(problem.y)
    guided = _sample(dp.DPS(problem.model, scale=1.0), problem)
    unguided = _sample(dp.Unguided(problem.model), problem)

    def mean_residual(x):
        return float(np.mean(np.linalg.norm(x @ A.T - y, axis=1)))

    assert mean_residual(guided) < 0.7 * mean_residual(unguided)


def test_low_level_api():
    gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))

    def log_likelihood(x):
        return jax.scipy.stats.norm.logpdf(1.0, x[0], 0.5)

    algorithm = dp.kernels.dps.as_top_level_api(
        gmm.denoiser, log_likelihood, gmm.timesteps(10), scale=0.1, normalize=False
    )
    state = algorithm.init(jax.random.normal(jax.random.key(0), (16, 2)))
    state, info = algorithm.step(jax.random.key(1), state)
    assert info.log_likelihood.shape == (16,)
    assert int(info.num_nonfinite) == 0
    # the paper's normalised step is the default, as for dp.DPS: it needs the residual
    with pytest.raises(ValueError, match="residual_fn"):
        dp.kernels.dps.as_top_level_api(gmm.denoiser, log_likelihood, gmm.timesteps(10))
