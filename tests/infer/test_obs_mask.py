"""Missing observations, ``numpyro.sample(..., obs=y, obs_mask=mask)``, through every sampler.

A model with ``obs_mask`` has the posterior of the model with the masked entries dropped: with a
Gaussian-mixture prior and linear Gaussian noise that posterior and its evidence are exact
(:meth:`diffprior.GaussianMixture.posterior` and ``log_evidence`` on the kept rows). The missing
entries ``y_unobserved`` come with the draws, drawn from the likelihood at each draw of ``x``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.infer.hierarchical import read_hierarchical_model
from diffprior.model import ModelError

D, DY, SIGMA_Y = 4, 6, 0.5
A = jnp.asarray(np.random.default_rng(0).normal(size=(DY, D)), jnp.float32)
KEEP = np.array([True, False, True, True, False, True])
PRIOR = dp.GaussianMixture(
    jnp.array([[-2.0, 0.0, 1.0, 0.0], [2.0, 1.0, 0.0, -1.0]]), jnp.array([0.4, 0.6]), scale=0.8
)
# the missing entries hold values far from the model's: a sampler that read them would show it
Y = (
    (A @ jnp.array([2.0, 1.0, 0.0, -1.0]) + jnp.array([0.3, 0.0, -0.4, 0.2, 0.0, 0.5]))
    .at[~KEEP]
    .set(jnp.array([25.0, -25.0]))
)


def model(y, mask):
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Normal(A @ x, SIGMA_Y).to_event(1), obs=y, obs_mask=mask)


def run(method, num_particles, num_steps, num_chains, key=0, **kwargs) -> dp.Sampler:
    sampler = dp.Sampler(
        method,
        num_particles=num_particles,
        num_steps=num_steps,
        num_chains=num_chains,
        progress_bar=False,
    )
    sampler.run(jax.random.key(key), **kwargs)
    return sampler


def check_unobserved_given_x(samples, locations, scale):
    """``y_unobserved`` given each draw of ``x`` is N(location, scale^2): the standardised
    residuals have mean 0 and standard deviation 1 within 5 standard errors."""
    z = (np.asarray(samples["y_unobserved"], np.float64) - np.asarray(locations)) / scale
    num = z.shape[0]
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=5 / math.sqrt(num))
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=5 / math.sqrt(2 * num))


def test_draws_and_datatree_include_the_missing_entries():
    sampler = run(dp.DPS(model), 16, 5, 2, y=Y, mask=jnp.asarray(KEEP))
    samples = sampler.get_samples()
    assert set(samples) == {"x", "y_unobserved"}
    assert samples["x"].shape == (32, D) and samples["y_unobserved"].shape == (32, DY)
    grouped = sampler.get_samples(group_by_chain=True)
    assert grouped["y_unobserved"].shape == (2, 16, DY)
    tree = sampler.to_arviz()
    posterior = tree["posterior"]
    assert posterior["y_unobserved"].dims == ("chain", "draw", "y_unobserved_dim_0")
    np.testing.assert_array_equal(posterior["y_unobserved"].values, grouped["y_unobserved"])
    assert set(tree["observed_data"].data_vars) == {"y_observed"}
    # the missing entries are drawn around A x, never near the placeholders in y
    assert np.all(np.abs(np.asarray(samples["y_unobserved"])[:, ~KEEP]) < 20.0)


def test_a_wrong_mask_is_refused_before_compiling():
    sampler = dp.Sampler(dp.TDS(model), num_particles=8, num_steps=4, progress_bar=False)
    with pytest.raises(ModelError, match=r"site 'y': obs_mask has shape \(5,\)"):
        sampler.run(jax.random.key(0), y=Y, mask=jnp.asarray(KEEP[:5]))
    assert sampler.num_compilations == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [lambda model: dp.MCGdiff(model), lambda model: dp.TDS(model, proposal="guided")],
    ids=["MCGdiff", "TDS_guided"],
)
def test_posterior_and_evidence_are_those_of_the_kept_rows(method):
    num_chains, num_particles = 4, 256
    sampler = run(method(model), num_particles, 30, num_chains, key=1, y=Y, mask=jnp.asarray(KEEP))
    exact = PRIOR.posterior(A[KEEP], SIGMA_Y, Y[KEEP])
    exact_log_evidence = float(PRIOR.log_evidence(A[KEEP], SIGMA_Y, Y[KEEP]))
    log_evidence = np.asarray(sampler.log_evidence, np.float64)
    # Monte Carlo error of the chains' mean, plus the bias of 30 steps and float32
    tolerance = 4 * log_evidence.std(ddof=1) / math.sqrt(num_chains) + 0.1
    assert abs(log_evidence.mean() - exact_log_evidence) < tolerance, (
        log_evidence,
        exact_log_evidence,
    )
    samples = sampler.get_samples()
    draws = np.asarray(exact.sample(jax.random.key(2), (20000,)))
    posterior_sd = draws.std(axis=0)
    np.testing.assert_allclose(
        np.asarray(samples["x"]).mean(axis=0),
        draws.mean(axis=0),
        atol=float(np.max(4 * posterior_sd / math.sqrt(num_particles))),
    )
    locations = jax.vmap(lambda x: A @ x)(samples["x"])
    check_unobserved_given_x(samples, locations, SIGMA_Y)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["laplace", "poisson"])
def test_non_gaussian_obs_mask_runs_as_the_masked_model(family):
    """TDS on a Laplace or Poisson likelihood with ``obs_mask`` makes, key for key, the run of
    the same likelihood masked with ``.mask(...)``: the same particles, weights and evidence
    (only the final equal-weight resampling differs, as the missing entries take a key)."""
    prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.5]]), jnp.array([0.5, 0.5]))
    B = jnp.array([[1.0, 0.5], [-0.3, 1.0], [0.8, -1.0]])
    keep = jnp.array([True, False, True])
    y = jnp.array([2.2, -7.0, 1.0]) if family == "laplace" else jnp.array([3.0, 40.0, 1.0])

    def likelihood(x):
        if family == "laplace":
            return dist.Laplace(B @ x, 0.3)
        return dist.Poisson(jnp.exp(0.5 * B @ x))

    def with_obs_mask(y, mask):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", likelihood(x).to_event(1), obs=y, obs_mask=mask)

    def with_mask(y, mask):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", likelihood(x).mask(mask).to_event(1), obs=y)

    missing, masked = (
        run(dp.TDS(m), 128, 20, 2, y=y, mask=keep) for m in (with_obs_mask, with_mask)
    )
    np.testing.assert_allclose(missing.log_evidence, masked.log_evidence, rtol=1e-6)
    stats = [s.to_arviz()["sample_stats"]["log_weight"].values for s in (missing, masked)]
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-6)
    np.testing.assert_allclose(
        missing.get_samples()["x"].mean(axis=0), masked.get_samples()["x"].mean(axis=0), atol=0.3
    )
    assert set(masked.get_samples()) == {"x"}
    draws = missing.get_samples()
    assert draws["y_unobserved"].shape == (256, 3)
    if family == "poisson":
        rates = np.exp(0.5 * np.asarray(draws["x"]) @ np.asarray(B).T)
        error = np.asarray(draws["y_unobserved"]).mean(axis=0) - rates.mean(axis=0)
        # a Poisson mixture's spread: mean rate plus the rates' own variance
        spread = np.sqrt(rates.mean(axis=0) + rates.var(axis=0)) / math.sqrt(256)
        assert np.all(np.abs(error) < 6 * spread), (error, spread)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["FK", "PiGDM", "DiffPIR", "ReSample", "Unguided"])
def test_every_method_returns_the_missing_entries(name):
    method = getattr(dp, name)(model)
    sampler = run(method, 64, 10, 2, y=Y, mask=jnp.asarray(KEEP))
    samples = sampler.get_samples()
    assert samples["y_unobserved"].shape == (128, DY)
    locations = jax.vmap(lambda x: A @ x)(samples["x"])
    check_unobserved_given_x(samples, locations, SIGMA_Y)


# -- hierarchical models: ParticleGibbs and PMMH ------------------------------------------------
PRIOR_2D = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
Y_2D = jnp.array([1.5, 60.0, 0.2])
KEEP_2D = jnp.array([True, False, True])


def sigma_model(y=None, mask=None):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    x = numpyro.sample("x", PRIOR_2D)
    numpyro.sample(
        "y", dist.Normal(jnp.stack([x[0], x[1], x[1]]), sigma).to_event(1), obs=y, obs_mask=mask
    )


def test_hierarchical_reading_leaves_the_missing_entries_out_of_theta():
    hm = read_hierarchical_model(sigma_model, kwargs={"y": Y_2D, "mask": KEEP_2D})
    assert list(hm.theta_sites) == ["sigma"]
    assert hm.missing == {"y_unobserved": "y_observed"}
    x = jnp.array([1.0, -0.5])
    expected = np.sum(
        -0.5 * ((np.array([1.5, 0.2]) - np.array([1.0, -0.5])) / 0.7) ** 2
        - np.log(0.7)
        - 0.5 * math.log(2 * math.pi)
    )
    np.testing.assert_allclose(hm.log_likelihood(x, {"sigma": 0.7}), expected, rtol=1e-5)
    # p(theta) alone: the missing entries add no density
    np.testing.assert_allclose(
        hm.log_prior({"sigma": 0.7}), dist.HalfNormal(1.0).log_prob(0.7), rtol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["ParticleGibbs", "PMMH"])
def test_hierarchical_kernels_draw_the_missing_entries(kernel):
    if kernel == "PMMH":
        sampler = dp.PMMH(sigma_model, num_particles=32, num_steps=10)
    else:
        sampler = dp.ParticleGibbs(sigma_model, num_particles=16, num_steps=10)
    mcmc = numpyro.infer.MCMC(sampler, num_warmup=30, num_samples=200, progress_bar=False)
    mcmc.run(jax.random.key(0), y=Y_2D, mask=KEEP_2D)
    samples = mcmc.get_samples()
    assert set(samples) == {"sigma", "x", "y", "y_unobserved"}
    assert samples["y_unobserved"].shape == (200, 3)
    # the deterministic site completes the observation with the missing entries
    np.testing.assert_allclose(samples["y"][:, KEEP_2D], jnp.broadcast_to(Y_2D[KEEP_2D], (200, 2)))
    np.testing.assert_array_equal(samples["y"][:, 1], samples["y_unobserved"][:, 1])
    # y_unobserved given (x, sigma): N(x, sigma^2) at each draw (PMMH repeats rejected draws)
    x = np.asarray(samples["x"])
    locations = np.stack([x[:, 0], x[:, 1], x[:, 1]], axis=1)
    sigma = np.asarray(samples["sigma"])[:, None]
    unique = np.unique(np.asarray(samples["y_unobserved"])[:, 1], return_index=True)[1]
    check_unobserved_given_x(
        {"y_unobserved": (np.asarray(samples["y_unobserved"]) / sigma)[unique]},
        (locations / sigma)[unique],
        1.0,
    )
