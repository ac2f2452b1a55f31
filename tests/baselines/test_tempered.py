"""Tempered SMC on the shared mixture problem: exact moments and evidence within the chains'
Monte Carlo error, the tempering and tuning traces, the DataTree that diffprior.Sampler's
readers understand, and clear errors on bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from baseline_setup import (
    PRIOR,
    SIGMA_Y,
    SMC_CHAINS,
    SMC_PARTICLES,
    A,
    Y,
    assert_chain_spread,
    latent_model,
    model,
)

import diffprior as dp
from diffprior.baselines import MCMC_KERNELS
from diffprior.baselines.tempered import weighted_covariance
from diffprior.model import ModelError


def test_tempered_smc_matches_exact_moments_and_evidence(smc, exact_moments):
    mean, variance, _ = exact_moments
    draws = np.asarray(smc.get_samples(group_by_chain=True)["x"])
    assert draws.shape == (SMC_CHAINS, SMC_PARTICLES, 2)
    assert_chain_spread(draws.mean(axis=1), mean, "posterior mean")
    assert_chain_spread(((draws - mean) ** 2).mean(axis=1), variance, "posterior variance")

    exact = float(PRIOR.log_evidence(A, SIGMA_Y, Y))
    log_evidence = np.asarray(smc.log_evidence)
    assert log_evidence.shape == (SMC_CHAINS,)
    assert_chain_spread(log_evidence[:, None], np.array([exact]), "log evidence")


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
    np.testing.assert_array_equal(stats["num_tempering_steps"].values, steps)
    assert tree.attrs["num_steps"] == lambdas.shape[1] == steps.max()


def test_tempered_smc_tunes_its_moves_from_the_acceptance_rate(smc):
    """Each step's random-walk step size is the last one times exp(acceptance - 0.234),
    starting from 1 (BlackJAX's inner-kernel tuning with the acceptance-rate update)."""
    stats = smc.to_arviz()["sample_stats"].dataset
    step_size = stats["step_size"].values
    acceptance = stats["acceptance_rate"].values
    steps = np.asarray(smc.num_tempering_steps)
    np.testing.assert_allclose(step_size[:, 0], 1.0)
    for chain in range(SMC_CHAINS):
        used = step_size[chain, : steps[chain]]
        rates = acceptance[chain, : steps[chain]]
        assert np.all((rates > 0) & (rates < 1)), rates
        expected = used[:-1] * np.exp(rates[:-1] - MCMC_KERNELS["rmh"])
        np.testing.assert_allclose(used[1:], expected, rtol=1e-5)


def test_tempered_smc_tree_reads_like_a_samplers(smc):
    """The tree comes from diffprior.diagnostics.to_datatree: the per-step ESS in particles
    (the last step's is the final ESS the draws are resampled from), the evidence increments
    adding up to the evidence, and the SMC health summary of a diffusion SMC run."""
    tree = smc.to_arviz()
    stats = tree["sample_stats"].dataset
    steps = np.asarray(smc.num_tempering_steps)
    ess = stats["ess"].values  # (chain, step)
    final_ess = stats["final_ess"].values
    assert final_ess.shape == (SMC_CHAINS,) and np.all(final_ess > 0.1 * SMC_PARTICLES)
    np.testing.assert_allclose(ess[np.arange(SMC_CHAINS), steps - 1], final_ess, rtol=1e-4)
    assert np.all((ess[~np.isnan(ess)] >= 1) & (ess[~np.isnan(ess)] <= SMC_PARTICLES))
    increments = stats["log_evidence_increment"].values
    np.testing.assert_allclose(
        np.nansum(increments, axis=1), np.asarray(smc.log_evidence), rtol=1e-5, atol=1e-5
    )
    health = dp.smc_health(tree)
    assert health.verdict == "healthy", health.message
    np.testing.assert_array_equal(health.num_resampled, steps)


def test_tempered_smc_draws_come_in_a_random_order(smc):
    """After the final resampling, copies of a particle are not side by side."""
    draws = np.asarray(smc.get_samples(group_by_chain=True)["x"])
    for chain in draws:
        duplicates = SMC_PARTICLES - len(np.unique(chain, axis=0))
        adjacent = int(np.sum(np.all(chain[1:] == chain[:-1], axis=1)))
        assert duplicates > 20 and adjacent < duplicates / 4, (duplicates, adjacent)


def test_tempered_smc_same_key_same_result(smc):
    first = np.asarray(smc.get_samples()["x"])
    smc.run(jax.random.key(1), y=Y)
    np.testing.assert_array_equal(np.asarray(smc.get_samples()["x"]), first)


def test_weighted_covariance_of_weighted_particles():
    rng = np.random.default_rng(0)
    particles = jnp.asarray(rng.normal(size=(50, 3)) * [1.0, 2.0, 0.5], jnp.float32)
    weights = jnp.asarray(rng.dirichlet(np.ones(50)), jnp.float32)
    expected = np.cov(np.asarray(particles), rowvar=False, aweights=np.asarray(weights), bias=True)
    dense = np.asarray(weighted_covariance(particles, weights, dense=True))
    np.testing.assert_allclose(dense, expected, rtol=1e-4, atol=1e-5)
    diagonal = np.asarray(weighted_covariance(particles, weights, dense=False))
    np.testing.assert_allclose(diagonal, np.diag(expected), rtol=1e-4, atol=1e-5)
    # particles that agree on a coordinate still get a positive definite covariance
    flat = particles.at[:, 1].set(3.0)
    assert np.all(np.linalg.eigvalsh(np.asarray(weighted_covariance(flat, weights, True))) > 0)


@pytest.mark.slow
def test_tempered_smc_hmc_matches_exact_moments_and_evidence(exact_moments):
    mean, variance, _ = exact_moments
    smc = dp.baselines.TemperedSMC(
        model, num_particles=500, num_chains=SMC_CHAINS, mcmc="hmc", progress_bar=False
    )
    smc.run(jax.random.key(2), y=Y)
    draws = np.asarray(smc.get_samples(group_by_chain=True)["x"])
    assert_chain_spread(draws.mean(axis=1), mean, "posterior mean")
    assert_chain_spread(((draws - mean) ** 2).mean(axis=1), variance, "posterior variance")
    exact = float(PRIOR.log_evidence(A, SIGMA_Y, Y))
    assert_chain_spread(np.asarray(smc.log_evidence)[:, None], np.array([exact]), "evidence")


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


def test_tempered_smc_refuses_prior_without_log_density():
    sampler = dp.baselines.TemperedSMC(latent_model, progress_bar=False)
    with pytest.raises(ModelError, match=r"site 'image'.*no log density.*dp\.Sampler"):
        sampler.run(jax.random.key(0), y=jnp.zeros((2, 2)))
    assert sampler.seconds is None  # refused before sampling
    with pytest.raises(RuntimeError, match="call run"):
        sampler.get_samples()


def test_tempered_smc_rejects_bad_options():
    with pytest.raises(ValueError, match="mcmc must be one of"):
        dp.baselines.TemperedSMC(model, mcmc="gibbs")
    with pytest.raises(ValueError, match="target_ess"):
        dp.baselines.TemperedSMC(model, target_ess=1.5)
    with pytest.raises(ValueError, match="num_particles"):
        dp.baselines.TemperedSMC(model, num_particles=0)
    with pytest.raises(ValueError, match="covariance must be"):
        dp.baselines.TemperedSMC(model, covariance="full")
    with pytest.raises(ValueError, match="resampling must be one of"):
        dp.baselines.TemperedSMC(model, resampling="wheel")
    with pytest.raises(ModelError, match="site 'y'.*NaN"):
        dp.baselines.TemperedSMC(model, progress_bar=False).run(0, y=jnp.array([jnp.nan]))
