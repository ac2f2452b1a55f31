"""The dp.Sampler driver: shapes, determinism, chain methods, compilation caching, progress bar,
early input checks, and the statistics of Unguided, DPS and TDS runs on exact problems."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.diffusion.sampling import ancestral_step
from diffprior.kernels import base
from diffprior.model import ModelError

NUM_CHAINS, NUM_PARTICLES, NUM_STEPS = 2, 32, 10
EVENT_SHAPE = (8, 8)


def _standard_normal_prior(event_shape=EVENT_SHAPE) -> dp.DiffusionPrior:
    """N(0, I) with its exact x0-denoiser, x0 = alpha x / (alpha^2 + sigma^2)."""
    schedule = dp.schedules.VP.linear()

    def net_fn(x, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        return alpha * x / (alpha**2 + sigma**2)

    return dp.DiffusionPrior(dp.Denoiser(net_fn, schedule, "x0"), event_shape=event_shape)


IMAGE_PRIOR = _standard_normal_prior()


def image_model(y=None):
    """An (8, 8) latent whose first row is observed with noise 0.5."""
    x = numpyro.sample("x", IMAGE_PRIOR)
    numpyro.sample("y", dist.Normal(x[0], 0.5).to_event(1), obs=y)


Y_IMAGE = jnp.linspace(-1.0, 1.0, 8)


def _sampler(method, **options):
    settings = dict(
        num_particles=NUM_PARTICLES,
        num_steps=NUM_STEPS,
        num_chains=NUM_CHAINS,
        progress_bar=False,
    )
    settings.update(options)
    return dp.Sampler(method, **settings)


@pytest.fixture(scope="module")
def tds_image():
    """A compiled TDS sampler on the (8, 8) model; tests re-run it as they need (no
    recompilation) and must not assume which run it last did."""
    sampler = _sampler(dp.TDS(image_model))
    sampler.run(jax.random.key(0), y=Y_IMAGE)
    return sampler


def _samples(sampler, key, *args, **kwargs):
    sampler.run(key, *args, **kwargs)
    return np.asarray(sampler.get_samples()["x"])


# -- shapes, determinism, chains ----------------------------------------------------------------


def test_tds_shapes_on_a_matrix_event(tds_image):
    sampler = tds_image
    sampler.run(jax.random.key(0), y=Y_IMAGE)
    flat = sampler.get_samples()["x"]
    grouped = sampler.get_samples(group_by_chain=True)["x"]
    assert flat.shape == (NUM_CHAINS * NUM_PARTICLES, *EVENT_SHAPE)
    assert grouped.shape == (NUM_CHAINS, NUM_PARTICLES, *EVENT_SHAPE)
    np.testing.assert_array_equal(flat, grouped.reshape(flat.shape))
    assert np.all(np.isfinite(np.asarray(flat)))
    assert sampler.log_evidence.shape == (NUM_CHAINS,)
    assert np.all(np.isfinite(np.asarray(sampler.log_evidence)))


def test_same_key_same_samples_different_key_different_samples(tds_image):
    first = _samples(tds_image, jax.random.key(1), y=Y_IMAGE)
    evidence = np.asarray(tds_image.log_evidence)
    again = _samples(tds_image, jax.random.key(1), y=Y_IMAGE)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(evidence, tds_image.log_evidence)
    other = _samples(tds_image, jax.random.key(2), y=Y_IMAGE)
    assert not np.allclose(first, other)
    # an int seed is accepted and means jax.random.key(seed)
    np.testing.assert_array_equal(_samples(tds_image, 1, y=Y_IMAGE), first)


def test_same_shapes_do_not_recompile_and_new_values_are_used(tds_image):
    first = _samples(tds_image, jax.random.key(3), y=Y_IMAGE)
    shifted = _samples(tds_image, jax.random.key(3), y=Y_IMAGE + 3.0)
    assert tds_image.num_compilations == 1
    # the observation is an input of the compiled run, not a baked-in constant: the posterior
    # mean of the observed row moves with y (prior N(0, 1), noise 0.5: gain 0.8)
    shift = shifted[:, 0].mean(0) - first[:, 0].mean(0)
    assert np.all(np.abs(shift - 0.8 * 3.0) < 1.0), shift


def test_no_progress_bar_writes_nothing(tds_image, capfd):
    tds_image.run(jax.random.key(4), y=Y_IMAGE)
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


@pytest.mark.slow
def test_sequential_chains_match_vectorized(tds_image):
    """lax.map over chains draws the same random numbers as vmap over chains."""
    sequential = _sampler(dp.TDS(image_model), chain_method="sequential")
    key = jax.random.key(5)
    samples = _samples(sequential, key, y=Y_IMAGE)
    reference = _samples(tds_image, key, y=Y_IMAGE)
    np.testing.assert_allclose(samples, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sequential.log_evidence, tds_image.log_evidence, atol=1e-3)


# -- compilation cache and progress bar -----------------------------------------------------------


@pytest.mark.slow
def test_progress_bar_and_recompilation_on_new_shapes(capfd):
    """Each run draws a fresh tqdm bar on stderr (also from the cached program); new observation
    shapes compile a second program, new values do not."""
    small = dp.problems.gaussian_problem(jax.random.key(0), 2, 1)
    larger = dp.problems.gaussian_problem(jax.random.key(1), 2, 3)
    sampler = _sampler(dp.Unguided(small.model), progress_bar=True)
    capfd.readouterr()

    sampler.run(jax.random.key(0), *small.model_args, **small.model_kwargs)
    out, err = capfd.readouterr()
    assert "Unguided" in err and f"{NUM_STEPS}/{NUM_STEPS}" in err, err
    assert out == ""

    sampler.run(jax.random.key(1), small.A, small.sigma_y, y=small.y + 1.0)
    _, err = capfd.readouterr()
    assert f"{NUM_STEPS}/{NUM_STEPS}" in err
    assert sampler.num_compilations == 1

    sampler.run(jax.random.key(2), *larger.model_args, **larger.model_kwargs)
    _, err = capfd.readouterr()
    assert f"{NUM_STEPS}/{NUM_STEPS}" in err
    assert sampler.num_compilations == 2
    assert sampler.get_samples()["x"].shape == (NUM_CHAINS * NUM_PARTICLES, 2)


# -- bad input fails before sampling --------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian():
    return dp.problems.gaussian_problem(jax.random.key(0), 2, 1)


@pytest.mark.parametrize("name", ["num_particles", "num_steps", "num_chains"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_bad_counts_raise(name, value, gaussian):
    with pytest.raises((TypeError, ValueError), match=name):
        _sampler(dp.TDS(gaussian.model), **{name: value})


def test_bad_chain_method_raises(gaussian):
    with pytest.raises(ValueError, match="chain_method") as info:
        _sampler(dp.TDS(gaussian.model), chain_method="bogus")
    assert "bogus" in str(info.value) and "vectorized" in str(info.value)


def test_method_must_be_a_method(gaussian):
    with pytest.raises(TypeError, match="dp.TDS"):
        _sampler(gaussian.model)


def test_unknown_method_option_raises(gaussian):
    with pytest.raises(TypeError, match="bogus"):
        dp.TDS(gaussian.model, bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        dp.DPS(gaussian.model, bogus=1)


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        (dp.TDS, "ess_threshold", 2),
        (dp.TDS, "ess_threshold", -0.1),
        (dp.TDS, "resampling", "foo"),
        (dp.TDS, "eta", -1),
        (dp.TDS, "scale", -1),
        (dp.TDS, "variance_inflation", "x"),
        (dp.DPS, "eta", -1),
        (dp.DPS, "scale", -1),
        (dp.Unguided, "eta", 2),
    ],
)
def test_bad_option_values_raise(method, option, value, gaussian):
    with pytest.raises(ValueError, match=option):
        method(gaussian.model, **{option: value})


def _run_fails(model, error, match, *args, **kwargs):
    sampler = _sampler(dp.TDS(model))
    with pytest.raises(error, match=match):
        sampler.run(jax.random.key(0), *args, **kwargs)
    assert sampler.num_compilations == 0  # failed before anything was traced or sampled
    with pytest.raises(RuntimeError, match="run"):
        sampler.get_samples()


def test_model_without_diffusion_prior_raises():
    def model(y=None):
        x = numpyro.sample("x", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)

    _run_fails(model, ModelError, "DiffusionPrior", y=1.0)


def test_nan_in_y_raises_naming_the_site(gaussian):
    y = gaussian.y.at[0].set(jnp.nan)
    _run_fails(gaussian.model, ModelError, "'y'.*NaN", *gaussian.model_args, y=y)


def test_y_shape_mismatch_raises_naming_the_shapes(gaussian):
    y = jnp.zeros(3)
    _run_fails(gaussian.model, ModelError, r"'y'.*\(3,\).*\(1,\)", *gaussian.model_args, y=y)


def test_results_before_run_raise(gaussian):
    sampler = _sampler(dp.TDS(gaussian.model))
    with pytest.raises(RuntimeError, match="run"):
        sampler.get_samples()
    with pytest.raises(RuntimeError, match="run"):
        sampler.log_evidence  # noqa: B018
    with pytest.raises(RuntimeError, match="run"):
        sampler.to_arviz()


# -- statistics ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture():
    return dp.problems.mixture_problem(jax.random.key(2), 2, 1)


# 500 steps: the DDPM discretisation bias of the variance (~15% at 20 steps, ~1% here) is
# below the Monte Carlo error of 16384 draws
PRIOR_CHAINS, PRIOR_PARTICLES, PRIOR_STEPS = 2, 8192, 500


@pytest.fixture(scope="module")
def unguided_mixture(mixture):
    sampler = dp.Sampler(
        dp.Unguided(mixture.model),
        num_particles=PRIOR_PARTICLES,
        num_steps=PRIOR_STEPS,
        num_chains=PRIOR_CHAINS,
        progress_bar=False,
    )
    sampler.run(jax.random.key(0), *mixture.model_args, **mixture.model_kwargs)
    return sampler


def test_unguided_samples_the_prior(unguided_mixture, mixture):
    """Mean and variance of 16384 unguided draws from the 25-component mixture match the exact
    ones within 5 standard errors (the variance's from the sample fourth moment)."""
    x = np.asarray(unguided_mixture.get_samples()["x"], np.float64)
    n = x.shape[0]
    assert unguided_mixture.log_evidence is None
    prior = mixture.prior
    exact_mean, exact_var = np.asarray(prior.mean), np.asarray(prior.variance)
    mean_error = np.abs(x.mean(0) - exact_mean)
    np.testing.assert_array_less(mean_error, 5 * np.sqrt(exact_var / n))
    centred = x - x.mean(0)
    var_se = np.sqrt((np.mean(centred**4, 0) - np.var(x, 0) ** 2) / n)
    np.testing.assert_array_less(np.abs(x.var(0) - exact_var), 5 * var_se)


@pytest.mark.slow
def test_parallel_chains_run_and_match_vectorized(unguided_mixture, mixture):
    parallel = dp.Sampler(
        dp.Unguided(mixture.model),
        num_particles=PRIOR_PARTICLES,
        num_steps=PRIOR_STEPS,
        num_chains=PRIOR_CHAINS,
        chain_method="parallel",
        progress_bar=False,
    )
    key = jax.random.key(6)
    samples = _samples(parallel, key, *mixture.model_args, **mixture.model_kwargs)
    reference = _samples(unguided_mixture, key, *mixture.model_args, **mixture.model_kwargs)
    assert samples.shape == (PRIOR_CHAINS * PRIOR_PARTICLES, 2)
    np.testing.assert_allclose(samples, reference, rtol=1e-4, atol=1e-3)


def _student_t_model(prior):
    def model(A, sigma_y, df, y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.StudentT(df, A @ x, sigma_y).to_event(1), obs=y)

    return model


@pytest.mark.parametrize(
    "likelihood", ["normal", pytest.param("student-t", marks=pytest.mark.slow)]
)
def test_dps_is_finite_and_has_no_evidence(likelihood):
    problem = dp.problems.mixture_problem(jax.random.key(0), 4, 2)
    if likelihood == "normal":
        model, args = problem.model, problem.model_args
    else:
        model, args = _student_t_model(problem.prior), (*problem.model_args, jnp.float32(4.0))
    sampler = _sampler(dp.DPS(model, scale=0.5), num_particles=64)
    samples = _samples(sampler, jax.random.key(0), *args, **problem.model_kwargs)
    assert samples.shape == (NUM_CHAINS * 64, 4)
    assert np.all(np.isfinite(samples))
    assert sampler.log_evidence is None


@pytest.mark.slow
def test_nan_likelihood_warns_and_keeps_samples_finite(gaussian):
    """A likelihood that is NaN for every particle gives zero weight everywhere: the sampler
    warns, naming the degenerate steps (all of them here), and returns finite samples with a
    log-evidence of -inf."""
    num_chains, num_steps = 3, 5

    def model(A, sigma_y, y=None):
        x = numpyro.sample("x", gaussian.prior)
        numpyro.sample("y", dist.Normal(A @ x, sigma_y).to_event(1), obs=y)
        numpyro.factor("broken", jnp.nan * jnp.sum(x))

    sampler = _sampler(dp.TDS(model), num_chains=num_chains, num_steps=num_steps)
    with pytest.warns(RuntimeWarning, match="zero weight") as record:
        sampler.run(jax.random.key(0), *gaussian.model_args, **gaussian.model_kwargs)
    samples = np.asarray(sampler.get_samples()["x"])
    assert np.all(np.isfinite(samples))
    assert np.all(np.asarray(sampler.log_evidence) == -np.inf)
    message = next(str(w.message) for w in record if "zero weight" in str(w.message))
    listed = re.search(r"step\(s\) (\[[0-9, ]*\])", message).group(1)
    assert listed == str(list(range(num_steps))), message


# -- TDS with a Student-t likelihood ---------------------------------------------------------------


@pytest.mark.slow
def test_tds_student_t_with_huge_df_agrees_with_gaussian():
    """On a d=4 Gaussian problem TDS with a Student-t likelihood runs (df=4), and with df=1e6
    agrees with Gaussian-likelihood TDS: the posterior means and the mean log-evidences of 8
    independent chains each differ by less than 5 standard errors of the difference, estimated
    from the spread between chains (chains are independent particle systems).

    StudentT(1e6) differs from Normal by O(1/df) in exact arithmetic, but NumPyro's float32
    normaliser gammaln(df/2) - gammaln((df+1)/2) loses ~0.2 nats per observation to rounding; that
    constant offset is computed here with the same float32 densities and removed from the
    Student-t log-evidence."""
    problem = dp.problems.gaussian_problem(jax.random.key(3), 4, 2)
    num_chains, num_particles, num_steps = 8, 256, 40
    settings = dict(num_particles=num_particles, num_steps=num_steps, num_chains=num_chains)

    gaussian_tds = _sampler(dp.TDS(problem.model), **settings)
    gaussian_tds.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    student_tds = _sampler(dp.TDS(_student_t_model(problem.prior)), **settings)
    student_tds.run(
        jax.random.key(1), *problem.model_args, jnp.float32(4.0), **problem.model_kwargs
    )
    assert np.all(np.isfinite(np.asarray(student_tds.get_samples()["x"])))
    assert np.all(np.isfinite(np.asarray(student_tds.log_evidence)))

    df = 1e6
    student_tds.run(jax.random.key(1), *problem.model_args, jnp.float32(df), **problem.model_kwargs)
    assert student_tds.num_compilations == 1  # df is an array input, not a new program

    def chain_means(sampler):
        return np.asarray(sampler.get_samples(group_by_chain=True)["x"], np.float64).mean(1)

    def difference_and_error(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        error = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
        return a.mean(0) - b.mean(0), error

    difference, error = difference_and_error(chain_means(student_tds), chain_means(gaussian_tds))
    np.testing.assert_array_less(np.abs(difference), 5 * error + 1e-3)

    sigma_y = problem.sigma_y
    offset = problem.y.shape[0] * float(
        dist.StudentT(df, 0.0, sigma_y).log_prob(0.0) - dist.Normal(0.0, sigma_y).log_prob(0.0)
    )
    difference, error = difference_and_error(
        np.asarray(student_tds.log_evidence) - offset, gaussian_tds.log_evidence
    )
    assert abs(difference) < 5 * error + 1e-3, (difference, error, offset)
    exact = float(problem.log_evidence)
    assert abs(np.mean(np.asarray(gaussian_tds.log_evidence)) - exact) < 0.5


def test_healthy_run_does_not_warn(tds_image):
    """A healthy TDS run raises no RuntimeWarning (the degenerate warning is not noise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tds_image.run(jax.random.key(7), y=Y_IMAGE)


# -- a method written outside the package: the kernel protocol ------------------------------------


def _particle_kernel(denoiser, timesteps, make_info):
    """The unguided step, built as a user would build a kernel (base.from_particle_step)."""

    def particle_step(key, x_t, times):
        return ancestral_step(key, denoiser, x_t, times.t, times.s)

    return base.from_particle_step(particle_step, timesteps, make_info)


class _UserUnguided(dp.infer.Method):
    """A user's method: the unguided kernel with a given ``make_info`` and ``is_smc``."""

    def __init__(self, model, make_info, is_smc=False):
        super().__init__(model)
        self.make_info = make_info
        self.is_smc = is_smc

    def build(self, prior, obs, timesteps):
        return _particle_kernel(prior.denoiser, timesteps, self.make_info)


def _count_only(x0_hat, times, num_nonfinite):
    return dp.kernels.unguided.UnguidedInfo(x0_hat, num_nonfinite)


def test_a_user_method_runs_as_the_builtin_one(gaussian):
    """A Method subclass outside the package, with a kernel from base.from_particle_step, is run
    like dp.Unguided: same key, same draws, no evidence, num_nonfinite kept per step."""
    settings = {"num_particles": 16, "num_steps": 5, "num_chains": 2}
    args, kwargs = gaussian.model_args, gaussian.model_kwargs
    user = _sampler(_UserUnguided(gaussian.model, _count_only), **settings)
    user.run(jax.random.key(3), *args, **kwargs)
    builtin = _sampler(dp.Unguided(gaussian.model), **settings)
    builtin.run(jax.random.key(3), *args, **kwargs)
    np.testing.assert_array_equal(user.get_samples()["x"], builtin.get_samples()["x"])
    assert user.log_evidence is None
    stats = user.to_arviz()["sample_stats"]
    assert stats["num_nonfinite"].shape == (2, 5)
    assert int(stats["num_nonfinite"].sum()) == 0
    assert stats.attrs["method"] == "_UserUnguided"


@pytest.mark.parametrize(
    ("make_info", "is_smc", "missing"),
    [
        (lambda x0_hat, times, num_nonfinite: (x0_hat,), False, "['num_nonfinite']"),
        (_count_only, True, "['ess', 'resampled', 'log_evidence_increment', 'degenerate']"),
    ],
    ids=["info-without-num_nonfinite", "smc-without-smc-fields"],
)
def test_a_kernel_without_a_protocol_field_fails_naming_it(gaussian, make_info, is_smc, missing):
    sampler = _sampler(_UserUnguided(gaussian.model, make_info, is_smc), num_steps=2)
    with pytest.raises(TypeError, match=re.escape(f"lacks {missing}")):
        sampler.run(jax.random.key(0), *gaussian.model_args, **gaussian.model_kwargs)
