"""Malformed input fails early with one clear line naming the argument (or site), what was
expected and what was given: before anything is compiled or sampled. And prior draws through a
model with no observed site (dp.Unguided)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior.infer.sampler import as_key
from diffprior.io import check_writable
from diffprior.model import ModelError, model_arguments, read_model

D, DY = 4, 3
PRIOR = dp.GaussianMixture(
    np.array([[-2.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]], np.float32),
    np.array([0.4, 0.6], np.float32),
)
A_MATRIX = jnp.asarray(np.random.default_rng(0).normal(size=(DY, D)), jnp.float32)


def _fails_before_compiling(model, error, match, *args, method=dp.TDS, key=0, **kwargs):
    """``Sampler.run`` raises ``error`` with one line matching ``match`` and compiles nothing."""
    sampler = dp.Sampler(method(model), num_particles=8, num_steps=4, progress_bar=False)
    with pytest.raises(error, match=match) as info:
        sampler.run(key, *args, **kwargs)
    assert sampler.num_compilations == 0
    assert "\n" not in str(info.value)
    return str(info.value)


# -- forward operators of the wrong shape -------------------------------------------------------


def _operator_model(forward):
    def model(y=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(forward(x), 0.5).to_event(1), obs=y)

    return model


@pytest.mark.parametrize(
    ("forward", "given"),
    [
        (lambda x: jnp.ones((DY, D + 1)) @ x, r"\(5,\) and \(4,\)"),  # a plain matrix
        (dp.operators.Linear(np.ones((DY, D + 1), np.float32)), r"Linear maps \(5,\) to \(3,\)"),
        (dp.operators.Saturation((D + 1,)), r"Saturation maps \(5,\) to \(5,\)"),
    ],
    ids=["matrix", "Linear", "Saturation"],
)
def test_operator_of_the_wrong_shape_names_the_site_and_shapes(forward, given):
    message = _fails_before_compiling(_operator_model(forward), ModelError, given, y=jnp.ones(DY))
    assert "DiffusionPrior site 'x' has shape (4,)" in message
    assert "forward operator must map an x of shape (4,)" in message


def test_observation_of_the_wrong_shape_names_both_shapes():
    model = _operator_model(lambda x: A_MATRIX @ x)
    _fails_before_compiling(
        model, ModelError, r"site 'y': observed value has shape \(2,\).*\(3,\)", y=jnp.ones(2)
    )


# -- invalid likelihood parameters --------------------------------------------------------------


def _likelihood(wrapper, loc, scale):
    if wrapper == "Independent":
        return dist.Normal(loc, scale).to_event(1)
    if wrapper == "Expanded":
        return dist.Normal(loc[0], scale).expand((DY,)).to_event(1)
    if wrapper == "Masked":
        return dist.Normal(loc, scale).mask(True).to_event(1)
    with numpyro.plate("obs", DY):  # no wrapper at all: a plate
        return dist.Normal(loc, scale)


@pytest.mark.parametrize("wrapper", ["Independent", "Expanded", "Masked", "plate"])
@pytest.mark.parametrize(("scale", "given"), [(-1.0, "-1.0"), (float("nan"), "nan"), (0.0, "0.0")])
@pytest.mark.parametrize("validation", [True, False], ids=["validated", "unvalidated"])
def test_invalid_noise_scale_names_the_site_and_value(wrapper, scale, given, validation):
    def model(sigma, y=None):
        x = numpyro.sample("x", PRIOR)
        likelihood = _likelihood(wrapper, A_MATRIX @ x, sigma)
        if wrapper == "plate":
            with numpyro.plate("obs", DY):
                numpyro.sample("y", likelihood, obs=y)
        else:
            numpyro.sample("y", likelihood, obs=y)

    # NumPyro's own validation raises inside the model, without the site's name; with it off
    # nothing would complain until the log-likelihood came out NaN
    with numpyro.validation_enabled(validation):
        _fails_before_compiling(
            model,
            ModelError,
            rf"site 'y': Normal scale must be > 0.0, got {given}$",
            scale,
            y=jnp.ones(DY),
        )


def test_invalid_parameter_of_a_vector_counts_the_bad_entries():
    def model(y=None):
        x = numpyro.sample("x", PRIOR)
        scale = jnp.array([0.5, -1.0, -2.0])
        numpyro.sample("y", dist.StudentT(4.0, A_MATRIX @ x, scale).to_event(1), obs=y)

    _fails_before_compiling(
        model,
        ModelError,
        r"site 'y': StudentT scale must be > 0.0, got -1.0 \(2 of 3 entries",
        y=jnp.ones(DY),
    )


def test_a_valid_model_reads_with_validation_on_and_off():
    model = _operator_model(lambda x: A_MATRIX @ x)
    for validation in (True, False):
        with numpyro.validation_enabled(validation):
            assert list(read_model(model, kwargs={"y": jnp.ones(DY)}).observed) == ["y"]


# -- keys and model arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "given"),
    [
        ("abc", "'abc' (str)"),
        (1.5, "1.5 (float)"),
        (True, "True (bool)"),
        (None, "None (NoneType)"),
        (jnp.zeros(3), "an array of dtype float32 and shape (3,)"),
        (np.zeros(2, np.int64), "an array of dtype int64 and shape (2,)"),
        (jax.random.split(jax.random.key(0), 2), "a batch of keys of shape (2,)"),
    ],
    ids=["str", "float", "bool", "None", "float-array", "int-pair", "key-batch"],
)
def test_bad_rng_key_says_what_a_key_is(key, given):
    model = _operator_model(lambda x: A_MATRIX @ x)
    message = _fails_before_compiling(
        model,
        TypeError,
        "rng_key must be a jax.random.key, a legacy uint32",
        key=key,
        y=jnp.ones(DY),
    )
    assert message.endswith(given) or given in message
    assert "int seed; got " in message


def test_every_kind_of_key_is_accepted():
    typed = jax.random.key(3)
    for key in (3, np.int32(3), typed, jax.random.PRNGKey(3), np.asarray(jax.random.PRNGKey(3))):
        out = as_key(key)
        assert out.shape == () and jnp.issubdtype(out.dtype, jax.dtypes.prng_key)
        assert np.array_equal(jax.random.key_data(out), jax.random.key_data(typed))


def test_lists_of_numbers_are_observed_as_arrays():
    """``y=[...]`` reads as ``y=jnp.array([...])``: same draws, and the same compiled program."""
    model = _operator_model(lambda x: A_MATRIX @ x)
    sampler = dp.Sampler(dp.DPS(model), num_particles=8, num_steps=4, progress_bar=False)
    sampler.run(jax.random.key(0), y=[0.5, -1.0, 2.0])
    from_list = np.asarray(sampler.get_samples()["x"])
    sampler.run(jax.random.key(0), y=jnp.array([0.5, -1.0, 2.0]))
    np.testing.assert_array_equal(from_list, np.asarray(sampler.get_samples()["x"]))
    assert sampler.num_compilations == 1


def test_model_arguments_leave_tuples_and_non_numbers_alone():
    args, kwargs = model_arguments(([1.0, 2.0], (2, 3), ["a", "b"], [[1, 2], [3]]), {"n": [[1]]})
    assert isinstance(args[0], jax.Array) and args[0].shape == (2,)
    assert args[1] == (2, 3)
    assert args[2] == ["a", "b"]
    assert args[3] == [[1, 2], [3]]  # ragged
    assert kwargs["n"].shape == (1, 1)


# -- output paths -------------------------------------------------------------------------------


def test_check_writable_accepts_new_files_and_folders(tmp_path):
    check_writable(tmp_path / "samples.npz")
    check_writable(tmp_path / "new" / "deeper" / "samples.npz")
    (tmp_path / "old.npz").write_text("")
    check_writable(tmp_path / "old.npz")  # replaced atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.npz"]  # nothing created


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("folder", "is a directory; expected the path of a file"),
        ("file/x.npz", "lies under .*file, which is a file, not a directory"),
        ("file/sub/x.npz", "lies under .*file, which is a file, not a directory"),
    ],
)
def test_check_writable_rejects_what_cannot_be_written(where, message, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=message):
        check_writable(tmp_path / where)


def test_check_writable_rejects_a_folder_without_write_permission(tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # the permission bits do not bind the superuser, so the refusal is what os.access reports
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )
    with pytest.raises(ValueError, match=r"no write permission in directory .*locked"):
        check_writable(locked / "new" / "x.npz")


# -- prior draws through a model ----------------------------------------------------------------

MIXTURE = dp.GaussianMixture(
    np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], np.float32),
    np.array([0.5, 0.3, 0.2], np.float32),
    np.array([0.6, 0.8, 0.5], np.float32),
)


def _prior_only(prior):
    def model():
        numpyro.sample("x", prior)

    return model


# 200 steps keep the discretisation bias of the covariance (about -1 standard error at 32768
# draws) far below the Monte Carlo error of 2048 draws
DRAW_CHAINS, DRAW_PARTICLES, DRAW_STEPS = 2, 1024, 200


@pytest.fixture(scope="module")
def prior_draws():
    sampler = dp.Sampler(
        dp.Unguided(_prior_only(MIXTURE)),
        num_particles=DRAW_PARTICLES,
        num_steps=DRAW_STEPS,
        num_chains=DRAW_CHAINS,
        progress_bar=False,
    )
    sampler.run(jax.random.key(1))
    return sampler


def test_unguided_draws_from_the_prior_through_a_model(prior_draws):
    """Mean and covariance of the draws match the mixture's within 5 standard errors (the
    covariance's from the sample fourth moments)."""
    x = np.asarray(prior_draws.get_samples()["x"], np.float64)
    n = x.shape[0]
    assert n == DRAW_CHAINS * DRAW_PARTICLES
    mean, covariance = np.asarray(MIXTURE.mean), np.asarray(MIXTURE.covariance)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(np.diag(covariance) / n))
    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    covariance_se = np.sqrt(products.var(0) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - covariance), 5 * covariance_se)


def test_prior_draws_read_with_arviz(prior_draws):
    tree = prior_draws.to_arviz()
    assert set(tree.children) == {"posterior", "sample_stats"}  # no data, no likelihood
    assert tree["posterior"]["x"].shape == (DRAW_CHAINS, DRAW_PARTICLES, 2)
    assert prior_draws.log_evidence is None


@pytest.mark.parametrize("method", [dp.TDS, dp.DPS, dp.MCGdiff])
def test_other_methods_refuse_a_model_with_nothing_to_condition_on(method):
    _fails_before_compiling(
        _prior_only(MIXTURE),
        ModelError,
        r"nothing to condition.*use dp.Unguided\(model\)",
        method=method,
    )


def test_unguided_names_unobserved_sites_and_points_to_predictive():
    def model(y=None):
        x = numpyro.sample("x", MIXTURE)
        numpyro.sample("y", dist.Normal(x, 0.1).to_event(1), obs=y)

    _fails_before_compiling(
        model, ModelError, r"latent sample sites 'y'.*numpyro.infer.Predictive", method=dp.Unguided
    )
