"""DiffusionPrior as a NumPyro distribution and a pytree: it passes through jax.jit as an
argument, its network's arrays are leaves, and bad constructor arguments fail clearly."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy.special import logsumexp
from scipy.stats import norm
from shared_setup import grid_mixture_params

import diffprior as dp


class ShrinkNet(eqx.Module):
    """The exact x0 denoiser of N(0, v I) under a VP schedule: x0_hat = alpha v x / (alpha^2 v +
    sigma^2), with ``log_v`` an array leaf."""

    log_v: jax.Array
    schedule: dp.schedules.Schedule

    def __call__(self, x, t):
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        v = jnp.exp(self.log_v)
        return alpha * v * x / (alpha**2 * v + sigma**2)


def gaussian_prior(variance: float, **options) -> dp.DiffusionPrior:
    schedule = dp.schedules.VP.linear()
    net = ShrinkNet(jnp.log(jnp.float32(variance)), schedule)
    return dp.DiffusionPrior(dp.Denoiser(net, schedule, "x0"), event_shape=(3,), **options)


def test_network_arrays_are_leaves():
    prior = gaussian_prior(2.0)
    leaves, treedef = jax.tree_util.tree_flatten(prior)
    assert any(leaf is prior.denoiser.net_params.log_v for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, dp.DiffusionPrior)
    assert rebuilt.event_shape == (3,)
    assert (rebuilt.num_steps, rebuilt.eta, rebuilt.spacing) == (
        prior.num_steps,
        prior.eta,
        prior.spacing,
    )


def test_prior_passes_through_jit():
    """A prior passed into a jitted function gives the exact log density of N(0, v I) and the
    same samples as the eager call with the same key; a second prior with another array value
    reuses the compiled function (no retrace) and gives its own answer."""
    traces = []

    @jax.jit
    def run(prior, x, key):
        traces.append(None)
        return prior.log_prob(x), prior.reverse_sample(key, (2, 4), num_steps=20)

    x = jnp.array([[0.5, -1.0, 2.0], [0.0, 0.1, -0.3]])
    key = jax.random.key(0)
    samples = {}
    for variance in (2.0, 0.5):
        prior = gaussian_prior(variance, ode_steps=64)
        log_prob, samples[variance] = run(prior, x, key)
        # RK4 on 64 steps: ~1e-3 nats for a Gaussian
        exact = dist.Normal(0.0, np.sqrt(variance)).log_prob(x).sum(-1)
        np.testing.assert_allclose(log_prob, exact, atol=0.02)
        assert samples[variance].shape == (2, 4, 3)
        assert np.all(np.isfinite(samples[variance]))
    assert len(traces) == 1
    assert not np.allclose(samples[2.0], samples[0.5])
    eager = prior.reverse_sample(key, (2, 4), num_steps=20)
    np.testing.assert_allclose(samples[0.5], eager, rtol=1e-4, atol=1e-5)


def test_gaussian_mixture_passes_through_jit(grid_mixture):
    gmm = grid_mixture(2)
    means, weights, scales = grid_mixture_params(2)
    x = np.array([[0.5, -1.0], [2.0, 2.0]])
    jitted = jax.jit(lambda g, x: g.log_prob(x))(gmm, x)
    log_components = norm.logpdf(x[:, None, :], means, scales[:, None]).sum(-1)
    exact = logsumexp(log_components + np.log(weights / weights.sum()), axis=1)
    np.testing.assert_allclose(jitted, exact, rtol=1e-5)


def test_usable_as_a_numpyro_site():
    prior = gaussian_prior(1.0, num_steps=10)

    def model():
        numpyro.sample("x", prior)

    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace()
    site = trace["x"]
    assert site["fn"] is prior
    assert site["value"].shape == (3,)
    assert prior.support.event_dim == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"denoiser": lambda x, t: x}, TypeError, "Denoiser"),
        ({"event_shape": ()}, ValueError, "event_shape"),
        ({"event_shape": (3, 0)}, ValueError, "event_shape"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, ValueError, "num_steps"),
        ({"ode_steps": -1}, ValueError, "ode_steps"),
        ({"num_probes": 0}, ValueError, "num_probes"),
        ({"spacing": "cosine"}, ValueError, "spacing"),
        ({"eta": 1.5}, ValueError, "eta"),
        ({"eta": -0.1}, ValueError, "eta"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, error, match):
    schedule = dp.schedules.VP.linear()
    arguments = {
        "denoiser": dp.Denoiser(lambda x, t: jnp.zeros_like(x), schedule, "x0"),
        "event_shape": (3,),
    }
    arguments.update(kwargs)
    denoiser, event_shape = arguments.pop("denoiser"), arguments.pop("event_shape")
    with pytest.raises(error, match=match):
        dp.DiffusionPrior(denoiser, event_shape, **arguments)


def test_log_prob_rejects_wrong_event_shape():
    prior = gaussian_prior(1.0)
    with pytest.raises(ValueError, match=r"expected the event shape \(3,\)"):
        prior.log_prob(jnp.zeros((5, 4)))
