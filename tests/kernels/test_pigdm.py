"""PiGDM: exact for a Gaussian prior (its Gaussian approximation of p(x0 | x_t) is then the
truth), reproduces observed pixels as the noise vanishes, falls back for other likelihoods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp


def _samples(method, problem, num_particles=2048, num_steps=100, **kwargs):
    sampler = dp.Sampler(
        method, num_particles=num_particles, num_steps=num_steps, progress_bar=False
    )
    sampler.run(jax.random.key(0), *problem.model_args, **(kwargs or problem.model_kwargs))
    return np.asarray(sampler.get_samples()["x"])


@pytest.mark.slow
def test_exact_for_gaussian_prior():
    problem = dp.problems.gaussian_problem(jax.random.key(3), 4, 2)
    x = _samples(dp.PiGDM(problem.model), problem, num_particles=4096)
    post = problem.posterior
    var = np.diag(np.asarray(post.covariance))
    np.testing.assert_array_less(np.abs(x.mean(0) - np.asarray(post.mean)), 5 * np.sqrt(var / 4096))
    # variance ratio: the sampling sd of a sample variance is var * sqrt(2 / n)
    np.testing.assert_array_less(np.abs(np.var(x, axis=0) / var - 1), 5 * np.sqrt(2 / 4096) + 0.02)


def test_noiseless_inpainting_reproduces_observed_pixels():
    # plain DDPM steps (no added x0 spread), as a generic network has
    gmm = dp.GaussianMixture(
        jnp.array([[-2.0] * 6, [2.0] * 6]), jnp.array([0.5, 0.5]), local_variance=0.0
    )
    observed = jnp.array([0, 2, 5])
    y = jnp.array([1.5, -0.7, 2.2])

    def model(y=None, sigma_y=1e-3):
        x = numpyro.sample("x", gmm)
        numpyro.sample("y", dist.Normal(x[observed], sigma_y).to_event(1), obs=y)

    sampler = dp.Sampler(dp.PiGDM(model), num_particles=64, num_steps=100, progress_bar=False)
    sampler.run(jax.random.key(1), y=y)
    x = np.asarray(sampler.get_samples()["x"])
    np.testing.assert_allclose(x[:, observed], np.broadcast_to(y, (64, 3)), atol=0.02)
    # the unobserved pixels are not pinned
    assert np.std(x[:, 1]) > 0.1


def test_student_t_and_nonlinear_fall_back_and_stay_finite():
    problem = dp.problems.mixture_problem(jax.random.key(0), 8, 2)

    def model(A, sigma_y, y=None):
        x = numpyro.sample("x", problem.prior)
        numpyro.sample("y", dist.StudentT(3.0, jnp.tanh(A @ x), sigma_y).to_event(1), obs=y)

    x = _samples(dp.PiGDM(model), problem, num_particles=128, num_steps=30)
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize(
    ("options", "error"),
    [({"scale": -1.0}, ValueError), ({"eta": 2.0}, ValueError), ({"r": 1}, TypeError)],
)
def test_bad_options(options, error):
    problem = dp.problems.gaussian_problem(jax.random.key(0), 2, 1)
    with pytest.raises(error):
        dp.PiGDM(problem.model, **options)
