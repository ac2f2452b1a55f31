"""The shipped priors: listed, loaded offline from the package, and sane."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprior as dp
import diffprior.pretrained as pretrained


def test_available_lists_digits():
    names = pretrained.available()
    assert isinstance(names, list)
    assert "digits" in names


def test_unknown_name_raises_and_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: .*'digits'"):
        pretrained.load("no-such-prior")
    with pytest.raises(ValueError, match="unknown pretrained prior"):
        pretrained.metadata("no-such-prior")


@pytest.fixture(scope="module")
def digits():
    return pretrained.load("digits", num_steps=25)


def test_load_digits_returns_a_diffusion_prior(digits):
    assert isinstance(digits, dp.DiffusionPrior)
    assert digits.event_shape == (8, 8)
    assert digits.num_steps == 25
    meta = pretrained.metadata("digits")
    assert digits.data_variance == pytest.approx(meta["data_variance"])
    assert 0.1 < digits.data_variance < 1.0
    assert digits.denoiser.parameterization == meta["parameterization"] == "eps"


def test_metadata_records_how_the_prior_was_made():
    meta = pretrained.metadata("digits")
    for field in (
        "name",
        "event_shape",
        "schedule",
        "parameterization",
        "data",
        "net",
        "training",
        "seed",
        "command",
        "data_variance",
    ):
        assert field in meta, field
    assert meta["event_shape"] == [8, 8]
    assert meta["command"].startswith("python examples/train_digits.py")
    assert "1500" in meta["data"]["train"] and "297" in meta["data"]["test"]
    json.dumps(meta)  # plain JSON


def test_denoiser_output_is_finite(digits):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8))
    x0_fn = eqx.filter_jit(lambda den, x, t: jax.vmap(den.x0, (0, None))(x, t))
    for t in (0.01, 0.5, 1.0):
        x0_hat = x0_fn(digits.denoiser, x, jnp.float32(t))
        assert x0_hat.shape == (4, 8, 8)
        assert bool(jnp.all(jnp.isfinite(x0_hat)))


def test_samples_have_the_event_shape_and_the_data_range(digits):
    samples = np.asarray(digits.sample(jax.random.key(1), (8,)))
    assert samples.shape == (8, 8, 8)
    assert np.all(np.isfinite(samples))
    assert np.all(np.abs(samples) < 1.5)
    # digits: the background (-1) dominates and some pixels are bright
    assert np.median(samples) < -0.5
    assert np.max(samples) > 0.5


def test_digits_split_is_the_last_297_held_out():
    from sklearn.datasets import load_digits

    train, test = pretrained.load_digits_split()
    assert train.shape == (1500, 8, 8) and test.shape == (297, 8, 8)
    assert train.dtype == np.float32
    images = load_digits().images
    np.testing.assert_allclose(test, images[-297:] / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_allclose(train, images[:1500] / 8.0 - 1.0, atol=1e-6)
    assert train.min() == -1.0 and train.max() == 1.0


# -- the latent digits prior ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_latent():
    return pretrained.load("digits-latent", num_steps=25)


def test_available_lists_digits_latent():
    assert {"digits", "digits-latent"} <= set(pretrained.available())


def test_load_digits_latent_returns_a_latent_prior(digits_latent):
    meta = pretrained.metadata("digits-latent")
    assert isinstance(digits_latent, dp.LatentDiffusionPrior)
    assert digits_latent.event_shape == (8, 8)
    assert digits_latent.latent_shape == tuple(meta["latent_shape"]) == (16,)
    assert digits_latent.num_steps == 25
    assert digits_latent.data_variance == pytest.approx(meta["data_variance"]) == pytest.approx(1)
    assert digits_latent.denoiser.parameterization == meta["parameterization"] == "eps"
    assert digits_latent.encoder is not None


def test_digits_latent_metadata_records_how_it_was_made(digits_latent):
    meta = pretrained.metadata("digits-latent")
    for field in (
        "schedule",
        "parameterization",
        "net",
        "autoencoder",
        "latent_shape",
        "latent_standardisation",
        "data",
        "training",
        "autoencoder_training",
        "seed",
        "command",
        "weights_sha256",
    ):
        assert field in meta, field
    assert meta["command"].startswith("python examples/train_digits_latent.py")
    assert "1500" in meta["data"]["train"] and "297" in meta["data"]["test"]
    # the standardisation recorded is the one inside the shipped autoencoder
    autoencoder = digits_latent.decoder.__self__
    np.testing.assert_allclose(
        autoencoder.latent_mean, meta["latent_standardisation"]["mean"], rtol=1e-6
    )
    np.testing.assert_allclose(
        autoencoder.latent_scale, meta["latent_standardisation"]["scale"], rtol=1e-6
    )
    json.dumps(meta)


def test_digits_latent_loads_offline_and_samples_digits(digits_latent, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("pretrained.load must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    pretrained._load_denoiser.cache_clear()  # read the files again, offline
    prior = pretrained.load("digits-latent", num_steps=25)
    samples = np.asarray(prior.sample(jax.random.key(1), (16,)))
    assert samples.shape == (16, 8, 8)
    assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
    assert np.median(samples) < -0.5 and np.max(samples) > 0.5


def test_digits_latent_autoencoder_reconstructs_held_out_digits(digits_latent):
    """The recorded test MSE is about 0.024 (PSNR 22 dB); the data's variance is 0.29."""
    _, test = pretrained.load_digits_split()
    rebuilt = jax.vmap(lambda x: digits_latent.decode(digits_latent.encode(x)))(jnp.asarray(test))
    assert float(jnp.mean((rebuilt - test) ** 2)) < 0.05


def test_a_corrupted_weights_file_is_refused(tmp_path, monkeypatch):
    import importlib.resources
    import shutil

    for name in ("digits-latent.json", "digits-latent.eqx"):
        shutil.copy(importlib.resources.files(pretrained).joinpath(name), tmp_path / name)
    raw = bytearray((tmp_path / "digits-latent.eqx").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "digits-latent.eqx").write_bytes(bytes(raw))
    monkeypatch.setattr(pretrained, "_files", lambda: tmp_path)
    pretrained._load_denoiser.cache_clear()
    try:
        with pytest.raises(ValueError, match="does not match the sha256"):
            pretrained.load("digits-latent")
    finally:
        pretrained._load_denoiser.cache_clear()


@pytest.mark.parametrize("method", [dp.DPS, dp.TDS])
def test_sampler_on_digits_latent_returns_images(digits_latent, method):
    """The kernels run on the 16-d latent; the draws come back as (n, 8, 8) decoded images."""
    import numpyro
    import numpyro.distributions as dist

    _, test = pretrained.load_digits_split()
    y = jnp.asarray(test[0, :4])

    def model(y=None):
        x = numpyro.sample("x", digits_latent)
        numpyro.sample("y", dist.Normal(x[:4], 0.1).to_event(2), obs=y)

    sampler = dp.Sampler(method(model), 8, 5, num_chains=2, progress_bar=False)
    sampler.run(jax.random.key(0), y=y)
    x = np.asarray(sampler.get_samples()["x"])
    assert x.shape == (16, 8, 8)
    assert np.all(np.isfinite(x)) and np.all(np.abs(x) <= 1.0)
    idata = sampler.to_arviz()
    assert idata["posterior"]["x"].shape == (2, 8, 8, 8)
