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
