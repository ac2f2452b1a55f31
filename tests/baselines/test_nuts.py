"""NUTS on the shared mixture problem: exact posterior moments within ArviZ's Monte Carlo error,
its timing and DataTree, and clear errors on bad input."""

from __future__ import annotations

import arviz_base
import arviz_stats
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from baseline_setup import NUTS_CHAINS, NUTS_SAMPLES, latent_model, model

import diffprior as dp
from diffprior.model import ModelError


def _ess_mean(values: np.ndarray) -> np.ndarray:
    """ArviZ's ESS for the mean of each coordinate of ``(chain, draw, d)`` draws."""
    tree = arviz_base.from_dict({"posterior": {"v": values}})
    return np.asarray(arviz_stats.ess(tree["posterior"]["v"], method="mean"))


def test_nuts_matches_exact_posterior_moments(nuts, exact_moments):
    mean, variance, var_of_square = exact_moments
    draws = np.asarray(nuts.get_samples(group_by_chain=True)["x"])
    assert draws.shape == (NUTS_CHAINS, NUTS_SAMPLES, 2)
    assert nuts.get_samples()["x"].shape == (NUTS_CHAINS * NUTS_SAMPLES, 2)

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
    assert nuts.mcmc.num_samples == NUTS_SAMPLES
    tree = nuts.to_arviz()
    assert tree.attrs["method"] == "NUTS"
    assert tree["posterior"].attrs["method"] == "NUTS"
    assert tree["posterior"]["x"].shape == (NUTS_CHAINS, NUTS_SAMPLES, 2)
    assert tree.attrs["seconds"] == pytest.approx(nuts.seconds)
    assert tree.attrs["diffprior_version"] == dp.__version__


def test_nuts_refuses_prior_without_log_density():
    sampler = dp.baselines.NUTS(latent_model, progress_bar=False)
    with pytest.raises(ModelError, match=r"site 'image'.*no log density.*dp\.Sampler"):
        sampler.run(jax.random.key(0), y=jnp.zeros((2, 2)))
    assert sampler.seconds is None  # refused before sampling
    with pytest.raises(RuntimeError, match="call run"):
        sampler.get_samples()


def test_nuts_rejects_bad_options():
    with pytest.raises(ValueError, match="chain_method"):
        dp.baselines.NUTS(model, chain_method="threads")
    with pytest.raises(ValueError, match="num_warmup"):
        dp.baselines.NUTS(model, num_warmup=-1)
    with pytest.raises(ValueError, match="num_samples"):
        dp.baselines.NUTS(model, num_samples=0)
    with pytest.raises(TypeError, match="model must be a NumPyro model"):
        dp.baselines.NUTS("model")
