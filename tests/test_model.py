"""diffprior.model: reading a NumPyro model into log p(y | x), checked against densities written
out by hand (jax.scipy.stats and closed forms), never against NumPyro's own log_prob."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import diffprior as dp
from diffprior.model import ModelError, ObservationModel, inflate_variance, read_model

D, DY = 3, 4
SIGMA_Y = 0.3
DF = 4.0
# float64 NumPy on the hand-written side, float32 JAX inside the model
A_MATRIX = np.array([[1.0, 0.5, -0.2], [0.0, 2.0, 0.3], [-1.0, 0.1, 0.7], [0.4, -0.6, 1.2]])
X_TEST = np.array([0.3, -0.8, 1.1])
LOG_2PI = math.log(2 * math.pi)


def linear(x, xp=jnp):
    return xp.asarray(A_MATRIX, dtype=x.dtype) @ x


def nonlinear(x, xp=jnp):
    ax = linear(x, xp)
    return xp.sin(ax) + 0.1 * ax**2


def make_prior(d=D):
    means = jnp.stack([jnp.full((d,), -1.0), jnp.full((d,), 1.0)])
    return dp.GaussianMixture(means, jnp.array([0.5, 0.5]))


class ExpensivePrior(dp.GaussianMixture):
    """A prior whose sample and log_prob must never run while reading the likelihood."""

    def sample(self, key, sample_shape=()):
        raise AssertionError("the prior was sampled")

    def log_prob(self, value):
        raise AssertionError("the prior's log_prob was evaluated")


PRIOR = make_prior()


# --- hand-written log densities (NumPy, float64) --------------------------------------------

lgamma = np.vectorize(math.lgamma)


def normal_log_pdf(y, loc, scale):
    z = (np.asarray(y, np.float64) - loc) / scale
    return -0.5 * z**2 - np.log(scale) - 0.5 * LOG_2PI


def student_t_log_pdf(y, df, loc, scale):
    z = (np.asarray(y, np.float64) - loc) / scale
    return (
        lgamma((df + 1) / 2)
        - lgamma(df / 2)
        - 0.5 * np.log(df * math.pi)
        - np.log(scale)
        - (df + 1) / 2 * np.log1p(z**2 / df)
    )


def laplace_log_pdf(y, loc, scale):
    return -np.abs(np.asarray(y, np.float64) - loc) / scale - np.log(2 * scale)


def poisson_log_pmf(k, rate):
    k = np.asarray(k, np.float64)
    return k * np.log(rate) - rate - lgamma(k + 1)


def hand_log_lik(family, location, y, extra_variance=0.0):
    """Sum of log p(y_i | location_i) written out (Poisson: ``location`` is the rate)."""
    scale = math.sqrt(SIGMA_Y**2 + extra_variance)
    if family == "normal":
        return np.sum(normal_log_pdf(y, location, scale))
    if family == "student_t":
        return np.sum(student_t_log_pdf(y, DF, location, scale))
    if family == "laplace":
        return np.sum(laplace_log_pdf(y, location, SIGMA_Y))
    if family == "poisson":
        return np.sum(poisson_log_pmf(y, location))
    raise ValueError(family)


def likelihood(family, location):
    if family == "normal":
        return dist.Normal(location, SIGMA_Y)
    if family == "student_t":
        return dist.StudentT(DF, location, SIGMA_Y)
    if family == "laplace":
        return dist.Laplace(location, SIGMA_Y)
    if family == "poisson":
        return dist.Poisson(location)
    raise ValueError(family)


def location_fn(family, forward):
    if family == "poisson":
        return lambda x, xp=jnp: xp.exp(0.5 * forward(x, xp))
    return forward


def make_model(family, forward, layout, prior=PRIOR):
    loc_fn = location_fn(family, forward)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.deterministic("Ax", forward(x))
        if layout == "to_event":
            numpyro.sample("y", likelihood(family, loc_fn(x)).to_event(1), obs=y)
        else:
            with numpyro.plate("obs", DY):
                numpyro.sample("y", likelihood(family, loc_fn(x)), obs=y)

    return model


def observation(family, forward):
    """Observed data as float32 JAX arrays (counts for Poisson)."""
    if family == "poisson":
        return jnp.array([0.0, 3.0, 1.0, 5.0])
    y = forward(np.array([0.1, -0.5, 0.9]), np) + np.array([0.2, -0.1, 0.05, 0.3])
    return jnp.asarray(y, dtype=jnp.float32)


def hand(family, forward, x=X_TEST):
    """The location (rate) at ``x``, in float64 NumPy."""
    return location_fn(family, forward)(np.asarray(x, np.float64), np)


FAMILIES = ["normal", "student_t", "laplace", "poisson"]
X32 = jnp.asarray(X_TEST, dtype=jnp.float32)


def gaussian_obs():
    y = observation("normal", linear)
    return read_model(make_model("normal", linear, "to_event"), kwargs={"y": y}), y


# --- log_likelihood against hand-written densities ------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["to_event", "plate"])
@pytest.mark.parametrize("forward", [linear, nonlinear], ids=["linear", "nonlinear"])
def test_log_likelihood_matches_hand_written_density(family, layout, forward):
    y = observation(family, forward)
    obs = read_model(make_model(family, forward, layout), kwargs={"y": y})
    got = jax.jit(obs.log_likelihood)(X32)
    assert got.shape == ()
    expected = hand_log_lik(family, hand(family, forward), y)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_log_likelihood_eagerly():
    obs, y = gaussian_obs()
    np.testing.assert_allclose(
        obs.log_likelihood(X_TEST), hand_log_lik("normal", hand("normal", linear), y), rtol=1e-5
    )


def test_reads_sites_and_shapes():
    obs, y = gaussian_obs()
    assert isinstance(obs, ObservationModel)
    assert obs.prior_site == "x"
    assert obs.prior is PRIOR
    assert obs.event_shape == (D,)
    assert list(obs.observed) == ["y"]
    assert obs.fixed_sites == ()
    np.testing.assert_array_equal(obs.observed["y"], y)
    np.testing.assert_array_equal(obs.observed_flat, y)
    assert "'x'" in repr(obs) and "y(4,)" in repr(obs)


def test_image_event_shape_with_inpainting_mask():
    den = dp.Denoiser(lambda x, t: jnp.zeros_like(x), dp.schedules.VP.linear(), "x0")
    prior = dp.DiffusionPrior(den, event_shape=(8, 8))
    keep = (np.arange(64).reshape(8, 8) % 3) != 0

    def model(y=None):
        x = numpyro.sample("img", prior)
        numpyro.sample("y", dist.Normal(x[keep], SIGMA_Y).to_event(1), obs=y)

    y = np.linspace(-1.0, 1.0, 64).reshape(8, 8)[keep] + 0.1
    obs = read_model(model, kwargs={"y": jnp.asarray(y, jnp.float32)})
    assert obs.prior_site == "img"
    assert obs.event_shape == (8, 8)
    x = np.cos(np.arange(64.0)).reshape(8, 8)
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        jax.jit(obs.log_likelihood)(x32), hand_log_lik("normal", x[keep], y), rtol=1e-5
    )
    np.testing.assert_allclose(jax.jit(obs.observation_mean)(x32), x[keep], rtol=1e-6)


def test_prior_is_never_sampled_or_evaluated():
    prior = ExpensivePrior(jnp.zeros((1, D)), jnp.ones(1))
    y = observation("normal", linear)
    obs = read_model(make_model("normal", linear, "plate", prior=prior), kwargs={"y": y})
    assert obs.prior is prior
    obs.log_likelihood(X32)
    obs.log_likelihood(X32, extra_variance=0.1)
    obs.pointwise_log_likelihood(X32)
    obs.observation_mean(X32)


def test_positional_args_and_several_observed_sites():
    def model(y1, y2):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y1", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y1)
        numpyro.sample("y2", dist.Laplace(jnp.sum(x), SIGMA_Y), obs=y2)

    y1, y2 = observation("normal", linear), jnp.array(0.7)
    obs = read_model(model, args=(y1, y2))
    assert list(obs.observed) == ["y1", "y2"]
    expected = hand_log_lik("normal", hand("normal", linear), y1) + hand_log_lik(
        "laplace", X_TEST.sum(), y2
    )
    np.testing.assert_allclose(jax.jit(obs.log_likelihood)(X32), expected, rtol=1e-5)
    np.testing.assert_array_equal(obs.observed_flat, np.concatenate([y1, [0.7]]).astype("f4"))
    np.testing.assert_allclose(
        jax.jit(obs.observation_mean)(X32),
        np.concatenate([hand("normal", linear), [X_TEST.sum()]]),
        rtol=1e-5,
    )


# --- JAX transformations ----------------------------------------------------------------------


def test_log_likelihood_under_vmap():
    obs, y = gaussian_obs()
    xs = np.random.default_rng(0).normal(size=(5, D))
    expected = [hand_log_lik("normal", A_MATRIX @ x, y) for x in xs]
    xs32 = jnp.asarray(xs, jnp.float32)
    np.testing.assert_allclose(jax.jit(jax.vmap(obs.log_likelihood))(xs32), expected, rtol=1e-5)


def test_grad_matches_hand_written_gaussian_gradient():
    obs, y = gaussian_obs()
    # d/dx [-|y - A x|^2 / (2 s^2)] = A^T (y - A x) / s^2
    expected = A_MATRIX.T @ (np.asarray(y, np.float64) - A_MATRIX @ X_TEST) / SIGMA_Y**2
    np.testing.assert_allclose(jax.jit(jax.grad(obs.log_likelihood))(X32), expected, rtol=1e-4)


def test_wrong_x_shape_is_rejected():
    obs, _ = gaussian_obs()
    with pytest.raises(ValueError, match=r"site 'x'.*\(2,\).*\(3,\)"):
        obs.log_likelihood(jnp.zeros(2))


# --- variance inflation -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["normal", "student_t"])
@pytest.mark.parametrize("layout", ["to_event", "plate"])
def test_extra_variance_matches_inflated_density(family, layout):
    y = observation(family, nonlinear)
    obs = read_model(make_model(family, nonlinear, layout), kwargs={"y": y})
    v = 0.5
    expected = hand_log_lik(family, hand(family, nonlinear), y, extra_variance=v)
    log_lik = jax.jit(obs.log_likelihood)
    np.testing.assert_allclose(log_lik(X32, extra_variance=v), expected, rtol=1e-5)
    assert not np.allclose(log_lik(X32), expected, rtol=1e-3)


def test_extra_variance_zero_is_the_plain_likelihood():
    obs, _ = gaussian_obs()
    np.testing.assert_allclose(
        obs.log_likelihood(X32, extra_variance=0.0), obs.log_likelihood(X32), rtol=1e-6
    )


def test_extra_variance_may_be_traced():
    obs, y = gaussian_obs()
    vs = np.array([0.0, 0.1, 1.0])
    got = jax.jit(jax.vmap(lambda v: obs.log_likelihood(X32, extra_variance=v)))(vs)
    location = hand("normal", linear)
    expected = [hand_log_lik("normal", location, y, v) for v in vs]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # d/dv log N(y; m, (s^2 + v) I) = sum_i [r_i^2 / (2 (s^2 + v)^2) - 1 / (2 (s^2 + v))]
    v = 0.2
    residual = np.asarray(y, np.float64) - location
    total = SIGMA_Y**2 + v
    expected_grad = np.sum(residual**2 / (2 * total**2) - 1 / (2 * total))
    got_grad = jax.jit(jax.grad(lambda v: obs.log_likelihood(X32, extra_variance=v)))(v)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4)


def test_extra_variance_leaves_other_likelihoods_alone_and_sees_through_masks():
    keep = np.array([True, False, True, True])

    def model(y, counts):
        x = numpyro.sample("x", PRIOR)
        with numpyro.plate("obs", DY), handlers.mask(mask=keep):
            numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y)
        numpyro.sample("counts", dist.Poisson(jnp.exp(0.5 * linear(x))).to_event(1), obs=counts)

    y, counts = observation("normal", linear), observation("poisson", linear)
    obs = read_model(model, args=(y, counts))
    v = 0.3
    expected = hand_log_lik("normal", hand("normal", linear)[keep], y[keep], v) + hand_log_lik(
        "poisson", hand("poisson", linear), counts
    )
    got = jax.jit(obs.log_likelihood)(X32, extra_variance=v)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_inflate_variance_handler_rebuilds_wrapped_distributions():
    def model():
        numpyro.sample("a", dist.Normal(jnp.zeros(2), 3.0).to_event(1), obs=jnp.zeros(2))
        numpyro.sample("b", dist.StudentT(5.0, 0.0, 3.0).expand([2]).mask(False), obs=jnp.ones(2))
        numpyro.sample("c", dist.Laplace(0.0, 3.0), obs=0.0)
        numpyro.sample("d", dist.Normal(0.0, 3.0))  # latent: untouched

    tr = handlers.trace(handlers.seed(inflate_variance(model, extra_variance=16.0), 0)).get_trace()
    assert isinstance(tr["a"]["fn"], dist.Independent)
    np.testing.assert_allclose(tr["a"]["fn"].base_dist.scale, 5.0)
    b = tr["b"]["fn"]
    assert isinstance(b, dist.MaskedDistribution) and b._mask is False
    assert isinstance(b.base_dist, dist.ExpandedDistribution)
    assert b.batch_shape == (2,)
    np.testing.assert_allclose(b.base_dist.base_dist.scale, 5.0)
    np.testing.assert_allclose(tr["c"]["fn"].scale, 3.0)
    np.testing.assert_allclose(tr["d"]["fn"].scale, 3.0)


# --- pointwise log-likelihood, means, scale, mask, factor, condition --------------------------


def test_pointwise_log_likelihood_keys_shapes_and_values():
    def model(y, z):
        x = numpyro.sample("x", PRIOR)
        with numpyro.plate("obs", DY):
            numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y)
        with numpyro.plate("rows", 2):
            numpyro.sample("z", dist.Laplace(jnp.tile(x, (2, 1)), SIGMA_Y).to_event(1), obs=z)

    y = observation("normal", linear)
    z = np.array([[0.1, 0.2, 0.3], [-0.4, 0.5, 1.0]])
    obs = read_model(model, args=(y, jnp.asarray(z, jnp.float32)))
    pointwise = jax.jit(obs.pointwise_log_likelihood)(X32)
    assert set(pointwise) == {"y", "z"}
    assert pointwise["y"].shape == (DY,)
    assert pointwise["z"].shape == (2,)
    expected_y = normal_log_pdf(y, hand("normal", linear), SIGMA_Y)
    expected_z = laplace_log_pdf(z, X_TEST, SIGMA_Y).sum(axis=-1)
    np.testing.assert_allclose(pointwise["y"], expected_y, rtol=1e-5)
    np.testing.assert_allclose(pointwise["z"], expected_z, rtol=1e-5)
    total = sum(float(np.sum(v)) for v in pointwise.values())
    np.testing.assert_allclose(total, jax.jit(obs.log_likelihood)(X32), rtol=1e-5)
    np.testing.assert_allclose(obs.observed_flat, np.concatenate([y, z.ravel()]), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(obs.observation_mean)(X32),
        np.concatenate([hand("normal", linear), np.tile(X_TEST, 2)]),
        rtol=1e-5,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_observation_mean_of_each_family(family):
    y = observation(family, linear)
    obs = read_model(make_model(family, linear, "plate"), kwargs={"y": y})
    mean = jax.jit(obs.observation_mean)(X32)
    assert mean.shape == (DY,)
    np.testing.assert_allclose(mean, hand(family, linear), rtol=1e-5)


def test_observation_mean_broadcasts_to_site_shape():
    def model(y=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(jnp.sum(x), jnp.full(DY, SIGMA_Y)).to_event(1), obs=y)

    obs = read_model(model, kwargs={"y": jnp.zeros(DY)})
    np.testing.assert_allclose(obs.observation_mean(X32), np.full(DY, X_TEST.sum()), rtol=1e-6)


def test_site_scale_and_mask_are_respected():
    y = observation("normal", linear)
    plain = hand_log_lik("normal", hand("normal", linear), y)

    def scaled(y=None):
        x = numpyro.sample("x", PRIOR)
        with handlers.scale(scale=2.5), numpyro.plate("obs", DY):
            numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y)

    keep = np.array([True, True, False, True])

    def masked(y=None):
        x = numpyro.sample("x", PRIOR)
        with numpyro.plate("obs", DY), handlers.mask(mask=keep):
            numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y)

    np.testing.assert_allclose(
        read_model(scaled, kwargs={"y": y}).log_likelihood(X32), 2.5 * plain, rtol=1e-5
    )
    np.testing.assert_allclose(
        read_model(masked, kwargs={"y": y}).log_likelihood(X32),
        hand_log_lik("normal", hand("normal", linear)[keep], y[keep]),
        rtol=1e-5,
    )


def test_factor_counts_in_the_likelihood_but_is_not_an_observation():
    def model(y=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)
        numpyro.factor("penalty", -jnp.sum(x**2))

    y = observation("normal", linear)
    obs = read_model(model, kwargs={"y": y})
    assert list(obs.observed) == ["y"]
    assert set(obs.pointwise_log_likelihood(X32)) == {"y", "penalty"}
    expected = hand_log_lik("normal", hand("normal", linear), y) - np.sum(X_TEST**2)
    np.testing.assert_allclose(obs.log_likelihood(X32), expected, rtol=1e-5)


def test_factor_only_model_is_a_likelihood():
    def model():
        x = numpyro.sample("x", PRIOR)
        numpyro.factor("reward", -0.5 * jnp.sum((x - 1.0) ** 2))

    obs = read_model(model)
    assert obs.observed == {}
    assert obs.observed_flat.shape == (0,)
    assert obs.observation_mean(X32).shape == (0,)
    np.testing.assert_allclose(
        jax.jit(obs.log_likelihood)(X32), -0.5 * np.sum((X_TEST - 1.0) ** 2), rtol=1e-5
    )


def test_conditioned_latent_site_is_fixed_not_observed():
    def model(y=None):
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        x = numpyro.sample("x", PRIOR)
        numpyro.deterministic("signal", linear(x))
        numpyro.sample("y", dist.Normal(linear(x), noise).to_event(1), obs=y)

    y = observation("normal", linear)
    obs = read_model(handlers.condition(model, data={"noise": SIGMA_Y}), kwargs={"y": y})
    assert list(obs.observed) == ["y"]
    assert obs.fixed_sites == ("noise",)
    assert set(obs.pointwise_log_likelihood(X32)) == {"y"}
    # log p(y | x, noise), without the constant log p(noise)
    np.testing.assert_allclose(
        obs.log_likelihood(X32), hand_log_lik("normal", hand("normal", linear), y), rtol=1e-5
    )
    np.testing.assert_allclose(obs.observation_mean(X32), hand("normal", linear), rtol=1e-5)


def test_wrapped_prior_is_unwrapped():
    def model(y=None):
        x = numpyro.sample("x", PRIOR.to_event(0).mask(True))
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)

    obs = read_model(model, kwargs={"y": observation("normal", linear)})
    assert obs.prior is PRIOR
    assert obs.event_shape == (D,)


# --- bad input --------------------------------------------------------------------------------


def test_no_diffusion_prior_site():
    def model(y=None):
        x = numpyro.sample("x", dist.Normal(jnp.zeros(D), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"no DiffusionPrior.*'x' \(Normal\)"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


def test_two_diffusion_prior_sites_are_both_named():
    def model(y=None):
        x1 = numpyro.sample("x1", PRIOR)
        x2 = numpyro.sample("x2", make_prior())
        numpyro.sample("y", dist.Normal(linear(x1 + x2), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"'x1' and 'x2'"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


def test_observed_prior_site():
    def model(x_obs, y=None):
        x = numpyro.sample("x", PRIOR, obs=x_obs)
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"site 'x'.*observed"):
        read_model(model, args=(X32,), kwargs={"y": jnp.zeros(DY)})


def test_prior_inside_plate():
    def model(y=None):
        with numpyro.plate("batch", 2):
            x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(x.sum(0), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"site 'x'.*\(2, 3\).*\(3,\)"):
        read_model(model, kwargs={"y": jnp.zeros(D)})


def test_scaled_prior_site():
    def model(y=None):
        with handlers.scale(scale=0.5):
            x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"site 'x'.*scaled"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


def test_masked_prior_site():
    def model(y=None):
        x = numpyro.sample("x", PRIOR.mask(False))
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"site 'x'.*masked"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


def test_observed_shape_mismatch():
    model = make_model("normal", linear, "to_event")
    with pytest.raises(
        ModelError,
        match=r"site 'y': observed value has shape \(3,\), but the likelihood has shape \(4,\)",
    ):
        read_model(model, kwargs={"y": jnp.zeros(3)})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([0.0, np.nan, 1.0, np.nan]), r"site 'y'.* 2 NaN and 0 inf .*out of 4"),
        (np.array([0.0, 1.0, np.inf, 1.0]), r"site 'y'.* 0 NaN and 1 inf"),
        (np.array([0.0, 1.0, -np.inf, np.nan]), r"site 'y'.* 1 NaN and 1 inf"),
    ],
)
def test_non_finite_observation(bad, message):
    with pytest.raises(ModelError, match=message):
        read_model(make_model("normal", linear, "plate"), kwargs={"y": jnp.asarray(bad)})


def test_other_latent_sites_are_named():
    def model(y=None):
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        offset = numpyro.sample("offset", dist.Normal(0.0, 1.0))
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(linear(x) + offset, noise).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"'noise', 'offset'.*condition"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


def test_no_observed_site():
    model = make_model("normal", linear, "to_event")
    with pytest.raises(ModelError, match=r"nothing to condition.*'x'.*\['y'\]"):
        read_model(model)


def test_no_observed_site_points_to_unguided():
    def model():
        numpyro.sample("x", PRIOR)

    with pytest.raises(ModelError, match=r"nothing to condition.*use dp.Unguided\(model\)"):
        read_model(model)


@pytest.mark.parametrize("observed", ["none", "constant"])
def test_nothing_to_condition_on_reads_when_not_required(observed):
    """``require_observation=False`` (for prior draws through a model): no likelihood sites, a
    log-likelihood of 0 and no pointwise terms."""

    def model(y=None):
        numpyro.sample("x", PRIOR)
        if observed == "constant":
            numpyro.sample("y", dist.Normal(jnp.zeros(DY), SIGMA_Y).to_event(1), obs=y)

    obs = read_model(model, kwargs={"y": jnp.zeros(DY)}, require_observation=False)
    assert obs.likelihood_sites == () and obs.observed == {}
    assert obs.fixed_sites == (("y",) if observed == "constant" else ())
    assert float(obs.log_likelihood(X32)) == 0.0
    assert obs.pointwise_log_likelihood(X32) == {}


def test_an_error_inside_the_model_names_the_last_site_reached():
    def model(y=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(jnp.ones((DY, D + 2)) @ x, SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError) as info:
        read_model(model, kwargs={"y": jnp.zeros(DY)})
    message = str(info.value)
    assert message.startswith("the model raised TypeError after site 'x' (the DiffusionPrior")
    assert "(5,) and (3,)" in message and "\n" not in message
    assert isinstance(info.value.__cause__, TypeError)  # the original error stays chained


def test_observations_that_do_not_depend_on_x():
    def model(y=None):
        numpyro.sample("x", PRIOR)
        numpyro.sample("y", dist.Normal(jnp.zeros(DY), SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"no observed site depends on .*'x'.*\['y'\]"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


@pytest.mark.parametrize("branch", ["python_if", "numpy_call"])
def test_model_that_is_not_traceable_in_x(branch):
    def model(y=None):
        x = numpyro.sample("x", PRIOR)
        if branch == "python_if":
            location = linear(x) if x[0] > 0 else -linear(x)
        else:
            location = jnp.asarray(A_MATRIX @ np.asarray(x), jnp.float32)
        numpyro.sample("y", dist.Normal(location, SIGMA_Y).to_event(1), obs=y)

    with pytest.raises(ModelError, match=r"site 'x'.*jax.jit"):
        read_model(model, kwargs={"y": jnp.zeros(DY)})


def test_model_error_is_a_value_error():
    assert issubclass(ModelError, ValueError)


# --- obs_mask= (missing observations) -------------------------------------------------------
KEEP = np.array([True, False, True, True])


def obs_mask_model(family, layout, forward=linear):
    """``y`` observed where ``mask`` is True, with ``obs_mask=`` on a ``.to_event(1)`` site (a
    mask of entries) or inside a plate (a mask of the batch shape, as NumPyro documents)."""
    loc_fn = location_fn(family, forward)

    def model(y=None, mask=None):
        x = numpyro.sample("x", PRIOR)
        if layout == "to_event":
            numpyro.sample("y", likelihood(family, loc_fn(x)).to_event(1), obs=y, obs_mask=mask)
        else:
            with numpyro.plate("obs", DY):
                numpyro.sample("y", likelihood(family, loc_fn(x)), obs=y, obs_mask=mask)

    return model


def read_obs_mask_model(family, layout, forward=linear, keep=KEEP):
    y = observation(family, forward)
    kwargs = {"y": y, "mask": jnp.asarray(keep)}
    return read_model(obs_mask_model(family, layout, forward), kwargs=kwargs), y


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["to_event", "plate"])
def test_obs_mask_log_likelihood_is_that_of_the_kept_entries(family, layout):
    obs, y = read_obs_mask_model(family, layout, nonlinear)
    assert list(obs.observed) == ["y_observed"]
    assert obs.missing == {"y_unobserved": "y_observed"}
    assert obs.likelihood_sites == ("y_observed",)
    expected = hand_log_lik(family, hand(family, nonlinear)[KEEP], np.asarray(y)[KEEP])
    np.testing.assert_allclose(jax.jit(obs.log_likelihood)(X32), expected, rtol=1e-5)
    pointwise = jax.jit(obs.pointwise_log_likelihood)(X32)["y_observed"]
    np.testing.assert_allclose(np.sum(pointwise), expected, rtol=1e-5)
    if layout == "plate":
        assert np.all(np.asarray(pointwise)[~KEEP] == 0.0)


def test_obs_mask_missing_entries_are_no_site_of_the_likelihood():
    obs, _ = read_obs_mask_model("normal", "to_event")
    model = handlers.substitute(obs.likelihood_model(), data={"x": X32})
    tr = handlers.trace(handlers.block(model, hide=["x"])).get_trace(**obs.kwargs)
    assert [name for name, site in tr.items() if site["type"] == "sample"] == ["y_observed"]
    # the deterministic site is the observation itself where the mask is True
    np.testing.assert_allclose(tr["y"]["value"][KEEP], np.asarray(obs.kwargs["y"])[KEEP])
    # NumPyro's own split is back in place once the model has run
    assert numpyro.primitives._masked_observe.__module__ == "numpyro.primitives"


@pytest.mark.parametrize("layout", ["to_event", "plate"])
def test_obs_mask_draws_missing_entries_from_the_likelihood(layout):
    obs, _ = read_obs_mask_model("normal", layout)
    num = 4000
    keys = jax.random.split(jax.random.key(0), num)
    draws = jax.jit(jax.vmap(obs.sample_unobserved, in_axes=(0, None)))(keys, X32)
    assert set(draws) == {"y_unobserved"} and draws["y_unobserved"].shape == (num, DY)
    residual = np.asarray(draws["y_unobserved"], np.float64) - hand("normal", linear)
    # mean and standard deviation of N(A x, sigma^2) within 5 standard errors
    np.testing.assert_allclose(residual.mean(axis=0), 0.0, atol=5 * SIGMA_Y / math.sqrt(num))
    np.testing.assert_allclose(residual.std(axis=0), SIGMA_Y, rtol=5 * math.sqrt(1 / (2 * num)))


def test_obs_mask_draws_poisson_counts():
    obs, _ = read_obs_mask_model("poisson", "to_event")
    keys = jax.random.split(jax.random.key(1), 2000)
    draws = jax.vmap(obs.sample_unobserved, in_axes=(0, None))(keys, X32)["y_unobserved"]
    rate = hand("poisson", linear)
    assert np.all(np.asarray(draws) == np.round(np.asarray(draws)))
    error = np.abs(np.asarray(draws, np.float64).mean(axis=0) - rate)
    assert np.all(error <= 5 * np.sqrt(rate / 2000)), (error, rate)


@pytest.mark.parametrize("how", ["obs_mask", "obs_mask_plate", "handlers_mask", "scale"])
def test_linear_gaussian_weighs_masked_and_scaled_rows(how):
    """The whitened SVD drops masked rows (and weighs scaled sites) as the log-likelihood does:
    the SVD's own log-likelihood equals the model's at every x."""
    y = observation("normal", linear)
    weight = np.where(KEEP, 1.0, 0.0)
    if how.startswith("obs_mask"):
        layout = "plate" if how == "obs_mask_plate" else "to_event"
        obs, _ = read_obs_mask_model("normal", layout)
    else:

        def model(y=None):
            x = numpyro.sample("x", PRIOR)
            with numpyro.plate("obs", DY):
                if how == "scale":
                    with handlers.scale(scale=2.5):
                        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y)
                else:
                    with handlers.mask(mask=KEEP):
                        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y)

        obs = read_model(model, kwargs={"y": y})
        weight = np.full(DY, 2.5) if how == "scale" else weight
    assert obs.is_linear_gaussian()
    np.testing.assert_allclose(obs.observation_weights(), weight)
    svd = obs.linear_gaussian()
    assert int(svd.num_observed) == min(int(np.count_nonzero(weight)), D)
    expected = np.sum(weight * normal_log_pdf(y, hand("normal", linear), SIGMA_Y))
    for x in [X_TEST, np.array([1.5, 0.2, -2.0])]:
        x32 = jnp.asarray(x, jnp.float32)
        np.testing.assert_allclose(svd.log_likelihood(x32), obs.log_likelihood(x32), rtol=2e-5)
    np.testing.assert_allclose(svd.log_likelihood(X32), expected, rtol=2e-5)


def test_obs_mask_with_an_inpainting_operator_keeps_its_structured_svd():
    image_prior = make_prior(6)
    A = dp.operators.Inpaint(jnp.array([True, True, False, True, True, True]))
    keep = jnp.array([True, False, True, True, False])
    y = jnp.array([0.3, 9.0, -0.2, 0.8, -9.0])

    def model(y=None, mask=None):
        x = numpyro.sample("x", image_prior)
        numpyro.sample("y", dist.Normal(A(x), SIGMA_Y).to_event(1), obs=y, obs_mask=mask)

    obs = read_model(model, kwargs={"y": y, "mask": keep})
    svd = obs.linear_gaussian()
    assert svd.basis is A  # the operator's own SVD: no dense matrix
    assert int(svd.num_observed) == 3
    x = jnp.linspace(-1.0, 1.0, 6)
    kept = np.asarray(keep)
    expected = np.sum(normal_log_pdf(np.asarray(y)[kept], np.asarray(A(x))[kept], SIGMA_Y))
    np.testing.assert_allclose(svd.log_likelihood(x), expected, rtol=1e-5)
    np.testing.assert_allclose(obs.log_likelihood(x), expected, rtol=1e-5)


@pytest.mark.parametrize("family", ["laplace", "poisson"])
def test_obs_mask_twist_is_that_of_the_masked_model(family):
    """TDS's smoothed twist of an obs_mask site is that of the same likelihood masked with
    ``.mask(...)`` (what the runs of tests/infer/test_obs_mask.py compare end to end)."""
    from diffprior.infer.twists import likelihood_twist

    loc_fn = location_fn(family, linear)
    y = observation(family, linear)

    def masked(y=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", likelihood(family, loc_fn(x)).mask(KEEP).to_event(1), obs=y)

    obs_mask, _ = read_obs_mask_model(family, "to_event")
    obs_masked = read_model(masked, kwargs={"y": y})
    twists = [likelihood_twist(PRIOR, obs, "jacobian") for obs in (obs_mask, obs_masked)]
    for t in [0.0, 0.3, 0.8]:
        values = [float(twist(X32, jnp.float32(t))) for twist in twists]
        np.testing.assert_allclose(values[0], values[1], rtol=1e-6)


def test_obs_mask_rereads_with_a_new_mask():
    model = obs_mask_model("normal", "to_event")
    reader = dp.model.ModelReader(model)
    y = observation("normal", linear)
    for keep in [KEEP, np.array([False, True, True, False])]:
        obs = reader((), {"y": y, "mask": jnp.asarray(keep)})
        expected = hand_log_lik("normal", hand("normal", linear)[keep], np.asarray(y)[keep])
        np.testing.assert_allclose(obs.log_likelihood(X32), expected, rtol=1e-5)


def _uses_the_returned_value(y=None, mask=None):
    x = numpyro.sample("x", PRIOR)
    completed = numpyro.sample(
        "y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y, obs_mask=mask
    )
    numpyro.sample("total", dist.Normal(jnp.sum(completed), 1.0), obs=0.0)


def _obs_mask_on_the_prior(y=None, mask=None):
    x = numpyro.sample("x", PRIOR, obs=jnp.zeros(D), obs_mask=mask[:D])
    numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y).to_event(1), obs=y)


def _site_with(fn, mask_of):
    def model(y=None, mask=None):
        x = numpyro.sample("x", PRIOR)
        numpyro.sample("y", fn(x), obs=y, obs_mask=mask_of(mask))

    return model


def _in_plate(y=None, mask=None):
    x = numpyro.sample("x", PRIOR)
    with numpyro.plate("obs", DY):
        numpyro.sample("y", dist.Normal(linear(x), SIGMA_Y), obs=y, obs_mask=mask[:3])


@pytest.mark.parametrize(
    "model, match",
    [
        (_obs_mask_on_the_prior, r"site 'x': obs_mask= on the DiffusionPrior site"),
        (
            _site_with(lambda x: dist.Normal(linear(x), SIGMA_Y).to_event(1), lambda m: m[:3]),
            r"site 'y': obs_mask has shape \(3,\).*batch shape \(\).*or to its shape \(4,\)",
        ),
        (_in_plate, r"site 'y': obs_mask has shape \(3,\).*batch shape \(4,\) \(one entry"),
        (
            _site_with(lambda x: dist.MultivariateNormal(linear(x), jnp.eye(DY)), lambda m: m),
            r"site 'y':.*MultivariateNormal does not split into entries",
        ),
        (
            _site_with(lambda x: dist.Normal(linear(x), SIGMA_Y).to_event(1), jnp.float32),
            r"site 'y': obs_mask must be a boolean array",
        ),
        (_uses_the_returned_value, r"site 'total':.*obs_mask= site\(s\) 'y'.*y_unobserved"),
    ],
    ids=["prior_site", "event_shape", "batch_shape", "multivariate", "not_bool", "used_later"],
)
def test_obs_mask_errors_name_the_site(model, match):
    kwargs = {"y": observation("normal", linear), "mask": jnp.asarray(KEEP)}
    with pytest.raises(ModelError, match=match):
        read_model(model, kwargs=kwargs)
