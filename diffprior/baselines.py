r"""MCMC baselines on the very same NumPyro model, and a side-by-side comparison of samplers.

The diffusion samplers (:class:`diffprior.Sampler`) never evaluate the prior's density; the
baselines here do, so they need a prior with a ``log_prob``: a
:class:`~diffprior.GaussianMixture` (exact) or a :class:`~diffprior.DiffusionPrior` (through its
probability-flow ODE: a few hundred network calls per density, slow but fine for small ``d``).
A :class:`~diffprior.LatentDiffusionPrior` has no density on the image space and is refused.

- :class:`NUTS`: NumPyro's No-U-Turn sampler (Hoffman & Gelman 2014) on the user's model.
- :class:`TemperedSMC`: BlackJAX's adaptive tempered SMC (Del Moral et al. 2006; the next
  temperature keeps the ESS at ``target_ess``, Jasra et al. 2011) from prior draws to the
  posterior :math:`p(x)\, p(y \mid x)^{\lambda}`, :math:`\lambda: 0 \to 1`, with random-walk
  Metropolis or HMC moves; it also estimates :math:`\log p(y)`.
- :func:`compare` and :func:`plot_compare`: a table (seconds, ESS per second, R-hat, sliced
  Wasserstein to exact draws, log-evidence) and an overlay of marginals for several results.

Examples
--------
>>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
>>> import diffprior as dp
>>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
>>> def model(y=None):
...     x = numpyro.sample("x", prior)
...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
>>> nuts = dp.baselines.NUTS(model, num_warmup=100, num_samples=100, num_chains=2,
...                          progress_bar=False)
>>> nuts.run(jax.random.key(0), y=1.0)
>>> smc = dp.baselines.TemperedSMC(model, num_particles=200, progress_bar=False)
>>> smc.run(jax.random.key(1), y=1.0)
>>> posterior = prior.posterior(jnp.array([[1.0, 0.0]]), 0.5, jnp.array([1.0]))
>>> table = dp.compare({"nuts": nuts, "smc": smc}, reference=posterior)
>>> list(table.index)
['nuts', 'smc']
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import blackjax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.infer
from blackjax.mcmc import random_walk

from diffprior.diagnostics import sliced_wasserstein
from diffprior.infer.sampler import CHAIN_METHODS, ParticleResults, ProgressBar, Sampler, as_key
from diffprior.kernels.smc import resampling_fn as get_resampling_fn
from diffprior.model import (
    ModelError,
    is_diffusion_prior,
    read_model,
    sample_sites_at_zeros,
    unwrap_distribution,
)
from diffprior.priors.gaussian_mixture import GaussianMixture
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "NUTS",
    "TemperedSMC",
    "compare",
    "plot_compare",
    "COMPARE_COLUMNS",
    "DENSE_MAX_DIM",
    "MCMC_KERNELS",
]

#: Inner MCMC moves of :class:`TemperedSMC` and the acceptance rate their scale adapts to
#: (Roberts et al. 1997 for random-walk Metropolis; Beskos et al. 2013 for HMC).
MCMC_KERNELS: dict[str, float] = {"rmh": 0.234, "hmc": 0.65}
#: :class:`TemperedSMC` scales its moves by the dense particle covariance up to this event
#: size (``covariance="auto"``), by the per-coordinate variances above it.
DENSE_MAX_DIM = 200


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _require_log_density(model: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]):
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


# -- NUTS -------------------------------------------------------------------------------------
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
        Wall time of the last :meth:`run`, compilation included (as for
        :attr:`diffprior.Sampler.seconds`, whose first run also compiles).

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
        num_samples = _check_positive_int("num_samples", num_samples)
        num_chains = _check_positive_int("num_chains", num_chains)
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
        sites = _require_log_density(self.model, args, kwargs)
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
        """NUTS estimates no evidence: ``None``, as for diffprior's non-SMC methods."""
        return None

    def to_arviz(self):
        """The run as an ArviZ ``xarray.DataTree`` (``arviz.from_numpyro``), with attributes
        ``method="NUTS"``, its options and ``seconds``."""
        import arviz_base

        self._require_run()
        tree = arviz_base.from_numpyro(self.mcmc)
        _add_attrs(
            tree,
            {
                "method": self.name,
                "method_options": json.dumps(self.options, default=str),
                "num_samples": self.mcmc.num_samples,
                "num_chains": self.num_chains,
                "seconds": _seconds(self.seconds),
            },
        )
        return tree


# -- tempered SMC -----------------------------------------------------------------------------
class _LoopState(NamedTuple):
    """Carry of the tempering ``while_loop`` (leading axis: chains)."""

    step: Array
    rng_key: PRNGKey
    smc_state: Any  # blackjax TemperedSMCState
    log_scale: Array  # log multiplier of the MCMC move's scale
    log_evidence: Array
    num_tempering_steps: Array
    tempering_param: Array  # (max_steps, chains) trace, NaN after a chain finished
    acceptance_rate: Array  # (max_steps, chains)
    ess: Array  # (max_steps, chains) ESS of the new weights, a fraction of num_particles


class TemperedSMC(ParticleResults):
    r"""Adaptive tempered SMC (BlackJAX) on a diffprior model, with :class:`diffprior.Sampler`'s
    interface.

    Particles start as prior draws (``prior.sample``) and move through
    :math:`\pi_\lambda(x) \propto p(x)\, p(y \mid x)^{\lambda}`; each step picks the next
    :math:`\lambda` so that the incremental weights :math:`p(y \mid x)^{\Delta\lambda}` have
    ESS ``target_ess`` (BlackJAX's bisection), resamples, and applies ``num_mcmc_steps``
    moves that leave :math:`\pi_\lambda` invariant (``blackjax.adaptive_tempered_smc``). The
    log-evidence is the sum of the log mean incremental weights,

    .. math::
        \log \hat p(y) = \sum_n \log \frac{1}{N} \sum_i p(y \mid x_i^{(n)})^{\lambda_{n+1} -
        \lambda_n},

    BlackJAX's ``log_likelihood_increment``. The loop runs until :math:`\lambda = 1`, compiled
    as one ``lax.while_loop``; draws are the final particles after one equal-weight
    resampling.

    The moves are scaled between steps by the weighted particle covariance :math:`\Sigma`
    (dense up to :data:`DENSE_MAX_DIM` coordinates, else its diagonal) times a multiplier
    :math:`s` adapted towards a target acceptance rate :math:`a^*` (0.234 for RMH, 0.65 for
    HMC) by :math:`\log s \leftarrow \log s + (\bar a - a^*)`: random-walk steps are
    :math:`N(0, (2.38\, s)^2 \Sigma / d)` (Roberts et al. 1997), HMC uses the inverse mass
    matrix :math:`\Sigma` and step size :math:`s`.

    Parameters
    ----------
    model
        A NumPyro model whose only latent site is a DiffusionPrior with a log density (as read
        by :func:`diffprior.model.read_model`).
    num_particles
        Particles per chain.
    num_mcmc_steps
        MCMC moves per tempering step.
    target_ess
        ESS fraction (in ``(0, 1)``) that sets each temperature increment.
    mcmc
        ``"rmh"`` (random-walk Metropolis) or ``"hmc"``.
    step_size
        Initial multiplier :math:`s` for ``"rmh"`` (default 1) or HMC step size in whitened
        units (default :math:`d^{-1/4}`).
    num_integration_steps
        Leapfrog steps per HMC move.
    adapt_step_size
        Adapt :math:`s` to the acceptance rate (else keep ``step_size``).
    covariance
        ``"dense"``, ``"diag"`` or ``"auto"`` (dense up to :data:`DENSE_MAX_DIM` coordinates):
        the particle covariance that scales the moves.
    num_chains
        Independent particle systems (vmapped).
    resampling
        ``"systematic"``, ``"stratified"``, ``"multinomial"`` or ``"residual"``.
    max_tempering_steps
        Stop (with a warning) after this many steps even if :math:`\lambda < 1`.
    progress_bar
        Show a tqdm bar of :math:`100\,\lambda` (the slowest chain).

    Attributes
    ----------
    seconds
        Wall time of the last :meth:`run`, compilation included on the first run with given
        shapes (as for :attr:`diffprior.Sampler.seconds`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> smc = dp.baselines.TemperedSMC(model, num_particles=500, num_chains=2,
    ...                                progress_bar=False)
    >>> smc.run(jax.random.key(0), y=1.0)
    >>> smc.get_samples()["x"].shape, smc.log_evidence.shape
    ((1000, 2), (2,))
    >>> exact = prior.log_evidence(jnp.array([[1.0, 0.0]]), 0.5, jnp.array([1.0]))
    >>> bool(jnp.all(jnp.abs(smc.log_evidence - exact) < 0.2))
    True
    """

    name = "TemperedSMC"

    def __init__(
        self,
        model: Callable,
        num_particles: int = 1000,
        num_mcmc_steps: int = 10,
        target_ess: float = 0.5,
        mcmc: str = "rmh",
        step_size: float | None = None,
        num_integration_steps: int = 10,
        adapt_step_size: bool = True,
        covariance: str = "auto",
        num_chains: int = 1,
        resampling: str = "systematic",
        max_tempering_steps: int = 500,
        progress_bar: bool = True,
    ):
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model (a callable), got {model!r}")
        self.num_particles = _check_positive_int("num_particles", num_particles)
        self.num_mcmc_steps = _check_positive_int("num_mcmc_steps", num_mcmc_steps)
        self.num_integration_steps = _check_positive_int(
            "num_integration_steps", num_integration_steps
        )
        self.num_chains = _check_positive_int("num_chains", num_chains)
        self.max_tempering_steps = _check_positive_int("max_tempering_steps", max_tempering_steps)
        if not 0.0 < float(target_ess) < 1.0:
            raise ValueError(f"target_ess must be in (0, 1), got {target_ess!r}")
        if mcmc not in MCMC_KERNELS:
            raise ValueError(f"mcmc must be one of {tuple(MCMC_KERNELS)}, got {mcmc!r}")
        if covariance not in ("auto", "dense", "diag"):
            raise ValueError(f"covariance must be 'auto', 'dense' or 'diag', got {covariance!r}")
        if step_size is not None and not float(step_size) > 0:
            raise ValueError(f"step_size must be positive, got {step_size!r}")
        self._resampling_fn = get_resampling_fn(resampling)
        self.model = model
        self.target_ess = float(target_ess)
        self.mcmc = mcmc
        self.step_size = None if step_size is None else float(step_size)
        self.adapt_step_size = bool(adapt_step_size)
        self.covariance = covariance
        self.resampling = resampling
        self.progress_bar = bool(progress_bar)
        self.options = {
            "num_mcmc_steps": self.num_mcmc_steps,
            "target_ess": self.target_ess,
            "mcmc": mcmc,
            "step_size": self.step_size,
            "num_integration_steps": self.num_integration_steps,
            "adapt_step_size": self.adapt_step_size,
            "covariance": covariance,
            "resampling": resampling,
        }
        self._progress = ProgressBar()
        self._compiled = eqx.filter_jit(self._run_impl)
        self._result: dict[str, Any] | None = None
        self._obs = None
        self.seconds: float | None = None

    # -- the compiled run ---------------------------------------------------------------------
    def _move(self, dim: int):
        """The MCMC move: its step and init functions, its parameters as a function of the
        particle covariance and the log multiplier, the initial log multiplier and the target
        acceptance rate."""
        target = MCMC_KERNELS[self.mcmc]
        if self.mcmc == "rmh":
            random_walk_kernel = blackjax.additive_step_random_walk.build_kernel()

            def step_fn(rng_key, state, logdensity_fn, proposal_scale):
                return random_walk_kernel(
                    rng_key, state, logdensity_fn, random_walk.normal(proposal_scale)
                )

            init_fn = blackjax.additive_step_random_walk.init
            initial = 1.0 if self.step_size is None else self.step_size

            def parameters(covariance, log_scale):
                # N(0, c^2 Sigma): a Cholesky factor (dense) or standard deviations (diagonal)
                root = (
                    jnp.linalg.cholesky(covariance)
                    if covariance.ndim == 2
                    else jnp.sqrt(covariance)
                )
                return {"proposal_scale": (jnp.exp(log_scale) * 2.38 / math.sqrt(dim) * root)[None]}
        else:
            hmc_kernel = blackjax.hmc.build_kernel()
            num_integration_steps = self.num_integration_steps

            def step_fn(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix):
                return hmc_kernel(
                    rng_key,
                    state,
                    logdensity_fn,
                    step_size,
                    inverse_mass_matrix,
                    num_integration_steps,
                )

            init_fn = blackjax.hmc.init
            initial = dim**-0.25 if self.step_size is None else self.step_size

            def parameters(covariance, log_scale):
                return {
                    "step_size": jnp.exp(log_scale)[None],
                    "inverse_mass_matrix": covariance[None],
                }

        return step_fn, init_fn, parameters, math.log(initial), target

    def _run_impl(self, rng_key, prior, dynamic_args, static_args):
        args, kwargs = eqx.combine(dynamic_args, static_args)
        obs = read_model(self.model, args, kwargs)
        num_chains, num_particles = self.num_chains, self.num_particles
        event_shape = obs.event_shape
        dim = math.prod(event_shape)
        dense = dim <= DENSE_MAX_DIM if self.covariance == "auto" else self.covariance == "dense"
        step_fn, init_fn, parameters, initial_log_scale, target = self._move(dim)
        kernel = blackjax.adaptive_tempered_smc.build_kernel(
            prior.log_prob,
            obs.log_likelihood,
            step_fn,
            init_fn,
            self._resampling_fn,
            self.target_ess,
        )

        def particle_covariance(particles, weights):
            centred = particles.reshape((num_particles, dim))
            centred = centred - weights @ centred
            variance = weights @ centred**2
            # a collapsed coordinate must not freeze the moves
            jitter = 1e-6 * jnp.mean(variance) + 1e-12
            if not dense:
                return variance + jitter
            return (centred.T * weights) @ centred + jitter * jnp.eye(dim, dtype=centred.dtype)

        def one_step(rng_key, smc_state, log_scale):
            covariance = particle_covariance(smc_state.particles, smc_state.weights)
            new_state, info = kernel(
                rng_key, smc_state, self.num_mcmc_steps, parameters(covariance, log_scale)
            )
            acceptance = jnp.mean(info.update_info.acceptance_rate)
            ess = 1.0 / jnp.sum(new_state.weights**2) / num_particles
            return new_state, info.log_likelihood_increment, acceptance, ess

        init_key, loop_key, final_key = jax.random.split(rng_key, 3)
        x_init = prior.sample(init_key, (num_chains, num_particles))
        smc_state = jax.vmap(blackjax.adaptive_tempered_smc.init)(x_init)
        smc_state = smc_state._replace(tempering_param=jnp.zeros(num_chains, x_init.dtype))
        max_steps = self.max_tempering_steps
        nan_trace = jnp.full((max_steps, num_chains), jnp.nan, x_init.dtype)
        progress = self._progress if self.progress_bar else None

        def cond(loop: _LoopState):
            return (loop.step < max_steps) & jnp.any(loop.smc_state.tempering_param < 1.0)

        def body(loop: _LoopState) -> _LoopState:
            step_key, next_key = jax.random.split(loop.rng_key)
            keys = jax.random.split(step_key, num_chains)
            new_state, increment, acceptance, ess = jax.vmap(one_step)(
                keys, loop.smc_state, loop.log_scale
            )
            active = loop.smc_state.tempering_param < 1.0  # finished chains stay as they are
            smc_state = jax.tree.map(
                lambda new, old: jnp.where(
                    active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old
                ),
                new_state,
                loop.smc_state,
            )
            log_scale = loop.log_scale
            if self.adapt_step_size:
                log_scale = jnp.where(active, log_scale + (acceptance - target), log_scale)
            if progress is not None:
                jax.debug.callback(
                    progress.update,
                    100 * jnp.min(smc_state.tempering_param),
                    ordered=True,
                )
            step = loop.step
            return _LoopState(
                step + 1,
                next_key,
                smc_state,
                log_scale,
                loop.log_evidence + jnp.where(active, increment, 0.0),
                loop.num_tempering_steps + active.astype(jnp.int32),
                loop.tempering_param.at[step].set(
                    jnp.where(active, smc_state.tempering_param, jnp.nan)
                ),
                loop.acceptance_rate.at[step].set(jnp.where(active, acceptance, jnp.nan)),
                loop.ess.at[step].set(jnp.where(active, ess, jnp.nan)),
            )

        loop = jax.lax.while_loop(
            cond,
            body,
            _LoopState(
                jnp.zeros((), jnp.int32),
                loop_key,
                smc_state,
                jnp.full((num_chains,), initial_log_scale, x_init.dtype),
                jnp.zeros((num_chains,), x_init.dtype),
                jnp.zeros((num_chains,), jnp.int32),
                nan_trace,
                nan_trace,
                nan_trace,
            ),
        )

        def final_resample(key, particles, weights):
            return particles[self._resampling_fn(key, weights, num_particles)]

        final = loop.smc_state
        samples = jax.vmap(final_resample)(
            jax.random.split(final_key, num_chains), final.particles, final.weights
        )
        pointwise = jax.vmap(jax.vmap(obs.pointwise_log_likelihood))(samples)
        return {
            "samples": samples,
            "log_weights": jnp.log(final.weights),
            "log_evidence": loop.log_evidence,
            "num_tempering_steps": loop.num_tempering_steps,
            "final_tempering_param": final.tempering_param,
            "per_step": {
                "tempering_param": loop.tempering_param,
                "acceptance_rate": loop.acceptance_rate,
                "ess": loop.ess,
            },
            "pointwise_log_likelihood": pointwise,
        }

    # -- public API ---------------------------------------------------------------------------
    def run(self, rng_key: PRNGKey, *args: Any, **kwargs: Any) -> None:
        """Run tempered SMC; ``args``/``kwargs`` are the model's, as in NumPyro's ``MCMC.run``.

        The model is read and checked first (:func:`~diffprior.model.read_model`, and the
        prior must have a log density). A second call with arrays of the same shapes reuses the
        compiled program.
        """
        rng_key = as_key(rng_key)
        _require_log_density(self.model, args, kwargs)
        obs = read_model(self.model, args, kwargs)
        self._obs = obs
        dynamic, static = eqx.partition((args, kwargs), eqx.is_array)
        if self.progress_bar:
            self._progress.open(100, f"{self.name} ({self.num_chains} chains), 100 lambda")
        start = time.perf_counter()
        try:
            result = jax.block_until_ready(self._compiled(rng_key, obs.prior, dynamic, static))
        finally:
            self._progress.close()
        self.seconds = time.perf_counter() - start
        self._result = result
        if bool(jnp.any(result["final_tempering_param"] < 1.0)):
            warnings.warn(
                f"{self.name}: stopped after max_tempering_steps={self.max_tempering_steps} "
                f"with lambda = {np.asarray(result['final_tempering_param']).tolist()} < 1; "
                "the draws are not from the posterior (raise max_tempering_steps or lower "
                "target_ess)",
                RuntimeWarning,
                stacklevel=2,
            )
        if not bool(jnp.all(jnp.isfinite(result["log_evidence"]))):
            warnings.warn(
                f"{self.name}: the log-evidence is not finite "
                f"({np.asarray(result['log_evidence']).tolist()}); check the likelihood",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def log_evidence(self) -> Array:
        r"""``(num_chains,)`` estimates of :math:`\log p(y)`."""
        return self._require_result()["log_evidence"]

    @property
    def num_tempering_steps(self) -> Array:
        r"""``(num_chains,)`` tempering steps each chain took to reach :math:`\lambda = 1`."""
        return self._require_result()["num_tempering_steps"]

    def to_arviz(self):
        """The run as an ArviZ ``xarray.DataTree``: ``posterior`` (the equal-weight draws),
        ``sample_stats`` (per chain ``log_evidence`` and ``num_tempering_steps``; per draw
        ``log_weight`` before the final resampling; per tempering step ``tempering_param``,
        ``acceptance_rate`` and ``ess``, NaN after a chain finished), ``observed_data`` and
        ``log_likelihood``; attributes ``method="TemperedSMC"``, its options and ``seconds``."""
        import arviz_base
        import xarray as xr

        result = self._require_result()
        obs = self._obs
        site = obs.prior_site
        samples = np.asarray(result["samples"])
        num_steps = int(np.max(np.asarray(result["num_tempering_steps"])))
        tree = arviz_base.from_dict(
            {
                "posterior": {site: samples},
                "observed_data": {k: np.asarray(v) for k, v in obs.observed.items()},
                "log_likelihood": {
                    k: np.asarray(v) for k, v in result["pointwise_log_likelihood"].items()
                },
            },
            dims={site: [f"{site}_dim_{i}" for i in range(samples.ndim - 2)]},
        )
        stats = {
            "log_weight": (("chain", "draw"), np.asarray(result["log_weights"])),
            "log_evidence": (("chain",), np.asarray(result["log_evidence"])),
            "num_tempering_steps": (("chain",), np.asarray(result["num_tempering_steps"])),
        }
        for name, value in result["per_step"].items():
            stats[name] = (("chain", "step"), np.asarray(value)[:num_steps].T)
        tree["sample_stats"] = xr.DataTree(
            xr.Dataset(
                {name: xr.Variable(*dims_value) for name, dims_value in stats.items()},
                coords={
                    "chain": np.arange(samples.shape[0]),
                    "draw": np.arange(samples.shape[1]),
                    "step": np.arange(num_steps),
                },
            )
        )
        _add_attrs(
            tree,
            {
                "method": self.name,
                "method_options": json.dumps(self.options, default=str),
                "num_particles": self.num_particles,
                "num_chains": self.num_chains,
                "seconds": _seconds(self.seconds),
            },
        )
        return tree


def _seconds(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _add_attrs(tree, attrs: dict[str, Any]) -> None:
    import diffprior

    attrs = {**attrs, "diffprior_version": diffprior.__version__}
    tree.attrs.update(attrs)
    for group in tree.children.values():
        group.attrs.update(attrs)


# -- comparison -------------------------------------------------------------------------------
#: Columns of :func:`compare`, in order.
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
        return result.to_arviz(), _seconds(result.seconds)
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

    Columns (:data:`COMPARE_COLUMNS`):

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
        Name to result: a run :class:`diffprior.Sampler`, :class:`NUTS` or
        :class:`TemperedSMC`, a run :class:`numpyro.infer.MCMC`, or an ``xarray.DataTree``.
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
