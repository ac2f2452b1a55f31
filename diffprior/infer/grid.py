r"""The posterior of one scalar hyperparameter by quadrature over the SMC evidence.

For a model with one scalar latent site :math:`\theta` besides the DiffusionPrior site (a
noise level, a blur width, a gain), Bayes' rule on :math:`\theta` alone needs only the
evidence :math:`p(y \mid \theta)`, which TDS and MCGdiff estimate without bias:

.. math::
    p(\theta \mid y) \propto p(y \mid \theta)\, p(\theta).

:class:`EvidenceGrid` runs the SMC sampler ``num_runs`` times at each value of a grid of
:math:`\theta`, averages the evidences (the mean of unbiased estimates is unbiased) and
integrates on the grid. Unlike :class:`~diffprior.PMMH` it needs no Markov chain, so a noisy
evidence cannot make it stick: each grid value's error is independent, and its size is
reported (:attr:`GridPosterior.log_evidence_sd`). With ``smooth=k``, quantiles come from a
polynomial of degree ``k`` fitted to the log-posterior in the site's unconstrained coordinate
(:math:`\log \sigma` for a positive site), which averages that error out across the grid.

It is the method of choice for one scalar hyperparameter whose posterior a grid of a few
dozen values resolves; for several hyperparameters use :class:`~diffprior.ParticleGibbs` or
:class:`~diffprior.PMMH`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to
from scipy.special import logsumexp

from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.infer.hierarchical import (
    _check_count,
    _resolve_method,
    read_hierarchical_model,
    smc_given_theta,
)
from diffprior.infer.sampler import as_key
from diffprior.model import ModelError, model_arguments
from diffprior.types import Array

__all__ = ["EvidenceGrid", "GridPosterior"]

#: Posterior mass within the first or last grid interval above which the grid is said not to
#: cover the posterior.
_END_MASS = 0.01


class GridPosterior(NamedTuple):
    r"""The result of :meth:`EvidenceGrid.run`.

    site
        The hyperparameter's site name.
    values
        ``(G,)`` the grid, increasing.
    log_evidence
        ``(G, R)``: each run's :math:`\log \hat p(y \mid \theta)`.
    log_prior
        ``(G,)``: :math:`\log p(\theta)` at the grid values.
    unconstrained
        ``(G,)``: the grid in the site's unconstrained coordinate (NumPyro's
        ``biject_to(support)``), where ``smooth`` fits.
    log_abs_det_jacobian
        ``(G,)``: :math:`\log \lvert d\theta / du \rvert` there.
    draws
        ``{site: (G, R), x: (G, R, *event_shape), ...}``: one draw of each latent site per run
        (``x`` by the run's final weights).
    transform
        NumPyro's transform from the unconstrained coordinate to the site's support.
    """

    site: str
    values: np.ndarray
    log_evidence: np.ndarray
    log_prior: np.ndarray
    unconstrained: np.ndarray
    log_abs_det_jacobian: np.ndarray
    draws: dict
    transform: Any

    @property
    def log_marginal_likelihood(self) -> np.ndarray:
        r"""``(G,)``: :math:`\log` of the runs' mean evidence at each grid value."""
        return logsumexp(self.log_evidence, axis=1) - np.log(self.log_evidence.shape[1])

    @property
    def log_evidence_sd(self) -> np.ndarray:
        """``(G,)``: the standard deviation of the log-evidence between runs (nats): the
        Monte Carlo error of each grid value; near 1 or more, use more particles."""
        return np.std(self.log_evidence, axis=1, ddof=1)

    @property
    def log_posterior(self) -> np.ndarray:
        r"""``(G,)``: :math:`\log p(\theta \mid y)` at the grid values, a density in
        :math:`\theta` normalised by the trapezoid rule."""
        log_joint = self.log_marginal_likelihood + self.log_prior
        density = np.exp(log_joint - np.max(log_joint))
        return log_joint - np.max(log_joint) - np.log(np.trapezoid(density, self.values))

    def _density_on(self, smooth: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``(theta, density)`` on a fine grid, the density in theta unnormalised."""
        u = self.unconstrained
        log_u = self.log_marginal_likelihood + self.log_prior + self.log_abs_det_jacobian
        if smooth is None:
            fine = np.linspace(u[0], u[-1], 4001)
            values = np.interp(fine, u, log_u)
        else:
            keep = log_u > np.max(log_u) - 25.0
            if np.count_nonzero(keep) <= smooth:
                raise ValueError(
                    f"smooth={smooth} needs more than {smooth} grid values within 25 nats of "
                    f"the peak; {np.count_nonzero(keep)} are: refine the grid around it"
                )
            coefficients = np.polyfit(u[keep], log_u[keep], smooth)
            fine = np.linspace(u[keep].min(), u[keep].max(), 4001)
            values = np.polyval(coefficients, fine)
        return fine, np.exp(values - np.max(values))

    def cdf(self, theta: Any, *, smooth: int | None = None) -> np.ndarray:
        r""":math:`P(\theta' \le \theta \mid y)` (piecewise linear log-density between grid
        values in the unconstrained coordinate, or the ``smooth`` polynomial)."""
        fine, density = self._density_on(smooth)
        cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
        cumulative /= cumulative[-1]
        u = np.asarray(self._to_unconstrained(np.asarray(theta, np.float64)))
        return np.interp(u, fine, cumulative)

    def quantiles(self, probs: Any = (0.05, 0.5, 0.95), *, smooth: int | None = None):
        """The posterior quantiles of the hyperparameter at ``probs`` (see :meth:`cdf`), e.g.
        ``low, median, high = result.quantiles((0.05, 0.5, 0.95), smooth=4)``."""
        fine, density = self._density_on(smooth)
        cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
        cumulative /= cumulative[-1]
        at = np.interp(np.asarray(probs, np.float64), cumulative, fine)
        return self._to_constrained(at)

    def end_mass(self) -> tuple[float, float]:
        """The posterior mass in the first and the last grid interval: more than 1% at an end
        means the grid may cut the posterior off there (:meth:`EvidenceGrid.run` warns)."""
        fine, density = self._density_on(None)
        total = np.trapezoid(density, fine)
        u = self.unconstrained
        first = fine <= u[1]
        last = fine >= u[-2]
        return (
            float(np.trapezoid(density[first], fine[first]) / total),
            float(np.trapezoid(density[last], fine[last]) / total),
        )

    def sample(self, rng_key: Array, num_samples: int) -> dict[str, np.ndarray]:
        """``num_samples`` joint draws of the hyperparameter and the other latent sites: a
        grid value by its quadrature weight (trapezoid in the unconstrained coordinate), then
        one of its runs by that run's evidence, and that run's draw."""
        num_samples = _check_count("num_samples", num_samples, 1)
        u = self.unconstrained
        log_u = self.log_marginal_likelihood + self.log_prior + self.log_abs_det_jacobian
        widths = np.gradient(u) if u.size > 1 else np.ones(1)
        log_weights = log_u + np.log(np.abs(widths))
        key_grid, key_run = jax.random.split(rng_key)
        node = np.asarray(
            jax.random.categorical(key_grid, jnp.asarray(log_weights), shape=(num_samples,))
        )
        runs = np.asarray(
            jax.random.categorical(key_run, jnp.asarray(self.log_evidence[node]), axis=-1)
        )
        return {name: np.asarray(value)[node, runs] for name, value in self.draws.items()}

    def _to_unconstrained(self, theta: np.ndarray) -> np.ndarray:
        # outside the grid the CDF is 0 or 1: clip before mapping (no NaN off the support)
        inside = np.clip(theta, self.values[0], self.values[-1])
        return np.asarray(self.transform.inv(jnp.asarray(inside)), np.float64)

    def _to_constrained(self, u: np.ndarray) -> np.ndarray:
        return np.asarray(self.transform(jnp.asarray(u)), np.float64)

    def plot(self, ax=None, *, truth: float | None = None, smooth: int | None = None):
        """The posterior density of the hyperparameter (normalised on the grid), each grid
        value's runs as points (their log-evidence spread, scaled), and ``truth`` if given.
        Returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        created = ax is None
        if created:
            _, ax = plt.subplots(figsize=(5, 3))
        fine, density = self._density_on(smooth)
        theta = self._to_constrained(fine)
        jacobian = np.gradient(fine) / np.maximum(np.gradient(theta), np.finfo(float).tiny)
        in_theta = density * jacobian
        in_theta /= np.trapezoid(in_theta, theta)
        ax.plot(theta, in_theta, color="C0", label=f"p({self.site} | y)")
        ax.plot(self.values, np.exp(self.log_posterior), "o", color="C0", ms=3)
        if truth is not None:
            ax.axvline(truth, color="k", ls="--", label="truth")
        ax.set_xlabel(self.site)
        ax.set_ylabel("posterior density")
        ax.legend(frameon=False)
        if created:
            ax.figure.tight_layout()
        return ax


class EvidenceGrid:
    r"""The posterior of one scalar hyperparameter by quadrature over TDS's or MCGdiff's
    evidence on a grid of its values (see the module docstring).

    Parameters
    ----------
    model
        A NumPyro model with one DiffusionPrior site and exactly one other latent site, a
        continuous scalar (:func:`~diffprior.infer.hierarchical.read_hierarchical_model`).
    method
        ``"tds"`` (default), ``"mcgdiff"``, the class ``dp.TDS`` / ``dp.MCGdiff`` or an
        instance with options.
    num_particles, num_steps
        Particles and diffusion steps of each SMC run.
    num_runs
        Independent SMC runs per grid value (at least 2: their spread is the Monte Carlo
        error that :attr:`GridPosterior.log_evidence_sd` reports).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.ones(2))
    >>> def model(y=None):
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)
    >>> grid = dp.EvidenceGrid(model, num_particles=64, num_steps=20, num_runs=2)
    >>> values = np.geomspace(0.005, 6.0, 20)
    >>> result = grid.run(jax.random.key(0), values, y=jnp.array([1.5, 0.2]))
    >>> low, median, high = result.quantiles((0.05, 0.5, 0.95))
    >>> bool(values[0] < low < median < high < values[-1])
    True
    """

    def __init__(
        self,
        model: Callable,
        method: Any = "tds",
        *,
        num_particles: int,
        num_steps: int,
        num_runs: int = 4,
    ):
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}")
        self.model = model
        self.method = _resolve_method(method, model)
        self.num_particles = _check_count("num_particles", num_particles, 1)
        self.num_steps = _check_count("num_steps", num_steps, 1)
        self.num_runs = _check_count("num_runs", num_runs, 2)
        self._compiled = eqx.filter_jit(self._run_impl)

    def _run_impl(self, rng_key, values, dynamic_args, static_args):
        args, kwargs = eqx.combine(dynamic_args, static_args)
        hm = read_hierarchical_model(self.model, args, kwargs)
        (name,) = hm.theta_sites
        times = make_timesteps(hm.prior.schedule, self.num_steps, self.method.spacing)
        method, num_particles, num_runs = self.method, self.num_particles, self.num_runs

        def at_value(key, value):
            def one(key):
                return smc_given_theta(key, method, hm, {name: value}, times, num_particles)

            return jax.vmap(one)(jax.random.split(key, num_runs))

        keys = jax.random.split(rng_key, values.shape[0])
        return jax.lax.map(lambda kv: at_value(*kv), (keys, values))

    def run(self, rng_key: Array, values: Any, *args: Any, **kwargs: Any) -> GridPosterior:
        """Run the SMC sampler ``num_runs`` times at each of ``values`` (the hyperparameter's
        grid, increasing, inside its support) on the model's arguments ``args``/``kwargs``.

        Warns when the posterior has more than 1% of its mass in the first or the last grid
        interval (the grid may cut it off) and when the runs' log-evidences disagree by more
        than 2 nats (standard deviation) where the posterior is, so that an answer from too few
        particles does not pass unnoticed."""
        rng_key = as_key(rng_key)
        args, kwargs = model_arguments(tuple(args), dict(kwargs))
        hm = read_hierarchical_model(self.model, args, kwargs)
        if len(hm.theta_sites) != 1:
            raise ModelError(
                "EvidenceGrid needs exactly one latent site besides "
                f"{hm.prior_site!r}; the model has {list(hm.theta_sites)}: use dp.PMMH or "
                "dp.ParticleGibbs for several"
            )
        (site,) = hm.theta_sites.values()
        if site.shape != ():
            raise ModelError(
                f"EvidenceGrid needs a scalar hyperparameter; {site.name!r} has shape "
                f"{site.shape}: use dp.PMMH or dp.ParticleGibbs"
            )
        grid = np.asarray(values, np.float64)
        if grid.ndim != 1 or grid.size < 3:
            raise ValueError(f"values must be a 1-d grid of at least 3 values, got {grid.shape}")
        if not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
            raise ValueError("values must be finite and strictly increasing")
        support = _site_support(hm, site.name)
        transform = biject_to(support)
        values_f = jnp.asarray(grid, jnp.result_type(float))
        inside = np.asarray(support(values_f), bool)
        if not np.all(inside):
            raise ValueError(
                f"values {grid[~inside].tolist()} lie outside the support of {site.name!r}"
            )
        u = transform.inv(values_f)
        unconstrained = np.asarray(u, np.float64)
        if not np.all(np.isfinite(unconstrained)):
            raise ValueError(
                f"values {grid[~np.isfinite(unconstrained)].tolist()} lie on the boundary of "
                f"the support of {site.name!r}"
            )
        log_det = np.asarray(transform.log_abs_det_jacobian(u, values_f), np.float64)
        log_prior = np.asarray(
            jax.vmap(lambda v: hm.log_prior({site.name: v}))(values_f), np.float64
        )
        self.method.check(hm.observation_model({site.name: values_f[0]}).in_latent_space())
        dynamic, static = eqx.partition((args, kwargs), eqx.is_array)
        log_evidence, draws = self._compiled(rng_key, values_f, dynamic, static)
        draws = {name: np.asarray(value) for name, value in draws.items()}
        draws[site.name] = np.broadcast_to(grid[:, None], (grid.size, self.num_runs)).copy()
        result = GridPosterior(
            site.name,
            grid,
            np.asarray(log_evidence, np.float64),
            log_prior,
            unconstrained,
            log_det,
            draws,
            transform,
        )
        _warn_if_unreliable(result)
        return result


def _site_support(hm, name: str):
    from numpyro import handlers

    # the draw only lets the model run; what is read is the site's support
    seeded = handlers.seed(hm._theta_only(), rng_seed=0)
    trace = handlers.trace(seeded).get_trace(*hm.args, **hm.kwargs)
    return trace[name]["fn"].support


def _warn_if_unreliable(result: GridPosterior) -> None:
    if not np.any(np.isfinite(result.log_marginal_likelihood)):
        raise FloatingPointError(
            f"every SMC evidence on the grid of {result.site!r} was -inf or NaN: the runs "
            "collapsed; use more particles or another method"
        )
    first, last = result.end_mass()
    ends = [name for name, mass in (("first", first), ("last", last)) if mass > _END_MASS]
    if ends:
        warnings.warn(
            f"EvidenceGrid: the posterior of {result.site!r} has more than {_END_MASS:.0%} of "
            f"its mass in the {' and '.join(ends)} grid interval ({first:.1%} / {last:.1%}): "
            "the grid may cut it off; extend the grid there",
            UserWarning,
            stacklevel=3,
        )
    weights = np.exp(result.log_posterior - np.max(result.log_posterior))
    where = weights > 0.1
    spread = float(np.max(result.log_evidence_sd[where]))
    if spread > 2.0:
        warnings.warn(
            f"EvidenceGrid: the runs' log-evidences differ by up to {spread:.1f} nats (standard "
            f"deviation) where the posterior of {result.site!r} is: the quadrature is noisy; "
            "use more particles or runs",
            UserWarning,
            stacklevel=3,
        )
