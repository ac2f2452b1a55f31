"""What the baselines share: argument checks and the refusal of a prior without a density."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from diffprior.model import (
    ModelError,
    is_diffusion_prior,
    sample_sites_at_zeros,
    unwrap_distribution,
)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int``, or a ValueError naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def seconds_or_nan(value: float | None) -> float:
    """A run's wall time, NaN before the first run."""
    return float("nan") if value is None else float(value)


def require_log_density(
    model: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Refuse, before any sampling, a model whose DiffusionPrior site has no ``log_prob``.

    The model is traced once with zeros at every DiffusionPrior site (no diffusion is run) and
    each such site's ``log_prob`` is traced abstractly (``jax.eval_shape``: nothing is
    computed), which is where a :class:`~diffprior.LatentDiffusionPrior` raises.
    Returns the trace's sample sites.
    """
    sites = sample_sites_at_zeros(model, args, kwargs)
    for site in sites:
        if site["is_observed"] or not is_diffusion_prior(site["fn"]):
            continue
        try:
            jax.eval_shape(site["fn"].log_prob, site["value"])
        except NotImplementedError as err:
            prior = type(unwrap_distribution(site["fn"])).__name__
            raise ModelError(
                f"site {site['name']!r}: its prior ({prior}) has no log density, which MCMC "
                "baselines need (NUTS and tempered SMC evaluate log p(x)); sample this "
                "posterior with dp.Sampler (e.g. "
                "dp.Sampler(dp.TDS(model), ...)), which never evaluates the prior's density"
            ) from err
    return sites
