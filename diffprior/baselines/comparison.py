r"""Side-by-side comparison of samplers on one model: :func:`diffprior.baselines.compare` (a
table: cost, mixing and accuracy against exact draws) and
:func:`diffprior.baselines.plot_compare` (overlaid marginals), ``dp.compare`` and
``dp.plot_compare``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.infer

from diffprior.baselines._common import seconds_or_nan
from diffprior.baselines.nuts import NUTS
from diffprior.baselines.tempered import TemperedSMC
from diffprior.diagnostics import sliced_wasserstein
from diffprior.infer.sampler import Sampler
from diffprior.priors.gaussian_mixture import GaussianMixture
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["compare", "plot_compare", "COMPARE_COLUMNS"]

#: Columns of :func:`~diffprior.baselines.compare`, in order.
COMPARE_COLUMNS = (
    "seconds",
    "num_chains",
    "num_draws",
    "ess_bulk",
    "ess_bulk_per_second",
    "r_hat",
    "sliced_wasserstein",
    "sw_floor",
    "log_evidence",
)


def _as_datatree(name: str, result: Any):
    """A result as ``(DataTree, seconds)``."""
    import xarray as xr

    if isinstance(result, Sampler | NUTS | TemperedSMC):
        return result.to_arviz(), seconds_or_nan(result.seconds)
    if isinstance(result, numpyro.infer.MCMC):
        import arviz_base

        return arviz_base.from_numpyro(result), float("nan")
    if isinstance(result, xr.DataTree):
        return result, float(result.attrs.get("seconds", float("nan")))
    raise TypeError(
        f"results[{name!r}]: cannot compare a {type(result).__name__}; expected a run "
        "dp.Sampler, dp.baselines.NUTS or dp.baselines.TemperedSMC, a numpyro.infer.MCMC, or "
        "an xarray.DataTree with a posterior group"
    )


def _posterior_draws(name: str, tree, var_name: str):
    """The ``(chain, draw, ...)`` DataArray of ``var_name`` in the tree's posterior."""
    if "posterior" not in tree.children:
        raise ValueError(f"results[{name!r}]: the DataTree has no posterior group")
    posterior = tree["posterior"].dataset
    if var_name not in posterior:
        raise ValueError(
            f"results[{name!r}]: the posterior has no variable {var_name!r} (it has "
            f"{sorted(posterior.data_vars)}); pass var_name="
        )
    return posterior[var_name]


def _reference_draws(reference: Any, key: PRNGKey | None = None, num: int = 0) -> Array:
    """Exact draws ``(num, *event)`` of a GaussianMixture reference, or the given draws."""
    if isinstance(reference, GaussianMixture):
        return reference.sample(key, (num,))
    draws = jnp.asarray(reference)
    if draws.ndim < 2:
        raise ValueError(
            "reference must be a dp.GaussianMixture or an array of draws (n, *event), got "
            f"shape {draws.shape}"
        )
    return draws


def compare(
    results: Mapping[str, Any],
    reference: GaussianMixture | ArrayLike | None = None,
    *,
    var_name: str = "x",
    seed: int = 0,
):
    r"""One row per method: cost, mixing and accuracy of posterior draws of ``var_name``.

    Columns (:data:`~diffprior.baselines.comparison.COMPARE_COLUMNS`):

    - ``seconds``: the run's wall time (NaN when unknown: a raw ``MCMC``, a DataTree without a
      ``seconds`` attribute);
    - ``num_chains``, ``num_draws`` (per chain);
    - ``ess_bulk``: ArviZ's rank-normalised bulk ESS (Vehtari et al. 2021), the smallest over
      the coordinates of ``var_name``, and ``ess_bulk_per_second``. The draws of SMC and
      diffusion samplers (one chain of equal-weight resampled particles per chain) go in as
      they are: ArviZ reads them as a chain, so duplicated particles next to each other count
      as autocorrelation, but a particle system that collapsed to a few ancestors earlier in
      the run is not seen, so for SMC read this column with the sliced Wasserstein one;
    - ``r_hat``: ArviZ's rank-normalised split R-hat, the largest over coordinates, where there
      are at least 2 chains (NaN otherwise);
    - ``sliced_wasserstein``: :func:`~diffprior.diagnostics.sliced_wasserstein` (1000
      projections) between all the method's draws and ``reference`` (NaN without one). A
      :class:`~diffprior.GaussianMixture` reference gives as many exact draws as the method
      has, and ``sw_floor`` is the distance between two such exact sets: what a perfect
      sampler scores (the distance of finite samples is biased upwards, less with more
      draws, so compare methods by ``sliced_wasserstein / sw_floor``; NaN for an array
      reference);
    - ``log_evidence``: the mean over chains of the :math:`\log p(y)` estimates, NaN where a
      method has none.

    Parameters
    ----------
    results
        Name to result: a run :class:`diffprior.Sampler`, :class:`~diffprior.baselines.NUTS` or
        :class:`~diffprior.baselines.TemperedSMC`, a run :class:`numpyro.infer.MCMC`, or an ``xarray.DataTree``.
    reference
        Exact posterior (a :class:`~diffprior.GaussianMixture`) or draws ``(n, *event)``.
    var_name
        The variable compared (the DiffusionPrior site).
    seed
        Seed of the exact draws and of the projections (the same for every row).

    Returns
    -------
    pandas.DataFrame
        Indexed by the names of ``results``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, arviz_base
    >>> import diffprior as dp
    >>> gmm = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> draws = gmm.sample(jax.random.key(1), (2, 500))  # 2 chains of exact draws
    >>> exact = arviz_base.from_dict({"posterior": {"x": draws}})
    >>> too_wide = arviz_base.from_dict({"posterior": {"x": 3.0 * draws}})
    >>> table = dp.compare({"exact": exact, "too wide": too_wide}, reference=gmm)
    >>> list(table.columns)  # doctest: +NORMALIZE_WHITESPACE
    ['seconds', 'num_chains', 'num_draws', 'ess_bulk', 'ess_bulk_per_second', 'r_hat',
     'sliced_wasserstein', 'sw_floor', 'log_evidence']
    >>> ratio = table["sliced_wasserstein"] / table["sw_floor"]
    >>> bool(ratio["exact"] < 3 < ratio["too wide"])
    True
    """
    import arviz_stats
    import pandas as pd

    if not isinstance(results, Mapping) or not results:
        raise TypeError("results must be a non-empty dict {name: result}")
    key_reference, key_floor, key_projections = jax.random.split(jax.random.key(seed), 3)
    exact_sets: dict[int, tuple[Array, float]] = {}  # by number of draws

    def exact_draws(num_draws: int) -> tuple[Array, float]:
        if isinstance(reference, GaussianMixture):
            if num_draws not in exact_sets:
                exact = reference.sample(key_reference, (num_draws,))
                other = reference.sample(key_floor, (num_draws,))
                floor = float(sliced_wasserstein(key_projections, exact, other))
                exact_sets[num_draws] = (exact, floor)
            return exact_sets[num_draws]
        return _reference_draws(reference), np.nan

    rows = {}
    for name, result in results.items():
        tree, seconds = _as_datatree(name, result)
        draws = _posterior_draws(name, tree, var_name)
        num_chains, num_draws = draws.sizes["chain"], draws.sizes["draw"]
        ess_bulk = float(np.min(np.asarray(arviz_stats.ess(draws, method="bulk"))))
        r_hat = np.nan
        if num_chains >= 2:
            r_hat = float(np.max(np.asarray(arviz_stats.rhat(draws))))
        distance, floor = np.nan, np.nan
        if reference is not None:
            values = np.asarray(draws.transpose("chain", "draw", ...).values)
            flat = values.reshape((num_chains * num_draws, *values.shape[2:]))
            exact, floor = exact_draws(len(flat))
            if flat.shape[1:] != tuple(exact.shape[1:]):
                raise ValueError(
                    f"results[{name!r}]: draws of {var_name!r} have event shape "
                    f"{flat.shape[1:]}, but the reference has {tuple(exact.shape[1:])}"
                )
            distance = float(sliced_wasserstein(key_projections, flat, exact))
        log_evidence = np.nan
        if "sample_stats" in tree.children and "log_evidence" in tree["sample_stats"].dataset:
            log_evidence = float(np.mean(tree["sample_stats"].dataset["log_evidence"].values))
        rows[name] = {
            "seconds": seconds,
            "num_chains": int(num_chains),
            "num_draws": int(num_draws),
            "ess_bulk": ess_bulk,
            "ess_bulk_per_second": ess_bulk / seconds if seconds > 0 else np.nan,
            "r_hat": r_hat,
            "sliced_wasserstein": distance,
            "sw_floor": floor,
            "log_evidence": log_evidence,
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(COMPARE_COLUMNS))


def plot_compare(
    results: Mapping[str, Any],
    reference: GaussianMixture | ArrayLike | None = None,
    *,
    var_name: str = "x",
    coords: Mapping[str, Any] | None = None,
    num_reference: int = 4000,
    seed: int = 0,
):
    """Overlay the marginal densities of ``var_name`` from several results (and exact draws).

    One panel per coordinate, one colour per result (``arviz_plots.plot_dist`` on a dict of
    DataTrees, KDEs), plus ``"reference"`` when a reference is given (as in :func:`compare`).
    Every source's draws are pooled over chains and subsampled (seeded, without replacement)
    to the smallest source's number of draws.

    Parameters
    ----------
    results
        As for :func:`compare`.
    reference
        Optional exact posterior or draws, drawn as an extra source named ``"reference"``.
    var_name
        The variable plotted.
    coords
        Which coordinates to show, e.g. ``{"x_dim_0": [0, 5]}``; default the first 4 entries
        of the first event dimension (and entry 0 of any other).
    num_reference, seed
        As for :func:`compare`.

    Returns
    -------
    arviz_plots.PlotCollection
        Its ``viz["figure"]`` holds the matplotlib figure.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import jax, jax.numpy as jnp, arviz_base
    >>> import diffprior as dp
    >>> gmm = dp.GaussianMixture(jnp.zeros((1, 3)), jnp.ones(1))
    >>> draws = gmm.sample(jax.random.key(0), (1, 200))
    >>> tree = arviz_base.from_dict({"posterior": {"x": draws}})
    >>> pc = dp.plot_compare({"draws": tree}, reference=gmm)
    >>> type(pc).__name__
    'PlotCollection'
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(
            "plot_compare needs matplotlib, which diffprior does not install by default: "
            "pip install matplotlib (or diffprior[dev])"
        )
    import arviz_base
    import arviz_plots

    if not isinstance(results, Mapping) or not results:
        raise TypeError("results must be a non-empty dict {name: result}")
    sources = {}
    for name, result in results.items():
        tree, _ = _as_datatree(name, result)
        draws = _posterior_draws(name, tree, var_name).transpose("chain", "draw", ...)
        sources[name] = np.asarray(draws.values).reshape((-1, *draws.shape[2:]))
    if reference is not None:
        exact = _reference_draws(reference, jax.random.key(seed), num_reference)
        sources["reference"] = np.asarray(exact)
    # the same number of draws from each source (a seeded subsample), so that the sources line
    # up along ArviZ's "model" dimension without NaN padding
    shapes = {name: draws.shape[1:] for name, draws in sources.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the draws of {var_name!r} have different event shapes: {shapes}")
    num_draws = min(len(draws) for draws in sources.values())
    rng = np.random.default_rng(seed)
    trees = {
        name: arviz_base.from_dict(
            {"posterior": {var_name: draws[rng.permutation(len(draws))[:num_draws]][None]}}
        )
        for name, draws in sources.items()
    }
    if coords is None:
        tree = next(iter(trees.values()))
        sizes = tree["posterior"].dataset[var_name].sizes
        event_dims = [dim for dim in sizes if dim not in ("chain", "draw")]
        coords = {dim: [0] for dim in event_dims[1:]}
        if event_dims:
            coords[event_dims[0]] = list(range(min(4, sizes[event_dims[0]])))
    plot_collection = arviz_plots.plot_dist(
        trees,
        var_names=[var_name],
        coords=dict(coords),
        kind="kde",
        backend="matplotlib",
        visuals={
            "credible_interval": False,
            "point_estimate": False,
            "point_estimate_text": False,
        },
    )
    plot_collection.add_legend("model")
    return plot_collection
