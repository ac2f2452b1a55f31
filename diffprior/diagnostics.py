"""Sample-quality diagnostics: distances between sample sets, used by the tests and benchmarks.

Examples
--------
>>> import jax
>>> from diffprior.diagnostics import sliced_wasserstein
>>> x = jax.random.normal(jax.random.key(0), (500, 3))
>>> float(sliced_wasserstein(jax.random.key(1), x, x))
0.0
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["sliced_wasserstein", "to_datatree"]


@partial(jax.jit, static_argnames=("num_projections", "p"))
def sliced_wasserstein(
    key: PRNGKey,
    x: ArrayLike,
    y: ArrayLike,
    num_projections: int = 1000,
    p: float = 2.0,
) -> Array:
    r"""Monte Carlo sliced :math:`p`-Wasserstein distance between two empirical distributions.

    .. math::
        SW_p(\mu, \nu) = \Big(E_{\theta \sim U(S^{d-1})}\, W_p^p(\theta_\# \mu,
        \theta_\# \nu)\Big)^{1/p}

    (Bonneel et al. 2015), with ``num_projections`` directions drawn uniformly on the sphere from
    ``key``. Each one-dimensional :math:`W_p^p` is exact for the two empirical measures (uniform
    weights): the quantile functions are step functions, integrated on the union of their
    breakpoints, so ``x`` and ``y`` may have different numbers of samples.

    Parameters
    ----------
    key
        PRNG key for the projection directions.
    x, y
        Samples ``(n, ...)`` and ``(m, ...)``; trailing axes are flattened into one event axis of
        the same size ``d``.
    num_projections
        Number of random directions.
    p
        Order of the Wasserstein distance, ``p >= 1``.

    Returns
    -------
    A scalar, in the units of the samples. The function is jitted (``num_projections`` and ``p``
    static), so repeated calls with the same shapes compile once.
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    y = jnp.asarray(y, dtype=jnp.float32)
    x = x.reshape((x.shape[0], -1))
    y = y.reshape((y.shape[0], -1))
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"sliced_wasserstein: x and y must have the same event size, got {x.shape[1]} and "
            f"{y.shape[1]}"
        )
    if num_projections < 1:
        raise ValueError(f"num_projections must be a positive integer, got {num_projections}")
    if p < 1:
        raise ValueError(f"p must be at least 1, got {p}")
    directions = jax.random.normal(key, (num_projections, x.shape[1]))
    directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
    x_proj = jnp.sort(directions @ x.T, axis=1)  # (num_projections, n)
    y_proj = jnp.sort(directions @ y.T, axis=1)  # (num_projections, m)
    n, m = x.shape[0], y.shape[0]
    if n == m:
        wp_p = jnp.mean(jnp.abs(x_proj - y_proj) ** p, axis=1)
    else:
        # breakpoints of both quantile functions on (0, 1]; between two of them both are constant
        breaks = jnp.sort(jnp.concatenate([jnp.arange(1, n + 1) / n, jnp.arange(1, m + 1) / m]))
        lengths = jnp.diff(breaks, prepend=0.0)
        mids = breaks - 0.5 * lengths
        x_idx = jnp.minimum(jnp.floor(mids * n).astype(jnp.int32), n - 1)
        y_idx = jnp.minimum(jnp.floor(mids * m).astype(jnp.int32), m - 1)
        gaps = jnp.abs(x_proj[:, x_idx] - y_proj[:, y_idx]) ** p  # (num_projections, n + m)
        wp_p = gaps @ lengths  # W_p^p per direction
    return jnp.mean(wp_p) ** (1.0 / p)


def to_datatree(sampler, result, obs):
    """Build the ArviZ ``xarray.DataTree`` of a :class:`diffprior.Sampler` run.

    Groups: ``posterior`` (the equal-weight draws, dims ``chain, draw`` plus
    ``{site}_dim_{i}`` event dims); ``sample_stats`` (per chain ``log_evidence``; per step
    ``ess`` and ``resampled``; per particle ``log_weight``, the weights before the final
    equal-weight resampling); ``observed_data``; ``log_likelihood`` (pointwise, per observed
    site). Attributes record the method, its options, the step and particle counts and the
    diffprior version.
    """
    import json

    import arviz_base
    import xarray as xr

    import diffprior

    site = obs.prior_site
    samples = np.asarray(result["samples"])
    num_chains, num_draws = samples.shape[:2]
    event_dims = [f"{site}_dim_{i}" for i in range(samples.ndim - 2)]
    method = sampler.method
    attrs = {
        "method": method.name,
        "method_options": json.dumps(method.options, default=str),
        "num_steps": sampler.num_steps,
        "num_particles": sampler.num_particles,
        "num_chains": sampler.num_chains,
        "chain_method": sampler.chain_method,
        "seconds": float(sampler.seconds) if sampler.seconds is not None else float("nan"),
        "diffprior_version": diffprior.__version__,
    }
    observed = {name: np.asarray(value) for name, value in obs.observed.items()}
    pointwise = {
        name: np.asarray(value) for name, value in result["pointwise_log_likelihood"].items()
    }
    tree = arviz_base.from_dict(
        {
            "posterior": {site: samples},
            "observed_data": observed,
            "log_likelihood": pointwise,
        },
        dims={site: event_dims},
    )
    chain = np.arange(num_chains)
    draw = np.arange(num_draws)
    stats = {
        "log_weight": (("chain", "draw"), np.asarray(result["log_weights"])),
        "log_evidence": (("chain",), np.asarray(result["log_evidence"])),
    }
    for name, value in result["per_step"].items():
        stats[name] = (("step", "chain"), np.asarray(value))
    num_steps = sampler.num_steps
    sample_stats = xr.Dataset(
        {name: xr.Variable(*dims_and_value) for name, dims_and_value in stats.items()},
        coords={"chain": chain, "draw": draw, "step": np.arange(num_steps)},
        attrs=attrs,
    )
    # per-step arrays are stored (chain, step)
    sample_stats = sample_stats.transpose("chain", "draw", "step")
    tree["sample_stats"] = xr.DataTree(sample_stats)
    tree.attrs.update(attrs)
    for group in tree.children.values():
        group.attrs.update(attrs)
    return tree
