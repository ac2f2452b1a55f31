"""Denoiser: the conversions between parameterizations are inverse to each other, and the same
exact network in any parameterization gives the same Tweedie estimates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_setup import SCHEDULES

import diffprior as dp
from diffprior.diffusion import PARAMETERIZATIONS


def _times(schedule, num=6):
    # away from t = 0, where sigma = 0 and eps is undefined
    return np.linspace(0.02, schedule.t_max, num, dtype=np.float32)


def test_output_round_trip(schedule):
    """from_output(to_output(x0, eps, t), x_t, t) = (x0, eps) with x_t = alpha x0 + sigma eps,
    for every parameterization (one compiled function per schedule)."""
    dens = {p: dp.Denoiser(lambda x, t: x, schedule, p) for p in PARAMETERIZATIONS}
    key_x0, key_eps = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(key_x0, (5,)) * 2.0 + 1.0
    eps = jax.random.normal(key_eps, (5,))
    times = jnp.asarray(_times(schedule, 8))

    @jax.jit
    @jax.vmap
    def round_trips(t):
        x_t = schedule.alpha(t) * x0 + schedule.sigma(t) * eps
        back = {p: den.from_output(den.to_output(x0, eps, t), x_t, t) for p, den in dens.items()}
        return back, x_t

    back, x_t = round_trips(times)
    alpha_t, sigma_t = schedule.alpha(times)[:, None], schedule.sigma(times)[:, None]
    # float32 cancellation in x_t - sigma eps (or x_t - alpha x0) costs ~1e-7 |x_t| / alpha
    # (or / sigma); the bounds are a generous multiple of that
    scale = jnp.max(jnp.abs(x_t), axis=1, keepdims=True) + 1.0
    for p, (x0_back, eps_back) in back.items():
        x0_error = jnp.abs(x0_back - x0) - (1e-5 * scale / alpha_t + 1e-4 * jnp.abs(x0))
        eps_error = jnp.abs(eps_back - eps) - (1e-5 * scale / sigma_t + 1e-4 * jnp.abs(eps))
        assert jnp.all(x0_error <= 0), f"{p}: x0 not recovered"
        assert jnp.all(eps_error <= 0), f"{p}: eps not recovered"


def _exact_network(gmm, parameterization):
    """The mixture's exact x0-network re-expressed as ``parameterization``'s target."""
    exact = gmm.denoiser
    target = dp.Denoiser(lambda x, t: x, gmm.schedule, parameterization)

    def net_fn(x, t):
        x0_hat, eps_hat = exact.predict(x, t)
        return target.to_output(x0_hat, eps_hat, t)

    return dp.Denoiser(net_fn, gmm.schedule, parameterization)


@pytest.mark.parametrize("schedule_name", ["vp_linear", "edm"])
def test_parameterizations_agree_on_exact_network(schedule_name, grid_mixture):
    """The conversions see the schedule only through (alpha, sigma), which the round trip above
    checks for every schedule; here one VP (alpha < 1) and one EDM (alpha = 1) schedule."""
    schedule = SCHEDULES[schedule_name]()
    gmm = grid_mixture(3, schedule=schedule)
    dens = {"reference": gmm.denoiser} | {p: _exact_network(gmm, p) for p in PARAMETERIZATIONS}
    x0 = gmm.sample(jax.random.key(1), (4,))
    eps = jax.random.normal(jax.random.key(2), x0.shape)
    times = _times(schedule, 4)

    @jax.jit
    def estimates(t):
        x_t = schedule.alpha(t) * x0 + schedule.sigma(t) * eps
        out = {}
        for name, den in dens.items():
            x0_hat, eps_hat = jax.vmap(den.predict, in_axes=(0, None))(x_t, t)
            score = jax.vmap(den.score, in_axes=(0, None))(x_t, t)
            out[name] = {"x0": x0_hat, "eps": eps_hat, "score": score}
        return out

    for t in times:
        out = estimates(t)
        # recovering x0 from x_t divides a float32 difference of size ~|x_t| by alpha
        x_t_size = float(jnp.max(jnp.abs(schedule.alpha(t) * x0 + schedule.sigma(t) * eps)))
        for p in PARAMETERIZATIONS:
            for method, want in out["reference"].items():
                scale = float(jnp.max(jnp.abs(want))) + 1.0
                if method == "x0":
                    scale = scale + x_t_size / float(schedule.alpha(t))
                np.testing.assert_allclose(
                    out[p][method],
                    want,
                    rtol=1e-3,
                    atol=1e-4 * scale,
                    err_msg=f"{p}.{method} at t={t}",
                )


@pytest.mark.parametrize("schedule_name", ["vp_linear", "edm"])
def test_tweedie_relations(schedule_name, grid_mixture):
    """x0 = (x + sigma^2 score) / alpha and eps = -sigma score, for any denoiser."""
    schedule = SCHEDULES[schedule_name]()
    gmm = grid_mixture(3, schedule=schedule)
    den = gmm.denoiser
    x = gmm.sample(jax.random.key(3), ())
    noise = jax.random.normal(jax.random.key(4), x.shape)

    @jax.jit
    def relations(t):
        alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
        x_t = alpha_t * x + sigma_t * noise
        score = den.score(x_t, t)
        return (
            (den.eps(x_t, t), -sigma_t * score),
            (den.x0(x_t, t), (x_t + sigma_t**2 * score) / alpha_t),
        )

    for t in _times(schedule, 4):
        (eps, eps_from_score), (x0, x0_from_score) = relations(t)
        np.testing.assert_allclose(eps, eps_from_score, rtol=1e-4, atol=1e-5)
        atol = 1e-5 * (float(jnp.max(jnp.abs(x))) + 1.0) / float(schedule.alpha(t))
        np.testing.assert_allclose(x0, x0_from_score, rtol=1e-4, atol=atol)


def test_denoiser_is_a_pytree_with_network_arrays_as_leaves():
    class Linear(dp.Denoiser.__mro__[1]):  # an equinox Module
        weight: jax.Array

        def __call__(self, x, t):
            return self.weight * x

    net = Linear(jnp.float32(2.0))
    den = dp.Denoiser(net, dp.schedules.VP.linear(), "x0")
    leaves = jax.tree_util.tree_leaves(den)
    assert any(leaf is net.weight for leaf in leaves)
    x = jnp.ones(3)

    @jax.jit
    def x0_of(den):
        return den.x0(x, 0.5)

    np.testing.assert_allclose(x0_of(den), 2.0 * x)
    other = jax.tree_util.tree_map(lambda leaf: leaf * 3 if leaf is net.weight else leaf, den)
    np.testing.assert_allclose(x0_of(other), 6.0 * x)


def test_bad_arguments_raise():
    sched = dp.schedules.VP.linear()
    with pytest.raises(ValueError, match="parameterization"):
        dp.Denoiser(lambda x, t: x, sched, "epsilon")
    with pytest.raises(TypeError, match="callable"):
        dp.Denoiser(np.zeros(3), sched, "eps")
    with pytest.raises(TypeError, match="Schedule"):
        dp.Denoiser(lambda x, t: x, "vp", "eps")
