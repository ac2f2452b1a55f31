"""Conditional twisted SMC with ancestor sampling: it leaves the path posterior invariant for any
number of particles, and ancestor sampling keeps the reference path moving.

The prior is Gaussian, whose reverse steps (with ``local_variance`` its variance, as
:class:`diffprior.GaussianMixture` sets it) are exact at any step size: the discretised path
measure has the exact posterior as its last marginal, so the chains are checked against
:meth:`diffprior.GaussianMixture.posterior` with no discretisation allowance. Each check runs
with both proposals: TDS's guided one and the subspace one of MCGdiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.diagnostics import effective_sample_size

import diffprior as dp
from diffprior.kernels import csmc, mcgdiff
from diffprior.linear_gaussian import from_matrix

A = jnp.array([[1.0, 0.5]])
Y = jnp.array([1.2])
SIGMA_Y = 0.15


def _twist(prior):
    def twist(x0_hat, t):
        # the likelihood widened by Var[A x0 | x_t] (what dp.TDS builds from a model); at
        # t = 0 it is the exact likelihood
        r2 = dp.diffusion.tweedie_variance(prior.schedule, t, jnp.mean(prior.variance))
        scale = jnp.sqrt(SIGMA_Y**2 + r2 * jnp.sum(A**2))
        return jax.scipy.stats.norm.logpdf(Y, A @ x0_hat, scale).sum()

    return twist


def _subspace(prior, times, data_mean=-1.0, data_variance=0.2):
    """The subspace proposal for y = A x + N(0, SIGMA_Y^2), by default with wrong moments along
    the observed direction (the prior's are -0.22 and 1), so that its weights are not uniform
    (sd of log Z^ near 0.7 with 4 particles); a variance below the prior's leaves the last
    step's variance floor inactive, so the path measure stays the exact one."""
    svd = from_matrix(A, SIGMA_Y, Y)
    return mcgdiff.subspace_proposal(
        prior.denoiser, times, svd, data_mean=data_mean, data_variance=data_variance
    )


def _proposal(kind, prior, times):
    if kind == "guided":
        return csmc.guided_proposal(prior.denoiser, _twist(prior), times)
    return _subspace(prior, times)


PROPOSALS = ["guided", pytest.param("subspace", marks=pytest.mark.slow)]


def _chains(
    prior, kind, num_particles, num_steps, num_chains, num_iterations, ancestor_sampling=True
):
    """``num_chains`` independent particle Gibbs chains on the path alone, with the ``kind``
    of proposal: the reference paths ``(chains, iterations, num_steps + 1, d)`` and the
    reference-ancestor choices."""
    if kind == "guided":  # through the top-level API
        algorithm = csmc.as_top_level_api(
            prior.denoiser,
            _twist(prior),
            prior.timesteps(num_steps),
            num_particles,
            prior.sample_reference,
            ancestor_sampling=ancestor_sampling,
        )
        init, step = algorithm.init, algorithm.step
    else:
        proposal = _proposal(kind, prior, prior.timesteps(num_steps))

        def init(key):
            return csmc.sweep_with(key, None, proposal, num_particles, prior.sample_reference)[0]

        def step(key, path):
            return csmc.sweep_with(
                key,
                path,
                proposal,
                num_particles,
                prior.sample_reference,
                ancestor_sampling=ancestor_sampling,
            )

    def chain(key):
        key_init, key_run = jax.random.split(key)

        def body(state, step_key):
            state, info = step(step_key, state)
            path = state.path if kind == "guided" else state
            return state, (path, info.reference_ancestors)

        keys = jax.random.split(key_run, num_iterations)
        return jax.lax.scan(body, init(key_init), keys)[1]

    keys = jax.random.split(jax.random.key(0), num_chains)
    return jax.jit(jax.vmap(chain))(keys)


NUM_STEPS = 10


@pytest.fixture(scope="module", params=PROPOSALS)
def gaussian_chains(request):
    prior = dp.GaussianMixture(jnp.array([[0.5, -0.5]]), jnp.ones(1), scale=1.0)
    return prior, request.param, _chains(prior, request.param, 4, NUM_STEPS, 512, 50)


def test_few_particles_target_the_exact_path_posterior(gaussian_chains):
    """With 4 particles (a conditional SMC bug shows strongly with few), the reference paths
    of 512 chains x 30 kept iterations have the exact posterior marginals at every time of
    the grid: x_t = alpha_t x_0 + sigma_t eps with x_0 from the exact posterior (the reverse
    steps of a Gaussian prior are exact, so the path measure is the forward process given
    y). Means and variances are within 4 Monte Carlo standard errors (from the effective
    sample size, which accounts for autocorrelation). Mid-path marginals are where wrong
    ancestor weights show (the last one alone can look right)."""
    prior, _, (paths, _) = gaussian_chains
    paths = np.asarray(paths[:, 20:])  # (chains, iterations, steps + 1, d)
    post = prior.posterior(A, SIGMA_Y, Y)
    post_mean = np.asarray(post.mean)
    post_var = np.diag(np.asarray(post.covariance))
    times = prior.timesteps(NUM_STEPS)
    for k in range(NUM_STEPS + 1):
        alpha, sigma = float(prior.schedule.alpha(times[k])), float(prior.schedule.sigma(times[k]))
        exact_mean = alpha * post_mean
        exact_var = alpha**2 * post_var + sigma**2
        for i in range(2):
            draws = paths[:, :, k, i]
            ess = float(effective_sample_size(draws))
            assert ess > 1000, f"step {k}, coordinate {i}: ESS {ess:.0f}"
            mean_error = (draws.mean() - exact_mean[i]) / np.sqrt(exact_var[i] / ess)
            assert abs(mean_error) < 4, f"step {k}, coordinate {i}: mean off by {mean_error:.1f} SE"
            # the variance of a sample variance of Gaussian draws is 2 v^2 / n
            var_error = (draws.var() - exact_var[i]) / (exact_var[i] * np.sqrt(2 / ess))
            assert abs(var_error) < 4, (
                f"step {k}, coordinate {i}: variance off by {var_error:.1f} SE"
            )


def test_ancestor_sampling_moves_the_reference(gaussian_chains):
    """Ancestor sampling redraws the reference's ancestors (most steps move it), so the
    first state of the path, x_{t_max}, decorrelates between iterations; without it the
    reference keeps its own history at every step and x_{t_max} sticks."""
    prior, kind, (paths, ancestors) = gaussian_chains
    assert float(jnp.mean(ancestors != 0)) > 0.3

    paths_plain, ancestors_plain = _chains(
        prior, kind, 4, NUM_STEPS, 16, 30, ancestor_sampling=False
    )
    assert int(jnp.sum(ancestors_plain != 0)) == 0

    def lag_one(x):
        x = np.asarray(x[:, :, 0, 0])
        centred = x - x.mean(axis=1, keepdims=True)
        return float(np.mean(centred[:, 1:] * centred[:, :-1]) / np.mean(centred**2))

    assert lag_one(paths) < 0.5 < lag_one(paths_plain)


def test_sweep_keeps_the_reference_in_slot_zero_and_returns_a_path():
    """One sweep returns a path of the grid's length; with the reference's ancestors fixed
    and two particles whose other one has zero weight everywhere (a likelihood that is -inf
    away from the reference), the new path is the reference itself."""
    prior = dp.GaussianMixture(jnp.array([[0.0, 0.0]]), jnp.ones(1))
    times = prior.timesteps(5)
    reference = jax.random.normal(jax.random.key(0), (6, 2))

    def twist(x0_hat, t):
        return jnp.zeros(())

    path, info = csmc.sweep(
        jax.random.key(1), reference, prior.denoiser, twist, times, 8, prior.sample_reference
    )
    assert path.shape == (6, 2)
    assert info.ess.shape == (6,) and info.reference_ancestors.shape == (5,)
    assert bool(jnp.all(jnp.isfinite(path)))

    def only_at_end(x0_hat, t):
        # zero weight for every particle but the reference at the last step
        return jnp.where(t > 0, 0.0, jnp.where(jnp.allclose(x0_hat, reference[-1]), 0.0, -jnp.inf))

    path, _ = csmc.sweep(
        jax.random.key(2),
        reference,
        prior.denoiser,
        only_at_end,
        times,
        8,
        prior.sample_reference,
        ancestor_sampling=False,
    )
    np.testing.assert_allclose(np.asarray(path), np.asarray(reference), rtol=1e-6)


def test_rejects_one_particle_and_deterministic_steps():
    prior = dp.GaussianMixture(jnp.array([[0.0, 0.0]]), jnp.ones(1))
    args = (prior.denoiser, lambda x0, t: jnp.zeros(()), prior.timesteps(5))
    with pytest.raises(ValueError, match="num_particles must be an integer >= 2"):
        csmc.as_top_level_api(*args, 1, prior.sample_reference)
    with pytest.raises(ValueError, match="eta must be > 0"):
        csmc.as_top_level_api(*args, 8, prior.sample_reference, eta=0.0)


def _posterior_paths(prior, times, key, num_paths):
    """Paths from the exact path posterior of the Gaussian prior: x_0 from the posterior given
    y, then the forward process back up the grid (the reverse steps are exact, so the path
    measure given y is the forward process from a posterior draw)."""
    alpha, sigma = prior.schedule.alpha(times), prior.schedule.sigma(times)
    post = prior.posterior(A, SIGMA_Y, Y)

    def one(key):
        key_x0, key_noise = jax.random.split(key)
        x0 = post.sample(key_x0)
        noise = jax.random.normal(key_noise, (times.shape[0] - 1, *x0.shape))

        def up(x_s, inputs):
            alpha_t, sigma_t, alpha_s, sigma_s, eps = inputs
            ratio = alpha_t / alpha_s
            x_t = ratio * x_s + jnp.sqrt(sigma_t**2 - (ratio * sigma_s) ** 2) * eps
            return x_t, x_t

        inputs = (alpha[:-1], sigma[:-1], alpha[1:], sigma[1:], noise)
        _, earlier = jax.lax.scan(up, x0, inputs, reverse=True)
        return jnp.concatenate([earlier, x0[None]])

    return jax.vmap(one)(jax.random.split(key, num_paths))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["guided", "subspace"])
def test_evidence_of_a_sweep_is_unbiased_and_size_biased_given_a_reference(kind):
    """The two halves of ParticleGibbs's marginal move (diffprior.infer.hierarchical): an
    unconditional sweep's estimate is unbiased, E[Z^] = p(y), and a conditional sweep without
    ancestor sampling, on a reference path from the path posterior, is an exact draw of the
    other particles under the extended target p(theta) psi(xi) Z^(xi) W^j / p(y), where
    E[1 / Z^] = 1 / p(y); that holds only if the conditional sweep weighs the reference like
    any other particle. 4 particles (a noisy estimate: sd of log Z^ near 0.9 guided, 0.7 with
    the subspace proposal's wrong moments), 10 steps, 2048 sweeps each; means within 4 Monte
    Carlo standard errors of 1, with small errors (a heavy tail, as when the reference is left
    out of the estimate, fails too)."""
    prior = dp.GaussianMixture(jnp.array([[0.5, -0.5]]), jnp.ones(1), scale=1.0)
    times = prior.timesteps(NUM_STEPS)
    log_evidence = float(prior.log_evidence(A, SIGMA_Y, Y))
    num_sweeps = 2048
    key_paths, key_conditional, key_plain = jax.random.split(jax.random.key(3), 3)
    references = _posterior_paths(prior, times, key_paths, num_sweeps)
    proposal = _proposal(kind, prior, times)

    def estimate(key, reference):
        _, info = csmc.sweep_with(
            key, reference, proposal, 4, prior.sample_reference, ancestor_sampling=False
        )
        return info.log_evidence

    conditional = jax.jit(jax.vmap(estimate))(
        jax.random.split(key_conditional, num_sweeps), references
    )
    plain = jax.jit(jax.vmap(lambda key: estimate(key, None)))(
        jax.random.split(key_plain, num_sweeps)
    )
    ratios = {
        "Z^ / p(y), unconditional": np.exp(np.asarray(plain, np.float64) - log_evidence),
        "p(y) / Z^, conditional": np.exp(log_evidence - np.asarray(conditional, np.float64)),
    }
    for name, ratio in ratios.items():
        standard_error = ratio.std() / np.sqrt(num_sweeps)
        assert standard_error < 0.05, f"{name}: standard error {standard_error:.3f}"
        error = (ratio.mean() - 1.0) / standard_error
        assert abs(error) < 4, f"{name}: mean {ratio.mean():.3f}, off by {error:.1f} SE"


@pytest.mark.parametrize("sigma_y", [SIGMA_Y, 1e-6])
def test_subspace_sweep_is_exactly_twisted_for_a_gaussian_prior(sigma_y):
    """With the prior's own moments the subspace proposal is the twisted transition itself
    for a Gaussian prior: every weight after the first is uniform (ESS = N at every step), for
    any reference path, drawn or not, and the log-evidence, with the change of variables to
    y, is log p(y) up to the spread of the first twist at t_max (tiny). Down to a noise of
    1e-6, where float rounding of the reference's last state alone would put its likelihood
    off by orders of magnitude were it not cancelled exactly against the proposal's."""
    prior = dp.GaussianMixture(jnp.array([[0.5, -0.5]]), jnp.ones(1), scale=1.0)
    times = prior.timesteps(NUM_STEPS)
    svd = from_matrix(A, sigma_y, Y)
    proposal = mcgdiff.subspace_proposal(
        prior.denoiser, times, svd, data_mean=svd.V_T(prior.mean[None])[0], data_variance=1.0
    )
    reference = jax.random.normal(jax.random.key(0), (NUM_STEPS + 1, 2))

    def run(key, reference):
        return csmc.sweep_with(key, reference, proposal, 8, prior.sample_reference)[1]

    exact = float(prior.log_evidence(A, sigma_y, Y))
    for info in (run(jax.random.key(1), None), run(jax.random.key(2), reference)):
        np.testing.assert_allclose(np.asarray(info.ess[1:]), 8.0, rtol=1e-4)
        assert abs(float(info.log_evidence) - exact) < 0.02


@pytest.mark.parametrize("kind", [pytest.param("guided", marks=pytest.mark.slow), "subspace"])
def test_one_sweep_from_posterior_paths_returns_posterior_paths(kind):
    """One conditional sweep without ancestor sampling (2 particles, 2 steps) applied to 60000
    paths from the exact path posterior returns paths from it: the mean of every state of the
    path within 4.5 standard errors of the exact one. With 2 particles the other particle's
    ancestor is one draw by the weights; a resampler whose draws come sorted (BlackJAX's
    multinomial), whose first one the reference overwrites, leaves it the larger of two draws
    instead, which shows here at 9 standard errors with the subspace proposal."""
    prior = dp.GaussianMixture(jnp.array([[0.5, -0.5]]), jnp.ones(1), scale=1.0)
    times = prior.timesteps(2)
    num_paths = 60000
    references = _posterior_paths(prior, times, jax.random.key(5), num_paths)
    proposal = _proposal(kind, prior, times)

    def one(key, reference):
        return csmc.sweep_with(
            key, reference, proposal, 2, prior.sample_reference, ancestor_sampling=False
        )[0]

    paths = np.asarray(
        jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), num_paths), references)
    )
    post = prior.posterior(A, SIGMA_Y, Y)
    post_mean = np.asarray(post.mean)
    post_var = np.diag(np.asarray(post.covariance))
    for k in range(3):
        alpha, sigma = float(prior.schedule.alpha(times[k])), float(prior.schedule.sigma(times[k]))
        exact_var = alpha**2 * post_var + sigma**2
        error = (paths[:, k].mean(axis=0) - alpha * post_mean) / np.sqrt(exact_var / num_paths)
        assert np.all(np.abs(error) < 4.5), f"step {k}: means off by {error} SE"
