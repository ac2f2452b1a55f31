"""The TDS / FK twist for any NumPyro likelihood: exact at t = 0, the closed forms it uses, the
warnings for what it cannot smooth, and TDS against grid quadrature on d = 2 mixture priors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import diffprior as dp
from diffprior.infer import methods, twists
from diffprior.kernels.smc import ess
from diffprior.model import read_model

MIXTURE = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 1.0]]), jnp.array([0.7, 0.3]))
THREE_MODES = dp.GaussianMixture(
    jnp.array([[-1.5, -1.0], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.4, 0.3, 0.3]), 0.7
)
A = jnp.array([[1.0, 1.0]])
B = jnp.array([[0.6, 0.4], [0.3, -0.7]])
C = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
LOGITS = 2.0 * jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-0.5, 1.0]])


def _single(prior, make):
    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", make(x).to_event(1), obs=y)

    return model


def _several_sites(y=None):
    x = numpyro.sample("x", THREE_MODES)
    numpyro.sample("y_normal", dist.Normal(x[:1], 0.3).to_event(1), obs=y["y_normal"])
    numpyro.sample("y_laplace", dist.Laplace(x[1:], 0.1).to_event(1), obs=y["y_laplace"])
    numpyro.sample("y_poisson", dist.Poisson(jnp.exp(0.5 * (x[0] + x[1]))), obs=y["y_poisson"])


def _masked(y=None):
    x = numpyro.sample("x", THREE_MODES)
    with numpyro.plate("rows", 3), handlers.mask(mask=jnp.array([True, False, True])):
        numpyro.sample("y", dist.Laplace(C @ x, 0.15), obs=y)


#: name -> (model, y): every likelihood the twist must handle, on d = 2 mixture priors.
PROBLEMS = {
    "normal": (_single(MIXTURE, lambda x: dist.Normal(A @ x, 0.1)), jnp.array([2.5])),
    "student_t_1.5": (
        _single(MIXTURE, lambda x: dist.StudentT(1.5, A @ x, 0.1)),
        jnp.array([2.5]),
    ),
    "student_t_4": (_single(MIXTURE, lambda x: dist.StudentT(4.0, A @ x, 0.1)), jnp.array([2.5])),
    "laplace": (_single(MIXTURE, lambda x: dist.Laplace(A @ x, 0.1)), jnp.array([2.5])),
    "cauchy": (_single(MIXTURE, lambda x: dist.Cauchy(A @ x, 0.1)), jnp.array([2.5])),
    "poisson": (
        _single(MIXTURE, lambda x: dist.Poisson(jnp.exp(2.0 * B @ x))),
        jnp.array([9.0, 0.0]),
    ),
    "bernoulli": (
        _single(THREE_MODES, lambda x: dist.Bernoulli(logits=LOGITS @ x)),
        jnp.array([1.0, 0.0, 1.0, 1.0, 0.0]),
    ),
    "gamma": (
        _single(MIXTURE, lambda x: dist.Gamma(10.0, 10.0 * jnp.exp(-(A @ x)))),
        jnp.array([3.0]),
    ),
    "lognormal": (_single(MIXTURE, lambda x: dist.LogNormal(A @ x, 0.1)), jnp.array([3.0])),
    "several_sites": (
        _several_sites,
        {"y_normal": jnp.array([1.2]), "y_laplace": jnp.array([-0.6]), "y_poisson": 2.0},
    ),
    "masked": (_masked, jnp.array([1.4, 99.0, 2.2])),
    "tanh": (_single(MIXTURE, lambda x: dist.Laplace(jnp.tanh(A @ x), 0.1)), jnp.array([0.9])),
    "abs": (_single(MIXTURE, lambda x: dist.Normal(jnp.abs(A @ x), 0.1)), jnp.array([1.5])),
    "exp": (
        _single(MIXTURE, lambda x: dist.Laplace(jnp.exp(0.5 * (A @ x)), 0.1)),
        jnp.array([2.0]),
    ),
}


def _prior_of(model, y):
    return read_model(model, kwargs={"y": y}).prior


def _exact(model, y, half_width=8.0, num=801):
    """log p(y), posterior mean and covariance by the trapezoid rule on a grid."""
    obs = read_model(model, kwargs={"y": y})
    axis = np.linspace(-half_width, half_width, num)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    points = jnp.asarray(grid, jnp.float32)
    log_joint = jax.jit(jax.vmap(lambda x: obs.log_likelihood(x) + obs.prior.log_prob(x)))(points)
    log_joint = np.asarray(log_joint, np.float64)
    peak = log_joint.max()
    weights = np.exp(log_joint - peak)
    mass = weights.sum()
    weights /= mass
    mean = weights @ grid
    centred = grid - mean
    return peak + np.log(mass * (axis[1] - axis[0]) ** 2), mean, (centred.T * weights) @ centred


def _weighted_moments(particles, log_weights):
    weights = np.exp(log_weights - log_weights.max())
    weights /= weights.sum()
    mean = weights @ particles
    centred = particles - mean
    return mean, (centred.T * weights) @ centred


# -- exactness and the closed forms --------------------------------------------------------
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_twist_is_the_likelihood_at_time_zero_and_smooths_before(name):
    """At t = 0 the twist is the model's likelihood (so TDS stays exact); at high noise it is
    flatter in x0_hat than the likelihood (the spread of its values over points is smaller)."""
    model, y = PROBLEMS[name]
    obs = read_model(model, kwargs={"y": y})
    twist = twists.likelihood_twist(obs.prior, obs, "jacobian")
    points = jax.random.normal(jax.random.key(0), (64, 2)) * 2.0
    exact = jax.vmap(obs.log_likelihood)(points)
    at_zero = jax.vmap(lambda x: twist(x, jnp.float32(0.0)))(points)
    np.testing.assert_allclose(at_zero, exact, rtol=1e-5, atol=1e-4)
    high_noise = jax.vmap(lambda x: twist(x, jnp.float32(0.5)))(points)
    assert np.all(np.isfinite(np.asarray(high_noise)))
    assert float(jnp.std(high_noise)) < 0.5 * float(jnp.std(exact))


@pytest.mark.parametrize(("residual", "variance"), [(0.0, 0.04), (0.3, 0.01), (-2.0, 1.0)])
def test_smoothed_laplace_is_the_gaussian_convolution(residual, variance):
    """The closed form equals the numerical integral of Laplace(y; eta + u, b) N(u; 0, v)."""
    scale = 0.1
    u = np.linspace(-12, 12, 400001) * np.sqrt(variance)
    laplace = np.exp(-np.abs(residual - u) / scale) / (2 * scale)
    gauss = np.exp(-0.5 * u**2 / variance) / np.sqrt(2 * np.pi * variance)
    integral = np.sum(laplace * gauss) * (u[1] - u[0])
    closed = twists.SmoothedLaplace(0.0, scale, variance).log_prob(residual)
    np.testing.assert_allclose(float(closed), np.log(integral), rtol=2e-4, atol=2e-4)
    grad = jax.grad(lambda v: twists.SmoothedLaplace(0.0, scale, v).log_prob(residual))(0.0)
    assert np.isfinite(float(grad))  # the where() at v = 0 leaks no NaN into gradients


def test_gaussian_twist_is_the_variance_inflation():
    """For Normal noise the twist is N(y; A x0_hat, sigma^2 + r_t^2 |A|^2), as before."""
    model, y = PROBLEMS["normal"]
    obs = read_model(model, kwargs={"y": y})
    twist = twists.likelihood_twist(obs.prior, obs, "jacobian")
    r2 = dp.diffusion.transitions.tweedie_variance(
        obs.prior.schedule, jnp.float32(0.3), jnp.mean(obs.prior.variance)
    )
    x = jnp.array([0.4, -0.2])
    expected = dist.Normal(A @ x, jnp.sqrt(0.01 + 2.0 * r2)).log_prob(y).sum()
    np.testing.assert_allclose(float(twist(x, jnp.float32(0.3))), float(expected), rtol=1e-5)


def test_masked_entries_do_not_enter_the_twist():
    model, y = PROBLEMS["masked"]
    values = []
    for masked_value in (99.0, -5.0):
        obs = read_model(model, kwargs={"y": y.at[1].set(masked_value)})
        twist = twists.likelihood_twist(obs.prior, obs, "jacobian")
        values.append(float(twist(jnp.array([0.3, 0.1]), jnp.float32(0.2))))
    assert values[0] == values[1]


def test_site_kinds_and_warning_for_what_cannot_be_smoothed():
    def model(y=None, z=None):
        x = numpyro.sample("x", MIXTURE)
        numpyro.sample("y", dist.Laplace(x, 0.1).to_event(1), obs=y)
        numpyro.sample("z", dist.MultivariateNormal(x, 0.1 * jnp.eye(2)), obs=z)
        numpyro.factor("penalty", -jnp.sum(x**2))

    obs = read_model(model, kwargs={"y": jnp.zeros(2), "z": jnp.ones(2)})
    assert twists.site_kinds(obs) == {"y": "Laplace", "z": "multivariate", "penalty": "factor"}
    with pytest.warns(twists.TwistWarning) as record:
        twist = twists.likelihood_twist(obs.prior, obs, "jacobian")
    messages = " ".join(str(w.message) for w in record)
    assert "site 'z'" in messages and "site 'penalty'" in messages and "site 'y'" not in messages
    # still exact at t = 0
    x = jnp.array([0.2, -0.1])
    np.testing.assert_allclose(
        float(twist(x, jnp.float32(0.0))), float(obs.log_likelihood(x)), rtol=1e-6
    )


def test_methods_reexports_the_twist():
    assert methods.likelihood_twist is twists.likelihood_twist
    assert methods.observation_gains is twists.observation_gains


# -- TDS against quadrature -----------------------------------------------------------------
def _run_tds(model, y, num_chains, num_particles, num_steps, seed=0):
    sampler = dp.Sampler(
        dp.TDS(model, proposal="guided"),  # the twists are those of the guided proposal
        num_particles=num_particles,
        num_steps=num_steps,
        num_chains=num_chains,
        progress_bar=False,
    )
    sampler.run(jax.random.key(seed), y=y)
    return sampler


#: likelihoods checked statistically; one compiled program each
STATISTICAL = [
    "normal",
    "student_t_1.5",
    "student_t_4",
    "laplace",
    "cauchy",
    "poisson",
    "bernoulli",
    "gamma",
    "several_sites",
    "masked",
    "tanh",
    "abs",
    "exp",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", STATISTICAL)
def test_tds_matches_quadrature(name):
    """4 chains x 512 particles x 50 steps: the pooled posterior mean and covariance are within
    5 Monte Carlo standard errors of the exact ones (the error taken as the larger of the
    between-chain spread and the ESS-based one), the mean log-evidence within 5 standard
    errors plus 0.05 nats (the 50-step discretisation), and no step's ESS collapses."""
    model, y = PROBLEMS[name]
    num_chains, num_particles = 4, 512
    log_evidence, mean, cov = _exact(model, y)
    sampler = _run_tds(model, y, num_chains, num_particles, 50)
    result = sampler._result
    particles = np.asarray(result["particles"], np.float64)
    log_weights = np.asarray(result["log_weights"], np.float64)
    moments = [_weighted_moments(particles[c], log_weights[c]) for c in range(num_chains)]
    means = np.array([m for m, _ in moments])
    covs = np.array([c for _, c in moments])
    num_eff = min(float(ess(jnp.asarray(lw))) for lw in log_weights)
    min_step_ess = float(np.min(np.asarray(result["per_step"]["ess"]))) / num_particles
    # the Sampler's own collapse level (diagnostics.weight_collapse): 2% of the particles
    assert min_step_ess > 0.02, f"{name}: ESS / N fell to {min_step_ess:.3f}"

    var = np.diag(cov)
    mean_se = np.sqrt(np.maximum(means.var(0, ddof=1), var / num_eff) / num_chains)
    np.testing.assert_array_less(np.abs(means.mean(0) - mean), 5 * mean_se + 1e-3)
    cov_ess = np.sqrt((np.outer(var, var) + cov**2) / num_eff)
    cov_se = np.sqrt(np.maximum(covs.var(0, ddof=1), cov_ess**2) / num_chains)
    np.testing.assert_array_less(np.abs(covs.mean(0) - cov), 5 * cov_se + 2e-3)

    errors = np.asarray(sampler.log_evidence, np.float64) - log_evidence
    se = errors.std(ddof=1) / np.sqrt(num_chains)
    assert abs(errors.mean()) < 5 * se + 0.05, f"{name}: log-evidence errors {errors}"
    assert np.all(np.abs(errors) < 0.5), f"{name}: log-evidence errors {errors}"


@pytest.mark.slow
def test_laplace_evidence_is_unbiased():
    """E[Z_hat] = Z: over 16 chains of 256 particles, the mean of Z_hat / Z is within 4 standard
    errors of 1 for the Laplace likelihood (the unsmoothed twist misses it by orders of
    magnitude)."""
    model, y = PROBLEMS["laplace"]
    log_evidence, _, _ = _exact(model, y)
    sampler = _run_tds(model, y, 16, 256, 50, seed=1)
    ratios = np.exp(np.asarray(sampler.log_evidence, np.float64) - log_evidence)
    se = ratios.std(ddof=1) / np.sqrt(ratios.size)
    assert abs(ratios.mean() - 1.0) < 4 * se + 0.02, f"Z_hat / Z = {ratios}"


def test_gains_without_dense_jacobians(monkeypatch):
    """Above the size limit the twist's gains come from Rademacher probes, not a (dy, d)
    Jacobian: exact for inpainting (one coordinate per observation), within the probes'
    Monte Carlo error for a blur."""
    shape = (6, 6)
    mask = dp.operators.random_mask(jax.random.key(0), shape, 0.5)
    blur = dp.operators.Blur(dp.operators.gaussian_kernel(3, 1.0), shape, boundary="circular")
    points = jax.random.normal(jax.random.key(1), (3, 36))
    for A, rtol in ((dp.operators.Inpaint(mask), 1e-6), (blur, 0.5)):

        def fn(x, A=A):
            return jnp.tanh(A(x.reshape(shape)).reshape(-1))

        dense = twists._row_norms_sq(fn, points, A.out_dim)
        monkeypatch.setattr(twists, "MAX_JACOBIAN_ENTRIES", 0)
        probed = twists._row_norms_sq(fn, points, A.out_dim)
        monkeypatch.undo()
        np.testing.assert_allclose(probed, dense, rtol=rtol)
        # on average over observations the estimate is unbiased: within 4 standard errors
        relative = np.asarray(probed / dense - 1.0)
        assert abs(relative.mean()) < 4 * np.sqrt(2 / twists.NUM_GAIN_PROBES / A.out_dim) + 1e-6
