"""TDS against exact posteriors and evidences (Gaussian and Gaussian-mixture priors, linear
Gaussian observations)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.diagnostics import sliced_wasserstein
from diffprior.kernels.smc import ess


def _run(problem, num_particles, num_steps, num_chains, seed=0, **options):
    sampler = dp.Sampler(
        dp.TDS(problem.model, **options),
        num_particles=num_particles,
        num_steps=num_steps,
        num_chains=num_chains,
        progress_bar=False,
    )
    sampler.run(jax.random.key(seed), *problem.model_args, **problem.model_kwargs)
    return sampler


@pytest.mark.slow
@pytest.mark.parametrize("ess_threshold", [1.0, 0.5, 0.0])
def test_gaussian_posterior_and_evidence(ess_threshold):
    """d=4 standard normal prior, two linear Gaussian observations: the weighted particles'
    mean and covariance match the exact posterior within Monte Carlo error, and the
    log-evidence is within 0.1 nats with 4096 particles."""
    problem = dp.problems.gaussian_problem(jax.random.key(3), 4, 2)
    sampler = _run(problem, 4096, 100, 2, ess_threshold=ess_threshold)
    post = problem.posterior
    exact_mean, exact_cov = np.asarray(post.mean), np.asarray(post.covariance)

    result = sampler._result
    particles = np.asarray(result["particles"])  # (C, N, d) before the final resampling
    log_weights = np.asarray(result["log_weights"])
    for chain in range(particles.shape[0]):
        weights = np.exp(log_weights[chain])
        x = particles[chain]
        mean = weights @ x
        centred = x - mean
        cov = (centred.T * weights) @ centred
        num_eff = float(ess(jnp.asarray(log_weights[chain])))
        assert num_eff > 200, f"ESS collapsed to {num_eff:.0f}"
        # 5 Monte Carlo standard errors of a weighted mean and of a covariance entry
        mean_tol = 5 * np.sqrt(np.diag(exact_cov) / num_eff)
        np.testing.assert_array_less(np.abs(mean - exact_mean), mean_tol)
        var = np.diag(exact_cov)
        cov_tol = 5 * np.sqrt((np.outer(var, var) + exact_cov**2) / num_eff)
        np.testing.assert_array_less(np.abs(cov - exact_cov), cov_tol)

    errors = np.asarray(sampler.log_evidence) - float(problem.log_evidence)
    assert np.all(np.abs(errors) < 0.1), f"log-evidence errors {errors}"


@pytest.mark.slow
@pytest.mark.parametrize(("dim", "obs_dim", "seed"), [(8, 1, 0), (8, 1, 1), (80, 2, 0)])
def test_mixture_problem_sliced_wasserstein(dim, obs_dim, seed):
    """The MCGdiff mixture problem: 4 x 512 particles and 100 steps reach a sliced Wasserstein
    distance to exact posterior samples within 3x the distance between two exact sets, and the
    evidence within 0.5 nats (median over chains)."""
    problem = dp.problems.mixture_problem(jax.random.key(seed), dim, obs_dim)
    sampler = _run(problem, 512, 100, 4, seed=seed)
    post = problem.posterior
    key_a, key_b, key_proj = jax.random.split(jax.random.key(100 + seed), 3)
    exact = post.sample(key_a, (2000,))
    floor = float(sliced_wasserstein(key_proj, exact, post.sample(key_b, (2000,))))
    samples = sampler.get_samples()["x"][:2000]
    distance = float(sliced_wasserstein(key_proj, samples, exact))
    assert np.all(np.isfinite(np.asarray(samples)))
    assert distance < 3 * floor, f"SW {distance:.3f} vs floor {floor:.3f}"
    error = np.median(np.asarray(sampler.log_evidence)) - float(problem.log_evidence)
    assert abs(error) < 0.5, f"median log-evidence error {error:.3f}"


def test_unguided_proposal_still_estimates_evidence():
    """scale=0 proposes from the prior transition: a twisted particle filter without guidance.
    It is still unbiased, so the evidence is right (the bookkeeping does not rely on the
    guided proposal)."""
    problem = dp.problems.gaussian_problem(jax.random.key(1), 2, 1)
    sampler = _run(problem, 2048, 40, 2, scale=0.0)
    errors = np.asarray(sampler.log_evidence) - float(problem.log_evidence)
    assert np.all(np.abs(errors) < 0.15), errors


def test_student_t_likelihood_runs_and_matches_gaussian_for_large_df():
    problem = dp.problems.gaussian_problem(jax.random.key(2), 4, 2)

    def student_model(A, sigma_y, y=None, df=1e6):
        x = numpyro.sample("x", problem.prior)
        numpyro.sample("y", dist.StudentT(df, A @ x, sigma_y).to_event(1), obs=y)

    gaussian = _run(problem, 2048, 50, 2)
    sampler = dp.Sampler(
        dp.TDS(student_model), num_particles=2048, num_steps=50, num_chains=2, progress_bar=False
    )
    sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    assert np.all(np.isfinite(np.asarray(sampler.get_samples()["x"])))
    diff = np.asarray(sampler.log_evidence) - np.asarray(gaussian.log_evidence)
    # in float32 the Student-t normaliser at df=1e6 is off by a constant (lgamma of ~5e5
    # cancels badly); that constant, not the sampler, is the only expected difference
    sigma_y, obs_dim = problem.sigma_y, problem.y.shape[0]
    offset = obs_dim * float(
        dist.StudentT(1e6, 0.0, sigma_y).log_prob(0.0) - dist.Normal(0.0, sigma_y).log_prob(0.0)
    )
    assert np.all(np.abs(diff - offset) < 0.05), (diff, offset)
    post = problem.posterior
    mean = np.asarray(sampler.get_samples()["x"]).mean(axis=0)
    tol = 5 * np.sqrt(np.diag(np.asarray(post.covariance)) / 1000)
    np.testing.assert_array_less(np.abs(mean - np.asarray(post.mean)), tol)

    # heavy tails change the answer: df=2 on the same data gives a different evidence
    sampler.run(jax.random.key(0), *problem.model_args, df=2.0, **problem.model_kwargs)
    assert np.all(np.isfinite(np.asarray(sampler.log_evidence)))


def test_low_level_api_matches_kernel_contract():
    gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.3, 0.7]))
    A = jnp.array([[1.0, 0.5]])
    y = jnp.array([1.0])

    def log_likelihood(x):
        return jax.scipy.stats.norm.logpdf(y, A @ x, 0.5).sum()

    def twist(x0_hat, t):
        # the likelihood widened by Var[A x0 | x_t] (what dp.TDS builds from a model)
        r2 = dp.diffusion.tweedie_variance(gmm.schedule, t, jnp.mean(gmm.variance))
        scale = jnp.sqrt(0.25 + r2 * jnp.sum(A**2))
        return jax.scipy.stats.norm.logpdf(y, A @ x0_hat, scale).sum()

    times = gmm.timesteps(30)
    algorithm = dp.kernels.tds.as_top_level_api(gmm.denoiser, log_likelihood, times, twist_fn=twist)
    state = algorithm.init(jax.random.normal(jax.random.key(0), (256, 2)))
    assert state.log_weights.shape == (256,)
    np.testing.assert_allclose(float(jax.scipy.special.logsumexp(state.log_weights)), 0, atol=1e-5)
    step = jax.jit(algorithm.step)
    for i in range(30):
        state, info = step(jax.random.key(i + 1), state)
        assert info.ancestors.shape == (256,)
        assert bool(jnp.isfinite(info.log_evidence_increment))
    assert int(state.step) == 30
    exact = float(gmm.log_evidence(A, 0.5, y))
    assert abs(float(state.log_evidence) - exact) < 0.3
