"""MCMC baselines and the comparison table: NUTS and tempered SMC against the exact posterior
and evidence of a two-component Gaussian mixture observed through y = A x + N(0, sigma_y^2),
compare's columns and ranking, plot_compare's figure, and clear errors on bad input.

Tolerances are Monte Carlo errors: NUTS from ArviZ's ESS of the quantity estimated, tempered
SMC from the spread between independent chains (a t statistic with num_chains - 1 degrees of
freedom). One run per sampler serves several tests (compilation dominates the cost).
"""

from __future__ import annotations

import arviz_base
import arviz_stats
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.baselines import COMPARE_COLUMNS
from diffprior.model import ModelError

A = jnp.array([[1.0, 1.0]])
SIGMA_Y = 0.5
Y = jnp.array([1.0])
#: Two overlapping modes (posterior weights about 0.07 and 0.93), a ridge along A's null space.
PRIOR = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.3, 0.7]))
SMC_CHAINS, SMC_PARTICLES = 8, 500


def model(y=None):
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Normal(A @ x, SIGMA_Y).to_event(1), obs=y)


@pytest.fixture(scope="module")
def posterior():
    return PRIOR.posterior(A, SIGMA_Y, Y)


@pytest.fixture(scope="module")
def exact_moments(posterior):
    """Mean, variance and the variance of (x - mean)^2 (for the error of a variance
    estimate), from many exact draws (their own error is negligible next to the samplers')."""
    draws = np.asarray(posterior.sample(jax.random.key(99), (200_000,)))
    mean = np.asarray(posterior.mean)
    variance = np.asarray(posterior.variance)
    return mean, variance, np.var((draws - mean) ** 2, axis=0)


@pytest.fixture(scope="module")
def nuts():
    sampler = dp.baselines.NUTS(
        model, num_warmup=300, num_samples=500, num_chains=4, progress_bar=False
    )
    sampler.run(jax.random.key(0), y=Y)
    return sampler


@pytest.fixture(scope="module")
def smc():
    sampler = dp.baselines.TemperedSMC(
        model, num_particles=SMC_PARTICLES, num_chains=SMC_CHAINS, progress_bar=False
    )
    sampler.run(jax.random.key(1), y=Y)
    return sampler


def _ess_mean(values: np.ndarray) -> np.ndarray:
    """ArviZ's ESS for the mean of each coordinate of ``(chain, draw, d)`` draws."""
    tree = arviz_base.from_dict({"posterior": {"v": values}})
    return np.asarray(arviz_stats.ess(tree["posterior"]["v"], method="mean"))


def _assert_chain_spread(per_chain: np.ndarray, exact: np.ndarray, what: str, z: float = 6.0):
    """``mean over chains`` within ``z`` standard errors (from the between-chain spread)."""
    estimate = per_chain.mean(axis=0)
    standard_error = per_chain.std(axis=0, ddof=1) / np.sqrt(per_chain.shape[0])
    assert np.all(np.abs(estimate - exact) <= z * standard_error), (
        f"{what}: {estimate} vs exact {exact} (standard error {standard_error})"
    )


# -- NUTS ---------------------------------------------------------------------------------------
def test_nuts_matches_exact_posterior_moments(nuts, exact_moments):
    mean, variance, var_of_square = exact_moments
    draws = np.asarray(nuts.get_samples(group_by_chain=True)["x"])  # (4, 500, 2)
    assert draws.shape == (4, 500, 2)
    assert nuts.get_samples()["x"].shape == (2000, 2)

    ess_mean = _ess_mean(draws)
    estimate = draws.mean(axis=(0, 1))
    tolerance = 5 * np.sqrt(variance / ess_mean)
    assert np.all(np.abs(estimate - mean) <= tolerance), (estimate, mean, tolerance)

    squares = (draws - mean) ** 2
    ess_square = _ess_mean(squares)
    estimate = squares.mean(axis=(0, 1))
    tolerance = 5 * np.sqrt(var_of_square / ess_square)
    assert np.all(np.abs(estimate - variance) <= tolerance), (estimate, variance, tolerance)


def test_nuts_reports_time_and_arviz_tree(nuts):
    assert nuts.seconds > 0
    assert nuts.log_evidence is None
    assert nuts.mcmc.num_samples == 500
    tree = nuts.to_arviz()
    assert tree.attrs["method"] == "NUTS"
    assert tree["posterior"].attrs["method"] == "NUTS"
    assert tree["posterior"]["x"].shape == (4, 500, 2)
    assert tree.attrs["seconds"] == pytest.approx(nuts.seconds)


# -- tempered SMC -------------------------------------------------------------------------------
def test_tempered_smc_matches_exact_moments_and_evidence(smc, exact_moments):
    mean, variance, _ = exact_moments
    draws = np.asarray(smc.get_samples(group_by_chain=True)["x"])
    assert draws.shape == (SMC_CHAINS, SMC_PARTICLES, 2)
    _assert_chain_spread(draws.mean(axis=1), mean, "posterior mean")
    _assert_chain_spread(((draws - mean) ** 2).mean(axis=1), variance, "posterior variance")

    exact = float(PRIOR.log_evidence(A, SIGMA_Y, Y))
    log_evidence = np.asarray(smc.log_evidence)
    assert log_evidence.shape == (SMC_CHAINS,)
    _assert_chain_spread(log_evidence[:, None], np.array([exact]), "log evidence")


def test_tempered_smc_reaches_lambda_one_and_records_steps(smc):
    steps = np.asarray(smc.num_tempering_steps)
    assert steps.shape == (SMC_CHAINS,) and np.all(steps >= 1)
    tree = smc.to_arviz()
    stats = tree["sample_stats"].dataset
    assert tree.attrs["method"] == "TemperedSMC"
    assert set(tree.children) == {"posterior", "sample_stats", "observed_data", "log_likelihood"}
    lambdas = stats["tempering_param"].values  # (chain, step), NaN after a chain finished
    for chain in range(SMC_CHAINS):
        trace = lambdas[chain, : steps[chain]]
        assert np.all(np.diff(trace) > 0) and trace[-1] == pytest.approx(1.0)
        assert np.all(np.isnan(lambdas[chain, steps[chain] :]))
    np.testing.assert_allclose(stats["log_evidence"].values, np.asarray(smc.log_evidence))


def test_tempered_smc_same_key_same_result(smc):
    first = np.asarray(smc.get_samples()["x"])
    smc.run(jax.random.key(1), y=Y)
    np.testing.assert_array_equal(np.asarray(smc.get_samples()["x"]), first)


@pytest.mark.slow
def test_tempered_smc_hmc_matches_exact_moments_and_evidence(exact_moments):
    mean, variance, _ = exact_moments
    smc = dp.baselines.TemperedSMC(
        model, num_particles=500, num_chains=SMC_CHAINS, mcmc="hmc", progress_bar=False
    )
    smc.run(jax.random.key(2), y=Y)
    draws = np.asarray(smc.get_samples(group_by_chain=True)["x"])
    _assert_chain_spread(draws.mean(axis=1), mean, "posterior mean")
    _assert_chain_spread(((draws - mean) ** 2).mean(axis=1), variance, "posterior variance")
    exact = float(PRIOR.log_evidence(A, SIGMA_Y, Y))
    _assert_chain_spread(np.asarray(smc.log_evidence)[:, None], np.array([exact]), "evidence")


@pytest.mark.slow
def test_tempered_smc_on_a_diffusion_prior_through_its_ode_density():
    """A generic DiffusionPrior (log_prob by the probability-flow ODE) with the exact denoiser
    of N(0, I): the posterior of y = x_0 + N(0, 0.5^2) is N(0.8, 0.2) x N(0, 1)."""
    gaussian = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    prior = dp.DiffusionPrior(gaussian.denoiser, (2,), ode_steps=16)

    def ode_model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)

    smc = dp.baselines.TemperedSMC(
        ode_model, num_particles=250, num_mcmc_steps=5, num_chains=4, progress_bar=False
    )
    smc.run(jax.random.key(0), y=1.0)
    draws = np.asarray(smc.get_samples(group_by_chain=True)["x"])
    # the ODE's log-density error (about 0.01 at these points) shifts the answer a little:
    # allow 0.05 on top of the Monte Carlo error
    per_chain = draws.mean(axis=1)
    error = np.abs(per_chain.mean(axis=0) - np.array([0.8, 0.0]))
    standard_error = per_chain.std(axis=0, ddof=1) / 2
    assert np.all(error <= 6 * standard_error + 0.05), (per_chain, standard_error)
    exact = float(gaussian.log_evidence(jnp.array([[1.0, 0.0]]), 0.5, jnp.array([1.0])))
    log_evidence = np.asarray(smc.log_evidence)
    assert abs(log_evidence.mean() - exact) <= 6 * log_evidence.std(ddof=1) / 2 + 0.05


# -- compare and plot_compare -------------------------------------------------------------------
def test_compare_columns_and_ranking(nuts, smc, posterior):
    # a deliberately wrong sampler: 2 chains of prior draws, which ignore y
    prior_draws = PRIOR.sample(jax.random.key(5), (2, 1000))
    wrong = arviz_base.from_dict({"posterior": {"x": prior_draws}})
    table = dp.compare({"nuts": nuts, "smc": smc, "mcmc": nuts.mcmc, "prior": wrong}, posterior)

    assert list(table.columns) == list(COMPARE_COLUMNS)
    assert list(table.index) == ["nuts", "smc", "mcmc", "prior"]
    assert table.loc["smc", "sliced_wasserstein"] < table.loc["prior", "sliced_wasserstein"]
    assert table.loc["nuts", "sliced_wasserstein"] < table.loc["prior", "sliced_wasserstein"]
    # draws as good as exact ones sit near the floor (exact vs exact, as many draws), the
    # prior's far above it
    ratio = table["sliced_wasserstein"] / table["sw_floor"]
    assert ratio["smc"] < 3 and ratio["nuts"] < 3 and ratio["prior"] > 10, ratio

    assert table.loc["nuts", "seconds"] == pytest.approx(nuts.seconds)
    assert np.isnan(table.loc["mcmc", "seconds"]) and np.isnan(table.loc["prior", "seconds"])
    row = table.loc["smc"]
    assert row["ess_bulk_per_second"] == pytest.approx(row["ess_bulk"] / row["seconds"])
    assert row["num_chains"] == SMC_CHAINS and row["num_draws"] == SMC_PARTICLES
    assert row["log_evidence"] == pytest.approx(float(np.mean(np.asarray(smc.log_evidence))))
    assert np.isnan(table.loc["nuts", "log_evidence"])
    assert table.loc["nuts", "r_hat"] < 1.05
    # the same draws, one chain: no R-hat
    one_chain = arviz_base.from_dict({"posterior": {"x": np.asarray(prior_draws)[:1]}})
    assert np.isnan(dp.compare({"one": one_chain}).loc["one", "r_hat"])


def test_compare_accepts_sampler_and_array_reference(posterior):
    sampler = dp.Sampler(dp.Unguided(model), num_particles=500, num_steps=10, progress_bar=False)
    sampler.run(jax.random.key(3), y=Y)
    reference = posterior.sample(jax.random.key(4), (500,))
    row = dp.compare({"unguided": sampler}, reference).loc["unguided"]
    assert row["seconds"] == pytest.approx(sampler.seconds)
    assert row["num_chains"] == 1 and row["num_draws"] == 500
    assert np.isfinite(row["sliced_wasserstein"]) and np.isnan(row["sw_floor"])
    assert np.isnan(row["log_evidence"])  # a method without an evidence estimate


def test_plot_compare_overlays_every_source(nuts, smc, posterior):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    plot = dp.plot_compare({"nuts": nuts, "smc": smc}, posterior)
    figure = plot.viz["figure"].item()
    assert len(figure.axes) == 2  # one panel per coordinate of x
    assert all(len(axis.lines) == 3 for axis in figure.axes)  # nuts, smc, reference
    labels = {text.get_text() for legend in figure.legends for text in legend.get_texts()}
    assert labels == {"nuts", "smc", "reference"}
    matplotlib.pyplot.close(figure)


# -- bad input ----------------------------------------------------------------------------------
def test_compare_rejects_unknown_results_and_variables(smc):
    with pytest.raises(TypeError, match=r"results\['bad'\].*cannot compare a list"):
        dp.compare({"bad": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"no variable 'z'.*\['x'\]"):
        dp.compare({"smc": smc}, var_name="z")
    with pytest.raises(ValueError, match="event shape"):
        dp.compare({"smc": smc}, reference=np.zeros((10, 3)))


def _latent_model(y=None):
    den = dp.Denoiser(lambda z, t: jnp.zeros_like(z), dp.schedules.VP.linear(), "x0")
    prior = dp.LatentDiffusionPrior(den, lambda z: jnp.tanh(jnp.outer(z, z)), (2, 2), (2,))
    x = numpyro.sample("image", prior)
    numpyro.sample("y", dist.Normal(x, 0.1).to_event(2), obs=y)


@pytest.mark.parametrize("baseline", [dp.baselines.NUTS, dp.baselines.TemperedSMC])
def test_baselines_refuse_prior_without_log_density(baseline):
    sampler = baseline(_latent_model, progress_bar=False)
    with pytest.raises(ModelError, match=r"site 'image'.*no log density.*dp\.Sampler"):
        sampler.run(jax.random.key(0), y=jnp.zeros((2, 2)))
    assert sampler.seconds is None  # refused before sampling
    with pytest.raises(RuntimeError, match="call run"):
        sampler.get_samples()


def test_baselines_reject_bad_options():
    with pytest.raises(ValueError, match="mcmc must be one of"):
        dp.baselines.TemperedSMC(model, mcmc="gibbs")
    with pytest.raises(ValueError, match="target_ess"):
        dp.baselines.TemperedSMC(model, target_ess=1.5)
    with pytest.raises(ValueError, match="num_particles"):
        dp.baselines.TemperedSMC(model, num_particles=0)
    with pytest.raises(ValueError, match="chain_method"):
        dp.baselines.NUTS(model, chain_method="threads")
    with pytest.raises(ModelError, match="site 'y'.*NaN"):
        dp.baselines.TemperedSMC(model, progress_bar=False).run(0, y=jnp.array([jnp.nan]))
