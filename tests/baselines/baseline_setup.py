"""The problem the baseline tests share (imported by name, ``from baseline_setup import ...``;
the session runs of each baseline are fixtures in this folder's ``conftest.py``).

A two-component Gaussian mixture observed through y = A x + N(0, sigma_y^2): its posterior and
evidence are exact.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import diffprior as dp

A = jnp.array([[1.0, 1.0]])
SIGMA_Y = 0.5
Y = jnp.array([1.0])
#: Two overlapping modes (posterior weights about 0.07 and 0.93), a ridge along A's null space.
PRIOR = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.3, 0.7]))
SMC_CHAINS, SMC_PARTICLES = 8, 500
NUTS_CHAINS, NUTS_SAMPLES = 4, 500


def model(y=None):
    x = numpyro.sample("x", PRIOR)
    numpyro.sample("y", dist.Normal(A @ x, SIGMA_Y).to_event(1), obs=y)


def latent_model(y=None):
    """A model whose prior (a LatentDiffusionPrior) has no density on the image space."""
    den = dp.Denoiser(lambda z, t: jnp.zeros_like(z), dp.schedules.VP.linear(), "x0")
    prior = dp.LatentDiffusionPrior(den, lambda z: jnp.tanh(jnp.outer(z, z)), (2, 2), (2,))
    x = numpyro.sample("image", prior)
    numpyro.sample("y", dist.Normal(x, 0.1).to_event(2), obs=y)


def assert_chain_spread(per_chain: np.ndarray, exact: np.ndarray, what: str, z: float = 6.0):
    """``mean over chains`` within ``z`` standard errors (from the between-chain spread)."""
    estimate = per_chain.mean(axis=0)
    standard_error = per_chain.std(axis=0, ddof=1) / np.sqrt(per_chain.shape[0])
    assert np.all(np.abs(estimate - exact) <= z * standard_error), (
        f"{what}: {estimate} vs exact {exact} (standard error {standard_error})"
    )
