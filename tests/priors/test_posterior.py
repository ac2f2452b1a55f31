"""GaussianMixture.posterior and log_evidence for y = A x + sigma_y eps against brute force:
closed-form Gaussian algebra per component, and importance sampling with the prior as proposal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import diffprior as dp

MEANS = np.array([[-2.0, 0.0, 1.0], [2.0, 1.0, 0.0], [0.0, -2.0, -1.0]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
SCALES = np.array([0.6, 1.0, 0.8])
SIGMA_Y = 0.5


@pytest.fixture
def gmm():
    return dp.GaussianMixture(MEANS, WEIGHTS, SCALES)


def problem(dy: int, seed: int = 1):
    """A random (dy, 3) operator and an observation with mixed posterior component weights."""
    A = np.random.default_rng(seed).normal(size=(dy, 3))
    return A, A @ np.array([0.2, 0.3, 0.5])


def dense_components(mixture):
    d = mixture.means.shape[1]
    basis = np.eye(d) if mixture.basis is None else np.asarray(mixture.basis, np.float64)
    variances = np.asarray(mixture.variances, np.float64)
    covs = np.stack([basis @ np.diag(v) @ basis.T for v in variances])
    return np.asarray(mixture.weights, np.float64), np.asarray(mixture.means, np.float64), covs


@pytest.mark.parametrize("dy", [1, 2, 3, 5])
def test_posterior_is_componentwise_gaussian_conditioning(gmm, dy):
    """Per component: Sigma_k' = (I/s_k^2 + A^T A/sigma_y^2)^-1, mu_k' = Sigma_k'(mu_k/s_k^2 +
    A^T y/sigma_y^2), w_k' ~ w_k N(y; A mu_k, s_k^2 A A^T + sigma_y^2 I), in float64 numpy;
    underdetermined, square and overdetermined A."""
    A, y = problem(dy)
    post = gmm.posterior(A, SIGMA_Y, y)
    weights, means, covs = dense_components(post)
    log_terms = []
    for k in range(len(WEIGHTS)):
        precision = np.eye(3) / SCALES[k] ** 2 + A.T @ A / SIGMA_Y**2
        cov = np.linalg.inv(precision)
        mean = cov @ (MEANS[k] / SCALES[k] ** 2 + A.T @ y / SIGMA_Y**2)
        np.testing.assert_allclose(covs[k], cov, atol=1e-5)
        np.testing.assert_allclose(means[k], mean, atol=1e-4)
        marginal = SCALES[k] ** 2 * A @ A.T + SIGMA_Y**2 * np.eye(dy)
        log_terms.append(np.log(WEIGHTS[k]) + multivariate_normal(A @ MEANS[k], marginal).logpdf(y))
    log_terms = np.array(log_terms)
    np.testing.assert_allclose(weights, np.exp(log_terms - logsumexp(log_terms)), atol=1e-5)
    np.testing.assert_allclose(gmm.log_evidence(A, SIGMA_Y, y), logsumexp(log_terms), atol=1e-4)


def test_posterior_and_evidence_match_importance_sampling(gmm):
    """Prior draws x_i (400000, with their component labels k_i) weighted by the likelihood
    L_i = N(y; A x_i, sigma_y^2 I):
    - posterior mean and component weights by self-normalised importance sampling, standard
      error by the delta method, sqrt(sum w_i^2 (f_i - estimate)^2) with normalised w;
    - log p(y) = log mean L_i, standard error sd(L) / (sqrt(n) mean(L)).
    Each of the 7 comparisons must be within 4.5 standard errors."""
    A, y = problem(2)
    num_samples = 400_000
    rng = np.random.default_rng(0)
    labels = rng.choice(len(WEIGHTS), num_samples, p=WEIGHTS)
    x = MEANS[labels] + SCALES[labels, None] * rng.normal(size=(num_samples, 3))
    log_lik = multivariate_normal(np.zeros(2), SIGMA_Y**2 * np.eye(2)).logpdf(y - x @ A.T)
    w = np.exp(log_lik - log_lik.max())
    w /= w.sum()
    assert 1.0 / np.sum(w**2) > 1000, "importance sampling too degenerate to test"

    post = gmm.posterior(A, SIGMA_Y, y)
    mean_is = w @ x
    mean_se = np.sqrt(w**2 @ (x - mean_is) ** 2)
    np.testing.assert_array_less(np.abs(np.asarray(post.mean) - mean_is), 4.5 * mean_se)
    onehot = np.eye(len(WEIGHTS))[labels]
    weights_is = w @ onehot
    weights_se = np.sqrt(w**2 @ (onehot - weights_is) ** 2)
    np.testing.assert_array_less(np.abs(np.asarray(post.weights) - weights_is), 4.5 * weights_se)

    lik = np.exp(log_lik)
    evidence_se = lik.std() / (np.sqrt(num_samples) * lik.mean())
    log_evidence_mc = np.log(lik.mean())
    assert abs(float(gmm.log_evidence(A, SIGMA_Y, y)) - log_evidence_mc) < 4.5 * evidence_se


def test_posterior_samples_have_posterior_moments(gmm):
    """Exact posterior draws (100000) match post.mean and post.covariance within 4.5 standard
    errors estimated from the draws; the moments themselves are checked above."""
    A, y = problem(2)
    post = gmm.posterior(A, SIGMA_Y, y)
    draws = jax.jit(lambda p: p.sample(jax.random.key(0), (100_000,)))(post)
    draws = np.asarray(draws, np.float64)
    n = draws.shape[0]
    mean = np.asarray(post.mean, np.float64)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4.5 * draws.std(0) / np.sqrt(n))
    centred = draws - mean
    products = centred[:, :, None] * centred[:, None, :]
    cov_error = np.abs(products.mean(0) - np.asarray(post.covariance, np.float64))
    np.testing.assert_array_less(cov_error, 4.5 * products.std(0) / np.sqrt(n) + 1e-6)
    # and the covariance property is the mixture's: sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T
    weights, means, covs = dense_components(post)
    second = np.einsum("k,kij->ij", weights, covs + means[:, :, None] * means[:, None, :])
    np.testing.assert_allclose(post.covariance, second - np.outer(mean, mean), atol=1e-4)


def test_posterior_keeps_the_schedule_and_sampler_options():
    schedule = dp.schedules.VE(0.01, 50.0)
    gmm = dp.GaussianMixture(MEANS, WEIGHTS, SCALES, schedule=schedule, num_steps=37, eta=0.5)
    A, y = problem(2)
    post = gmm.posterior(A, SIGMA_Y, y)
    assert post.schedule == schedule
    assert (post.num_steps, post.eta) == (37, 0.5)


def test_posterior_under_jit(gmm):
    """The exact posterior is usable inside jitted code (benchmarks, vmapped observations)."""
    A, y = problem(2)
    eager = gmm.posterior(A, SIGMA_Y, y)
    jitted = jax.jit(lambda y: gmm.posterior(A, SIGMA_Y, y).means)(jnp.asarray(y))
    np.testing.assert_allclose(jitted, eager.means, rtol=1e-5, atol=1e-5)


def test_posterior_with_the_mixture_as_a_jit_argument(gmm):
    A, y = problem(2)
    eager = gmm.posterior(A, SIGMA_Y, y)
    jitted = jax.jit(lambda g, y: g.posterior(A, SIGMA_Y, y).means)(gmm, jnp.asarray(y))
    np.testing.assert_allclose(jitted, eager.means, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "A, sigma_y, y, match",
    [
        (np.ones(3), SIGMA_Y, np.ones(1), r"A must have shape \(dy, 3\)"),
        (np.ones((2, 4)), SIGMA_Y, np.ones(2), r"A must have shape \(dy, 3\), got \(2, 4\)"),
        (np.ones((2, 3)), SIGMA_Y, np.ones(3), r"y must have shape \(2,\)"),
        (np.ones((2, 3)), SIGMA_Y, np.ones((2, 1)), r"y must have shape \(2,\)"),
        (np.ones((2, 3)), np.ones(2), np.ones(2), "sigma_y must be a scalar"),
        (np.ones((2, 3)), 0.0, np.ones(2), "sigma_y must be positive"),
        (np.ones((2, 3)), -1.0, np.ones(2), "sigma_y must be positive"),
    ],
)
def test_bad_problems_raise(gmm, A, sigma_y, y, match):
    with pytest.raises(ValueError, match=match):
        gmm.posterior(A, sigma_y, y)
    with pytest.raises(ValueError, match=match):
        gmm.log_evidence(A, sigma_y, y)


def test_nan_observation_raises(gmm):
    """DESIGN: NaN in y fails early with a clear error (today the weights silently become NaN)."""
    A, y = problem(2)
    y = y.copy()
    y[0] = np.nan
    with pytest.raises(ValueError, match="y"):
        gmm.posterior(A, SIGMA_Y, y)


def test_posterior_of_a_posterior_is_refused(gmm):
    """The posterior has general covariances; conditioning it again needs isotropic components."""
    A, y = problem(2)
    post = gmm.posterior(A, SIGMA_Y, y)
    with pytest.raises(NotImplementedError, match="isotropic"):
        post.posterior(A, SIGMA_Y, y)


COLOUR = (2, 4, 4)


def _colour_mixture() -> dp.GaussianMixture:
    means = np.random.default_rng(2).normal(size=(3, int(np.prod(COLOUR))))
    return dp.GaussianMixture(means, WEIGHTS, SCALES)


def _brute_force_log_evidence(gmm, matrix, y) -> float:
    """log sum_k w_k N(y; A mu_k, s_k^2 A A^T + sigma_y^2 I) with scipy, in float64."""
    matrix = np.asarray(matrix, np.float64)
    terms = [
        np.log(w)
        + multivariate_normal(
            matrix @ m, s**2 * matrix @ matrix.T + SIGMA_Y**2 * np.eye(matrix.shape[0])
        ).logpdf(np.ravel(y))
        for w, m, s in zip(WEIGHTS, np.asarray(gmm.means, np.float64), SCALES, strict=True)
    ]
    return float(logsumexp(terms))


COLOUR_OPERATORS = {
    "inpaint": lambda: dp.operators.Inpaint(
        dp.operators.random_mask(jax.random.key(0), COLOUR, 0.5)
    ),
    "blur_rank_deficient": lambda: dp.operators.Blur(np.full((2, 2), 0.25), COLOUR),
    "downsample": lambda: dp.operators.Downsample(2, COLOUR),
    "linear_tall": lambda: dp.operators.Linear(  # dy > d: a residual outside the range
        np.random.default_rng(3).normal(size=(40, 32)), in_shape=COLOUR
    ),
}


@pytest.mark.parametrize("name", list(COLOUR_OPERATORS))
def test_log_evidence_with_an_operator(name):
    """An operator (through its structured SVD) gives the evidence of its dense matrix; the
    posterior accepts it too."""
    gmm, A = _colour_mixture(), COLOUR_OPERATORS[name]()
    rng = np.random.default_rng(4)
    x = rng.normal(size=COLOUR).astype(np.float32)
    y = np.asarray(A(x)) + SIGMA_Y * rng.normal(size=A.out_shape).astype(np.float32)
    matrix = np.asarray(A.matrix())

    @jax.jit
    def compute(gmm, A, y):
        return (
            gmm.log_evidence(A, SIGMA_Y, y),
            gmm.posterior(A, SIGMA_Y, y).means,
            gmm.posterior(matrix, SIGMA_Y, y.ravel()).means,
        )

    log_evidence, means, dense_means = compute(gmm, A, y)
    expected = _brute_force_log_evidence(gmm, matrix, y)
    np.testing.assert_allclose(float(log_evidence), expected, atol=1e-3)
    np.testing.assert_allclose(means, dense_means, rtol=1e-4, atol=1e-4)


def test_log_evidence_of_inpainting_a_full_size_image():
    """At d = 3 x 128 x 128 with an Inpaint operator, against the closed form: y is the
    observed entries, N(mu_k[mask], (s_k^2 + sigma_y^2) I) per component."""
    shape = (3, 128, 128)
    d = int(np.prod(shape))
    rng = np.random.default_rng(5)
    means = rng.normal(size=(3, d)).astype(np.float32)
    gmm = dp.GaussianMixture(means, WEIGHTS, SCALES)
    mask = np.asarray(dp.operators.half_mask(shape, side="left"))
    A = dp.operators.Inpaint(mask)
    y = means[0].reshape(shape)[mask] + rng.normal(size=A.out_shape).astype(np.float32)
    variance = SCALES**2 + SIGMA_Y**2
    terms = [
        np.log(w) - 0.5 * np.sum((y - m.reshape(shape)[mask]) ** 2 / v + np.log(2 * np.pi * v))
        for w, m, v in zip(WEIGHTS, means.astype(np.float64), variance, strict=True)
    ]
    got = float(jax.jit(lambda y: gmm.log_evidence(A, SIGMA_Y, y))(y))
    np.testing.assert_allclose(got, logsumexp(terms), rtol=1e-5)


def test_operator_problems_are_checked(gmm):
    A = dp.operators.Inpaint(np.array([True, False, True, True]))
    with pytest.raises(ValueError, match=r"dimension 3, got an operator with in_shape \(4,\)"):
        gmm.log_evidence(A, SIGMA_Y, np.ones(3))
    A = dp.operators.Inpaint(np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\) to match A, got \(3,\)"):
        gmm.log_evidence(A, SIGMA_Y, np.ones(3))


@pytest.mark.parametrize("sigma_y", [1e-4, 1e-6])
def test_posterior_of_near_noiseless_observations(sigma_y):
    """y observed at sigma_y down to 1e-6 of the prior's scale: the posterior means match the
    float64 closed form, in the observed directions (pinned to y) and the free ones (the
    prior's, untouched by the 1/sigma_y^2 terms), and A times each mean reproduces y."""
    rng = np.random.default_rng(4)
    A = rng.normal(size=(2, 8))
    means = np.tile(np.array([[-4.0, 0.0], [4.0, 1.0]]), (1, 4))
    mixture = dp.GaussianMixture(means, np.array([0.6, 0.4]))
    y = A @ means[1] + 0.3
    post = mixture.posterior(A, sigma_y, y)
    for k in range(2):
        marginal = A @ A.T + sigma_y**2 * np.eye(2)
        exact = means[k] + A.T @ np.linalg.solve(marginal, y - A @ means[k])
        np.testing.assert_allclose(np.asarray(post.means[k], np.float64), exact, atol=1e-4)
        np.testing.assert_allclose(A @ np.asarray(post.means[k], np.float64), y, atol=1e-4)
