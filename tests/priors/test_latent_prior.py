"""LatentDiffusionPrior: a diffusion model on a latent z plus a decoder. Samples are decoded
images; the model's likelihood composes with the decoder (read_model ... in_latent_space); the
Sampler runs every method on z and returns images, exactly so for TDS on a linear decoder; the
image-space log_prob is refused with a reason; bad decoders fail early."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.model import read_model

#: A linear decoder R^2 -> R^4 (full column rank), so that posteriors stay exact.
M = jnp.array([[1.0, 0.5], [-0.3, 1.0], [0.8, -0.6], [0.2, 0.4]])
LATENT_GMM = dp.GaussianMixture(jnp.array([[-1.5, 0.5], [1.5, -0.5]]), jnp.array([0.6, 0.4]), 0.6)


def latent_prior(decoder=lambda z: M @ z, **options) -> dp.LatentDiffusionPrior:
    """The two-component latent mixture, decoded to R^4 (linearly by default)."""
    options.setdefault("data_variance", float(jnp.mean(LATENT_GMM.variance)))
    return dp.LatentDiffusionPrior(LATENT_GMM.denoiser, decoder, (4,), (2,), **options)


def nonlinear_decoder(z):
    return jnp.tanh(M @ z + 0.1)


SIGMA_Y = 0.3
Y = jnp.array([0.4])


def make_model(prior):
    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x[:1], SIGMA_Y).to_event(1), obs=y)

    return model


# -- the distribution ----------------------------------------------------------------------------


def test_samples_are_decoded_latents():
    prior = latent_prior(nonlinear_decoder, num_steps=10)
    assert prior.event_shape == (4,) and prior.latent_shape == (2,)
    x = prior.sample(jax.random.key(0), (3, 5))
    assert x.shape == (3, 5, 4)
    # same key, same latents: the samples are the decoded latent-prior samples
    z = prior.latent_prior.sample(jax.random.key(0), (3, 5))
    np.testing.assert_allclose(x, jax.vmap(jax.vmap(nonlinear_decoder))(z), atol=1e-6)
    assert bool(jnp.all(jnp.abs(x) < 1.0))  # tanh range: decoded


def test_plain_prior_decodes_with_the_identity():
    assert LATENT_GMM.latent_shape == LATENT_GMM.event_shape
    z = jnp.arange(2.0)
    np.testing.assert_array_equal(LATENT_GMM.decode(z), z)


def test_log_prob_is_refused_with_the_reason_and_latent_log_prob_works():
    """latent_log_prob is the latent diffusion's probability-flow density: for the mixture's
    exact denoiser, its exact log density (16 ODE steps: about 0.005 nats off)."""
    prior = latent_prior(ode_steps=16)
    with pytest.raises(NotImplementedError, match="no density on the image space"):
        prior.log_prob(jnp.zeros(4))
    with pytest.raises(NotImplementedError, match="latent_log_prob"):
        prior.ode_log_prob(jnp.zeros(4))
    z = jnp.array([[0.3, -0.2], [1.5, -0.5]])
    np.testing.assert_allclose(prior.latent_log_prob(z), LATENT_GMM.log_prob(z), atol=0.02)


def test_encoder_is_optional_and_checked():
    prior = latent_prior(encoder=lambda x: jnp.linalg.pinv(M) @ x)
    z = jnp.array([0.5, -1.0])
    np.testing.assert_allclose(prior.encode(prior.decode(z)), z, atol=1e-5)
    with pytest.raises(ValueError, match="no encoder"):
        latent_prior().encode(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"encoder maps shape \(4,\) to \(3,\)"):
        latent_prior(encoder=lambda x: x[:3])


@pytest.mark.parametrize(
    ("decoder", "error", "match"),
    [
        (lambda z: z, ValueError, r"decoder maps shape \(2,\) to \(2,\), but \(4,\)"),
        (lambda z: jnp.zeros((4, 1)) @ z[None, :1], ValueError, "decoder maps"),
        (lambda z: z @ jnp.ones((3, 4)), ValueError, "could not be applied"),
        ("not a function", TypeError, "decoder must be a function"),
    ],
)
def test_bad_decoders_fail_early(decoder, error, match):
    with pytest.raises(error, match=match):
        latent_prior(decoder)


def test_passes_through_jit_as_a_pytree():
    prior = latent_prior(num_steps=5)
    sample = jax.jit(lambda p, key: p.sample(key, (2,)))
    assert sample(prior, jax.random.key(0)).shape == (2, 4)


# -- the model's likelihood in latent space ------------------------------------------------------


def test_observation_model_composes_with_the_decoder():
    obs = read_model(make_model(latent_prior(nonlinear_decoder)), kwargs={"y": Y})
    assert obs.event_shape == (4,)  # the site's value is the image
    latent = obs.in_latent_space()
    assert latent.event_shape == (2,) and latent.decode is not None
    assert latent.in_latent_space() is latent
    z = jnp.array([0.7, -0.4])
    np.testing.assert_allclose(
        latent.log_likelihood(z), obs.log_likelihood(nonlinear_decoder(z)), rtol=1e-6
    )
    np.testing.assert_allclose(latent.observation_mean(z), nonlinear_decoder(z)[:1], rtol=1e-6)
    with pytest.raises(ValueError, match=r"latent z has shape \(4,\).*latent shape is \(2,\)"):
        latent.log_likelihood(jnp.zeros(4))


def test_plain_prior_model_is_its_own_latent_model():
    obs = read_model(make_model(LATENT_GMM), kwargs={"y": Y})
    assert obs.in_latent_space() is obs


def test_linear_gaussian_structure_is_judged_through_the_decoder():
    """PiGDM and DiffPIR use their closed forms only when y is linear-Gaussian in z."""
    linear = read_model(make_model(latent_prior()), kwargs={"y": Y})
    nonlinear = read_model(make_model(latent_prior(nonlinear_decoder)), kwargs={"y": Y})
    assert nonlinear.is_linear_gaussian()  # linear in the image x ...
    assert not nonlinear.in_latent_space().is_linear_gaussian()  # ... not in z
    assert linear.in_latent_space().is_linear_gaussian()


# -- the Sampler on a latent prior ---------------------------------------------------------------


@pytest.mark.parametrize("calibrated", [False, True], ids=["uncalibrated", "calibrated"])
def test_tds_on_a_linear_decoder_matches_the_exact_posterior(calibrated):
    """With x = M z and z from a Gaussian mixture, p(z | y) is the mixture's exact posterior for
    the operator A M; TDS (asymptotically exact) on z, decoded, must match E[x | y] = M E[z | y]
    within Monte Carlo error (4 standard errors with an effective size of a quarter of the
    draws), and the prior mean is far outside that band; also with the prior calibrated in its
    latent space (dp.calibrate on its own latent draws), which changes the twists only."""
    prior = latent_prior()
    if calibrated:
        latents = LATENT_GMM.sample(jax.random.key(5), (2000,))
        prior = dp.calibrate(prior, latents, num_times=8)
        assert prior.calibration.residual_variance.shape == (8, *prior.latent_shape)
    model = make_model(prior)
    sampler = dp.Sampler(dp.TDS(model), 512, 40, num_chains=2, progress_bar=False)
    sampler.run(jax.random.key(0), y=Y)
    x = np.asarray(sampler.get_samples()["x"])
    assert x.shape == (1024, 4)
    exact = LATENT_GMM.posterior(M[:1], SIGMA_Y, Y)
    exact_x = np.asarray(exact.sample(jax.random.key(1), (100_000,)) @ M.T)
    mean, sd = exact_x.mean(axis=0), exact_x.std(axis=0)
    tolerance = 4 * sd / np.sqrt(x.shape[0] / 4)
    assert np.all(np.abs(x.mean(axis=0) - mean) < tolerance), (x.mean(axis=0), mean, tolerance)
    np.testing.assert_allclose(x.std(axis=0), sd, rtol=0.2)
    prior_mean = np.asarray(M @ (LATENT_GMM.weights @ LATENT_GMM.means))
    assert np.any(np.abs(prior_mean - mean) > 3 * tolerance)


@pytest.mark.parametrize("method", [dp.DPS, dp.PiGDM, dp.DiffPIR])
def test_other_methods_return_finite_decoded_images(method):
    """The general (non-closed-form) paths of PiGDM and DiffPIR on a nonlinear decoder."""
    model = make_model(latent_prior(nonlinear_decoder))
    sampler = dp.Sampler(method(model), 16, 10, num_chains=2, progress_bar=False)
    sampler.run(jax.random.key(0), y=Y)
    x = np.asarray(sampler.get_samples(group_by_chain=True)["x"])
    assert x.shape == (2, 16, 4)
    assert np.all(np.isfinite(x)) and np.all(np.abs(x) < 1.0)
