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
from diffprior.kernels.fk import FKState
from diffprior.kernels.mcgdiff import MCGdiffState
from diffprior.kernels.smc import ess
from diffprior.model import ModelError, read_model


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

    # the Student-t model gets the guided proposal: so does its Gaussian reference, so that the
    # two runs share their noise and differ by the likelihood only
    gaussian = _run(problem, 512, 30, 2, proposal="guided")
    sampler = dp.Sampler(
        dp.TDS(student_model), num_particles=512, num_steps=30, num_chains=2, progress_bar=False
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
    tol = 5 * np.sqrt(np.diag(np.asarray(post.covariance)) / 400)
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


# -- the subspace proposal -------------------------------------------------------------------


def _inpainting_problem(shape=(8, 16), sigma=0.05):
    """A Gaussian prior on an image with half its pixels (64 of 128) observed at ``sigma``."""
    d = shape[0] * shape[1]
    mean = jnp.sin(jnp.linspace(-2.0, 2.0, d))
    prior = dp.GaussianMixture(mean[None], jnp.ones(1))
    A = dp.operators.Inpaint(dp.operators.random_mask(jax.random.key(3), shape, 0.5))
    y = A(prior.sample(jax.random.key(4)).reshape(shape))
    y = y + sigma * jax.random.normal(jax.random.key(5), A.out_shape)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(A(x.reshape(shape)), sigma).to_event(1), obs=y)

    return model, y, float(prior.log_evidence(A, sigma, y))


def test_subspace_proposal_keeps_weights_uniform_with_many_observations():
    """A Gaussian prior with 64 observed pixels at sigma 0.05: the subspace proposal is the
    twisted transition itself, so the ESS stays above half the particles at every step and
    the log-evidence is exact within Monte Carlo error (each chain within 0.1 nats). The
    guided proposal collapses on this problem (tens of nats off)."""
    model, y, exact = _inpainting_problem()
    sampler = dp.Sampler(dp.TDS(model, proposal="subspace"), 256, 30, 2, progress_bar=False)
    sampler.run(jax.random.key(0), y=y)
    ess_fraction = np.asarray(sampler._result["per_step"]["ess"]) / 256
    assert ess_fraction.min() > 0.5, f"smallest ESS / N {ess_fraction.min():.3f}"
    errors = np.asarray(sampler.log_evidence) - exact
    assert np.all(np.abs(errors) < 0.1), f"log-evidence errors {errors}"


def _student_model(prior):
    def model(A, sigma_y, y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.StudentT(4.0, A @ x, sigma_y).to_event(1), obs=y)

    return model


@pytest.mark.slow
def test_subspace_proposal_is_the_mcgdiff_kernel_and_auto_picks_it():
    """TDS(proposal="subspace") runs MCGdiff's kernel (same samples, same evidence for the
    same key). The default "auto" builds it for a linear Gaussian model, and the guided
    kernel when a guided-only option is set or the likelihood is not Gaussian."""
    problem = dp.problems.mixture_problem(jax.random.key(0), 4, 2)
    args, kwargs = problem.model_args, problem.model_kwargs
    runs = []
    for method in (dp.MCGdiff(problem.model), dp.TDS(problem.model, proposal="subspace")):
        sampler = dp.Sampler(method, 64, 8, progress_bar=False)
        sampler.run(jax.random.key(1), *args, **kwargs)
        runs.append((sampler.get_samples()["x"], sampler.log_evidence))
    for got, expected in zip(*runs, strict=True):
        np.testing.assert_array_equal(got, expected)

    def built_state(model, **options):
        obs = read_model(model, args, kwargs)
        method = dp.TDS(model, **options)
        method.check(obs)
        algorithm = method.build(obs.prior, obs, problem.prior.timesteps(4))
        return algorithm.init(problem.prior.sample_reference(jax.random.key(0), (4,)))

    assert isinstance(built_state(problem.model), MCGdiffState)
    assert isinstance(built_state(problem.model, scale=0.5), FKState)
    assert isinstance(built_state(problem.model, variance_inflation=None), FKState)
    assert isinstance(built_state(_student_model(problem.prior)), FKState)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"scale": 0.5}, "scale=0.5"),
        ({"variance_inflation": None}, "variance_inflation=None"),
        ({"variance_inflation": "pigdm"}, "variance_inflation='pigdm'"),
        ({"eta": 0.0}, "eta=0"),
    ],
)
def test_subspace_proposal_refuses_guided_only_options(options, match):
    problem = dp.problems.mixture_problem(jax.random.key(0), 4, 1)
    with pytest.raises(ValueError, match=match):
        dp.TDS(problem.model, proposal="subspace", **options)


def test_subspace_proposal_refuses_models_it_cannot_take():
    """A Student-t likelihood has no subspace proposal: a ModelError before compiling, naming
    the guided proposal (which "auto" picks for it)."""
    problem = dp.problems.mixture_problem(jax.random.key(0), 4, 1)
    method = dp.TDS(_student_model(problem.prior), proposal="subspace")
    sampler = dp.Sampler(method, 16, 4, progress_bar=False)
    with pytest.raises(ModelError, match="proposal='guided'"):
        sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    assert sampler.num_compilations == 0
    with pytest.raises(ValueError, match="proposal must be one of"):
        dp.TDS(problem.model, proposal="kalman")
