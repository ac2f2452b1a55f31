"""The generic probability-flow ODE log density (DiffusionPrior.ode_log_prob), forced on a
GaussianMixture, against the mixture's exact log density."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_setup import SCHEDULES

import diffprior as dp

NUM_POINTS = 32
NUM_PROBES = 32


def anisotropic_mixture(dim: int, basis=None, **prior_options) -> dp.GaussianMixture:
    """Three components with variances from 0.05 to 1.5 along the columns of a random rotation,
    so that the denoiser's Jacobian has large off-diagonal entries (Hutchinson's estimator of its
    trace then has visible variance; for isotropic components it would be nearly exact)."""
    rng = np.random.default_rng(0)
    base, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    means = np.zeros((3, dim))
    means[:, :2] = [[-2.0, 1.0], [2.0, 1.0], [0.0, -2.5]]
    variances = np.exp(rng.uniform(np.log(0.05), np.log(1.5), size=(3, dim)))
    rotation = np.eye(dim) if basis is None else basis
    return dp.GaussianMixture.from_components(
        means @ rotation.T, np.log([0.5, 0.3, 0.2]), variances, rotation @ base, **prior_options
    )


@pytest.mark.slow
@pytest.mark.parametrize("dim, schedule_name", [(2, "vp_linear"), (8, "edm")])
def test_exact_trace_ode_matches_exact_log_prob(grid_mixture, dim, schedule_name):
    """Mean absolute error under 0.05 nats at exact draws (the exact trace leaves only the RK4
    and end-point errors, ~0.01 nats at the default 128 steps)."""
    gmm = grid_mixture(dim, schedule=SCHEDULES[schedule_name]())
    x = gmm.sample(jax.random.key(0), (NUM_POINTS,))
    ode = gmm.ode_log_prob(x, exact=True)
    error = np.asarray(ode - gmm.log_prob(x))
    assert np.all(np.isfinite(error))
    assert np.mean(np.abs(error)) < 0.05, f"mean |error| {np.mean(np.abs(error)):.4f}"


@pytest.fixture(scope="module")
def anisotropic_points():
    gmm = anisotropic_mixture(8)
    x = gmm.sample(jax.random.key(1), (NUM_POINTS,))
    return gmm, x, gmm.ode_log_prob(x, exact=True)


@pytest.mark.slow
def test_exact_trace_ode_on_anisotropic_mixture(anisotropic_points):
    gmm, x, ode = anisotropic_points
    error = np.asarray(ode - gmm.log_prob(x))
    assert np.mean(np.abs(error)) < 0.05, f"mean |error| {np.mean(np.abs(error)):.4f}"


@pytest.mark.slow
def test_hutchinson_trace_is_unbiased(anisotropic_points):
    """Hutchinson's estimate of the divergence integral is unbiased over the probes, and the
    log density is linear in it, so the Hutchinson log density minus the exact-trace one has
    mean zero. The probes come from one fixed ``probe_seed``; independent replicates come from
    rotating the problem instead: the mixture rotated by a Haar-random Q, at Q x, has the same
    log density, while its fixed probes v act as Q^T v in the original frame (isotropic,
    E[Q^T v v^T Q] = I, so still unbiased, and independent across Q). With R = 24 replicates of
    NUM_POINTS points each (NUM_PROBES probes; replicate standard deviation ~0.2 nats), the
    mean error must be within 4 standard errors of zero (standard
    error from the spread of the replicate means), plus 0.01 for the float32 difference between
    the rotated and unrotated exact paths."""
    gmm, x, ode_exact = anisotropic_points
    dim, num_replicates = 8, 24
    rng = np.random.default_rng(2)
    rotations = [np.linalg.qr(rng.normal(size=(dim, dim)))[0] for _ in range(num_replicates)]
    rotated = [anisotropic_mixture(dim, basis=q) for q in rotations]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rotated)
    points = jnp.stack([x @ q.T for q in rotations])

    @jax.jit
    @jax.vmap
    def hutchinson(prior, points):
        return prior.ode_log_prob(points, exact=False, num_probes=NUM_PROBES)

    errors = np.asarray(hutchinson(stacked, points) - ode_exact[None])  # (R, NUM_POINTS)
    assert np.all(np.isfinite(errors))
    replicate_means = errors.mean(axis=1)
    std_error = replicate_means.std(ddof=1) / np.sqrt(num_replicates)
    assert std_error > 0, "no Hutchinson variance: the test would not see a bias"
    assert abs(replicate_means.mean()) < 4 * std_error + 0.01, (
        f"mean error {replicate_means.mean():.3f}, standard error {std_error:.3f}"
    )
    # and the estimate is usable: per-point errors of a few tenths of a nat, not more
    assert np.sqrt(np.mean(errors**2)) < 1.0


def test_shapes_and_bad_values(grid_mixture):
    gmm = grid_mixture(2)
    assert jax.eval_shape(gmm.ode_log_prob, jnp.zeros((2, 3, 2))).shape == (2, 3)
    with pytest.raises(ValueError, match="event shape"):
        gmm.ode_log_prob(jnp.zeros((4, 3)))
