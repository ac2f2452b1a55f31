"""dp.calibrate: the measured spread of x0_hat against closed forms, its use by the twisted
samplers (which must stay exact whatever the calibration), the shipped digits calibration."""

from __future__ import annotations

import copy
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.calibration import Calibration
from diffprior.infer.methods import _calibrated_variance


@pytest.fixture(scope="module")
def gaussian():
    """N(1, 4 I) in d = 3 and 6000 of its draws."""
    prior = dp.GaussianMixture(jnp.ones((1, 3)), jnp.ones(1), 2.0)
    return prior, prior.sample(jax.random.key(0), (6000,))


def test_gaussian_data_gives_tweedie_variance(gaussian):
    prior, data = gaussian
    cal = dp.calibrate(prior, data, num_times=5, num_noise=2).calibration
    assert cal.residual_variance.shape == (5, 3) and cal.times.shape == (5,)
    exact = jax.vmap(lambda t: dp.diffusion.tweedie_variance(prior.schedule, t, 4.0))(cal.times)
    # 12000 squared errors per coordinate: relative standard error about sqrt(2 / 12000) = 1.3%
    np.testing.assert_allclose(cal.residual_variance, exact[:, None] * np.ones(3), rtol=0.06)
    # the exact denoiser is the posterior mean: no shrinkage (a is noisy where x0_hat ~ m)
    np.testing.assert_allclose(cal.shrinkage[:3], 1.0, atol=0.05)
    np.testing.assert_allclose(cal.mean, 1.0, atol=0.1)


def test_interpolation_ends_at_the_likelihood(gaussian):
    prior, data = gaussian
    cal = dp.calibrate(prior, data, num_times=4).calibration
    assert float(jnp.max(cal.variance_at(0.0))) == 0.0
    assert float(cal.shrinkage_at(0.0)) == 1.0
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(cal.estimate(x, 0.0), x)
    # linear between grid times, constant beyond the last
    mid = 0.5 * (cal.times[1] + cal.times[2])
    np.testing.assert_allclose(
        cal.variance_at(mid), 0.5 * (cal.residual_variance[1] + cal.residual_variance[2]), rtol=1e-5
    )
    np.testing.assert_allclose(cal.variance_at(5.0), cal.residual_variance[-1])


def test_multimodal_prior_is_narrower_than_its_gaussian_stand_in():
    """Two far-apart unit components: once x_t tells them apart, x0_hat is only off by the
    component's own spread, far less than the mixture's variance (37) that the uncalibrated
    twist assumes."""
    prior = dp.GaussianMixture(jnp.array([[-6.0], [6.0]]), jnp.ones(2), 1.0)
    data = prior.sample(jax.random.key(1), (4000,))
    cal = dp.calibrate(prior, data, num_times=8).calibration
    t = cal.times[2]
    gaussian_stand_in = dp.diffusion.tweedie_variance(prior.schedule, t, jnp.mean(prior.variance))
    assert float(cal.mean_variance_at(t)) < 0.5 * float(gaussian_stand_in)


def test_round_trip_and_errors(gaussian):
    prior, data = gaussian
    cal = dp.calibrate(prior, data[:100], num_times=3).calibration
    back = Calibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(back.residual_variance, cal.residual_variance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(back.mean, cal.mean, atol=1e-6)
    assert back.inflation == cal.inflation == 1.0
    inflated = dp.calibrate(prior, data[:100], num_times=3, inflation=2.5).calibration
    assert Calibration.from_dict(inflated.to_dict()).inflation == 2.5
    legacy = {k: v for k, v in inflated.to_dict().items() if k != "inflation"}
    assert Calibration.from_dict(legacy).inflation == 1.0  # metadata written before it existed
    with pytest.raises(ValueError, match="inflation must be a finite number >= 1, got 0.5"):
        dp.calibrate(prior, data, inflation=0.5)
    with pytest.raises(TypeError, match="inflation must be a number"):
        dp.calibrate(prior, data, inflation="2")
    with pytest.raises(ValueError, match="shape"):
        dp.calibrate(prior, data[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        dp.calibrate(prior, data.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="num_times"):
        dp.calibrate(prior, data, num_times=0)
    with pytest.warns(UserWarning, match="scale the network was trained on"):
        dp.calibrate(prior, 16.0 * data[:50], num_times=2)


def test_latent_prior_is_calibrated_in_its_latent_space():
    """Images go through the encoder; latents give the same calibration; other shapes, and
    images for a latent prior without an encoder, are refused naming both shapes."""
    prior = dp.pretrained.load("digits-latent", calibrated=False)
    train, _ = dp.pretrained.load_digits_split()
    images = jnp.asarray(train[:200])
    from_images = dp.calibrate(prior, images, num_times=4).calibration
    latents = jax.vmap(prior.encode)(images)
    from_latents = dp.calibrate(prior, latents, num_times=4).calibration
    assert from_images.residual_variance.shape == (4, *prior.latent_shape)
    np.testing.assert_allclose(
        from_images.residual_variance, from_latents.residual_variance, rtol=1e-5
    )
    np.testing.assert_allclose(from_images.mean, latents.mean(axis=0), atol=1e-5)
    shapes = re.escape("(n, *(16,)) (or images of shape (n, *(8, 8)))")
    with pytest.raises(ValueError, match=shapes):
        dp.calibrate(prior, np.zeros((4, 5)))
    no_encoder = dp.LatentDiffusionPrior(
        prior.denoiser, prior.decoder, prior.event_shape, prior.latent_shape
    )
    with pytest.raises(ValueError, match="no encoder"):
        dp.calibrate(no_encoder, images)


def test_shipped_digits_priors_are_calibrated():
    latent = dp.pretrained.load("digits-latent")
    assert latent.calibration is not None
    assert latent.calibration.residual_variance.shape[1:] == tuple(latent.latent_shape)
    assert dp.pretrained.load("digits-latent", calibrated=False).calibration is None
    prior = dp.pretrained.load("digits")
    cal = prior.calibration
    assert cal is not None and cal.residual_variance.shape[1:] == (8, 8)
    # measured on the training images: x0_hat is worthless at the highest noise (shrinkage ~0)
    # and close to the Bayes estimate at low noise
    assert float(cal.shrinkage[-1]) < 0.1 and abs(float(cal.shrinkage[0]) - 1.0) < 0.05
    assert dp.pretrained.load("digits", calibrated=False).calibration is None
    with pytest.raises(TypeError, match="calibrated"):
        dp.pretrained.load("digits", calibrated="yes")


@pytest.mark.slow
@pytest.mark.parametrize("proposal", ["subspace", "guided"])
def test_samplers_stay_exact_under_any_calibration(proposal):
    """TDS with its subspace and guided proposals on a d = 8 mixture with linear Gaussian
    observations: the log-evidence against the closed form across 4 chains (tolerance from
    their spread), with a calibration wrong on purpose (x0_hat shrunk by 20% towards the mean,
    the spread 1.5 times the Gaussian stand-in's, inflated by 2): a calibration may change the
    weights' variance, never the answer."""
    problem = dp.problems.mixture_problem(jax.random.key(3), 8, 2)
    prior = copy.copy(problem.prior)
    times = jnp.linspace(1.0 / 16, 1.0, 16)
    tweedie = jax.vmap(
        lambda t: dp.diffusion.tweedie_variance(prior.schedule, t, jnp.mean(prior.variance))
    )(times)
    prior.calibration = Calibration(
        times,
        1.5 * tweedie[:, None] * jnp.ones((16, *prior.event_shape)),
        jnp.full((16,), 0.8),
        jnp.asarray(prior.mean),
        1,
        2.0,  # and inflated twice more: the twists use three times the Gaussian spread
    )
    problem = problem._replace(prior=prior)
    sampler = dp.Sampler(dp.TDS(problem.model, proposal=proposal), 512, 40, 4, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    errors = np.asarray(sampler.log_evidence) - float(problem.log_evidence)
    # the 40-step prior's own discretisation error is about +0.1 nats on this problem
    assert abs(np.mean(errors)) < 0.25 + 3 * errors.std(ddof=1) / 2, errors


def test_calibrated_twist_follows_the_shrunk_estimate():
    """The twist of a calibrated prior is the likelihood at m + a_t (x0_hat - m) widened by
    the calibrated spread: at a time where a_t = 0 it does not depend on x0_hat at all."""
    prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    times = jnp.array([0.5, 1.0])
    calibrated = copy.copy(prior)
    calibrated.calibration = Calibration(
        times, jnp.full((2, 2), 0.4), jnp.array([0.0, 0.0]), jnp.full((2,), 0.25), 1
    )

    def model(y=None, prior=calibrated):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, 0.1).to_event(1), obs=y)

    obs = dp.model.read_model(model, kwargs={"y": jnp.array([1.0, -1.0])})
    twist = dp.infer.twists.likelihood_twist(calibrated, obs, "jacobian")
    a = twist(jnp.array([3.0, 3.0]), 0.75)
    b = twist(jnp.array([-2.0, 0.5]), 0.75)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    # and at t = 0 it is the likelihood itself
    x = jnp.array([0.3, -0.2])
    assert float(twist(x, 0.0)) == pytest.approx(float(obs.log_likelihood(x)), abs=1e-5)


def test_inflation_widens_both_twists_by_its_factor():
    """An inflation c acts as a measured spread c times larger, in the guided twist and in
    the subspace proposal's per-direction variances, and leaves the last twist the
    likelihood."""
    prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    times = jnp.array([0.5, 1.0])
    spread = jnp.full((2, 2), 0.1)

    def calibrated(residual, inflation):
        new = copy.copy(prior)
        shrink = jnp.array([0.9, 0.5])
        new.calibration = Calibration(times, residual, shrink, jnp.zeros(2), 1, inflation)
        return new

    inflated, wide = calibrated(spread, 3.0), calibrated(3.0 * spread, 1.0)
    plain = calibrated(spread, 1.0)
    y = jnp.array([1.0, -1.0])
    x0_hat = jnp.array([0.3, 0.2])
    values = {}
    for name, p in {"inflated": inflated, "wide": wide, "plain": plain}.items():

        def model(y=None, p=p):
            x = numpyro.sample("x", p)
            numpyro.sample("y", dist.Normal(x, 0.1).to_event(1), obs=y)

        obs = dp.model.read_model(model, kwargs={"y": y})
        twist = dp.infer.twists.likelihood_twist(p, obs, "jacobian")
        svd = obs.linear_gaussian()
        grid = jnp.array([0.75, 0.25, 0.0])
        data_variance = jnp.ones(svd.dim)
        values[name] = (
            float(twist(x0_hat, 0.75)),
            float(twist(x0_hat, 0.0)),
            np.asarray(_calibrated_variance(p, svd, grid, data_variance)),
        )
    assert values["inflated"][0] == pytest.approx(values["wide"][0], abs=1e-5)
    assert values["inflated"][0] != pytest.approx(values["plain"][0], abs=1e-2)
    assert values["inflated"][1] == pytest.approx(values["plain"][1], abs=1e-6)
    np.testing.assert_allclose(values["inflated"][2], values["wide"][2], rtol=1e-5)
    assert np.all(values["inflated"][2][:2] > values["plain"][2][:2])
