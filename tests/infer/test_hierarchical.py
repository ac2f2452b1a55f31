"""Hierarchical models: latent sites theta sampled with x by dp.ParticleGibbs and dp.PMMH
through numpyro.infer.MCMC.

With a Gaussian-mixture prior and linear Gaussian noise the evidence p(y | theta) is exact
(:meth:`diffprior.GaussianMixture.log_evidence`), so the marginal posterior of a scalar theta,
and the posterior mean of x as a mixture over theta, are exact by quadrature. The chains are
checked against them with tolerances from their effective sample sizes.
"""

from __future__ import annotations

import functools
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import diffprior as dp
from diffprior.infer.hierarchical import read_hierarchical_model
from diffprior.model import ModelError

PRIOR_2D = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))


def sigma_model_2d(y=None):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    x = numpyro.sample("x", PRIOR_2D)
    numpyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)


Y_2D = jnp.array([1.5, 0.2])


# -- reading a hierarchical model ---------------------------------------------------------------
def test_sampler_refuses_other_latent_sites_and_names_the_kernels():
    sampler = dp.Sampler(dp.TDS(sigma_model_2d), 8, 4, progress_bar=False)
    with pytest.raises(ModelError, match=r"'sigma'.*dp\.ParticleGibbs.*dp\.PMMH"):
        sampler.run(jax.random.key(0), y=Y_2D)


def test_densities_match_hand_computed_values():
    """log p(y | x, theta), log p(theta) and the unconstrained prior density (with the log
    Jacobian of exp) for a scalar site, a vector site in a plate and a positive gain."""
    A = jnp.array([[1.0, 2.0], [0.5, -1.0]])

    def model(y=None):
        gain = numpyro.sample("gain", dist.LogNormal(0.0, 0.5))
        with numpyro.plate("obs", 2):
            sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        x = numpyro.sample("x", PRIOR_2D)
        numpyro.sample("y", dist.Normal(gain * A @ x, sigma).to_event(1), obs=y)

    hm = read_hierarchical_model(model, kwargs={"y": Y_2D})
    assert list(hm.theta_sites) == ["gain", "sigma"]
    assert hm.theta_sites["sigma"].shape == (2,)
    x = jnp.array([0.3, -0.7])
    theta = {"gain": jnp.array(1.3), "sigma": jnp.array([0.4, 0.9])}
    expected = jax.scipy.stats.norm.logpdf(Y_2D, 1.3 * A @ x, theta["sigma"]).sum()
    np.testing.assert_allclose(hm.log_likelihood(x, theta), expected, rtol=1e-6)
    log_prior = (
        dist.LogNormal(0.0, 0.5).log_prob(1.3) + dist.HalfNormal(1.0).log_prob(theta["sigma"]).sum()
    )
    np.testing.assert_allclose(hm.log_prior(theta), log_prior, rtol=1e-6)
    u = hm.unconstrain(theta)
    np.testing.assert_allclose(u["sigma"], jnp.log(theta["sigma"]), rtol=1e-6)
    np.testing.assert_allclose(hm.constrain(u)["gain"], 1.3, rtol=1e-6)
    # log p(theta) + log |d theta / d u| with theta = exp(u)
    log_jacobian = jnp.log(1.3) + jnp.sum(jnp.log(theta["sigma"]))
    np.testing.assert_allclose(hm.log_prior_unconstrained(u), log_prior + log_jacobian, rtol=1e-5)


def _prior_of(scale):
    return dp.GaussianMixture(jnp.zeros((1, 2)) + scale, jnp.ones(1))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("prior_depends_on_theta", r"site 'x'.*depends on the latent sites \['s'\]"),
        ("theta_depends_on_x", r"site 's'.*depends on the DiffusionPrior site 'x'"),
        ("discrete_theta", r"site 's'.*discrete latent site \(Poisson\)"),
        ("no_theta", r"no latent site besides the DiffusionPrior site 'x'.*dp\.Sampler"),
        ("x_unused", r"no observed site depends on the DiffusionPrior site 'x'"),
    ],
)
def test_refuses_models_it_cannot_sample(body, match):
    def model(y=None):
        if body == "prior_depends_on_theta":
            s = numpyro.sample("s", dist.HalfNormal(1.0))
            x = numpyro.sample("x", _prior_of(s))
        elif body == "theta_depends_on_x":
            x = numpyro.sample("x", PRIOR_2D)
            s = numpyro.sample("s", dist.HalfNormal(jnp.abs(x[0]) + 1.0))
        elif body == "discrete_theta":
            s = numpyro.sample("s", dist.Poisson(2.0))
            x = numpyro.sample("x", PRIOR_2D)
        else:
            s = 1.0 if body == "no_theta" else numpyro.sample("s", dist.HalfNormal(1.0))
            x = numpyro.sample("x", PRIOR_2D)
        loc = jnp.zeros(2) if body == "x_unused" else x
        numpyro.sample("y", dist.Normal(loc, s + 1.0).to_event(1), obs=y)

    with pytest.raises(ModelError, match=match):
        read_hierarchical_model(model, kwargs={"y": Y_2D})


def test_options_are_checked_early():
    with pytest.raises(ValueError, match="method must be one of"):
        dp.PMMH(sigma_model_2d, "dps", num_particles=8, num_steps=4)
    with pytest.raises(ValueError, match="method must be an SMC method"):
        dp.PMMH(sigma_model_2d, dp.DPS, num_particles=8, num_steps=4)
    with pytest.raises(TypeError, match="adapt_covariance must be True or False"):
        dp.PMMH(sigma_model_2d, num_particles=8, num_steps=4, adapt_covariance="dense")
    with pytest.raises(ValueError, match="num_particles must be >= 2"):
        dp.ParticleGibbs(sigma_model_2d, num_particles=1, num_steps=4)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        dp.ParticleGibbs(sigma_model_2d, num_particles=8, num_steps=0)
    with pytest.raises(TypeError, match="theta_kernel must be None"):
        dp.ParticleGibbs(sigma_model_2d, num_particles=8, num_steps=4, theta_kernel="nuts")
    with pytest.raises(ValueError, match="marginal_moves must be an integer >= 0"):
        dp.ParticleGibbs(sigma_model_2d, num_particles=8, num_steps=4, marginal_moves=-1)
    with pytest.raises(ValueError, match="marginal_target_accept_prob must be in"):
        dp.ParticleGibbs(
            sigma_model_2d, num_particles=8, num_steps=4, marginal_target_accept_prob=1.0
        )
    with pytest.raises(ValueError, match="proposal must be one of"):
        dp.ParticleGibbs(sigma_model_2d, num_particles=8, num_steps=4, proposal="prior")
    with pytest.raises(ValueError, match=r"ParticleGibbs\(proposal='subspace'\).*scale=0.5"):
        dp.ParticleGibbs(
            sigma_model_2d, num_particles=8, num_steps=4, proposal="subspace", scale=0.5
        )


def test_particle_gibbs_takes_the_subspace_proposal_for_linear_gaussian_models():
    """``proposal="auto"`` reads the model (before anything is compiled): the subspace
    proposal for a linear model with Normal noise whose scale is a latent site, the guided
    one for Student-t noise, which ``proposal="subspace"`` refuses with the sites named."""

    def student_t_model(y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        x = numpyro.sample("x", PRIOR_2D)
        numpyro.sample("y", dist.StudentT(4.0, x, sigma).to_event(1), obs=y)

    def chosen(model, proposal="auto"):
        kernel = dp.ParticleGibbs(model, num_particles=4, num_steps=3, proposal=proposal)
        kernel._check(read_hierarchical_model(model, kwargs={"y": Y_2D}))
        return kernel._subspace

    assert chosen(sigma_model_2d) and chosen(sigma_model_2d, "subspace")
    assert not chosen(sigma_model_2d, "guided") and not chosen(student_t_model)
    with pytest.raises(ModelError, match=r"ParticleGibbs needs a linear.*y: StudentT"):
        chosen(student_t_model, "subspace")


# -- the NumPyro integration, on a tiny run --------------------------------------------------------
@pytest.fixture(scope="module", params=["ParticleGibbs", "PMMH"])
def tiny_run(request):
    if request.param == "ParticleGibbs":
        # a callable theta kernel (HMC with a fixed trajectory compiles faster than NUTS)
        theta_kernel = functools.partial(numpyro.infer.HMC, num_steps=4, trajectory_length=None)
        # with a marginal move, so that its plumbing runs in both chain layouts
        kernel = dp.ParticleGibbs(
            sigma_model_2d,
            num_particles=8,
            num_steps=5,
            theta_kernel=theta_kernel,
            marginal_moves=1,
        )
    else:
        kernel = dp.PMMH(sigma_model_2d, "tds", num_particles=8, num_steps=5)
    mcmc = numpyro.infer.MCMC(
        kernel,
        num_warmup=10,
        num_samples=15,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(0), y=Y_2D)
    return request.param, mcmc


def test_mcmc_draws_x_and_theta(tiny_run, capsys):
    name, mcmc = tiny_run
    samples = mcmc.get_samples()
    assert samples["sigma"].shape == (30,) and samples["x"].shape == (30, 2)
    assert bool(jnp.all(samples["sigma"] > 0)) and bool(jnp.all(jnp.isfinite(samples["x"])))
    grouped = mcmc.get_samples(group_by_chain=True)
    assert grouped["x"].shape == (2, 15, 2)
    # the chains differ: each has its own key
    assert not bool(jnp.allclose(grouped["x"][0], grouped["x"][1]))
    # x moves between draws (a fresh x from every accepted SMC run or sweep)
    assert len(np.unique(np.asarray(samples["x"][:, 0]))) > 2
    mcmc.print_summary()
    assert "sigma" in capsys.readouterr().out
    idata = az.from_numpyro(mcmc)
    posterior = idata["posterior"]
    assert set(posterior.data_vars) >= {"sigma", "x"}
    assert posterior["x"].shape == (2, 15, 2)


@pytest.mark.slow
def test_same_key_same_draws_sequential_or_vectorized(tiny_run):
    """One key gives the same chains whether NumPyro runs them side by side or one after
    another (each chain's randomness comes from its own key only)."""
    name, mcmc = tiny_run
    kernel = mcmc.sampler
    sequential = numpyro.infer.MCMC(
        kernel,
        num_warmup=10,
        num_samples=15,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    sequential.run(jax.random.key(0), y=Y_2D)
    # float32 rounding differs between the batched and the one-chain program (a few ulps,
    # carried along the chain); a key shared between chains would differ at order 1
    np.testing.assert_allclose(
        np.asarray(sequential.get_samples()["sigma"]),
        np.asarray(mcmc.get_samples()["sigma"]),
        rtol=1e-4,
    )


# -- exact checks: a scalar theta whose marginal posterior is known by quadrature ---------------
DIM = 8


def _grid_mixture(dim):
    """Four components on a 2-d grid embedded in ``dim`` dimensions (unequal weights and
    scales): a multimodal prior whose evidence is exact for linear Gaussian observations."""
    means = np.zeros((4, dim), np.float32)
    means[:, 0] = [-2.0, 2.0, -2.0, 2.0]
    means[:, 1] = [-2.0, -2.0, 2.0, 2.0]
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    scales = np.array([0.5, 0.7, 0.6, 0.8], np.float32)
    return dp.GaussianMixture(means, weights, scales)


class ExactProblem:
    """A model with one scalar theta, and its exact posterior by quadrature on ``grid``:
    ``weights`` of p(theta | y) on the grid, and E[x | y] and Var[x | y] as mixtures over
    theta of the exact posteriors given theta."""

    def __init__(self, model, theta_name, theta_prior, operator_and_noise, grid, y, A):
        self.model, self.theta_name, self.y, self.A = model, theta_name, y, A
        self.grid = np.asarray(grid)

        def log_joint(theta):
            operator, noise = operator_and_noise(theta)
            return prior.log_evidence(operator, noise, y) + theta_prior.log_prob(theta)

        def moments(theta):
            operator, noise = operator_and_noise(theta)
            post = prior.posterior(operator, noise, y)
            return post.mean, jnp.diag(post.covariance) + post.mean**2

        prior = PRIOR_8D
        log_post = np.asarray(jax.vmap(log_joint)(grid), np.float64)
        weights = np.exp(log_post - log_post.max())
        self.weights = weights / weights.sum()
        means, second = (np.asarray(m, np.float64) for m in jax.vmap(moments)(grid))
        self.x_mean = self.weights @ means
        self.x_var = self.weights @ second - self.x_mean**2

    def kolmogorov_distance(self, draws):
        cdf = np.cumsum(self.weights)
        draws = np.sort(np.ravel(draws))
        n = draws.size
        at_draws = np.interp(draws, self.grid, cdf)
        return max(np.max(np.arange(1, n + 1) / n - at_draws), np.max(at_draws - np.arange(n) / n))


PRIOR_8D = _grid_mixture(DIM)


def _operator_and_data(key, obs_dim):
    key_a, key_x, key_e = jax.random.split(key, 3)
    A = 2.0 * jax.random.normal(key_a, (obs_dim, DIM)) / np.sqrt(DIM)
    x_true = PRIOR_8D.sample(key_x)
    return A, A @ x_true + 0.5 * jax.random.normal(key_e, (obs_dim,))


@functools.cache
def unknown_noise(obs_dim):
    """(a) y = A x + sigma eps with sigma ~ HalfNormal(1)."""
    A, y = _operator_and_data(jax.random.key(10), obs_dim)

    def model(A, y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        x = numpyro.sample("x", PRIOR_8D)
        numpyro.sample("y", dist.Normal(A @ x, sigma).to_event(1), obs=y)

    grid = jnp.linspace(1e-3, 3.0, 3000)
    return ExactProblem(model, "sigma", dist.HalfNormal(1.0), lambda s: (A, s), grid, y, A)


@functools.cache
def unknown_gain(obs_dim):
    """(b) y = g A x + 0.5 eps with g ~ LogNormal(0, 0.5)."""
    A, y = _operator_and_data(jax.random.key(11), obs_dim)

    def model(A, y=None):
        gain = numpyro.sample("gain", dist.LogNormal(0.0, 0.5))
        x = numpyro.sample("x", PRIOR_8D)
        numpyro.sample("y", dist.Normal(gain * A @ x, 0.5).to_event(1), obs=y)

    grid = jnp.linspace(1e-3, 5.0, 3000)
    return ExactProblem(model, "gain", dist.LogNormal(0.0, 0.5), lambda g: (g * A, 0.5), grid, y, A)


def _kernel(name, model):
    if name == "ParticleGibbs":
        return dp.ParticleGibbs(model, num_particles=64, num_steps=50)
    return dp.PMMH(model, "tds", num_particles=128, num_steps=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("problem", "obs_dim", "kernel"),
    [
        (unknown_noise, 16, "ParticleGibbs"),
        (unknown_gain, 4, "ParticleGibbs"),
        (unknown_noise, 4, "PMMH"),
        (unknown_gain, 4, "PMMH"),
    ],
    ids=["noise-ParticleGibbs", "gain-ParticleGibbs", "noise-PMMH", "gain-PMMH"],
)
def test_theta_and_x_match_the_exact_posterior(problem, obs_dim, kernel):
    """4 chains x 250 draws (d = 8, 64 particles and 50 steps for particle Gibbs, 128 and 30
    for PMMH): theta's Kolmogorov distance to the quadrature CDF is within what its effective
    sample size allows (sqrt(ESS) D below 1.8, the 99.7% point of Kolmogorov's distribution),
    every coordinate of E[x | y] is within 4 Monte Carlo standard errors of the exact mixture
    over theta, and split R-hat is below 1.1. PMMH runs with 4 observations, where the
    evidence of one TDS run is precise enough for it to mix (with 16 its log-evidence has a
    standard deviation near 1 and the chain sticks); particle Gibbs needs no precise
    evidence (its default proposal here is the subspace one: the models are linear Gaussian)."""
    problem = problem(obs_dim)
    mcmc = numpyro.infer.MCMC(
        _kernel(kernel, problem.model),
        num_warmup=150,
        num_samples=250,
        num_chains=4,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(1), problem.A, y=problem.y)
    samples = mcmc.get_samples(group_by_chain=True)
    theta = np.asarray(samples[problem.theta_name])
    ess = float(effective_sample_size(theta))
    assert ess > 50, f"{problem.theta_name}: ESS {ess:.0f} of {theta.size} draws"
    assert float(split_gelman_rubin(theta)) < 1.1
    distance = problem.kolmogorov_distance(theta)
    assert np.sqrt(ess) * distance < 1.8, f"Kolmogorov distance {distance:.3f}, ESS {ess:.0f}"

    x = np.asarray(samples["x"])  # (chains, draws, d)
    for i in range(DIM):
        ess_i = float(effective_sample_size(x[..., i]))
        error = (x[..., i].mean() - problem.x_mean[i]) / np.sqrt(problem.x_var[i] / ess_i)
        assert abs(error) < 4, f"E[x_{i} | y] off by {error:.1f} standard errors"
    assert float(np.max(np.asarray(split_gelman_rubin(x)))) < 1.1


# -- PMMH's covariance adaptation ---------------------------------------------------------------
CORRELATED_GAINS = jnp.array([[1.0, 1.0], [1.0, 1.3]])
CORRELATED_Y = jnp.array([2.0, 3.0])


def correlated_model(y=None):
    """y = x + M (a, b) + 0.5 eps with x ~ N(0, I_2): given y, a and b are Gaussian with
    correlation -0.93 (M is near singular)."""
    a = numpyro.sample("a", dist.Normal(0.0, 3.0))
    b = numpyro.sample("b", dist.Normal(0.0, 3.0))
    x = numpyro.sample("x", dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1)))
    theta = jnp.stack([a, b])
    numpyro.sample("y", dist.Normal(x + CORRELATED_GAINS @ theta, 0.5).to_event(1), obs=y)


def _correlated_posterior():
    """Exact mean and covariance of (a, b) given y: y ~ N(M theta, (1 + 0.5^2) I)."""
    precision = jnp.eye(2) / 9.0 + CORRELATED_GAINS.T @ CORRELATED_GAINS / 1.25
    covariance = np.linalg.inv(np.asarray(precision))
    return covariance @ np.asarray(CORRELATED_GAINS.T @ CORRELATED_Y) / 1.25, covariance


@pytest.mark.slow
def test_pmmh_learns_the_posterior_covariance_of_correlated_hyperparameters():
    """Two strongly correlated hyperparameters, with MCGdiff's evidence (exact for this
    Gaussian prior): after 300 warmup iterations the walk's shape has the exact posterior's
    correlation and its ratio of scales; 4 chains x 300 draws then match the exact mean within
    4 Monte Carlo standard errors and mix (R-hat below 1.05, ESS above 150). Without the
    adaptation the same chains keep the identity and mix worse (the shape is what moved)."""
    mean, covariance = _correlated_posterior()
    correlation = covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])

    def run(adapt):
        kernel = dp.PMMH(
            correlated_model, "mcgdiff", num_particles=16, num_steps=5, adapt_covariance=adapt
        )
        mcmc = numpyro.infer.MCMC(
            kernel,
            num_warmup=300,
            num_samples=300,
            num_chains=4,
            chain_method="vectorized",
            progress_bar=False,
        )
        mcmc.run(jax.random.key(3), y=CORRELATED_Y)
        samples = mcmc.get_samples(group_by_chain=True)
        theta = np.stack([samples["a"], samples["b"]], axis=-1)
        return mcmc.last_state, theta

    state, theta = run(True)
    for tril in np.asarray(state.scale_tril):
        shape = tril @ tril.T
        learned = shape[0, 1] / np.sqrt(shape[0, 0] * shape[1, 1])
        assert abs(learned - correlation) < 0.05, (
            f"correlation {learned:.2f}, exact {correlation:.2f}"
        )
        ratio = shape[0, 0] / shape[1, 1] / (covariance[0, 0] / covariance[1, 1])
        assert 0.7 < ratio < 1.4, f"variance ratio off by {ratio:.2f}"
    ess = np.asarray(effective_sample_size(theta))
    assert np.all(ess > 150), f"ESS {ess}"
    assert float(np.max(np.asarray(split_gelman_rubin(theta)))) < 1.05
    error = (theta.reshape(-1, 2).mean(axis=0) - mean) / np.sqrt(np.diag(covariance) / ess)
    assert np.all(np.abs(error) < 4), f"posterior mean off by {error} standard errors"

    plain_state, plain_theta = run(False)
    np.testing.assert_array_equal(
        np.asarray(plain_state.scale_tril), np.broadcast_to(np.eye(2), (4, 2, 2))
    )
    assert np.min(np.asarray(effective_sample_size(plain_theta))) < 0.7 * np.min(ess)


def test_pmmh_adapts_its_covariance_only_in_long_enough_warmups():
    """Stan's slow windows lie inside warmup, in order; a warmup under 20 iterations has none
    (one window would be all of it), and then the walk keeps the identity."""
    from diffprior.infer.hierarchical import _covariance_windows

    assert _covariance_windows(19) == []
    for num_warmup in (20, 150, 1000):
        windows = _covariance_windows(num_warmup)
        assert windows and windows[0][0] > 0 and windows[-1][1] < num_warmup - 1
        assert all(
            end + 1 == start for (_, end), (start, _) in zip(windows[:-1], windows[1:], strict=True)
        )
    kernel = dp.PMMH(correlated_model, "mcgdiff", num_particles=8, num_steps=4)
    mcmc = numpyro.infer.MCMC(kernel, num_warmup=15, num_samples=5, progress_bar=False)
    mcmc.run(jax.random.key(0), y=CORRELATED_Y)
    np.testing.assert_array_equal(np.asarray(mcmc.last_state.scale_tril), np.eye(2))


@pytest.mark.slow
@pytest.mark.parametrize("proposal", ["guided", "subspace"])
def test_marginal_moves_keep_theta_exact_with_a_noisy_evidence(proposal):
    """ParticleGibbs's marginal moves (three per iteration, the theta kernel a short HMC) with
    16 particles and 30 steps, where one guided sweep's evidence is noisy, so the acceptance
    ratio's current estimate must be the conditional sweep's (an unconditional one biases
    theta): 4 chains x 200 draws of sigma (d = 8, 16 observations) within Monte Carlo error of
    the quadrature CDF (sqrt(ESS) D below 1.8), every coordinate of E[x | y] within 4 Monte
    Carlo standard errors, the moves accepted at a useful rate; with either proposal (the
    subspace one's evidence, with the change of variables to y, enters the same ratio)."""
    problem = unknown_noise(16)
    theta_kernel = functools.partial(numpyro.infer.HMC, num_steps=4, trajectory_length=None)
    kernel = dp.ParticleGibbs(
        problem.model,
        num_particles=16,
        num_steps=30,
        theta_kernel=theta_kernel,
        marginal_moves=3,
        proposal=proposal,
    )
    mcmc = numpyro.infer.MCMC(
        kernel,
        num_warmup=75,
        num_samples=200,
        num_chains=4,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(1), problem.A, y=problem.y, extra_fields=("marginal_accept_prob",))
    accept = float(np.mean(mcmc.get_extra_fields()["marginal_accept_prob"]))
    assert 0.05 < accept < 0.6, f"marginal moves accepted at {accept:.2f}"
    sigma = np.asarray(mcmc.get_samples(group_by_chain=True)["sigma"])
    ess = float(effective_sample_size(sigma))
    assert ess > 100, f"sigma: ESS {ess:.0f} of {sigma.size} draws"
    assert float(split_gelman_rubin(sigma)) < 1.1
    distance = problem.kolmogorov_distance(sigma)
    assert np.sqrt(ess) * distance < 1.8, f"Kolmogorov distance {distance:.3f}, ESS {ess:.0f}"
    x = np.asarray(mcmc.get_samples(group_by_chain=True)["x"])
    for i in range(DIM):
        ess_i = float(effective_sample_size(x[..., i]))
        error = (x[..., i].mean() - problem.x_mean[i]) / np.sqrt(problem.x_var[i] / ess_i)
        assert abs(error) < 4, f"E[x_{i} | y] off by {error:.1f} standard errors"


def _student_t_problem():
    """(c) y = A x + 0.3 t_nu with unknown degrees of freedom nu ~ Gamma(2, 0.2), on a d = 2
    prior: p(y | nu) by quadrature over a grid of x, then p(nu | y) by quadrature over nu."""
    key_a, key_x, key_e = jax.random.split(jax.random.key(12), 3)
    A = jax.random.normal(key_a, (10, 2))
    y = A @ PRIOR_2D.sample(key_x) + 0.3 * jax.random.t(key_e, 3.0, (10,))
    nu_prior = dist.Gamma(2.0, 0.2)

    def model(A, y=None):
        nu = numpyro.sample("nu", nu_prior)
        x = numpyro.sample("x", PRIOR_2D)
        numpyro.sample("y", dist.StudentT(nu, A @ x, 0.3).to_event(1), obs=y)

    side = jnp.linspace(-6.0, 6.0, 300)
    points = jnp.stack(jnp.meshgrid(side, side, indexing="ij"), axis=-1).reshape(-1, 2)
    log_prior_x = PRIOR_2D.log_prob(points)
    nu_grid = jnp.linspace(0.05, 80.0, 400)

    def log_joint_x(nu):
        log_lik = dist.StudentT(nu, points @ A.T, 0.3).log_prob(y).sum(-1)
        return log_prior_x + log_lik

    joint = np.asarray(jax.lax.map(log_joint_x, nu_grid), np.float64)  # (nu, x)
    log_evidence = joint.max(axis=1) + np.log(
        np.exp(joint - joint.max(axis=1, keepdims=True)).sum(1)
    )
    log_post = log_evidence + np.asarray(nu_prior.log_prob(nu_grid))
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    x_given_nu = np.exp(joint - joint.max(axis=1, keepdims=True))
    x_given_nu /= x_given_nu.sum(axis=1, keepdims=True)
    x_weights = weights @ x_given_nu  # p(x | y) on the x grid
    return model, A, y, np.asarray(nu_grid), weights, x_weights, np.asarray(points)


@pytest.mark.slow
def test_student_t_degrees_of_freedom_match_quadrature():
    """Particle Gibbs (NUTS on nu given x, conditional TDS on x given nu; 64 particles, 20
    steps, 4 chains x 250 draws): nu's Kolmogorov distance to the quadrature CDF is within its
    Monte Carlo error and E[x | y] is within 4 standard errors of the 2-d quadrature."""
    model, A, y, nu_grid, weights, x_weights, points = _student_t_problem()
    mcmc = numpyro.infer.MCMC(
        dp.ParticleGibbs(model, num_particles=64, num_steps=20),
        num_warmup=150,
        num_samples=250,
        num_chains=4,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(3), A, y=y)
    samples = mcmc.get_samples(group_by_chain=True)
    nu = np.asarray(samples["nu"])
    ess = float(effective_sample_size(nu))
    assert ess > 50, f"nu: ESS {ess:.0f}"
    assert float(split_gelman_rubin(nu)) < 1.1
    cdf = np.cumsum(weights)
    draws = np.sort(np.ravel(nu))
    at_draws = np.interp(draws, nu_grid, cdf)
    n = draws.size
    distance = max(np.max(np.arange(1, n + 1) / n - at_draws), np.max(at_draws - np.arange(n) / n))
    assert np.sqrt(ess) * distance < 1.8, f"Kolmogorov distance {distance:.3f}, ESS {ess:.0f}"
    x = np.asarray(samples["x"])
    x_mean = x_weights @ points
    x_var = x_weights @ points**2 - x_mean**2
    for i in range(2):
        ess_i = float(effective_sample_size(x[..., i]))
        error = (x[..., i].mean() - x_mean[i]) / np.sqrt(x_var[i] / ess_i)
        assert abs(error) < 4, f"E[x_{i} | y] off by {error:.1f} standard errors"


# -- EvidenceGrid: one scalar theta by quadrature over the SMC evidence -------------------------
def _exact_quantiles(problem, probs):
    return np.interp(probs, np.cumsum(problem.weights), problem.grid)


@pytest.mark.slow
def test_evidence_grid_matches_the_exact_posterior():
    """Unknown noise (a) at d = 8 with 16 observations: the grid posterior's CDF at the exact
    5%, 10%, ..., 95% quantiles is within 0.04 of them, its draws of x average to E[x | y]
    within their Monte Carlo error, and a second run with new data reuses the program."""
    problem = unknown_noise(16)
    lo, hi = _exact_quantiles(problem, [0.001, 0.999])
    values = np.geomspace(lo / 1.2, hi * 1.2, 20)
    grid = dp.EvidenceGrid(problem.model, num_particles=256, num_steps=30, num_runs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a grid that covers the posterior, a precise evidence
        result = grid.run(jax.random.key(0), values, problem.A, y=problem.y)
    probs = np.linspace(0.05, 0.95, 19)
    distance = np.max(np.abs(result.cdf(_exact_quantiles(problem, probs)) - probs))
    assert distance < 0.04, distance
    smoothed = np.max(np.abs(result.cdf(_exact_quantiles(problem, probs), smooth=4) - probs))
    assert smoothed < 0.04, smoothed
    assert float(np.max(result.log_evidence_sd)) < 1.0
    draws = result.sample(jax.random.key(1), 4000)
    assert draws["sigma"].shape == (4000,) and draws["x"].shape == (4000, DIM)
    # 80 runs' draws behind the 4000: their standard error, from the exact variance
    se = np.sqrt(problem.x_var / 80)
    assert np.all(np.abs(draws["x"].mean(axis=0) - problem.x_mean) < 4 * se + 0.05)
    compilations = grid._compiled._cached._cache_size()
    grid.run(jax.random.key(2), values, problem.A, y=problem.y + 0.1)
    assert grid._compiled._cached._cache_size() == compilations


def test_evidence_grid_warns_and_refuses():
    problem = unknown_noise(4)
    grid = dp.EvidenceGrid(problem.model, num_particles=16, num_steps=5, num_runs=2)
    key = jax.random.key(0)
    with pytest.warns(UserWarning, match="mass in the first and last grid interval"):
        grid.run(key, [0.9, 1.0, 1.1], problem.A, y=problem.y)  # far narrower than p(sigma | y)
    with pytest.raises(ValueError, match="outside the support of 'sigma'"):
        grid.run(key, [-0.5, 0.5, 1.0], problem.A, y=problem.y)
    with pytest.raises(ValueError, match="strictly increasing"):
        grid.run(key, [0.5, 0.4, 1.0], problem.A, y=problem.y)
    with pytest.raises(ValueError, match="at least 3 values"):
        grid.run(key, [0.5, 1.0], problem.A, y=problem.y)
    with pytest.raises(ValueError, match="num_runs"):
        dp.EvidenceGrid(problem.model, num_particles=16, num_steps=5, num_runs=1)

    def two_sites(A, y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        gain = numpyro.sample("gain", dist.LogNormal(0.0, 0.5))
        x = numpyro.sample("x", PRIOR_8D)
        numpyro.sample("y", dist.Normal(gain * A @ x, sigma).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"exactly one latent site.*\['sigma', 'gain'\]"):
        dp.EvidenceGrid(two_sites, num_particles=16, num_steps=5).run(
            key, [0.5, 1.0, 2.0], problem.A, y=problem.y
        )

    def vector_site(A, y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(4)).to_event(1))
        x = numpyro.sample("x", PRIOR_8D)
        numpyro.sample("y", dist.Normal(A @ x, sigma).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"scalar hyperparameter; 'sigma' has shape \(4,\)"):
        dp.EvidenceGrid(vector_site, num_particles=16, num_steps=5).run(
            key, [0.5, 1.0, 2.0], problem.A, y=problem.y
        )
