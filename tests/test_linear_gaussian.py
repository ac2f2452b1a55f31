"""One SVD path: `ObservationModel.linear_gaussian()` from the operators' own structured SVDs
(exact against the model's likelihood and against the dense SVD), a dense fallback with a size
limit, clear refusals, and no d x d array at image sizes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior import linear_gaussian as lg
from diffprior.model import ModelError, read_model

SHAPE = (4, 6)  # the operators' image shape; the prior's event is the flat (24,)
DIM = math.prod(SHAPE)


def _prior(dim=DIM):
    means = jnp.stack([jnp.linspace(-1.0, 1.0, dim), -0.5 * jnp.ones(dim)])
    return dp.GaussianMixture(means, jnp.array([0.3, 0.7]), scale=0.8)


def _operator(name, shape=SHAPE):
    if name == "inpaint":
        return dp.operators.Inpaint(dp.operators.random_mask(jax.random.key(3), shape, 0.5))
    if name == "blur":
        kernel = dp.operators.gaussian_kernel(3, 1.0)
        return dp.operators.Blur(kernel, shape, boundary="circular")
    return dp.operators.Downsample(2, shape)


def _model(prior, A, gain=1.0, offset=0.0):
    def model(sigma, y=None):
        x = numpyro.sample("x", prior)
        mean = gain * A(x.reshape(A.in_shape)).reshape(-1) + offset
        numpyro.sample("y", dist.Normal(mean, sigma).to_event(1), obs=y)

    return model


def _observation(A, sigma):
    return jax.random.normal(jax.random.key(7), (A.out_dim,)) + 0.3


CASES = [
    ("inpaint", 0.3, 1.0, 0.0),
    ("inpaint", "per-pixel", -1.5, 0.2),
    ("blur", 0.2, 1.0, 0.0),
    ("blur", 0.2, -0.7, 0.5),
    ("downsample", 0.25, 2.0, -0.1),
    ("downsample", "per-pixel", 1.0, 0.0),
]


def _case(name, sigma, gain, offset):
    A = _operator(name)
    if sigma == "per-pixel":
        sigma = jnp.linspace(0.1, 0.6, A.out_dim)
    prior = _prior()
    obs = read_model(_model(prior, A, gain, offset), (sigma,), {"y": _observation(A, 0.0)})
    return A, obs, sigma


@pytest.mark.parametrize(("name", "sigma", "gain", "offset"), CASES)
def test_structured_svd_is_the_models_likelihood(name, sigma, gain, offset):
    """The structured whitened SVD reproduces log p(y | x) (gain, offset, per-pixel noise), and
    agrees with the thin SVD of the dense matrix."""
    A, obs, sigma = _case(name, sigma, gain, offset)
    svd = obs.linear_gaussian()
    assert not isinstance(svd.basis, lg._DenseBasis)  # the operator's own SVD
    dense = lg.from_matrix(gain * A.matrix(), sigma, obs.observed_flat, offset)
    assert int(svd.num_observed) == int(dense.num_observed)
    for key in jax.random.split(jax.random.key(0), 3):
        x = 2.0 * jax.random.normal(key, (DIM,))
        expected = obs.log_likelihood(x)
        np.testing.assert_allclose(svd.log_likelihood(x), expected, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(dense.log_likelihood(x), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("name", "sigma", "gain", "offset"), CASES[:4])
def test_pigdm_and_diffpir_steps_do_not_depend_on_the_basis(name, sigma, gain, offset):
    """PiGDM's guidance and DiffPIR's closed-form data step are the same from the structured
    SVD as from the dense one (they depend on the subspaces, not on the basis in them)."""
    A, obs, sigma = _case(name, sigma, gain, offset)
    structured = obs.linear_gaussian()
    dense = lg.from_matrix(gain * A.matrix(), sigma, obs.observed_flat, offset)
    denoiser = obs.prior.denoiser
    x0_hat = jax.random.normal(jax.random.key(1), (DIM,))
    for t in (0.0, 0.3, 0.9):
        guides = [dp.kernels.pigdm.svd_guidance(denoiser, s, 0.7) for s in (structured, dense)]
        values = [jax.value_and_grad(g)(x0_hat, t) for g in guides]
        np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-3, atol=1e-3)
    proximal = [dp.kernels.diffpir.svd_proximal(s) for s in (structured, dense)]
    for rho in (0.1, 3.0):
        np.testing.assert_allclose(
            proximal[0](x0_hat, rho), proximal[1](x0_hat, rho), rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inpaint", "blur", "downsample"])
def test_mcgdiff_on_structured_operators_matches_the_exact_posterior(name):
    """MCGdiff through the structured SVD: log-evidence and posterior mean against the closed
    form (4 chains x 512 particles; tolerances from the spread between chains)."""
    A = _operator(name)
    prior = _prior()
    gain, sigma = -1.3, 0.3
    y = _observation(A, sigma)
    model = _model(prior, A, gain)
    sampler = dp.Sampler(dp.MCGdiff(model), 512, 30, num_chains=4, progress_bar=False)
    sampler.run(jax.random.key(0), sigma, y=y)
    matrix = gain * A.matrix()
    exact = float(prior.log_evidence(matrix, sigma, y))
    log_z = np.asarray(sampler.log_evidence)
    assert abs(np.mean(log_z) - exact) < max(0.15, 4 * np.std(log_z) / 2)
    samples = np.asarray(sampler.get_samples(group_by_chain=True)["x"])
    posterior_mean = np.asarray(prior.posterior(matrix, sigma, y).mean)
    chain_means = samples.mean(axis=1)
    error = np.abs(chain_means.mean(axis=0) - posterior_mean)
    spread = chain_means.std(axis=0, ddof=1) / 2 + 0.02
    assert np.all(error < 5 * spread), (error.max(), spread.min())


def test_a_big_dense_linear_map_is_refused_naming_the_operators():
    """A linear map that is not a diffprior operator, too big for a dense SVD: a ModelError
    before anything is compiled, naming what to use instead."""
    dim = 8192
    prior = dp.GaussianMixture(jnp.zeros((1, dim)), jnp.ones(1))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(jnp.cumsum(x), 0.1).to_event(1), obs=y)

    sampler = dp.Sampler(dp.MCGdiff(model), 8, 2, progress_bar=False)
    with pytest.raises(ModelError, match="Inpaint, Blur, Downsample"):
        sampler.run(jax.random.key(0), y=jnp.zeros(dim))
    assert sampler.num_compilations == 0


def test_a_linear_mean_that_is_not_the_operator_is_refused():
    """The model applies an operator to x but its mean is another linear map: refused, not
    sampled with the operator's SVD."""
    A = _operator("inpaint")
    prior = _prior()

    def model(y=None):
        x = numpyro.sample("x", prior)
        mean = A(x.reshape(SHAPE)) + 0.5 * x[: A.out_dim]
        numpyro.sample("y", dist.Normal(mean, 0.1).to_event(1), obs=y)

    obs = read_model(model, (), {"y": jnp.zeros(A.out_dim)})
    assert obs.is_linear_gaussian()
    with pytest.raises(ModelError, match="not a multiple of Inpaint"):
        obs.linear_gaussian()


def test_per_pixel_noise_with_a_blur_falls_back_to_the_dense_svd():
    A = _operator("blur")
    sigma = jnp.linspace(0.1, 0.5, A.out_dim)
    obs = read_model(_model(_prior(), A), (sigma,), {"y": _observation(A, 0.0)})
    svd = obs.linear_gaussian()
    assert isinstance(svd.basis, lg._DenseBasis)
    x = jax.random.normal(jax.random.key(2), (DIM,))
    np.testing.assert_allclose(svd.log_likelihood(x), obs.log_likelihood(x), rtol=1e-4)


def _largest_intermediate(jaxpr) -> int:
    """The most entries of any value computed in a (closed) jaxpr, sub-jaxprs included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    largest = max(largest, _largest_intermediate(getattr(inner, "jaxpr", inner)))
    return largest


@pytest.mark.parametrize("name", ["inpaint", "blur", "downsample"])
@pytest.mark.parametrize("method", ["MCGdiff", "PiGDM", "DiffPIR"])
def test_no_dense_array_at_image_size(name, method):
    """At d = 3 x 32 x 32 no value of the set-up or of a step has more than a few times
    N x d entries (a dense SVD would have d^2 = 9.4e6)."""
    shape = (3, 32, 32)
    dim = math.prod(shape)
    A = _operator(name, shape)
    prior = _prior(dim)
    model = _model(prior, A)
    y = _observation(A, 0.1)
    obs = read_model(model, (0.1,), {"y": y})
    algorithm_method = getattr(dp, method)(model)
    algorithm_method.check(obs)
    num = 4

    def run(particles, key):
        algorithm = algorithm_method.build(prior, obs, prior.timesteps(5))
        state = algorithm.init(particles)
        return algorithm.step(key, state)[0].particles

    particles = jnp.zeros((num, dim))
    jaxpr = jax.make_jaxpr(run)(particles, jax.random.key(0))
    assert _largest_intermediate(jaxpr.jaxpr) <= 8 * num * dim


@pytest.mark.parametrize("sigma", [0.5, 1e-6])
def test_full_row_rank_leaves_nothing_outside_the_range(sigma):
    """Two observations of rank two: the whitened observation lies in the range, so the
    residual is exactly zero, however small the noise (computed, y / sigma near 1e7 would leave
    float32 rounding of several units in it, nats in the evidence)."""
    A = jax.random.normal(jax.random.key(0), (2, 8))
    y = jnp.array([3.1, -7.4])
    dense = lg.from_matrix(A, sigma, y)
    structured = lg.from_operator(dp.operators.Linear(A), sigma, y)
    for svd in (dense, structured):
        assert float(svd.residual_sq) == 0.0
        assert float(svd.log_residual_density()) == 0.0


def test_a_factor_on_x_makes_the_model_not_linear_gaussian():
    """A numpyro.factor that depends on x is part of the likelihood: the SVD methods must not
    drop it. The model is then not linear Gaussian, and MCGdiff refuses it."""
    A = _operator("inpaint")
    prior = _prior()

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(A(x.reshape(SHAPE)), 0.1).to_event(1), obs=y)
        numpyro.factor("penalty", -jnp.sum(x**2))

    obs = read_model(model, (), {"y": jnp.zeros(A.out_dim)})
    assert not obs.is_linear_gaussian()
    sampler = dp.Sampler(dp.MCGdiff(model), 8, 2, progress_bar=False)
    with pytest.raises(ModelError, match="linear forward operator"):
        sampler.run(jax.random.key(0), y=jnp.zeros(A.out_dim))
