"""Sampler.to_arviz: the DataTree's groups, dims, statistics and attributes, its use by ArviZ
(summary, ess, plot_dist), the netCDF round trip, and the pointwise log-likelihood group."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from scipy.special import logsumexp

import diffprior as dp

arviz = pytest.importorskip("arviz")

NUM_CHAINS, NUM_PARTICLES, NUM_STEPS, DIM = 2, 32, 10, 3
GROUPS = {"posterior", "sample_stats", "observed_data", "log_likelihood"}


def _sampler(method, **options):
    settings = dict(
        num_particles=NUM_PARTICLES,
        num_steps=NUM_STEPS,
        num_chains=NUM_CHAINS,
        progress_bar=False,
    )
    settings.update(options)
    return dp.Sampler(method, **settings)


@pytest.fixture(scope="module")
def problem():
    return dp.problems.gaussian_problem(jax.random.key(0), DIM, 2)


@pytest.fixture(scope="module")
def tds_run(problem):
    sampler = _sampler(dp.TDS(problem.model, ess_threshold=0.7, resampling="stratified"))
    sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    return sampler, sampler.to_arviz()


def test_groups(tds_run):
    _, tree = tds_run
    assert isinstance(tree, xr.DataTree)
    assert GROUPS <= set(tree.children)


def test_posterior_holds_the_equal_weight_draws(tds_run):
    sampler, tree = tds_run
    x = tree["posterior"]["x"]
    assert x.dims == ("chain", "draw", "x_dim_0")
    assert x.shape == (NUM_CHAINS, NUM_PARTICLES, DIM)
    np.testing.assert_array_equal(x.values, sampler.get_samples(group_by_chain=True)["x"])


def test_sample_stats(tds_run):
    sampler, tree = tds_run
    stats = tree["sample_stats"]
    assert stats["log_evidence"].dims == ("chain",)
    np.testing.assert_array_equal(stats["log_evidence"].values, sampler.log_evidence)
    for name in ("ess", "resampled"):
        assert stats[name].dims == ("chain", "step"), name
        assert stats[name].shape == (NUM_CHAINS, NUM_STEPS), name
    ess = stats["ess"].values
    assert np.all((ess >= 1 - 1e-3) & (ess <= NUM_PARTICLES + 1e-3))
    resampled = stats["resampled"].values
    assert resampled.dtype == bool
    # resampling happened exactly at the steps whose ESS was below the threshold
    np.testing.assert_array_equal(resampled, ess < 0.7 * NUM_PARTICLES)
    log_weight = stats["log_weight"]
    assert log_weight.dims == ("chain", "draw")
    assert log_weight.shape == (NUM_CHAINS, NUM_PARTICLES)
    np.testing.assert_allclose(logsumexp(log_weight.values, axis=1), 0.0, atol=1e-5)


def test_attributes_record_the_run(tds_run):
    _, tree = tds_run
    for attrs in (tree.attrs, tree["posterior"].attrs, tree["sample_stats"].attrs):
        assert attrs["method"] == "TDS"
        assert attrs["num_steps"] == NUM_STEPS
        assert attrs["num_particles"] == NUM_PARTICLES
        assert attrs["diffprior_version"] == dp.__version__
    options = json.loads(tree.attrs["method_options"])
    assert options["ess_threshold"] == 0.7
    assert options["resampling"] == "stratified"


def test_observed_data(tds_run, problem):
    _, tree = tds_run
    np.testing.assert_array_equal(tree["observed_data"]["y"].values, problem.y)


def test_log_likelihood_is_the_pointwise_likelihood_of_the_draws(tds_run, problem):
    """For y ~ Normal(A x, sigma_y).to_event(1) the site's term per draw is
    sum_j log N(y_j; (A x)_j, sigma_y), recomputed here in float64."""
    _, tree = tds_run
    log_lik = tree["log_likelihood"]["y"]
    assert log_lik.dims == ("chain", "draw")
    x = tree["posterior"]["x"].values.astype(np.float64)
    A = np.asarray(problem.A, np.float64)
    y = np.asarray(problem.y, np.float64)
    sigma = float(problem.sigma_y)
    residual = y - np.einsum("jd,cnd->cnj", A, x)
    expected = np.sum(-0.5 * (residual / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi), -1)
    np.testing.assert_allclose(log_lik.values, expected, rtol=1e-4, atol=1e-4)


def test_arviz_summary_and_ess(tds_run):
    _, tree = tds_run
    summary = arviz.summary(tree, var_names=["x"], round_to="none")
    assert len(summary) == DIM
    x = tree["posterior"]["x"].values
    np.testing.assert_allclose(summary["mean"].to_numpy(float), x.mean((0, 1)), rtol=1e-5)
    ess = arviz.ess(tree, var_names=["x"])
    assert ess["x"].dims == ("x_dim_0",)
    assert np.all(np.isfinite(ess["x"].values) & (ess["x"].values > 0))


def test_arviz_plot_dist(tds_run, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, tree = tds_run
    try:
        plot = arviz.plot_dist(tree, var_names=["x"], backend="matplotlib")
        plot.savefig(tmp_path / "dist.png")
    finally:
        plt.close("all")
    assert (tmp_path / "dist.png").stat().st_size > 0


def test_netcdf_round_trip(tds_run, tmp_path):
    _, tree = tds_run
    path = tmp_path / "run.nc"
    tree.to_netcdf(path)
    loaded = arviz.from_netcdf(path)
    assert GROUPS <= set(loaded.children)
    for group in GROUPS | {"sample_stats"}:
        original, read = tree[group].to_dataset(), loaded[group].to_dataset()
        assert set(original.data_vars) == set(read.data_vars), group
        for name in original.data_vars:
            assert read[name].dims == original[name].dims, (group, name)
            np.testing.assert_array_equal(read[name].values, original[name].values)
    assert loaded.attrs["method"] == "TDS"
    assert loaded.attrs["diffprior_version"] == dp.__version__


def test_non_smc_method_on_a_matrix_event():
    """Unguided on an (8, 8) prior: two named event dims, uniform log-weights, NaN evidence."""
    schedule = dp.schedules.VP.linear()

    def net_fn(x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        return alpha * x / (alpha**2 + sigma**2)

    prior = dp.DiffusionPrior(dp.Denoiser(net_fn, schedule, "x0"), event_shape=(8, 8))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x[0], 0.5).to_event(1), obs=y)

    sampler = _sampler(dp.Unguided(model))
    sampler.run(jax.random.key(0), y=jnp.zeros(8))
    tree = sampler.to_arviz()
    assert GROUPS <= set(tree.children)
    x = tree["posterior"]["x"]
    assert x.dims == ("chain", "draw", "x_dim_0", "x_dim_1")
    assert x.shape == (NUM_CHAINS, NUM_PARTICLES, 8, 8)
    stats = tree["sample_stats"]
    np.testing.assert_allclose(stats["log_weight"].values, -np.log(NUM_PARTICLES), rtol=1e-6)
    assert np.all(np.isnan(stats["log_evidence"].values))
    assert tree.attrs["method"] == "Unguided"
