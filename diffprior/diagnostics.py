"""Diagnostics: distances between sample sets (used by the tests and benchmarks), the ArviZ
DataTree of a run, and reading SMC runs (weight collapse, :func:`smc_health`, :func:`plot_smc`,
:func:`print_summary`).

Examples
--------
>>> import jax
>>> from diffprior.diagnostics import sliced_wasserstein
>>> x = jax.random.normal(jax.random.key(0), (500, 3))
>>> float(sliced_wasserstein(jax.random.key(1), x, x))
0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "sliced_wasserstein",
    "to_datatree",
    "to_arviz",
    "weight_collapse",
    "WeightCollapse",
    "collapse_level",
    "final_ess_level",
    "smc_health",
    "SMCHealth",
    "print_summary",
    "plot_smc",
    "COLLAPSE_FRACTION",
    "COLLAPSE_MIN_ESS",
    "COLLAPSE_RUN",
    "MIN_FINAL_ESS",
    "MAX_LOG_EVIDENCE_SD",
    "WARN_LOG_EVIDENCE_SD",
]


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
    ``{site}_dim_{i}`` event dims; with ``obs_mask=`` sites, their ``{name}_unobserved`` draws
    given each draw); ``sample_stats`` (per chain ``log_evidence`` and
    ``num_distinct``, the distinct draws; per step ``ess``, ``resampled`` and, for the SMC
    methods, ``log_evidence_increment``, ``degenerate`` and ``collapsed`` (the steps of
    :func:`weight_collapse`); per chain ``final_ess``; per particle ``log_weight``, the weights
    before the final equal-weight resampling); ``observed_data``; ``log_likelihood``
    (pointwise, per observed site). Attributes record the method, its options, the step and
    particle counts, the diffprior version and, for the SMC methods, ``weight_collapse`` (the
    warning's sentence, ``""`` when the weights never collapsed).

    **Reading ArviZ's ESS.** A chain's draws are its particles after a final equal-weight
    resampling, which copies heavy particles several times. They are stored in a random order
    (a permutation drawn from the run's key), so a chain is exchangeable: it has no
    autocorrelation, and a trace plot shows no spurious stuck stretches. ``ess_bulk`` /
    ``ess_tail`` then count the draws, discounted by how much the chains (independent particle
    systems) disagree; they do not see duplicates inside a chain. With healthy weights they are
    close to the number of distinct draws (``num_distinct``, summed over chains; within a
    factor of 2 in the tests); when a chain's ``final_ess`` or ``num_distinct`` is far below
    ``num_particles``, those are the sizes to trust, not ``ess_bulk``. ``r_hat`` compares the
    chains as usual.
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
    posterior = {site: samples}
    dims = {site: event_dims}
    for name, value in result.get("unobserved", {}).items():
        posterior[name] = np.asarray(value)
        dims[name] = [f"{name}_dim_{i}" for i in range(np.ndim(value) - 2)]
    groups = {"posterior": posterior, "observed_data": observed, "log_likelihood": pointwise}
    tree = arviz_base.from_dict(
        # prior draws through a model with no observed site (Unguided) have neither group
        {name: group for name, group in groups.items() if group},
        dims=dims,
    )
    chain = np.arange(num_chains)
    draw = np.arange(num_draws)
    stats = {
        "log_weight": (("chain", "draw"), np.asarray(result["log_weights"])),
        "log_evidence": (("chain",), np.asarray(result["log_evidence"])),
    }
    for name, value in result["per_step"].items():
        stats[name] = (("step", "chain"), np.asarray(value))
    stats["num_distinct"] = (("chain",), _num_distinct(samples))
    if method.is_smc:
        collapse = collapse_of_result(result, sampler.num_particles, method.name)
        stats["final_ess"] = (("chain",), _ess_of_log_weights(result["log_weights"]))
        stats["collapsed"] = (("chain", "step"), collapse.collapsed)
        attrs["weight_collapse"] = collapse.message
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


# -- reading SMC runs ------------------------------------------------------------------------------
#: A step's weights count as collapsed when their ESS is below this fraction of the particles
#: or below :data:`COLLAPSE_MIN_ESS`, whichever is larger (never above half the particles).
COLLAPSE_FRACTION = 0.02
#: The ESS level under which a step counts as collapsed, however few the particles (the ESS of
#: ``N`` weights lies in ``[1, N]``: below 2 one particle carries more than half the weight).
COLLAPSE_MIN_ESS = 2.0
#: A collapse is reported when it lasts at least this many consecutive steps of a chain (single
#: dips, common at the first, noisiest steps, recover when the particles move).
COLLAPSE_RUN = 3
#: A chain whose final ESS (of the weights its equal-weight draws are resampled from) is below
#: this, or below a quarter of the particles when that is smaller, is reported.
MIN_FINAL_ESS = 10.0
#: Between-chain standard deviation of the log-evidence (nats) above which the estimate is
#: called noisy.
MAX_LOG_EVIDENCE_SD = 1.0
#: Between-chain standard deviation of the log-evidence (nats) above which a run warns: the
#: chains then disagree so much that at least one of them is far from the posterior, even when
#: every chain's weights look healthy (as with a proposal that cannot reach a sharp likelihood).
WARN_LOG_EVIDENCE_SD = 5.0


def collapse_level(num_particles: int) -> float:
    """ESS under which a step's weights count as collapsed:
    ``max(COLLAPSE_FRACTION * num_particles, COLLAPSE_MIN_ESS)``, at most half the particles."""
    return min(max(COLLAPSE_FRACTION * num_particles, COLLAPSE_MIN_ESS), num_particles / 2)


def final_ess_level(num_particles: int) -> float:
    """Final ESS under which a chain is reported: ``min(MIN_FINAL_ESS, num_particles / 4)``."""
    return min(MIN_FINAL_ESS, num_particles / 4)


class WeightCollapse(NamedTuple):
    """Where the particle weights of a run collapsed (see :func:`weight_collapse`).

    collapsed
        ``(num_chains, num_steps)`` bool: the step lies in a run of at least
        :data:`COLLAPSE_RUN` consecutive steps whose ESS is below :func:`collapse_level`.
    low_final_ess
        ``(num_chains,)`` bool: the final ESS is below :func:`final_ess_level`.
    message
        A sentence naming the chains, the steps and what to try; ``""`` when nothing collapsed.
    """

    collapsed: np.ndarray
    low_final_ess: np.ndarray
    message: str


def weight_collapse(
    ess: ArrayLike, final_ess: ArrayLike, num_particles: int, method: str = "SMC"
) -> WeightCollapse:
    """Find the chains and steps where the particle weights collapsed.

    A chain is reported when its per-step ESS stays below :func:`collapse_level` (2% of the
    particles, at least 2) for :data:`COLLAPSE_RUN` or more consecutive steps, or when its final
    ESS is below :func:`final_ess_level` (10, or a quarter of the particles if fewer than 40).
    :class:`diffprior.Sampler` warns with the message (a ``RuntimeWarning``) and records it in
    the DataTree (``sample_stats`` variable ``collapsed``, attribute ``weight_collapse``).

    Parameters
    ----------
    ess
        ``(num_chains, num_steps)`` ESS the resampling decision of each step saw.
    final_ess
        ``(num_chains,)`` ESS of the final weights (before the equal-weight resampling).
    num_particles
        Particles per chain.
    method
        Name used in the message.

    Examples
    --------
    >>> import numpy as np
    >>> ess = np.full((2, 10), 80.0)
    >>> ess[1, 4:8] = 1.2
    >>> report = weight_collapse(ess, np.array([70.0, 60.0]), 100, "TDS")
    >>> np.flatnonzero(report.collapsed[1]).tolist()
    [4, 5, 6, 7]
    >>> print(report.message.split(";")[0])
    TDS: the particle weights collapsed in chain 1 (ESS < 2 of 100 particles at steps 4-7)
    """
    ess = np.atleast_2d(np.asarray(ess, dtype=np.float64))
    final_ess = np.atleast_1d(np.asarray(final_ess, dtype=np.float64))
    level = collapse_level(num_particles)
    # a non-finite ESS (a degenerate step, reported separately) is not a collapse
    low = np.where(np.isfinite(ess), ess < level, False)
    collapsed = np.zeros_like(low)
    for chain in range(low.shape[0]):
        for start, stop in _runs(low[chain]):
            if stop - start >= COLLAPSE_RUN:
                collapsed[chain, start:stop] = True
    final_level = final_ess_level(num_particles)
    low_final = np.where(np.isfinite(final_ess), final_ess < final_level, False)
    problems = []
    for chain in range(low.shape[0]):
        parts = []
        if collapsed[chain].any():
            steps = _format_steps(np.flatnonzero(collapsed[chain]))
            parts.append(f"ESS < {level:.3g} of {num_particles} particles at steps {steps}")
        if low_final[chain]:
            parts.append(f"final ESS {final_ess[chain]:.3g} < {final_level:.3g}")
        if parts:
            problems.append(f"chain {chain} ({', '.join(parts)})")
    message = ""
    if problems:
        advice = "more particles (num_particles) or more steps (num_steps)"
        if method != "MCGdiff":
            advice += ", or dp.MCGdiff for a linear model with Gaussian noise"
        message = (
            f"{method}: the particle weights collapsed in {'; '.join(problems)}; the draws "
            "descend from a few particles and the log-evidence is unreliable. Try "
            f"{advice}; dp.smc_health and dp.plot_smc show the details"
        )
    return WeightCollapse(collapsed, low_final, message)


def collapse_of_result(result, num_particles: int, method: str) -> WeightCollapse:
    """:func:`weight_collapse` of a :class:`diffprior.Sampler` run's results (an SMC method)."""
    ess = np.asarray(result["per_step"]["ess"]).T  # stored (step, chain)
    return weight_collapse(ess, _ess_of_log_weights(result["log_weights"]), num_particles, method)


def evidence_disagreement(log_evidence: ArrayLike, method: str) -> str:
    """The run-time warning's sentence when the chains' finite log-evidences spread by more
    than :data:`WARN_LOG_EVIDENCE_SD` nats (standard deviation), ``""`` otherwise or with one
    chain.

    Examples
    --------
    >>> from diffprior.diagnostics import evidence_disagreement
    >>> evidence_disagreement([-143.3, -192.3], "TDS")[:45]
    'TDS: the chains disagree: their log-evidences'
    >>> evidence_disagreement([-7.31, -7.28], "TDS")
    ''
    """
    values = np.asarray(log_evidence, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return ""
    sd = float(np.std(values, ddof=1))
    if sd <= WARN_LOG_EVIDENCE_SD:
        return ""
    shown = ", ".join(f"{v:.1f}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    return (
        f"{method}: the chains disagree: their log-evidences ({shown}) "
        f"spread by {sd:.1f} nats (sd > {WARN_LOG_EVIDENCE_SD}), though no chain's weights "
        "collapsed. The particles did not reach the likelihood's region in at least one chain, "
        "so the draws and the evidence are not reliable. Use more particles or steps, or a "
        "proposal that uses the observation fully (for a linear model with Gaussian noise: "
        "proposal='subspace', or dp.MCGdiff); dp.smc_health and dp.plot_smc show the details"
    )


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True in a 1-d bool array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _format_steps(steps) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    mask = np.zeros(int(np.max(steps)) + 1, dtype=bool)
    mask[np.asarray(steps)] = True
    return ", ".join(
        str(start) if stop - start == 1 else f"{start}-{stop - 1}" for start, stop in _runs(mask)
    )


def _ess_of_log_weights(log_weights: ArrayLike) -> np.ndarray:
    """ESS of each row of ``(num_chains, num_particles)`` log-weights (BlackJAX's formula)."""
    from diffprior.kernels.smc import ess

    return np.asarray(jax.vmap(ess)(jnp.asarray(log_weights)), dtype=np.float64)


def _num_distinct(samples: np.ndarray) -> np.ndarray:
    """Distinct draws per chain of ``(num_chains, num_draws, ...)`` samples."""
    flat = samples.reshape(samples.shape[0], samples.shape[1], -1)
    return np.array([len(np.unique(chain, axis=0)) for chain in flat], dtype=np.int64)


def _as_tree(data, caller: str):
    """A DataTree from a DataTree or from anything with ``to_arviz()`` (a finished run)."""
    import xarray as xr

    if isinstance(data, xr.DataTree):
        return data
    if callable(getattr(data, "to_arviz", None)):
        return data.to_arviz()
    raise TypeError(
        f"{caller} needs an xarray.DataTree (sampler.to_arviz()) or a finished dp.Sampler, got "
        f"{type(data).__name__}"
    )


_SMC_STATS = ("ess", "resampled", "log_evidence")


def _smc_stats(tree, caller: str):
    """The ``sample_stats`` of an SMC run of :class:`diffprior.Sampler`, or a ValueError."""
    method = tree.attrs.get("method", "unknown")
    stats = tree["sample_stats"].to_dataset() if "sample_stats" in tree.children else None
    missing = [name for name in _SMC_STATS if stats is None or name not in stats]
    if missing or "num_particles" not in tree.attrs:
        raise ValueError(
            f"{caller} needs the DataTree of a diffprior SMC run (dp.TDS, dp.FK, dp.MCGdiff with "
            f"dp.Sampler); this one (method {method!r}) has no sample_stats {missing or ''} "
            "(or no num_particles attribute)"
        )
    return stats


@dataclass(frozen=True)
class SMCHealth:
    """How an SMC run went, per chain (see :func:`smc_health`).

    Attributes
    ----------
    method, num_particles, num_steps
        The run.
    min_ess, min_ess_step
        ``(num_chains,)`` smallest per-step ESS and the step where it occurred.
    final_ess
        ``(num_chains,)`` ESS of the final weights, which the equal-weight draws are resampled
        from.
    num_resampled
        ``(num_chains,)`` number of steps that resampled.
    num_distinct
        ``(num_chains,)`` distinct equal-weight draws.
    log_evidence
        ``(num_chains,)`` log-evidence estimates.
    log_evidence_sd
        Their standard deviation across chains (NaN with one chain).
    collapsed_steps
        Per chain, the steps where the weights collapsed (:func:`weight_collapse`).
    verdict
        ``"healthy"``, ``"noisy evidence"`` (no collapse, but the chains' log-evidences spread
        by more than :data:`MAX_LOG_EVIDENCE_SD` nats) or ``"collapsed"``.
    message
        A sentence saying why, and what to try.
    """

    method: str
    num_particles: int
    num_steps: int
    min_ess: np.ndarray
    min_ess_step: np.ndarray
    final_ess: np.ndarray
    num_resampled: np.ndarray
    num_distinct: np.ndarray
    log_evidence: np.ndarray
    log_evidence_sd: float
    collapsed_steps: tuple[tuple[int, ...], ...]
    verdict: str
    message: str

    @property
    def healthy(self) -> bool:
        """True unless the weights collapsed."""
        return self.verdict != "collapsed"

    def __str__(self) -> str:
        return "\n".join(_chain_table(self) + [f"{self.verdict}: {self.message}"])


def smc_health(data) -> SMCHealth:
    """One-call health summary of a finished SMC run.

    Parameters
    ----------
    data
        A finished :class:`diffprior.Sampler` with an SMC method (TDS, FK, MCGdiff), or its
        DataTree (``sampler.to_arviz()``, also read back from netCDF).

    Returns
    -------
    An :class:`SMCHealth`: per chain the minimum ESS and its step, the final ESS, the number of
    resampling steps, the distinct draws and the log-evidence; the between-chain standard
    deviation of the log-evidence; the collapsed steps (the rule of :func:`weight_collapse`);
    and a verdict with a sentence. ``print(health)`` shows it as a table.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> sampler = dp.Sampler(dp.TDS(model), num_particles=64, num_steps=20, num_chains=2,
    ...                      progress_bar=False)
    >>> sampler.run(jax.random.key(0), y=1.5)
    >>> health = dp.smc_health(sampler)
    >>> health.verdict, health.final_ess.shape
    ('healthy', (2,))
    """
    tree = _as_tree(data, "smc_health")
    stats = _smc_stats(tree, "smc_health")
    attrs = tree.attrs
    num_particles = int(attrs["num_particles"])
    method = str(attrs.get("method", "SMC"))
    ess = np.asarray(stats["ess"].transpose("chain", "step").values, dtype=np.float64)
    if "final_ess" in stats:
        final_ess = np.asarray(stats["final_ess"].values, dtype=np.float64)
    else:
        final_ess = _ess_of_log_weights(stats["log_weight"].transpose("chain", "draw").values)
    if "num_distinct" in stats:
        num_distinct = np.asarray(stats["num_distinct"].values)
    else:
        posterior = tree["posterior"].to_dataset()
        num_distinct = _num_distinct(np.asarray(posterior[next(iter(posterior.data_vars))]))
    log_evidence = np.asarray(stats["log_evidence"].values, dtype=np.float64)
    resampled = np.asarray(stats["resampled"].transpose("chain", "step").values, dtype=bool)
    report = weight_collapse(ess, final_ess, num_particles, method)
    safe_ess = np.where(np.isfinite(ess), ess, np.inf)
    min_ess_step = np.argmin(safe_ess, axis=1)
    min_ess = np.take_along_axis(ess, min_ess_step[:, None], axis=1)[:, 0]
    num_chains = len(log_evidence)
    log_evidence_sd = float(np.std(log_evidence, ddof=1)) if num_chains > 1 else float("nan")
    if report.message:
        verdict, message = "collapsed", report.message
    elif not np.all(np.isfinite(log_evidence)):
        verdict = "collapsed"
        message = (
            f"{method}: the log-evidence is not finite in chains "
            f"{np.flatnonzero(~np.isfinite(log_evidence)).tolist()} (every particle had zero "
            "weight at some step); check the likelihood"
        )
    elif log_evidence_sd > MAX_LOG_EVIDENCE_SD:
        verdict = "noisy evidence"
        message = (
            f"no collapse, but the chains' log-evidences spread by {log_evidence_sd:.2f} nats "
            f"(> {MAX_LOG_EVIDENCE_SD}); the chains disagree, so compare their draws (r_hat) and "
            "use more particles for a reliable evidence"
        )
    else:
        spread = f", log-evidence sd {log_evidence_sd:.2f} across chains" if num_chains > 1 else ""
        message = (
            f"final ESS {np.min(final_ess):.0f}-{np.max(final_ess):.0f} of {num_particles}, "
            f"smallest per-step ESS {np.min(min_ess):.1f}, no collapse{spread}"
        )
        verdict = "healthy"
    return SMCHealth(
        method=method,
        num_particles=num_particles,
        num_steps=ess.shape[1],
        min_ess=min_ess,
        min_ess_step=min_ess_step,
        final_ess=final_ess,
        num_resampled=resampled.sum(axis=1),
        num_distinct=num_distinct,
        log_evidence=log_evidence,
        log_evidence_sd=log_evidence_sd,
        collapsed_steps=tuple(tuple(np.flatnonzero(row).tolist()) for row in report.collapsed),
        verdict=verdict,
        message=message,
    )


def _chain_table(health: SMCHealth) -> list[str]:
    """The per-chain lines of :func:`print_summary` and ``str(SMCHealth)``."""
    header = ("chain", "final ESS", "min ESS", "at step", "resampled", "distinct", "log Z")
    lines = [("{:>6}" + " {:>10}" * 6).format(*header)]
    row = "{:>6} {:>10.1f} {:>10.1f} {:>10d} {:>10d} {:>10d} {:>10.3f}"
    for chain in range(len(health.log_evidence)):
        lines.append(
            row.format(
                chain,
                health.final_ess[chain],
                health.min_ess[chain],
                int(health.min_ess_step[chain]),
                int(health.num_resampled[chain]),
                int(health.num_distinct[chain]),
                health.log_evidence[chain],
            )
        )
    if len(health.log_evidence) > 1:
        lines.append(
            f"log Z: mean {np.mean(health.log_evidence):.3f}, sd {health.log_evidence_sd:.3f} "
            f"across {len(health.log_evidence)} chains"
        )
    return lines


def print_summary(data, prob: float = 0.9, max_rows: int = 8) -> None:
    """Print a run's summary in NumPyro's layout, SMC-aware.

    For an SMC method, first one line per chain: the final ESS (of the weights the equal-weight
    draws are resampled from), the smallest per-step ESS and its step, the number of resampling
    steps, the distinct draws and the log-evidence, then the log-evidence's mean and standard
    deviation across chains. Then, per posterior site, NumPyro's columns: ``mean``, ``std``,
    ``median``, the equal-tailed ``prob`` interval (quantiles, not NumPyro's HPDI) and
    ``r_hat`` across chains (:func:`numpyro.diagnostics.gelman_rubin`, which needs two or more
    chains; NaN with one). There is no ``n_eff`` column: the draws of a chain are resampled
    particles, whose worth is the ESS of the chain table, not an autocorrelation time.

    A site with more than ``max_rows`` elements (an image) shows the ``max_rows`` elements with
    the largest ``r_hat`` (the first ones with one chain), then one line over all its elements:
    the range of the means and standard deviations and the largest ``r_hat`` with its element.
    Last comes the verdict of :func:`smc_health`.

    Parameters
    ----------
    data
        A finished :class:`diffprior.Sampler` or its DataTree.
    prob
        Mass of the central interval, in ``(0, 1)``.
    max_rows
        Most rows printed per site.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> sampler = dp.Sampler(dp.TDS(model), num_particles=64, num_steps=20, num_chains=2,
    ...                      progress_bar=False)
    >>> sampler.run(jax.random.key(0), y=1.5)
    >>> dp.diagnostics.print_summary(sampler)  # doctest: +ELLIPSIS
    TDS: 2 chains x 64 particles, 20 steps...
     chain  final ESS    min ESS    at step  resampled   distinct      log Z
    ...
                    mean       std    median      5.0%     95.0%     r_hat
          x[0]...
    """
    for line in _summary_lines(_as_tree(data, "print_summary"), prob, max_rows):
        print(line)


def _independent_particle_methods() -> set[str]:
    """Names of the diffprior methods whose particles carry no weights."""
    from diffprior.infer import methods

    return {
        value.__name__
        for value in vars(methods).values()
        if isinstance(value, type)
        and issubclass(value, methods.Method)
        and value is not methods.Method
        and not value.is_smc
    }


def _summary_lines(tree, prob: float, max_rows: int) -> list[str]:
    from numpyro.diagnostics import gelman_rubin

    if not 0.0 < float(prob) < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int | np.integer) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    attrs = tree.attrs
    method = attrs.get("method", "posterior")
    posterior = tree["posterior"].to_dataset()
    num_chains = posterior.sizes.get("chain", 1)
    num_draws = posterior.sizes.get("draw", 0)
    header = f"{method}: {num_chains} chains x {attrs.get('num_particles', num_draws)} particles"
    if "num_steps" in attrs:
        header += f", {attrs['num_steps']} steps"
    seconds = float(attrs.get("seconds", float("nan")))
    if np.isfinite(seconds):
        header += f", {seconds:.1f} s"
    lines = [header, ""]
    health = None
    try:
        health = smc_health(tree)
    except ValueError:
        if method in _independent_particle_methods():
            lines += [f"{method}: independent particles (no weights, no evidence)", ""]
        else:
            lines += [f"{method}: no per-step SMC statistics (ess, resampled) to show", ""]
    else:
        lines += _chain_table(health) + [""]

    lower, upper = 50 * (1 - prob), 50 * (1 + prob)
    columns = ["mean", "std", "median", f"{lower:.1f}%", f"{upper:.1f}%", "r_hat"]
    sites = {}
    for name, variable in posterior.data_vars.items():
        values = np.asarray(variable.transpose("chain", "draw", ...).values, dtype=np.float64)
        flat = values.reshape(-1, *values.shape[2:])
        if num_chains >= 2 and num_draws >= 2:
            with np.errstate(invalid="ignore", divide="ignore"):
                r_hat = np.asarray(gelman_rubin(values))
        else:
            r_hat = np.full(values.shape[2:], np.nan)
        lo, median, hi = np.quantile(flat, [lower / 100, 0.5, upper / 100], axis=0)
        sites[name] = [flat.mean(0), flat.std(0, ddof=1), median, lo, hi, r_hat]

    def element(name, index):
        return f"{name}[{','.join(map(str, index))}]" if index else name

    shown = {}
    for name, stats in sites.items():
        shape = stats[0].shape
        indices = list(np.ndindex(shape))
        if len(indices) > max_rows:
            order = np.argsort(-np.nan_to_num(stats[5].ravel(), nan=-np.inf), kind="stable")
            indices = [indices[i] for i in sorted(order[:max_rows])]
        shown[name] = indices
    width = max([10] + [len(element(n, i)) for n, idx in shown.items() for i in idx])
    name_format = "{:>" + str(width) + "}"
    lines.append((name_format + " {:>9}" * 6).format("", *columns))
    row_format = name_format + " {:>9.2f}" * 6
    notes = []
    for name, stats in sites.items():
        for index in shown[name]:
            lines.append(row_format.format(element(name, index), *[s[index] for s in stats]))
        size = stats[0].size
        if size > max_rows:
            which = (
                f"the {max_rows} with the largest r_hat"
                if np.isfinite(stats[5]).any()
                else f"the first {max_rows}"
            )
            note = (
                f"{name}: {size} elements, rows above: {which}; all: mean {stats[0].min():.2f} "
                f"to {stats[0].max():.2f}, std {stats[1].min():.2f} to {stats[1].max():.2f}"
            )
            if np.isfinite(stats[5]).any():
                worst = np.unravel_index(np.nanargmax(stats[5]), stats[5].shape)
                note += f", r_hat max {np.nanmax(stats[5]):.2f} at {element(name, worst)}"
            notes.append(note)
    lines += notes + [""]
    if health is not None:
        lines.append(f"{health.verdict}: {health.message}")
    return lines


def plot_smc(data, figsize: tuple[float, float] | None = None):
    """Plot how an SMC run went, one colour per chain (matplotlib).

    Four panels: the ESS of the weights at each step (log scale), and of the final weights the
    draws are resampled from (diamonds after the last step), with the resampling threshold
    (``ess_threshold`` times the particles) and the collapse level of :func:`weight_collapse`,
    collapsed steps marked with crosses; the steps that resampled; the log-evidence increment of each step;
    and each chain's log-evidence, with the mean and one standard deviation across chains.

    Parameters
    ----------
    data
        A finished :class:`diffprior.Sampler` with an SMC method (TDS, FK, MCGdiff), or its
        DataTree.
    figsize
        Figure size in inches.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`; its four axes are ``fig.axes``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> sampler = dp.Sampler(dp.TDS(model), num_particles=64, num_steps=20, num_chains=2,
    ...                      progress_bar=False)
    >>> sampler.run(jax.random.key(0), y=1.5)
    >>> fig = dp.plot_smc(sampler.to_arviz())
    >>> len(fig.axes)
    4
    """
    import json

    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the dev and docs extras
        raise ImportError("plot_smc needs matplotlib: pip install matplotlib") from None

    tree = _as_tree(data, "plot_smc")
    stats = _smc_stats(tree, "plot_smc")
    health = smc_health(tree)
    num_particles = health.num_particles
    ess = np.asarray(stats["ess"].transpose("chain", "step").values, dtype=np.float64)
    resampled = np.asarray(stats["resampled"].transpose("chain", "step").values, dtype=bool)
    num_chains, num_steps = ess.shape
    steps = np.arange(num_steps)
    colours = [f"C{chain % 10}" for chain in range(num_chains)]

    fig, axes = plt.subplots(2, 2, figsize=figsize or (10, 6.5))
    ax_ess, ax_resampled, ax_increment, ax_evidence = axes.ravel()
    for chain in range(num_chains):
        ax_ess.plot(steps, ess[chain], color=colours[chain], lw=1, label=f"chain {chain}")
        collapsed = np.asarray(health.collapsed_steps[chain], dtype=int)
        if collapsed.size:
            ax_ess.plot(collapsed, ess[chain, collapsed], "x", color="red", ms=4)
    options = json.loads(tree.attrs.get("method_options", "{}"))
    threshold = options.get("ess_threshold")
    if threshold is not None and 0 < float(threshold) <= 1:
        ax_ess.axhline(
            float(threshold) * num_particles, color="gray", ls="--", lw=1, label="resampling"
        )
    ax_ess.scatter(
        np.full(num_chains, num_steps), health.final_ess, c=colours, marker="D", s=16, zorder=3
    )
    ax_ess.axhline(collapse_level(num_particles), color="red", ls=":", lw=1, label="collapse")
    ax_ess.set_yscale("log")
    ax_ess.set_ylim(0.8, num_particles * 1.25)
    ax_ess.set(xlabel="step (from noise to data)", ylabel=f"ESS of {num_particles} particles")
    ax_ess.set_title(f"ESS per step (diamonds at {num_steps}: final weights)", fontsize=10)
    ax_ess.legend(fontsize=7, ncol=2)

    ax_resampled.eventplot(
        [steps[resampled[chain]] for chain in range(num_chains)],
        lineoffsets=np.arange(num_chains),
        linelengths=0.7,
        colors=colours,
    )
    ax_resampled.set_yticks(np.arange(num_chains))
    ax_resampled.set_xlim(-0.5, num_steps - 0.5)
    ax_resampled.set(xlabel="step", ylabel="chain")
    ax_resampled.set_title(
        f"resampling steps ({', '.join(map(str, health.num_resampled))} per chain)", fontsize=10
    )

    if "log_evidence_increment" in stats:
        increments = np.asarray(
            stats["log_evidence_increment"].transpose("chain", "step").values, dtype=np.float64
        )
        for chain in range(num_chains):
            finite = np.where(np.isfinite(increments[chain]), increments[chain], np.nan)
            ax_increment.plot(steps, finite, color=colours[chain], lw=1)
    ax_increment.set(xlabel="step", ylabel="log-evidence increment")
    ax_increment.set_title("log-evidence increment per step", fontsize=10)

    log_evidence = health.log_evidence
    ax_evidence.scatter(np.arange(num_chains), log_evidence, c=colours, zorder=3)
    finite = log_evidence[np.isfinite(log_evidence)]
    if finite.size:
        mean = float(np.mean(finite))
        ax_evidence.axhline(mean, color="black", lw=1, label=f"mean {mean:.2f}")
        if finite.size > 1:
            sd = float(np.std(finite, ddof=1))
            ax_evidence.axhspan(
                mean - sd, mean + sd, color="gray", alpha=0.25, label=f"sd {sd:.2f}"
            )
        ax_evidence.legend(fontsize=7)
    ax_evidence.set_xticks(np.arange(num_chains))
    ax_evidence.set(xlabel="chain", ylabel="log-evidence")
    ax_evidence.set_title("log-evidence per chain", fontsize=10)
    fig.suptitle(f"{health.method}: {health.verdict}", fontsize=11)
    fig.tight_layout()
    return fig


def to_arviz(result):
    """The ArviZ ``xarray.DataTree`` of a finished run, for NumPyro- and ArviZ-minded users.

    ``arviz.from_numpyro`` reads ``numpyro.infer.MCMC`` objects only; this takes a
    :class:`diffprior.Sampler` (``sampler.to_arviz()``), the baselines
    (:class:`diffprior.baselines.NUTS`, :class:`diffprior.baselines.TemperedSMC`), a
    ``numpyro.infer.MCMC`` (``arviz.from_numpyro``) or a DataTree (returned as it is).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> sampler = dp.Sampler(dp.TDS(model), num_particles=64, num_steps=20, progress_bar=False)
    >>> sampler.run(jax.random.key(0), y=1.5)
    >>> idata = dp.to_arviz(sampler)
    >>> idata["posterior"]["x"].dims
    ('chain', 'draw', 'x_dim_0')
    """
    import numpyro
    import xarray as xr

    if isinstance(result, xr.DataTree):
        return result
    if isinstance(result, numpyro.infer.MCMC):
        import arviz_base

        return arviz_base.from_numpyro(result)
    if callable(getattr(type(result), "to_arviz", None)):
        return result.to_arviz()
    raise TypeError(
        "to_arviz takes a finished dp.Sampler, a dp.baselines run, a numpyro.infer.MCMC or an "
        f"xarray.DataTree; got {type(result).__name__}"
    )
