"""ReSample: its consistency schedule, the data-consistency solve (the argmin it claims), the
stochastic resampling (the Gaussian product of the paper), and end to end on a latent problem:
far more data-consistent than unguided sampling, unguided DDIM without consistency steps, finite
with Gaussian, Student-t and ill-defined likelihoods; options checked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import diffprior as dp
from diffprior.kernels import resample

# -- a toy latent problem: z in R^2 from a two-component mixture, x = tanh(W z + b) in R^6, the
# first three coordinates of x observed with noise 0.05 -------------------------------------------
W = jax.random.normal(jax.random.key(0), (6, 2))
B = 0.1 * jax.random.normal(jax.random.key(1), (6,))
LATENT = dp.GaussianMixture(jnp.array([[-1.5, 0.0], [1.5, 0.0]]), jnp.array([0.5, 0.5]), 0.5)
SIGMA_Y = 0.05


def decoder(z):
    return jnp.tanh(W @ z + B)


PRIOR = dp.LatentDiffusionPrior(
    LATENT.denoiser, decoder, (6,), (2,), data_variance=float(jnp.mean(LATENT.variance))
)
Y = decoder(jnp.array([1.2, 0.4]))[:3] + SIGMA_Y * jax.random.normal(jax.random.key(2), (3,))


def model(y=None, family="normal"):
    x = numpyro.sample("x", PRIOR)
    if family == "normal":
        numpyro.sample("y", dist.Normal(x[:3], SIGMA_Y).to_event(1), obs=y)
    else:
        numpyro.sample("y", dist.StudentT(3.0, x[:3], SIGMA_Y).to_event(1), obs=y)


def residuals(method, num_particles=256, num_steps=30, seed=0, **model_kwargs):
    """||A(x) - y|| per draw of a Sampler run."""
    sampler = dp.Sampler(method, num_particles, num_steps, progress_bar=False)
    sampler.run(jax.random.key(seed), y=Y, **model_kwargs)
    x = np.asarray(sampler.get_samples()["x"])
    assert x.shape == (num_particles, 6)
    return np.linalg.norm(x[:, :3] - np.asarray(Y), axis=1)


# -- the pieces ----------------------------------------------------------------------------------


def test_consistency_steps_follow_the_skip_and_the_window():
    steps = resample.consistency_steps(100, 10, (1 / 3, 1.0))
    assert steps.shape == (100,) and steps[-1]
    assert np.flatnonzero(steps).tolist() == [39, 49, 59, 69, 79, 89, 99]
    assert resample.consistency_steps(20, 1, (0.0, 1.0)).all()
    assert np.flatnonzero(resample.consistency_steps(20, 5, (0.0, 0.5))).tolist() == [4, 9]
    assert not resample.consistency_steps(20, 10, (0.0, 0.01)).any()


def test_data_consistency_is_the_proximal_argmin():
    """For a linear Gaussian likelihood the objective is quadratic with minimiser
    (A^T A / s^2 + rho I)^-1 (A^T y / s^2 + rho x0_hat); plain gradient descent with step
    1 / (L + rho) converges to it."""
    A = jax.random.normal(jax.random.key(3), (3, 5))
    y = jnp.array([0.5, -1.0, 2.0])
    sigma, rho = 0.5, 2.0
    x0_hat = jax.random.normal(jax.random.key(4), (5,))

    def log_likelihood(x):
        return -0.5 * jnp.sum((A @ x - y) ** 2) / sigma**2

    curvature = float(jnp.linalg.norm(A, 2) ** 2 / sigma**2)
    solve = jax.jit(
        lambda x0: resample.data_consistency(
            log_likelihood, x0, rho, 2000, optax.sgd(1.0 / (curvature + rho))
        )
    )
    exact = jnp.linalg.solve(
        A.T @ A / sigma**2 + rho * jnp.eye(5), A.T @ y / sigma**2 + rho * x0_hat
    )
    np.testing.assert_allclose(solve(x0_hat), exact, atol=1e-4)
    # zero iterations: x0_hat unchanged; a non-finite likelihood: x0_hat back, never NaN
    no_steps = resample.data_consistency(log_likelihood, x0_hat, rho, 0, optax.adam(0.1))
    np.testing.assert_array_equal(no_steps, x0_hat)
    broken = resample.data_consistency(
        lambda x: jnp.log(-jnp.sum(x**2)), x0_hat, rho, 10, optax.adam(0.1)
    )
    assert bool(jnp.all(jnp.isfinite(broken)))


def test_stochastic_resampling_is_the_gaussian_product():
    """z_s ~ N(m, v) with m = (h a_s z0 + s_s^2 z') / (h + s_s^2), v = h s_s^2 / (h + s_s^2),
    h = gamma (s_s^2 / s_t^2)(s_t^2 - (a_t / a_s)^2 s_s^2): the product of the forward noising
    of z0 and N(z', h). Checked on 200k draws (tolerance: 5 standard errors)."""
    schedule = dp.schedules.VP.linear()
    t, s, gamma = 0.6, 0.5, 40.0
    z0, z_prime = jnp.array([1.0, -2.0]), jnp.array([0.3, 0.1])
    alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
    alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
    h = gamma * sigma_s**2 / sigma_t**2 * (sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2)
    mean = (h * alpha_s * z0 + sigma_s**2 * z_prime) / (h + sigma_s**2)
    variance = h * sigma_s**2 / (h + sigma_s**2)
    n = 200_000
    keys = jax.random.split(jax.random.key(5), n)
    draws = jax.vmap(lambda k: resample.stochastic_resample(k, schedule, z0, z_prime, t, s, gamma))(
        keys
    )
    se = float(jnp.sqrt(variance / n))
    np.testing.assert_allclose(draws.mean(axis=0), mean, atol=5 * se)
    np.testing.assert_allclose(draws.var(axis=0), variance, rtol=5 * np.sqrt(2 / n))
    # at s = 0 the draw is deterministic, the weight gamma / (gamma + 1) on z0
    last = resample.stochastic_resample(keys[0], schedule, z0, z_prime, t, 0.0, gamma)
    np.testing.assert_allclose(last, (gamma * z0 + z_prime) / (gamma + 1), rtol=1e-5)


def test_kernel_steps_under_jit_and_reports_consistency():
    denoiser = PRIOR.denoiser
    times = PRIOR.timesteps(10)
    log_likelihood = dp.model.read_model(model, kwargs={"y": Y}).in_latent_space().log_likelihood
    algo = resample.as_top_level_api(denoiser, log_likelihood, times, consistency_every=5)
    state = algo.init(jax.random.normal(jax.random.key(0), (8, 2)))
    step = jax.jit(algo.step)
    flags = []
    for key in jax.random.split(jax.random.key(1), 10):
        state, info = step(key, state)
        flags.append(bool(info.consistency))
        assert info.x0_star.shape == (8, 2) and info.log_likelihood.shape == (8,)
    assert flags == [False] * 4 + [True] + [False] * 4 + [True]
    assert int(state.step) == 10 and bool(jnp.all(jnp.isfinite(state.particles)))


# -- end to end ----------------------------------------------------------------------------------


def test_resample_is_far_more_data_consistent_than_unguided():
    """Measured (256 draws, 30 steps): mean ||A(x) - y|| about 1.37 unguided (sd 0.85, so a
    standard error of 0.05) and 0.26 with ReSample (sd 0.22, se 0.013), with consistency at
    only two steps (the defaults). A factor 0.4 leaves five standard errors on both sides;
    without the consistency steps ReSample is unguided DDIM and fails it (about 1.4)."""
    unguided = residuals(dp.Unguided(model))
    resampled = residuals(dp.ReSample(model))
    assert resampled.mean() < 0.4 * unguided.mean(), (resampled.mean(), unguided.mean())
    assert np.median(resampled) < 0.25 * np.median(unguided)


def test_without_consistency_steps_it_is_unguided_ddim():
    """An empty window leaves only the unconditional DDIM steps: the draws are those of
    Unguided(eta=0) from the same key."""
    empty = dp.Sampler(dp.ReSample(model, window=(0.0, 0.01)), 32, 20, progress_bar=False)
    ddim = dp.Sampler(dp.Unguided(model, eta=0.0), 32, 20, progress_bar=False)
    empty.run(jax.random.key(3), y=Y)
    ddim.run(jax.random.key(3), y=Y)
    np.testing.assert_allclose(empty.get_samples()["x"], ddim.get_samples()["x"], atol=1e-5)


def test_student_t_likelihood_and_pixel_space_prior():
    """The model's own likelihood (Student-t here) is what is fitted; on a plain prior (decoder =
    identity) ReSample works on x itself."""
    robust = residuals(
        dp.ReSample(model, consistency_every=5), num_particles=64, family="student-t"
    )
    assert np.all(np.isfinite(robust)) and np.median(robust) < 0.5

    problem = dp.problems.gaussian_problem(jax.random.key(1), 4, 4)
    sampler = dp.Sampler(dp.ReSample(problem.model, consistency_every=2), 64, 20)
    sampler.progress_bar = False
    sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    x = np.asarray(sampler.get_samples()["x"])
    prior_draws = np.asarray(problem.prior.sample(jax.random.key(1), (64,)))
    A, y = np.asarray(problem.A), np.asarray(problem.y)
    assert np.mean(np.linalg.norm(x @ A.T - y, axis=1)) < 0.5 * np.mean(
        np.linalg.norm(prior_draws @ A.T - y, axis=1)
    )


def encoder(x):
    """The decoder's left inverse: arctanh, then the least-squares solve for z."""
    return jnp.linalg.lstsq(W, jnp.arctanh(jnp.clip(x, -0.999, 0.999)) - B)[0]


PRIOR_WITH_ENCODER = dp.LatentDiffusionPrior(
    LATENT.denoiser,
    decoder,
    (6,),
    (2,),
    encoder=encoder,
    data_variance=float(jnp.mean(LATENT.variance)),
)


def model_with_encoder(y=None):
    x = numpyro.sample("x", PRIOR_WITH_ENCODER)
    numpyro.sample("y", dist.Normal(x[:3], SIGMA_Y).to_event(1), obs=y)


def test_pixel_space_consistency_is_far_more_data_consistent_than_unguided():
    """The paper's pixel-space variant: fit the image, then encode it. Measured (256 draws, 30
    steps): mean ||A(x) - y|| 1.37 unguided, 0.51 here (sd 0.26, se 0.016) and 0.26 in latent
    space (the encoder's clipped arctanh loses some of the fit). A factor 0.5 leaves ten
    standard errors; without the consistency steps it is unguided DDIM (about 1.4) and fails."""
    unguided = residuals(dp.Unguided(model_with_encoder))
    pixel = residuals(dp.ReSample(model_with_encoder, space="pixel"))
    assert pixel.mean() < 0.5 * unguided.mean(), (pixel.mean(), unguided.mean())


def test_pixel_space_equals_latent_space_under_an_identity_autoencoder():
    """With D = E = identity the two variants solve the same problem with the same optimiser,
    so they draw the same samples from the same key."""
    identity = dp.LatentDiffusionPrior(
        LATENT.denoiser, lambda z: z, (2,), (2,), encoder=lambda x: x, data_variance=2.5
    )

    def identity_model(y=None):
        x = numpyro.sample("x", identity)
        numpyro.sample("y", dist.Normal(x[0], 0.1), obs=y)

    draws = {}
    for space in ("latent", "pixel"):
        sampler = dp.Sampler(
            dp.ReSample(identity_model, space=space, consistency_every=3),
            32,
            12,
            progress_bar=False,
        )
        sampler.run(jax.random.key(4), y=1.0)
        draws[space] = np.asarray(sampler.get_samples()["x"])
    np.testing.assert_allclose(draws["pixel"], draws["latent"], atol=1e-5)
    assert np.mean(np.abs(draws["pixel"][:, 0] - 1.0)) < 0.3


def test_pixel_space_needs_an_encoder():
    sampler = dp.Sampler(dp.ReSample(model, space="pixel"), 8, 5, progress_bar=False)
    with pytest.raises(dp.model.ModelError, match="no encoder"):
        sampler.run(jax.random.key(0), y=Y)


def test_no_nan_leaves_the_kernel_when_the_likelihood_is_ill_defined():
    """sqrt(x) is NaN for negative x, about half the latents: the particles stay finite."""

    def sqrt_model(y=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(jnp.sqrt(x[:3]), SIGMA_Y).to_event(1), obs=y)

    sampler = dp.Sampler(dp.ReSample(sqrt_model, consistency_every=3), 32, 12, progress_bar=False)
    sampler.run(jax.random.key(0), y=jnp.full(3, 0.5))
    assert np.all(np.isfinite(np.asarray(sampler.get_samples()["x"])))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"gamma": 0.0}, ValueError, "gamma must be > 0"),
        ({"consistency_every": 0}, ValueError, "consistency_every must be >= 1"),
        ({"consistency_every": 2.5}, TypeError, "consistency_every must be an integer"),
        ({"num_grad_steps": 0}, ValueError, "num_grad_steps must be >= 1"),
        ({"window": (0.5, 0.2)}, ValueError, "0 <= start < stop <= 1"),
        ({"window": (0.0, 1.5)}, ValueError, "0 <= start < stop <= 1"),
        ({"window": 0.5}, TypeError, "window must be a pair"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate must be > 0"),
        ({"proximal_weight": -1.0}, ValueError, "proximal_weight must be >= 0"),
        ({"eta": 2.0}, ValueError, "eta must be in"),
        ({"space": "image"}, ValueError, "space must be one of"),
        ({"skip": 10}, TypeError, "skip"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        dp.ReSample(model, **options)
