"""MCGdiff against exact posteriors and evidences (Gaussian and Gaussian-mixture priors, linear
Gaussian observations), noiseless reproduction of y, and clear errors for models it cannot
take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from shared_setup import run_whole_and_split

import diffprior as dp
from diffprior.diagnostics import sliced_wasserstein
from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.kernels.smc import ess
from diffprior.model import ModelError, read_model


def _run(method, problem, num_particles, num_steps=100, num_chains=1, seed=0, **kwargs):
    sampler = dp.Sampler(
        method,
        num_particles=num_particles,
        num_steps=num_steps,
        num_chains=num_chains,
        progress_bar=False,
    )
    sampler.run(jax.random.key(seed), *problem.model_args, **(kwargs or problem.model_kwargs))
    return sampler


def _weighted_moments_close(sampler, exact_mean, exact_cov, num_se=5.0):
    """Weighted particle mean and covariance within ``num_se`` Monte Carlo standard errors
    (from the ESS)."""
    result = sampler._result
    for x, log_w in zip(
        np.asarray(result["particles"]), np.asarray(result["log_weights"]), strict=True
    ):
        weights = np.exp(log_w)
        num_eff = float(ess(jnp.asarray(log_w)))
        assert num_eff > 200, f"ESS collapsed to {num_eff:.0f}"
        mean = weights @ x
        centred = x - mean
        cov = (centred.T * weights) @ centred
        var = np.diag(exact_cov)
        np.testing.assert_array_less(np.abs(mean - exact_mean), num_se * np.sqrt(var / num_eff))
        cov_tol = num_se * np.sqrt((np.outer(var, var) + exact_cov**2) / num_eff)
        np.testing.assert_array_less(np.abs(cov - exact_cov), cov_tol)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("potential", "twisted"), [("tweedie", True), ("gaussian", True), ("gaussian", False)]
)
def test_gaussian_posterior_and_evidence(potential, twisted):
    """d=4 standard normal prior, two noisy observations: weighted moments match the exact
    posterior and the log-evidence is within 0.1 nats (the Gaussian potentials are then the
    exact likelihoods given x_t)."""
    problem = dp.problems.gaussian_problem(jax.random.key(3), 4, 2)
    method = dp.MCGdiff(problem.model, potential=potential, twisted=twisted)
    sampler = _run(method, problem, 4096, num_chains=2)
    post = problem.posterior
    _weighted_moments_close(sampler, np.asarray(post.mean), np.asarray(post.covariance))
    errors = np.asarray(sampler.log_evidence) - float(problem.log_evidence)
    assert np.all(np.abs(errors) < 0.1), f"log-evidence errors {errors}"


@pytest.mark.slow
@pytest.mark.parametrize("potential", ["flat", "pinned"])
def test_paper_potentials_are_consistent(potential):
    """The paper's potentials ignore the prior; where a potential is much narrower than the
    reverse step (``"pinned"`` next to its pinning time) the weights are heavy-tailed, so the
    ESS says little about the error. Coarse checks: with 4 x 4096 particles the posterior mean
    is within a quarter posterior sd per coordinate (a wrong target is off by more, e.g. the
    prior mean is 0.7-3.3 sd away here) and the evidence within 1 nat."""
    problem = dp.problems.gaussian_problem(jax.random.key(3), 4, 2)
    method = dp.MCGdiff(problem.model, potential=potential, twisted=False)
    sampler = _run(method, problem, 4096, num_chains=4)
    post = problem.posterior
    sd = np.sqrt(np.diag(np.asarray(post.covariance)))
    mean = np.asarray(sampler.get_samples()["x"]).mean(axis=0)
    np.testing.assert_array_less(np.abs(mean - np.asarray(post.mean)), 0.25 * sd)
    errors = np.asarray(sampler.log_evidence) - float(problem.log_evidence)
    assert np.all(np.abs(errors) < 1.0), f"log-evidence errors {errors}"


@pytest.mark.parametrize(("dim", "obs_dim", "seed"), [(4, 2, 3), (16, 1, 1)])
def test_tweedie_potential_is_the_exact_step_for_a_gaussian_prior(dim, obs_dim, seed):
    """For a Gaussian prior the denoiser is affine with the potential's slope and the reverse
    step is the exact conditional, so the proposal is the locally optimal one: after the
    reference draws are weighted at t_max, every weight increment is zero (to float32), and
    the log-evidence of one run of 256 particles is exact to 1e-3 nats."""
    problem = dp.problems.gaussian_problem(jax.random.key(seed), dim, obs_dim)
    prior = problem.prior
    obs = read_model(problem.model, problem.model_args, problem.model_kwargs)
    timesteps = make_timesteps(prior.schedule, 20, "uniform")
    algorithm = dp.MCGdiff(problem.model).build(prior, obs, timesteps)
    state = algorithm.init(prior.sample_reference(jax.random.key(0), (256,)))
    initial = state.log_weights
    assert float(jnp.max(initial) - jnp.min(initial)) > 1e-3  # t_max weighting is not trivial
    for key in jax.random.split(jax.random.key(1), 20):
        state, info = algorithm.step(key, state)
        assert not bool(info.resampled)
        np.testing.assert_allclose(state.log_weights, initial, atol=2e-4)
    assert abs(float(state.log_evidence - problem.log_evidence)) < 1e-3


def test_noiseless_reproduces_y_and_gives_the_density_of_ax():
    """Noiseless: every sample satisfies A x = y to float32 precision, the free directions
    keep their posterior spread, and log p(y) is the density of A x at y, N(y; 0, A A^T) for a
    standard normal prior."""
    problem = dp.problems.gaussian_problem(jax.random.key(5), 6, 3)
    sampler = _run(dp.MCGdiff(problem.model, noiseless=True), problem, 2048, num_chains=2)
    x = np.asarray(sampler.get_samples()["x"])
    A, y = np.asarray(problem.A), np.asarray(problem.y)
    np.testing.assert_allclose(x @ A.T, np.broadcast_to(y, (x.shape[0], 3)), atol=2e-4)
    # the null space of A keeps its N(0, 1) spread (3 free directions)
    null = np.linalg.svd(A)[2][3:]
    np.testing.assert_allclose(np.var(x @ null.T, axis=0), 1.0, atol=0.15)
    gram = A @ A.T
    exact = -0.5 * (y @ np.linalg.solve(gram, y) + np.linalg.slogdet(2 * np.pi * gram)[1])
    errors = np.asarray(sampler.log_evidence) - exact
    assert np.all(np.abs(errors) < 0.1), f"log-evidence errors {errors}"


@pytest.mark.slow
@pytest.mark.parametrize(("dim", "obs_dim", "seed"), [(8, 1, 0), (8, 2, 1)])
def test_mixture_problem_within_3x_floor(dim, obs_dim, seed):
    """The MCGdiff mixture problem, 4 x 512 particles, 100 steps: sliced Wasserstein within 3x
    the distance between two exact sample sets, evidence within 0.5 nats (median over chains)."""
    problem = dp.problems.mixture_problem(jax.random.key(seed), dim, obs_dim)
    sampler = _run(dp.MCGdiff(problem.model), problem, 512, num_chains=4, seed=seed)
    post = problem.posterior
    key_a, key_b, key_proj = jax.random.split(jax.random.key(100 + seed), 3)
    exact = post.sample(key_a, (2000,))
    floor = float(sliced_wasserstein(key_proj, exact, post.sample(key_b, (2000,))))
    samples = sampler.get_samples()["x"][:2000]
    assert np.all(np.isfinite(np.asarray(samples)))
    distance = float(sliced_wasserstein(key_proj, samples, exact))
    assert distance < 3 * floor, f"SW {distance:.3f} vs floor {floor:.3f}"
    error = np.median(np.asarray(sampler.log_evidence)) - float(problem.log_evidence)
    assert abs(error) < 0.5, f"median log-evidence error {error:.3f}"


def test_near_noiseless_mixture_evidence():
    """The d = 8 mixture problem observed at sigma_y = 1e-6 (two observations): each chain's
    log-evidence within 0.5 nats of the exact one, and A x reproduces y to the noise level
    and float32. (The whitened observation is near 1e7 there: a residual outside the range
    computed from it, rather than known to be zero, cost 4 nats.)"""
    base = dp.problems.mixture_problem(jax.random.key(2), 8, 2)
    sigma = jnp.float32(1e-6)
    y = base.A @ base.x_true + sigma * jax.random.normal(jax.random.key(9), (2,))
    problem = base._replace(sigma_y=sigma, y=y)
    sampler = _run(dp.MCGdiff(problem.model), problem, 512, num_steps=50, num_chains=2)
    errors = np.asarray(sampler.log_evidence) - float(problem.log_evidence)
    assert np.all(np.abs(errors) < 0.5), f"log-evidence errors {errors}"
    x = np.asarray(sampler.get_samples()["x"])
    np.testing.assert_allclose(x @ np.asarray(problem.A).T - np.asarray(y), 0.0, atol=1e-4)


def test_rank_deficient_operator_counts_the_pure_noise_direction():
    """Three observations of two coordinates (rank 2): the third whitened direction of y is
    pure noise and enters the evidence as N(0, 1); checked against the exact evidence."""
    gmm = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    A = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = jnp.array([0.4, -0.2, 0.9])

    def model(y=None):
        x = numpyro.sample("x", gmm)
        numpyro.sample("y", dist.Normal(A @ x, 0.5).to_event(1), obs=y)

    sampler = dp.Sampler(dp.MCGdiff(model), 4096, 50, num_chains=2, progress_bar=False)
    sampler.run(jax.random.key(0), y=y)
    exact = float(gmm.log_evidence(A, 0.5, y))
    errors = np.asarray(sampler.log_evidence) - exact
    assert np.all(np.abs(errors) < 0.1), f"log-evidence errors {errors}"


def test_kernel_output_is_finite_and_weights_normalised():
    problem = dp.problems.mixture_problem(jax.random.key(2), 8, 2)
    sampler = _run(dp.MCGdiff(problem.model), problem, 128, num_steps=20)
    result = sampler._result
    assert np.all(np.isfinite(np.asarray(result["particles"])))
    np.testing.assert_allclose(np.exp(np.asarray(result["log_weights"])).sum(-1), 1.0, rtol=1e-4)
    assert np.isfinite(np.asarray(sampler.log_evidence)).all()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"potential": "tilted"}, ValueError, "potential must be one of"),
        ({"eta": 0.0}, ValueError, "eta must be > 0"),
        ({"eta": 1.5}, ValueError, "eta must be in"),
        ({"noiseless": "yes"}, TypeError, "noiseless must be True or False"),
        ({"twisted": 1}, TypeError, "twisted must be True or False"),
        ({"potential": "pinned", "twisted": True}, ValueError, "twisted=True needs"),
        ({"potential": "tweedie", "twisted": False}, ValueError, "needs twisted=True"),
        ({"resampling": "best"}, ValueError, "resampling must be one of"),
        ({"ess_threshold": 2.0}, ValueError, "ess_threshold"),
    ],
)
def test_bad_options_rejected(options, error, match):
    with pytest.raises(error, match=match):
        dp.MCGdiff(lambda: None, **options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"potential": "tilted"}, ValueError, "potential must be one of"),
        ({"twisted": 1}, TypeError, "twisted must be True or False"),
        ({"potential": "pinned"}, ValueError, "twisted=True needs"),
        ({"potential": "tweedie", "twisted": False}, ValueError, "needs twisted=True"),
        ({"resampling": "best"}, ValueError, "resampling must be one of"),
    ],
)
def test_the_kernel_rejects_the_same_options(options, error, match):
    """The kernel's defaults are the method's ("tweedie", twisted), so "pinned" alone is the
    twisted pinned pair."""
    gmm = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    with pytest.raises(error, match=match):
        dp.kernels.mcgdiff.as_top_level_api(
            gmm.denoiser, gmm.timesteps(5), jnp.eye(2)[:, :1], jnp.zeros(1), jnp.ones(1), **options
        )


def _mixture_model_with(likelihood):
    problem = dp.problems.mixture_problem(jax.random.key(0), 8, 2)

    def model(A, sigma_y, y=None):
        x = numpyro.sample("x", problem.prior)
        numpyro.sample("y", likelihood(A, x, sigma_y), obs=y)

    return problem, model


@pytest.mark.parametrize(
    "likelihood",
    [
        lambda A, x, s: dist.StudentT(3.0, A @ x, s).to_event(1),
        lambda A, x, s: dist.Normal(jnp.tanh(A @ x), s).to_event(1),
    ],
    ids=["student-t", "nonlinear"],
)
def test_models_it_cannot_take_are_rejected_before_sampling(likelihood):
    problem, model = _mixture_model_with(likelihood)
    sampler = dp.Sampler(dp.MCGdiff(model), 16, 5, progress_bar=False)
    with pytest.raises(ModelError, match="MCGdiff needs a linear forward operator"):
        sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    assert sampler.num_compilations == 0


def test_noiseless_needs_full_row_rank():
    gmm = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    A = jnp.array([[1.0, 0.0], [2.0, 0.0]])

    def model(y=None):
        x = numpyro.sample("x", gmm)
        numpyro.sample("y", dist.Normal(A @ x, 0.1).to_event(1), obs=y)

    sampler = dp.Sampler(dp.MCGdiff(model, noiseless=True), 16, 5, progress_bar=False)
    with pytest.raises(ModelError, match="full row rank: 2 observations but rank 1"):
        sampler.run(jax.random.key(0), y=jnp.array([0.1, 0.2]))


@pytest.mark.parametrize("potential", ["tweedie", "gaussian"])
def test_particles_split_over_a_named_axis_give_the_whole_run(potential):
    """Blocks of particles mapped with an axis name (as over devices) make the run of the
    whole set: same noise per particle, global weights, resampling (here at every step) and
    log-evidence, up to float rounding."""
    gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.3, 0.7]))
    algorithm = dp.kernels.mcgdiff.as_top_level_api(
        gmm.denoiser,
        gmm.timesteps(8),
        jnp.array([[1.0], [0.0]]),
        jnp.array([1.5]),
        jnp.array([0.5]),
        potential=potential,
        twisted=potential == "tweedie",
        ess_threshold=1.0,
    )
    particles = jax.random.normal(jax.random.key(0), (16, 2))
    whole, split = run_whole_and_split(algorithm, particles, jax.random.key(1), 8)
    for name in ("particles", "log_weights", "log_evidence", "x0_hat", "log_correction"):
        np.testing.assert_allclose(getattr(split, name), getattr(whole, name), atol=1e-5)
