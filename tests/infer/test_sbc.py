"""Simulation-based calibration of TDS with non-Gaussian likelihoods on a d = 2 mixture prior.

Each replicate draws ``(x, y)`` from the model's joint (``x`` from the mixture, ``y`` from the
likelihood at ``x``), runs TDS on ``y`` and ranks ``x`` among independent draws from the final
weighted particles. For a sampler of the right posterior the ranks are uniform on
``0 .. NUM_DRAWS``, whatever the prior and the likelihood (Talts, Betancourt, Simpson, Vehtari &
Gelman, 2018, arXiv 1804.06788). The draws come from a finite weighted particle set, so the
extreme ranks carry an excess of about ``(NUM_DRAWS + 1) / (2 ESS)``, a few percent here.

All replicates run in one compiled program: the observation is an argument of the mapped
function, and the model is read from it inside, as the Sampler does. That program returns the
whole final state and the draws are made in a second one: with the draws fused into the batched
run, XLA on CPU (jaxlib 0.12) compiled a batched TDS that disagreed with the same run unbatched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from scipy import stats

import diffprior as dp
from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.model import read_model

PRIOR = dp.GaussianMixture(
    jnp.array([[-1.5, -1.0], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.4, 0.3, 0.3]), 0.7
)
A = jnp.array([[1.0, 1.0]])
B = jnp.array([[0.9, 0.6], [0.45, -1.05]])

#: replicates, particles per run, TDS steps, posterior draws ranked per replicate
NUM_REPLICATES, NUM_PARTICLES, NUM_STEPS, NUM_DRAWS = 300, 256, 40, 15
#: the rank histogram of each quantity must not be rejected at this level; with 2 models x 3
#: quantities the family-wise false alarm rate of an exact sampler is at most 6e-3 (Bonferroni)
P_VALUE = 1e-3


def _laplace(y=None, scale=0.3):
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Laplace(A @ x, scale).to_event(1), obs=y)


def _poisson(y=None, gain=1.0):
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Poisson(jnp.exp(gain * (B @ x))).to_event(1), obs=y)


#: name -> (model, a parameter of its likelihood, the value the data are drawn with, a wrong
#: value: run with it, the sampler targets a posterior too narrow and off-centre)
MODELS = {
    "laplace": (_laplace, "scale", 0.3, 0.15),
    "poisson": (_poisson, "gain", 1.0, 1.4),
}


def _quantities(x):
    """The scalars whose ranks are checked: both coordinates and their sum."""
    return jnp.stack([x[..., 0], x[..., 1], x[..., 0] + x[..., 1]], axis=-1)


def _tds_runs(model, parameter, true_value):
    """``run(keys, value)``: per key, ``(x, y)`` drawn from the model's joint with ``parameter``
    at ``true_value``, and the final TDS state on ``y`` with ``parameter`` at ``value`` in the
    sampler; one compiled program for every ``y`` and ``value``."""
    method = dp.TDS(model, proposal="guided")
    times = make_timesteps(PRIOR.schedule, NUM_STEPS, method.spacing)

    def one(key, value):
        key_joint, key_init, key_run = jax.random.split(key, 3)
        joint = handlers.trace(handlers.seed(model, key_joint)).get_trace(**{parameter: true_value})
        x_true, y = joint["x"]["value"], joint["y"]["value"]
        obs = read_model(model, kwargs={"y": y, parameter: value})
        algorithm = method.build(PRIOR, obs, times)
        state = algorithm.init(PRIOR.sample_reference(key_init, (NUM_PARTICLES,)))

        def body(state, key):
            return algorithm.step(key, state)[0], None

        state, _ = jax.lax.scan(body, state, jax.random.split(key_run, NUM_STEPS))
        return x_true, state

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


@jax.jit
def _ranks(keys, x_true, particles, log_weights):
    """Per replicate and quantity, how many of ``NUM_DRAWS`` independent draws from the weighted
    particles fall below the true value."""

    def one(key, x, particles, log_weights):
        index = jax.random.categorical(key, log_weights, shape=(NUM_DRAWS,))
        below = _quantities(particles[index]) < _quantities(x)
        return jnp.sum(below, axis=0)

    return jax.vmap(one)(keys, x_true, particles, log_weights)


def _rank_p_values(run, value, seed=0):
    """Chi-square p-value of each quantity's rank counts against the uniform, and the counts."""
    key_runs, key_draws = jax.random.split(jax.random.key(seed))
    x_true, state = run(jax.random.split(key_runs, NUM_REPLICATES), value)
    ranks = _ranks(
        jax.random.split(key_draws, NUM_REPLICATES), x_true, state.particles, state.log_weights
    )
    ranks = np.asarray(ranks)
    counts = [np.bincount(ranks[:, j], minlength=NUM_DRAWS + 1) for j in range(ranks.shape[1])]
    return np.array([stats.chisquare(c).pvalue for c in counts]), counts


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_tds_ranks_are_uniform(name):
    """300 replicates x 256 particles x 40 steps: the ranks of x1, x2 and x1 + x2 among 15
    posterior draws pass a chi-square test of uniformity (p > 1e-3 each), and the same check
    rejects the sampler run with a wrong likelihood parameter (a posterior too narrow and
    off-centre), so it has the power to see a miscalibrated posterior."""
    model, parameter, true_value, wrong_value = MODELS[name]
    run = _tds_runs(model, parameter, true_value)
    p_values, counts = _rank_p_values(run, jnp.float32(true_value))
    assert np.all(p_values > P_VALUE), f"{name}: p-values {p_values}, rank counts {counts}"
    p_values, counts = _rank_p_values(run, jnp.float32(wrong_value))
    assert np.min(p_values) < P_VALUE, (
        f"{name} with {parameter}={wrong_value} in the sampler: p-values {p_values}, "
        f"rank counts {counts}"
    )
