"""GaussianMixture: its exact denoiser is E[x_0 | x_t], its score is the gradient of the exact
noised log density, and its sampler and log density are those of the mixture.

The exact denoiser sees the schedule only through (alpha_t, sigma_t), and times are chosen by
log-SNR, so two schedules cover it: VP linear (alpha < 1) and EDM (alpha = 1, sigma up to 80);
the schedules themselves are checked in ``tests/diffusion/test_schedules.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from shared_setup import SCHEDULES

import diffprior as dp

LOG_SNRS = (2.0, 0.0, -2.0)


def rotated_mixture(schedule=None) -> dp.GaussianMixture:
    """Three anisotropic components sharing a random rotation (the general-covariance path that
    posteriors take)."""
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(2, 2)))
    means = np.array([[-2.0, 0.5], [1.5, 1.5], [0.5, -2.0]])
    log_weights = np.log([0.5, 0.3, 0.2])
    variances = np.array([[0.2, 1.0], [0.6, 0.3], [1.2, 0.1]])
    return dp.GaussianMixture.from_components(
        means, log_weights, variances, basis, schedule=schedule
    )


@pytest.fixture(params=[("grid", "vp_linear"), ("rotated", "edm")], ids=lambda p: "-".join(p))
def mixture(request, grid_mixture):
    kind, schedule_name = request.param
    schedule = SCHEDULES[schedule_name]()
    if kind == "grid":
        return grid_mixture(2, schedule=schedule)
    return rotated_mixture(schedule)


def dense_components(gmm):
    """(weights, means, covariances) as plain float64 numpy arrays."""
    d = gmm.means.shape[1]
    basis = np.eye(d) if gmm.basis is None else np.asarray(gmm.basis, np.float64)
    covs = np.stack([basis @ np.diag(v) @ basis.T for v in np.asarray(gmm.variances, np.float64)])
    return np.asarray(gmm.weights, np.float64), np.asarray(gmm.means, np.float64), covs


@jax.jit
def _denoising_problems(gmm, key):
    """Prior draws, and for each log-SNR: (alpha, sigma), noised points x_t and the exact
    E[x_0 | x_t] at them."""
    key_prior, key_x0, key_noise = jax.random.split(key, 3)
    prior = gmm.sample(key_prior, (200_000,))
    x0 = gmm.sample(key_x0, (4,))
    noise = jax.random.normal(key_noise, x0.shape)
    problems = []
    for log_snr in LOG_SNRS:
        t = gmm.schedule.t_from_log_snr(log_snr)
        alpha_t, sigma_t = gmm.schedule.alpha(t), gmm.schedule.sigma(t)
        # four noised prior draws plus a point between the components (mixed responsibilities)
        x_t = jnp.concatenate([alpha_t * x0 + sigma_t * noise, alpha_t * gmm.mean[None]])
        x0_hat = jax.vmap(gmm.denoiser.x0, in_axes=(0, None))(x_t, t)
        problems.append((alpha_t, sigma_t, x_t, x0_hat))
    return prior, problems


def test_exact_x0_matches_importance_sampling(mixture):
    """E[x_0 | x_t] by self-normalised importance sampling: x_0^i from the prior (200000 draws),
    weights N(x_t; alpha x_0^i, sigma^2 I). The delta-method standard error of the ratio estimate
    is sqrt(sum w_i^2 (x_0^i - mu)^2) / sum w_i; every coordinate must be within 4.5 of them
    (30 comparisons: a false alarm has probability < 1e-4)."""
    prior, problems = _denoising_problems(mixture, jax.random.key(0))
    prior = np.asarray(prior, np.float64)
    for alpha_t, sigma_t, x_t, x0_hat in problems:
        alpha_t, sigma_t = float(alpha_t), float(sigma_t)
        for point, exact in zip(np.asarray(x_t, np.float64), np.asarray(x0_hat), strict=True):
            log_w = -0.5 * np.sum((point - alpha_t * prior) ** 2, axis=1) / sigma_t**2
            w = np.exp(log_w - log_w.max())
            w /= w.sum()
            ess = 1.0 / np.sum(w**2)
            assert ess > 500, f"importance sampling too degenerate to test (ESS {ess:.0f})"
            estimate = w @ prior
            std_error = np.sqrt(w**2 @ (prior - estimate) ** 2)
            np.testing.assert_array_less(np.abs(exact - estimate), 4.5 * std_error)


def test_score_is_gradient_of_marginal_log_prob(mixture):
    schedule = mixture.schedule
    times = jnp.array([0.05, 0.3, 0.7, 1.0]) * schedule.t_max

    @jax.jit
    def score_and_grad(gmm, t):
        alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
        x0 = gmm.sample(jax.random.key(1), (8,))
        x_t = alpha_t * x0 + sigma_t * jax.random.normal(jax.random.key(2), x0.shape)
        grad = jax.vmap(jax.grad(lambda x: gmm.marginal_log_prob(x, t)))(x_t)
        score = jax.vmap(gmm.denoiser.score, in_axes=(0, None))(x_t, t)
        return x_t, score, grad

    x_t, score, grad = jax.vmap(score_and_grad, in_axes=(None, 0))(mixture, times)
    for i, t in enumerate(times):
        # score = -(x_t - alpha x0_hat) / sigma^2: float32 cancellation ~1e-7 |x_t| / sigma^2
        atol = 1e-6 * (float(jnp.max(jnp.abs(x_t[i]))) + 1.0) / float(schedule.sigma(t)) ** 2
        np.testing.assert_allclose(score[i], grad[i], rtol=1e-3, atol=atol, err_msg=f"t={t}")


def test_marginal_log_prob_is_the_noised_mixture(mixture):
    """p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I), evaluated with scipy."""
    weights, means, covs = dense_components(mixture)
    schedule = mixture.schedule
    t = 0.5 * schedule.t_max

    @jax.jit
    def log_probs(gmm):
        x = gmm.sample(jax.random.key(3), (16,))
        return x, gmm.log_prob(x), gmm.marginal_log_prob(x, t)

    x, log_prob, marginal = log_probs(mixture)
    x = np.asarray(x, np.float64)
    for got, alpha_t, sigma_t in [
        (log_prob, 1.0, 0.0),
        (marginal, float(schedule.alpha(t)), float(schedule.sigma(t))),
    ]:
        terms = [
            np.log(w)
            + multivariate_normal(alpha_t * m, alpha_t**2 * c + sigma_t**2 * np.eye(2)).logpdf(x)
            for w, m, c in zip(weights, means, covs, strict=True)
        ]
        np.testing.assert_allclose(got, logsumexp(np.stack(terms), axis=0), rtol=1e-5, atol=1e-4)


def test_sample_moments(grid_mixture):
    """Exact draws have the mixture's weights, mean and covariance (4.5 standard errors,
    estimated from the draws themselves)."""
    gmm = grid_mixture(3)
    draws = jax.jit(lambda g: g.sample(jax.random.key(4), (100_000,)))(gmm)
    draws = np.asarray(draws, np.float64)
    n = draws.shape[0]
    mean = np.asarray(gmm.mean, np.float64)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4.5 * draws.std(0) / np.sqrt(n))
    centred = draws - mean
    products = centred[:, :, None] * centred[:, None, :]
    cov_error = np.abs(products.mean(0) - np.asarray(gmm.covariance, np.float64))
    np.testing.assert_array_less(cov_error, 4.5 * products.std(0) / np.sqrt(n) + 1e-6)
    # component frequencies: the nearest mean identifies the component (means 4 apart, sd <= 0.8)
    labels = np.argmin(((draws[:, None, :] - np.asarray(gmm.means)) ** 2).sum(-1), axis=1)
    freq = np.bincount(labels, minlength=4) / n
    weights = np.asarray(gmm.weights)
    np.testing.assert_array_less(np.abs(freq - weights), 4.5 * np.sqrt(weights * (1 - weights) / n))


def test_sample_and_log_prob_shapes(grid_mixture):
    gmm = grid_mixture(3)
    key = jax.random.key(5)
    assert jax.eval_shape(lambda k: gmm.sample(k, (2, 5)), key).shape == (2, 5, 3)
    assert jax.eval_shape(lambda k: gmm.sample(k), key).shape == (3,)
    assert jax.eval_shape(gmm.log_prob, jnp.zeros((2, 5, 3))).shape == (2, 5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.ones(3)), "means"),
        ((np.zeros((2, 3)), np.ones(3)), "weights"),
        ((np.zeros((2, 3)), np.array([1.0, -1.0])), "non-negative"),
        ((np.zeros((2, 3)), np.array([1.0, np.nan])), "finite"),
        ((np.zeros((2, 3)), np.zeros(2)), "zero"),
        ((np.zeros((2, 3)), np.ones(2), np.ones(3)), "scale"),
        ((np.zeros((2, 3)), np.ones(2), -1.0), "positive"),
        ((np.zeros((2, 3)), np.ones(2), np.array([1.0, 0.0])), "positive"),
    ],
)
def test_bad_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        dp.GaussianMixture(*args)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"means": [[NAN, 0.0], [1.0, 0.0]]}, "means must be finite, got nan (1 of 4 entries)"),
        ({"means": [[INF, -INF], [1.0, 0.0]]}, "means must be finite, got inf (2 of 4 entries)"),
        (
            {"weights": [INF, 1.0]},
            "weights must be finite and non-negative, got inf (1 of 2 entries)",
        ),
        (
            {"weights": [0.5, -0.5]},
            "weights must be finite and non-negative, got -0.5 (1 of 2 entries)",
        ),
        ({"weights": [0.0, 0.0]}, "weights must not all be zero, got [0.0, 0.0]"),
        ({"scale": NAN}, "scale must be finite and positive, got nan"),
        ({"scale": INF}, "scale must be finite and positive, got inf"),
        ({"scale": 0.0}, "scale must be finite and positive, got 0.0"),
        ({"scale": [1.0, NAN]}, "scale must be finite and positive, got nan (1 of 2 entries)"),
    ],
)
def test_bad_values_are_named_at_construction(kwargs, message):
    """Non-finite or out-of-range values fail when the mixture is made, naming the argument and
    the value (not later, as a -inf log-evidence or a Denoiser error)."""
    arguments = {"means": [[-1.0, 0.0], [1.0, 0.0]], "weights": [0.5, 0.5], **kwargs}
    with pytest.raises(ValueError) as info:
        dp.GaussianMixture(**arguments)
    assert str(info.value) == message


def test_traced_values_are_not_checked():
    """Under jit and vmap the values are unknown: the mixture is built and used as usual."""

    def mean(means, scale):
        return dp.GaussianMixture(means, jnp.ones(2), scale).mean

    means = jnp.array([[-1.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(jax.jit(mean)(means, 0.5), [0.0, 1.0])
    batched = jax.vmap(mean, in_axes=(0, None))(jnp.stack([means, -means]), 0.5)
    np.testing.assert_allclose(batched, [[0.0, 1.0], [0.0, -1.0]])


def dense_covariance(gmm) -> np.ndarray:
    """sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T in float64, from the components."""
    weights, means, covs = dense_components(gmm)
    mean = weights @ means
    second = np.einsum("k,kij->ij", weights, covs + means[:, :, None] * means[:, None, :])
    return second - np.outer(mean, mean)


def image_mixture(shape=(2, 4, 4)) -> dp.GaussianMixture:
    """Three isotropic components with random means on a small colour image, flattened."""
    d = int(np.prod(shape))
    means = np.random.default_rng(7).normal(size=(3, d))
    return dp.GaussianMixture(means, np.array([0.5, 0.3, 0.2]), np.array([0.5, 1.0, 0.8]))


def test_variance_is_the_diagonal_of_the_covariance(mixture):
    np.testing.assert_allclose(mixture.variance, np.diag(dense_covariance(mixture)), rtol=1e-5)


def test_variance_of_an_image_mixture():
    gmm = image_mixture()
    np.testing.assert_allclose(gmm.variance, np.diag(dense_covariance(gmm)), rtol=1e-5)


def test_variance_along_orthonormal_directions_is_the_quadratic_form(mixture):
    """v_j^T Sigma v_j for the columns of a random orthonormal (d, r) basis, against float64
    algebra: the isotropic formula (grid) and the dense fallback (rotated components)."""
    d = mixture.means.shape[1]
    full, _ = np.linalg.qr(np.random.default_rng(8).normal(size=(d, d)))
    for directions in (full, full[:, :1]):  # all d directions, and fewer
        expected = np.einsum("ir,ij,jr->r", directions, dense_covariance(mixture), directions)
        got = mixture.variance_along(lambda x, q=directions: x @ jnp.asarray(q, jnp.float32))
        np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_variance_along_an_operators_right_singular_vectors():
    """With an operator's V_T on a colour image: v_j^T Sigma v_j for the columns of its dense
    V (V applied to the unit vectors), for every right singular vector."""
    shape = (2, 4, 4)
    gmm = image_mixture(shape)
    A = dp.operators.Blur(np.full((2, 2), 0.25), shape)
    got = gmm.variance_along(lambda x: A.V_T(x.reshape(-1, *shape)))
    d = gmm.means.shape[1]
    right = np.asarray(A.V(np.eye(d, dtype=np.float32)), np.float64).reshape(d, d).T  # v_j
    expected = np.einsum("ir,ij,jr->r", right, dense_covariance(gmm), right)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_variance_along_refuses_a_dense_covariance_in_high_dimension():
    d = 4097
    variances = np.ones((2, d), np.float32)
    variances[:, 0] = 2.0  # not isotropic
    gmm = dp.GaussianMixture.from_components(np.zeros((2, d)), np.log([0.5, 0.5]), variances)
    with pytest.raises(ValueError, match=r"non-isotropic.*d = 4097 > 4096"):
        gmm.variance_along(lambda x: x[:, :3])
