"""Simulation-based calibration of a hierarchical model's noise level, sampled by dp.PMMH and
dp.ParticleGibbs.

Each replicate draws ``(sigma, x, y)`` from the model's joint, runs one chain of the kernel on
``y`` and ranks the true ``log sigma``, ``x1`` and ``x2`` among thinned draws of the chain.
For an exact sampler the ranks are uniform on ``0 .. NUM_DRAWS`` whatever the model (Talts,
Betancourt, Simpson, Vehtari & Gelman, 2018, arXiv 1804.06788) as long as the draws are about
independent: a chain's autocorrelation piles ranks at the extremes, so the chains are thinned
past it (and the test checks that they are).

Both kernels target the posterior under the *discretised* prior, the law of the reverse chain
their SMC sweeps run (``NUM_STEPS`` steps of the prior's transition from the prior's reference
at ``t_max``), not the mixture itself, so ``x`` is drawn from that chain,
:meth:`~diffprior.DiffusionPrior.reverse_sample`, and the ranks are exact for any number of
particles: PMMH and particle Gibbs are exact MCMC.

All replicates run in one compiled program, mapped over replicates with the kernels' own
initialisation and ``sample`` under ``jax.lax.scan``; the observation is traced, so the right
and the wrong run share the program. The kernels' ``init`` does not map over observations:
it checks the model with concrete values (which proposal fits it, where the SMC evidence is
finite), and PMMH's redraws on the host the chains whose first evidence is not finite. So
``init`` runs once on a concrete observation, which fixes those choices and the warmup
length, and each replicate's chain starts with the one-chain initialisation that ``init``
compiles, on its own traced observation; the test checks instead that every chain ends in a
valid state.
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
from diffprior.infer.hierarchical import read_hierarchical_model

PRIOR = dp.GaussianMixture(
    jnp.array([[-1.5, -1.0], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.4, 0.3, 0.3]), 0.7
)
A = jnp.array([[1.0, 0.3], [-0.4, 1.1], [0.8, -0.7], [0.2, 0.9], [-1.0, -0.2], [0.5, 0.5]])
#: median 0.5, bounded away from zero, where a tiny noise would make the chains sticky
SIGMA_PRIOR = dist.LogNormal(-0.7, 0.4)

#: replicates; particles and diffusion steps of each SMC sweep
NUM_REPLICATES, NUM_PARTICLES, NUM_STEPS = 200, 16, 10
#: warmup iterations, then NUM_DRAWS draws ranked per replicate, one every THIN iterations
NUM_WARMUP, NUM_DRAWS, THIN = 100, 15, 20
#: the rank histogram of each quantity must not be rejected at this level; with 2 kernels x 3
#: quantities the family-wise false alarm rate of exact samplers is at most 6e-3 (Bonferroni)
P_VALUE = 1e-3
#: the sampler's noise is the data's times this in the wrong run: a posterior of sigma too low
WRONG_NOISE_FACTOR = 1.5


def model(y=None, noise_factor=1.0):
    sigma = numpyro.sample("sigma", SIGMA_PRIOR)
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Normal(A @ x, noise_factor * sigma).to_event(1), obs=y)


def _kernel(name):
    if name == "PMMH":
        return dp.PMMH(model, "tds", num_particles=NUM_PARTICLES, num_steps=NUM_STEPS)
    return dp.ParticleGibbs(model, num_particles=NUM_PARTICLES, num_steps=NUM_STEPS)


def _quantities(log_sigma, x):
    """The scalars whose ranks are checked: log sigma (the chains' unconstrained value) and
    both coordinates of x."""
    return jnp.stack([log_sigma, x[..., 0], x[..., 1]], axis=-1)


def _sbc_runs(kernel):
    """``run(keys, noise_factor)``: per key, ``(sigma, x, y)`` drawn from the model's joint
    (``x`` from the discretised prior the kernels target), and one chain of ``kernel`` on ``y``
    with the likelihood's noise multiplied by ``noise_factor``; one compiled program for every
    ``y`` and factor. Returns the true quantities ``(R, 3)``, the chains' quantities after
    warmup ``(R, NUM_DRAWS * THIN, 3)`` and, per chain, whether its final state is valid."""
    # checks the model, picks the proposal and sets the warmup length of `sample`'s adaptation
    kernel.init(jax.random.key(0), NUM_WARMUP, None, (), {"y": jnp.zeros(A.shape[0])})

    def one(key, noise_factor):
        key_x, key_joint, key_init = jax.random.split(key, 3)
        # the reverse chain of the kernels' SMC: their grid, the default eta of dp.TDS (1)
        x_true = PRIOR.reverse_sample(key_x, num_steps=NUM_STEPS, eta=1.0)
        joint = handlers.trace(
            handlers.seed(handlers.substitute(model, data={"x": x_true}), key_joint)
        ).get_trace()
        sigma_true, y = joint["sigma"]["value"], joint["y"]["value"]
        kwargs = {"y": y, "noise_factor": noise_factor}
        hm = read_hierarchical_model(model, (), kwargs)
        state = kernel._init_chain(key_init, None, hm, (), kwargs)

        def body(state, _):
            state = kernel.sample(state, (), kwargs)
            return state, _quantities(state.z["sigma"], state.z["x"])

        # one scan (one compiled body) over warmup and sampling
        state, chain = jax.lax.scan(body, state, None, length=NUM_WARMUP + NUM_DRAWS * THIN)
        chain = chain[NUM_WARMUP:]
        valid = jnp.all(jnp.isfinite(chain))
        if isinstance(kernel, dp.PMMH):
            valid &= jnp.isfinite(state.log_density)
        return _quantities(jnp.log(sigma_true), x_true), chain, valid

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def _lag_correlation(chains, lag):
    """Autocorrelation at ``lag`` of chains ``(R, T)``, pooled over replicates (each centred
    on its own mean)."""
    centred = chains - chains.mean(axis=1, keepdims=True)
    return float(np.mean(centred[:, :-lag] * centred[:, lag:]) / np.mean(centred**2))


def _rank_p_values(run, noise_factor, seed=0):
    """Chi-square p-value of each quantity's rank counts against the uniform, the counts, the
    chains' autocorrelation at the thinning lag and the number of invalid chains."""
    truth, chains, valid = run(
        jax.random.split(jax.random.key(seed), NUM_REPLICATES), jnp.float32(noise_factor)
    )
    truth, chains = np.asarray(truth), np.asarray(chains)
    draws = chains[:, THIN - 1 :: THIN]  # (R, NUM_DRAWS, 3)
    ranks = np.sum(draws < truth[:, None, :], axis=1)
    counts = [np.bincount(ranks[:, j], minlength=NUM_DRAWS + 1) for j in range(ranks.shape[1])]
    p_values = np.array([stats.chisquare(c).pvalue for c in counts])
    correlation = max(_lag_correlation(chains[..., j], THIN) for j in range(chains.shape[-1]))
    return p_values, counts, correlation, int(np.sum(~np.asarray(valid)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PMMH", "ParticleGibbs"])
def test_theta_ranks_are_uniform(name):
    """200 replicates, each one chain of 100 warmup and 300 iterations (16 particles x 10
    steps per sweep, d = 2, 6 observations, sigma ~ LogNormal(-0.7, 0.4)): the ranks of
    log sigma, x1 and x2 among 15 draws (one every 20 iterations, past the chains'
    autocorrelation) pass a chi-square test of uniformity (p > 1e-3 each), and the same check
    rejects the chains run with the likelihood's noise 1.5 times the data's, so it has the
    power to see a miscalibrated posterior."""
    run = _sbc_runs(_kernel(name))
    p_values, counts, correlation, invalid = _rank_p_values(run, 1.0)
    assert invalid == 0, f"{name}: {invalid} chains ended without a finite state"
    assert correlation < 0.1, f"{name}: autocorrelation {correlation:.2f} at lag {THIN}"
    assert np.all(p_values > P_VALUE), f"{name}: p-values {p_values}, rank counts {counts}"
    p_values, counts, _, _ = _rank_p_values(run, WRONG_NOISE_FACTOR)
    assert np.min(p_values) < P_VALUE, (
        f"{name} with the noise times {WRONG_NOISE_FACTOR} in the sampler: p-values "
        f"{p_values}, rank counts {counts}"
    )
