r"""NumPyro's No-U-Turn sampler (Hoffman & Gelman 2014) on a diffprior model, with
:class:`diffprior.Sampler`'s interface (``run``, ``get_samples``, ``log_evidence``,
``to_arviz``, ``seconds``): :class:`diffprior.baselines.NUTS`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpyro.infer

from diffprior.baselines._common import check_positive_int, require_log_density, seconds_or_nan
from diffprior.infer.sampler import CHAIN_METHODS, as_key
from diffprior.model import is_diffusion_prior, read_model
from diffprior.types import Array, PRNGKey

__all__ = ["NUTS"]


class NUTS:
    r"""NumPyro's No-U-Turn sampler on a diffprior model, with :class:`diffprior.Sampler`'s
    interface.

    The potential is :math:`-\log p(x) - \log p(y \mid x)` as NumPyro computes it from the
    model: the prior's exact ``log_prob`` for a :class:`~diffprior.GaussianMixture`, the
    probability-flow ODE for a :class:`~diffprior.DiffusionPrior` (differentiated through the
    ODE solver: slow, for small event sizes). Other latent sites of the model are sampled too.
    Step size and a diagonal mass matrix are adapted during warmup (NumPyro's defaults).

    Parameters
    ----------
    model
        A NumPyro model, ``x = numpyro.sample("x", prior)`` plus observed sites.
    num_warmup, num_samples, num_chains, chain_method, progress_bar
        As for :class:`numpyro.infer.MCMC` (``chain_method`` in ``"vectorized"``,
        ``"sequential"``, ``"parallel"``).
    **nuts_kwargs
        Passed to :class:`numpyro.infer.NUTS` (``target_accept_prob``, ``max_tree_depth``,
        ``init_strategy``, ...).

    Attributes
    ----------
    mcmc
        The underlying :class:`numpyro.infer.MCMC`.
    seconds
        Wall time of the last :meth:`run`, compilation included (as for ``seconds`` of
        :class:`diffprior.Sampler`, whose first run also compiles).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> nuts = dp.baselines.NUTS(model, num_warmup=100, num_samples=50, num_chains=2,
    ...                          progress_bar=False)
    >>> nuts.run(jax.random.key(0), y=1.0)
    >>> nuts.get_samples()["x"].shape, nuts.get_samples(group_by_chain=True)["x"].shape
    ((100, 2), (2, 50, 2))
    """

    name = "NUTS"

    def __init__(
        self,
        model: Callable,
        num_warmup: int = 500,
        num_samples: int = 1000,
        num_chains: int = 4,
        chain_method: str = "vectorized",
        progress_bar: bool = True,
        **nuts_kwargs: Any,
    ):
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model (a callable), got {model!r}")
        if isinstance(num_warmup, bool) or not isinstance(num_warmup, int) or num_warmup < 0:
            raise ValueError(f"num_warmup must be a non-negative integer, got {num_warmup!r}")
        num_samples = check_positive_int("num_samples", num_samples)
        num_chains = check_positive_int("num_chains", num_chains)
        if chain_method not in CHAIN_METHODS:
            raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
        self.model = model
        self.options = {"num_warmup": num_warmup, **nuts_kwargs}
        self.num_chains = num_chains
        self.mcmc = numpyro.infer.MCMC(
            numpyro.infer.NUTS(model, **nuts_kwargs),
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            chain_method=chain_method,
            progress_bar=progress_bar,
        )
        self.seconds: float | None = None
        self._has_run = False

    def run(self, rng_key: PRNGKey, *args: Any, **kwargs: Any) -> None:
        """Run warmup and sampling; ``args``/``kwargs`` are the model's, as in ``MCMC.run``.

        The model is checked first: a prior site without a log density is refused, and a model
        that :class:`diffprior.Sampler` could sample gets the same checks as there (observed
        shapes, NaN in the data, ...).
        """
        rng_key = as_key(rng_key)
        sites = require_log_density(self.model, args, kwargs)
        latent = [s for s in sites if not s["is_observed"]]
        if latent and all(is_diffusion_prior(s["fn"]) for s in latent):
            read_model(self.model, args, kwargs)  # its clear errors, before any sampling
        start = time.perf_counter()
        self.mcmc.run(rng_key, *args, **kwargs)
        jax.block_until_ready(self.mcmc.get_samples())
        self.seconds = time.perf_counter() - start
        self._has_run = True

    def _require_run(self) -> None:
        if not self._has_run:
            raise RuntimeError("call run(rng_key, *model_args) before reading results")

    def get_samples(self, group_by_chain: bool = False) -> dict[str, Array]:
        """Posterior draws of every latent site, ``{site: (num_chains * num_samples, ...)}``,
        or ``(num_chains, num_samples, ...)`` with ``group_by_chain=True``."""
        self._require_run()
        return self.mcmc.get_samples(group_by_chain=group_by_chain)

    @property
    def log_evidence(self) -> None:
        """Always ``None`` (NUTS estimates no evidence, as for diffprior's non-SMC methods)."""
        return None

    def to_arviz(self):
        """The run as an ArviZ ``xarray.DataTree`` (``arviz.from_numpyro``), with attributes
        ``method="NUTS"``, its options, ``num_samples``, ``num_chains``, ``seconds`` and the
        diffprior version on the tree and on each group."""
        import arviz_base

        import diffprior

        self._require_run()
        tree = arviz_base.from_numpyro(self.mcmc)
        attrs = {
            "method": self.name,
            "method_options": json.dumps(self.options, default=str),
            "num_samples": self.mcmc.num_samples,
            "num_chains": self.num_chains,
            "seconds": seconds_or_nan(self.seconds),
            "diffprior_version": diffprior.__version__,
        }
        tree.attrs.update(attrs)
        for group in tree.children.values():
            group.attrs.update(attrs)
        return tree
