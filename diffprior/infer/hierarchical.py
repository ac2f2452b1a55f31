r"""Hierarchical models: latent sites :math:`\theta` (noise levels, gains, degrees of freedom,
...) sampled together with the DiffusionPrior site :math:`x`.

A hierarchical model in diffprior's sense is

.. math::
    p(\theta, x, y) = p(\theta)\, p(x)\, p(y \mid x, \theta),

where :math:`p(x)` is the (discretised) diffusion prior, which must not depend on
:math:`\theta`, and :math:`p(\theta)` any NumPyro prior on continuous sites that does not
depend on :math:`x`::

    def model(y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(A @ x, sigma).to_event(1), obs=y)

:func:`read_hierarchical_model` reads such a model into a :class:`HierarchicalModel` whose
methods are pure JAX functions of ``(x, theta)``. Two NumPyro MCMC kernels sample it:

- :class:`PMMH`, particle marginal Metropolis-Hastings (Andrieu, Doucet & Holenstein 2010): a
  Gaussian random walk on the unconstrained :math:`\theta` whose likelihood is the SMC
  estimate :math:`\hat p(y \mid \theta)` of TDS or MCGdiff;
- :class:`ParticleGibbs`, particle Gibbs with ancestor sampling (Lindsten, Jordan & Schön
  2014): NUTS (or any NumPyro kernel) on :math:`\theta \mid x`, then the conditional twisted
  SMC of :mod:`diffprior.kernels.csmc` on :math:`x \mid \theta` (with TDS's subspace
  proposal for a linear Gaussian likelihood, its guided one otherwise), then marginal
  Metropolis-Hastings moves of :math:`(\theta, x)` together on particle MCMC's extended
  target, which free :math:`\theta` where it and ``x`` pin each other.

Both target :math:`p(\theta, x \mid y)` exactly for any number of particles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.hmc import NUTS
from numpyro.infer.hmc_util import build_adaptation_schedule, welford_covariance
from numpyro.infer.mcmc import MCMCKernel
from numpyro.infer.util import (
    compute_log_probs,
    constrain_fn,
    potential_energy,
    unconstrain_fn,
)
from numpyro.ops.provenance import eval_provenance
from numpyro.util import is_prng_key

from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.infer.methods import (
    TDS,
    TDS_PROPOSALS,
    MCGdiff,
    Method,
    _check_subspace_options,
    _subspace_setup,
    _use_subspace,
)
from diffprior.kernels import csmc, mcgdiff
from diffprior.model import (
    ModelError,
    ObservationModel,
    check_missing_unused,
    hide_unobserved,
    is_diffusion_prior,
    missing_sites,
    model_arguments,
    reading_obs_mask,
    unwrap_distribution,
)
from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.types import Array

__all__ = [
    "ThetaSite",
    "HierarchicalModel",
    "read_hierarchical_model",
    "PMMH",
    "PMMHState",
    "ParticleGibbs",
    "ParticleGibbsState",
    "PMMH_METHODS",
    "X_KWARG",
]


class ThetaSite(NamedTuple):
    """A latent site besides the DiffusionPrior site.

    name
        The site's name.
    shape
        Shape of its (constrained) value.
    unconstrained_shape
        Shape of its value in unconstrained space, where NumPyro's
        ``biject_to(site["fn"].support)`` maps it from (differs for e.g. a simplex).
    """

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]


def _is_factor(site: Mapping[str, Any]) -> bool:
    return isinstance(unwrap_distribution(site["fn"]), dist.distribution.Unit)


def _feasible_value(fn: dist.Distribution) -> Array:
    """A point of the site's support, the image of zero in unconstrained space (nothing is
    drawn, so reading a model needs no random key); a discrete site gets zeros here and is
    refused afterwards."""
    if fn.support.is_discrete:
        return jnp.zeros(fn.shape(), jnp.result_type(int))
    transform = biject_to(fn.support)
    shape = tuple(fn.shape())
    return transform(jnp.zeros(transform.inverse_shape(shape), jnp.result_type(float)))


class HierarchicalModel:
    r"""A NumPyro model with one DiffusionPrior site ``x`` and latent sites :math:`\theta`.

    Build it with :func:`read_hierarchical_model`. Every method is a pure JAX function
    (jit-able, vmap-able, differentiable) of ``x`` (the prior's event shape) and ``theta``
    (a dict site name -> value, constrained unless the method says otherwise).

    Attributes
    ----------
    prior_site, prior, event_shape
        The DiffusionPrior site, its distribution and the shape of one ``x``.
    theta_sites
        Site name -> :class:`ThetaSite`, in the model's order.
    observed
        Observed site name -> observed value (``numpyro.factor`` terms are not listed here but
        count in :meth:`log_likelihood`).
    likelihood_sites
        Every observed site and factor term: :meth:`log_likelihood` is their sum.
    missing
        The latent site of each ``obs_mask=`` site's missing entries -> its observed site
        (:attr:`diffprior.model.ObservationModel.missing`): no theta site; the kernels draw it
        from the likelihood given ``(x, theta)`` (:meth:`sample_unobserved`).
    """

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: dict,
        prior_site: str,
        prior: DiffusionPrior,
        theta_sites: dict[str, ThetaSite],
        observed: dict[str, Array],
        likelihood_sites: Sequence[str],
        missing: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.prior_site = prior_site
        self.prior = prior
        self.event_shape = tuple(prior.event_shape)
        self.theta_sites = dict(theta_sites)
        self.observed = dict(observed)
        self.likelihood_sites = tuple(likelihood_sites)
        self.missing = dict(missing or {})

    def __repr__(self) -> str:
        theta = ", ".join(f"{s.name}{s.shape}" for s in self.theta_sites.values())
        return (
            f"HierarchicalModel(prior_site={self.prior_site!r}, event_shape={self.event_shape}, "
            f"theta=[{theta}], observed={list(self.observed)})"
        )

    # -- transforms and the prior of theta ---------------------------------------------------
    def _theta_only(self) -> Callable:
        """The model with the DiffusionPrior site (at zeros) and the likelihood hidden: a
        NumPyro model of the theta sites alone, for NumPyro's own transforms."""
        x = jnp.zeros(self.event_shape, jnp.result_type(float))
        model = handlers.substitute(_hiding_missing(self.model), data={self.prior_site: x})
        return handlers.block(model, hide=[self.prior_site, *self.likelihood_sites])

    def constrain(self, unconstrained: Mapping[str, Array]) -> dict[str, Array]:
        """Unconstrained values -> values on each site's support (NumPyro's
        :func:`~numpyro.infer.util.constrain_fn`, so supports that depend on other sites work)."""
        values = constrain_fn(self._theta_only(), self.args, self.kwargs, dict(unconstrained))
        return {name: values[name] for name in self.theta_sites}

    def unconstrain(self, theta: Mapping[str, Array]) -> dict[str, Array]:
        """Values on each site's support -> unconstrained values."""
        values = unconstrain_fn(self._theta_only(), self.args, self.kwargs, dict(theta))
        return {name: values[name] for name in self.theta_sites}

    def _log_probs(
        self,
        x: Array,
        theta: Mapping[str, Array],
        hide: Sequence[str],
        missing: Mapping[str, Array] | None = None,
    ) -> dict:
        data = {**theta, self.prior_site: x}
        model = _hiding_missing(self.model, missing)
        model = handlers.block(handlers.substitute(model, data=data), hide=list(hide))
        log_probs, _ = compute_log_probs(model, self.args, self.kwargs, params={})
        return log_probs

    def log_prior(self, theta: Mapping[str, Array]) -> Array:
        r""":math:`\log p(\theta)`, the sum of the theta sites' log-densities (with any
        ``numpyro.handlers.scale``)."""
        x = jnp.zeros(self.event_shape, jnp.result_type(float))
        log_probs = self._log_probs(x, theta, [self.prior_site, *self.likelihood_sites])
        return sum(
            (log_probs[name] for name in self.theta_sites),
            start=jnp.zeros((), jnp.result_type(float)),
        )

    def log_prior_unconstrained(self, unconstrained: Mapping[str, Array]) -> Array:
        r""":math:`\log p(\theta) + \log \lvert \det J \rvert` at :math:`\theta = T(u)`:
        the prior density of the unconstrained values :math:`u` (minus NumPyro's
        :func:`~numpyro.infer.util.potential_energy` of the theta sites)."""
        return -potential_energy(self._theta_only(), self.args, self.kwargs, dict(unconstrained))

    def log_likelihood(self, x: Array, theta: Mapping[str, Array]) -> Array:
        r""":math:`\log p(y \mid x, \theta)`, the sum over :attr:`likelihood_sites`."""
        return self.observation_model(theta).log_likelihood(x)

    def observation_model(self, theta: Mapping[str, Array]) -> ObservationModel:
        r"""The likelihood given :math:`\theta` as an
        :class:`~diffprior.model.ObservationModel` of ``x``, what the samplers of
        :class:`~diffprior.Sampler` (TDS, MCGdiff, ...) take; ``theta`` may be traced."""
        return ObservationModel(
            handlers.substitute(self.model, data=dict(theta)),
            self.args,
            self.kwargs,
            self.prior_site,
            self.prior,
            self.observed,
            likelihood_sites=self.likelihood_sites,
            missing=self.missing,
        )

    def sample_unobserved(self, rng_key: Array, x: Array, theta: Mapping[str, Array]) -> dict:
        r"""A draw of the missing entries of every ``obs_mask=`` site from the likelihood
        :math:`p(y \mid x, \theta)`, their posterior given ``(x, theta)``; ``{}`` without
        ``obs_mask``."""
        return self.observation_model(theta).sample_unobserved(rng_key, x)

    def theta_model(self, x_kwarg: str, model: Callable | None = None) -> Callable:
        r"""The model as a NumPyro model of :math:`\theta` alone: it takes ``x`` through the
        keyword ``x_kwarg``, substitutes it and hides the DiffusionPrior site, so that
        NumPyro's kernels see :math:`p(\theta)\, p(y \mid x, \theta)` and never evaluate the
        prior's ``log_prob``. ``model`` replaces the model read (a wrapped copy of it)."""
        model = _hiding_missing(self.model if model is None else model)
        prior_site = self.prior_site

        def theta_model(*args, **kwargs):
            x = kwargs.pop(x_kwarg)
            conditioned = handlers.substitute(model, data={prior_site: x})
            return handlers.block(conditioned, hide=[prior_site])(*args, **kwargs)

        return theta_model


def _hiding_missing(model: Callable, values: Mapping[str, Array] | None = None) -> Callable:
    """``model`` with the missing entries of its ``obs_mask=`` sites fixed at ``values``
    (default: placeholders) and hidden (:class:`~diffprior.model.hide_unobserved`): a model of
    theta, ``x`` and the observations only."""
    return reading_obs_mask(hide_unobserved(model, values))


def _trace_at(
    model: Callable, args: tuple, kwargs: dict, data: Mapping[str, Array] | None = None
) -> dict[str, Any]:
    """The model's trace with zeros at the DiffusionPrior site, ``data`` at the sites it names
    and a feasible point at any other latent site (nothing is drawn)."""
    data = dict(data or {})

    def value_at(msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return None
        if msg["name"] in data:
            return data[msg["name"]]
        if is_diffusion_prior(msg["fn"]):
            return jnp.zeros(msg["fn"].shape(), jnp.result_type(float))
        return _feasible_value(msg["fn"])

    model = handlers.substitute(reading_obs_mask(model), substitute_fn=value_at)
    return handlers.trace(model).get_trace(*args, **kwargs)


def read_hierarchical_model(
    model: Callable, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> HierarchicalModel:
    r"""Check a NumPyro model with latent sites besides its DiffusionPrior site and return its
    :class:`HierarchicalModel`.

    The model is traced with zeros at the DiffusionPrior site and, at every other latent site,
    the point of its support that NumPyro's transform maps zero to (nothing is drawn). It is
    rejected with a :class:`~diffprior.model.ModelError` naming the site when:

    - it has no DiffusionPrior site, or more than one, or the DiffusionPrior site is observed;
    - it has no other latent site (use :class:`diffprior.Sampler` with a method instead);
    - a latent site is discrete (NumPyro's gradient and random-walk kernels need continuous
      sites: marginalise it out);
    - the DiffusionPrior site's distribution depends on :math:`\theta` (the samplers use the
      prior's reverse diffusion, which must be the same for every :math:`\theta`), or a
      :math:`\theta` site's distribution depends on ``x``;
    - no observed site (or ``numpyro.factor``) depends on ``x``.

    The missing entries of an ``obs_mask=`` site (``y_unobserved``) are no theta site: their
    posterior given ``(x, theta)`` is the likelihood, and the kernels draw them from it
    (:attr:`HierarchicalModel.missing`).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> def model(y=None):
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)
    >>> hm = read_hierarchical_model(model, kwargs={"y": jnp.array([0.5, -0.5])})
    >>> list(hm.theta_sites), hm.theta_sites["sigma"].shape
    (['sigma'], ())
    >>> round(float(hm.log_likelihood(jnp.zeros(2), {"sigma": 1.0})), 4)  # 2 log N(0.5; 0, 1)
    -2.0879
    """
    args, kwargs = model_arguments(tuple(args), dict(kwargs or {}))
    if not callable(model):
        raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}")
    trace = _trace_at(model, args, kwargs)
    sample_sites = [site for site in trace.values() if site["type"] == "sample"]
    prior_sites = [site for site in sample_sites if is_diffusion_prior(site["fn"])]
    if len(prior_sites) != 1:
        found = ", ".join(repr(site["name"]) for site in prior_sites) or "none"
        raise ModelError(
            "a hierarchical model needs exactly one DiffusionPrior sample site, x = "
            f"numpyro.sample('x', prior), with prior a diffprior.DiffusionPrior; found {found}"
        )
    prior_site = prior_sites[0]
    name = prior_site["name"]
    if prior_site["is_observed"]:
        raise ModelError(
            f"site {name!r}: the DiffusionPrior site is observed (obs=...), but it must be the "
            "latent to sample"
        )
    prior = unwrap_distribution(prior_site["fn"])
    if tuple(prior_site["fn"].shape()) != tuple(prior.event_shape):
        raise ModelError(
            f"site {name!r}: the DiffusionPrior site has shape {tuple(prior_site['fn'].shape())}, "
            f"but the prior's event shape is {tuple(prior.event_shape)}; put it outside any "
            "plate and do not expand it"
        )

    # the missing entries of obs_mask= sites: drawn given (x, theta), never theta sites
    missing = missing_sites(sample_sites)
    theta_sites = {}
    for site in sample_sites:
        if site is prior_site or site["is_observed"] or site["name"] in missing:
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ModelError(
                f"site {site['name']!r}: a discrete latent site ({type(fn).__name__}) cannot be "
                "sampled by ParticleGibbs or PMMH, which move continuous sites; marginalise it "
                "out (e.g. a mixture distribution) or fix it with numpyro.handlers.condition"
            )
        transform = biject_to(fn.support)
        shape = tuple(fn.shape())
        theta_sites[site["name"]] = ThetaSite(
            site["name"], shape, tuple(transform.inverse_shape(shape))
        )
    if not theta_sites:
        raise ModelError(
            f"the model has no latent site besides the DiffusionPrior site {name!r}; sample it "
            "with dp.Sampler(dp.TDS(model), ...) (ParticleGibbs and PMMH are for models with "
            "other latent sites)"
        )

    likelihood_sites = [site["name"] for site in sample_sites if site["is_observed"]]
    observed = {
        site["name"]: jnp.asarray(site["value"])
        for site in sample_sites
        if site["is_observed"] and not _is_factor(site)
    }
    hm = HierarchicalModel(
        model, args, kwargs, name, prior, theta_sites, observed, likelihood_sites, missing
    )
    _check_dependencies(hm, trace)
    return hm


def _check_dependencies(hm: HierarchicalModel, trace: Mapping[str, Any]) -> None:
    """Refuse a prior that depends on theta, theta sites that depend on x, and a likelihood
    that does not depend on x (provenance tracking through the model's jaxpr: nothing is
    computed)."""
    theta0 = {name: trace[name]["value"] for name in hm.theta_sites}
    x0 = jnp.zeros(hm.event_shape, jnp.result_type(float))

    def prior_leaves(theta):
        tr = _trace_at(hm.model, hm.args, hm.kwargs, {**theta, hm.prior_site: x0})
        return [
            leaf
            for leaf in jax.tree.leaves(tr[hm.prior_site]["fn"])
            if isinstance(leaf, jax.Array | np.ndarray)
        ]

    def site_terms(x, theta, missing):
        log_probs = hm._log_probs(x, theta, [hm.prior_site], missing)
        return {site: log_probs[site] for site in [*hm.theta_sites, *hm.likelihood_sites]}

    missing0 = {name: hm.observed[site] for name, site in hm.missing.items()}
    try:
        leaves = eval_provenance(prior_leaves, theta=theta0)
        terms = eval_provenance(site_terms, x=x0, theta=theta0, missing=missing0)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError) as err:
        raise ModelError(
            "the model must be a pure JAX function of its latent sites (traceable by jax.jit: "
            f"no Python `if` on {hm.prior_site!r} or on {list(hm.theta_sites)}), but tracing it "
            f"failed with {type(err).__name__}"
        ) from err
    check_missing_unused(
        hm.observation_model(theta0),
        {site: "missing" in sources for site, sources in terms.items()},
    )
    if any("theta" in sources for sources in leaves):
        raise ModelError(
            f"site {hm.prior_site!r}: the DiffusionPrior's distribution depends on the latent "
            f"sites {list(hm.theta_sites)}, but it must be the same for every value of them "
            "(the samplers run its reverse diffusion); put the dependence in the likelihood, "
            "e.g. y ~ Normal(g * A(x), sigma)"
        )
    for site in hm.theta_sites:
        if "x" in terms[site]:
            raise ModelError(
                f"site {site!r}: its distribution depends on the DiffusionPrior site "
                f"{hm.prior_site!r}, but the latent sites besides it must not (p(theta) is "
                "taken before x); sample it before x, from parameters that do not involve x"
            )
    if not any("x" in terms[site] for site in hm.likelihood_sites):
        raise ModelError(
            f"no observed site depends on the DiffusionPrior site {hm.prior_site!r} "
            f"(observed: {list(hm.likelihood_sites)}), so there is nothing to condition it on"
        )


# -- the NumPyro kernels -------------------------------------------------------------------------
#: Reserved model keyword through which ParticleGibbs hands x to its theta kernel.
X_KWARG = "_diffprior_x"

#: Methods PMMH takes by name.
PMMH_METHODS = {"tds": TDS, "mcgdiff": MCGdiff}


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _is_batched(rng_key: Array) -> bool:
    """Whether MCMC handed one key per chain (``chain_method="vectorized"``)."""
    return not is_prng_key(rng_key)


def _finite_or(value: Array, fallback: float) -> Array:
    return jnp.where(jnp.isfinite(value), value, fallback)


class _HierarchicalKernel(MCMCKernel):
    """What PMMH and ParticleGibbs share: the model, its reading at ``init``, the diffusion
    grid, the vectorised-chains plumbing and NumPyro's ``postprocess_fn``."""

    sample_field = "z"

    def __init__(self, model: Callable, num_particles: int, num_steps: int, spacing: str):
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}")
        self._model = model
        self.num_particles = _check_count("num_particles", num_particles, 1)
        self.num_steps = _check_count("num_steps", num_steps, 1)
        self.spacing = spacing
        self._hm: HierarchicalModel | None = None
        self._init_cache: dict = {}
        self._num_warmup = 0
        self._vectorized = False

    @property
    def model(self) -> Callable:
        return self._model

    def _read(self, model_args, model_kwargs) -> HierarchicalModel:
        args, kwargs = model_arguments(tuple(model_args), dict(model_kwargs or {}))
        hm = self._hm
        if hm is None or not _same_arguments(hm, args, kwargs):
            hm = read_hierarchical_model(self._model, args, kwargs)
        return hm

    def _timesteps(self, hm: HierarchicalModel) -> Array:
        return make_timesteps(hm.prior.schedule, self.num_steps, self.spacing)

    def postprocess_fn(self, model_args, model_kwargs):
        """Unconstrained theta to each site's support (and any ``numpyro.deterministic``
        sites); ``x`` and the missing entries of ``obs_mask=`` sites as they are."""
        args, kwargs = model_arguments(tuple(model_args), dict(model_kwargs or {}))

        def postprocess(z):
            # the missing entries, hidden from constrain_fn, set the deterministic site of
            # their obs_mask= site and pass through
            model = _hiding_missing(self._model, z)
            values = constrain_fn(model, args, kwargs, z, return_deterministic=True)
            return {**values, **{name: value for name, value in z.items() if name not in values}}

        return postprocess

    def _init_chain(self, rng_key, init_params, hm, model_args, model_kwargs):
        raise NotImplementedError

    def _sample_chain(self, state, hm, model_args, model_kwargs):
        raise NotImplementedError

    def _check(self, hm: HierarchicalModel) -> None:
        """Checks on the concrete model before anything is compiled."""

    def init(self, rng_key, num_warmup, init_params, model_args, model_kwargs):
        hm = self._read(model_args, model_kwargs)
        if hm is not self._hm:
            self._check(hm)
            self._hm = hm
            self._init_cache = {}
        self._num_warmup = int(num_warmup)
        self._vectorized = _is_batched(rng_key)
        # one compiled initialisation per model reading and layout, reused by later runs
        cache_key = (self._vectorized, init_params is None, self._num_warmup)
        if cache_key not in self._init_cache:

            def init_chain(key, params):
                return self._init_chain(key, params, hm, model_args, model_kwargs)

            if self._vectorized:
                init_chain = jax.vmap(init_chain)
            self._init_cache[cache_key] = jax.jit(init_chain)
        return self._initialise(self._init_cache[cache_key], rng_key, init_params)

    def _initialise(self, init_fn, rng_key, init_params):
        return init_fn(rng_key, init_params)

    def sample(self, state, model_args, model_kwargs):
        hm = self._read(model_args, model_kwargs)

        def sample_chain(chain_state):
            return self._sample_chain(chain_state, hm, model_args, model_kwargs)

        if self._vectorized:
            return jax.vmap(sample_chain)(state)
        return sample_chain(state)


def _same_arguments(hm: HierarchicalModel, args: tuple, kwargs: dict) -> bool:
    """Whether ``args``/``kwargs`` are the ones ``hm`` was read with (same objects)."""
    if len(args) != len(hm.args) or set(kwargs) != set(hm.kwargs):
        return False
    return all(a is b for a, b in zip(args, hm.args, strict=True)) and all(
        kwargs[name] is hm.kwargs[name] for name in kwargs
    )


class PMMHState(NamedTuple):
    r"""State of :class:`PMMH`.

    i
        Iteration (warmup included).
    z
        Current draw: the theta sites in unconstrained space and ``x``.
    log_density
        :math:`\log \hat p(y \mid \theta) + \log p(\theta) + \log \lvert \det J
        \rvert` at ``z``: the pseudo-marginal target, kept from the accepted run and never
        recomputed (that is what makes the method exact).
    log_evidence
        The accepted run's :math:`\log \hat p(y \mid \theta)`.
    accept_prob
        Metropolis-Hastings acceptance probability of the last proposal.
    mean_accept_prob
        Its running mean (over warmup during warmup, over sampling after).
    step_size
        Random-walk scale on the unconstrained theta (adapted during warmup).
    scale_tril
        ``(D, D)`` lower Cholesky factor of the random walk's shape on the ``D`` flattened
        unconstrained coordinates of theta: the proposal is :math:`u + h\,L\,\varepsilon`
        (the identity unless the covariance is adapted).
    covariance
        NumPyro's Welford state ``(mean, m2, n)`` of the draws of the current adaptation
        window.
    window_accepts
        Accepted proposals in the current adaptation window.
    adapt_start
        Iteration at which the step size's Robbins-Monro recursion last restarted.
    rng_key
        The chain's key.
    """

    i: Array
    z: dict
    log_density: Array
    log_evidence: Array
    accept_prob: Array
    mean_accept_prob: Array
    step_size: Array
    scale_tril: Array
    covariance: tuple
    window_accepts: Array
    adapt_start: Array
    rng_key: Array


class PMMH(_HierarchicalKernel):
    r"""Particle marginal Metropolis-Hastings (Andrieu, Doucet & Holenstein, JRSS B 2010,
    section 2.4.2) on the latent sites :math:`\theta` of a hierarchical model, as a NumPyro
    :class:`~numpyro.infer.mcmc.MCMCKernel`.

    Each iteration proposes :math:`u' = u + h\,\varepsilon` on the unconstrained
    :math:`\theta` (all sites flattened, :math:`\varepsilon \sim N(0, I)`), runs the SMC
    sampler ``method`` (TDS or MCGdiff) on :math:`x` given :math:`\theta'` and accepts with
    probability

    .. math::
        \min\Big(1, \frac{\hat p(y \mid \theta')\, p(\theta')\, \lvert J(u') \rvert}
        {\hat p(y \mid \theta)\, p(\theta)\, \lvert J(u) \rvert}\Big),

    where :math:`\hat p(y \mid \theta)` is the SMC's unbiased evidence estimate. The current
    estimate is kept in the state and never recomputed, so the chain targets
    :math:`p(\theta \mid y)` exactly (for the discretised prior) whatever the number of
    particles; with ``x`` drawn from the accepted run's final weights, :math:`(\theta, x)`
    targets :math:`p(\theta, x \mid y)`. Few particles make the estimate noisy and the chain
    sticky (it mixes well when the standard deviation of :math:`\log \hat p` is about 1 or
    less): PMMH suits models where TDS or MCGdiff estimate the evidence well; otherwise use
    :class:`ParticleGibbs`.

    During warmup the step :math:`h` follows a Robbins-Monro recursion,
    :math:`\log h \mathrel{+}= (i + 1)^{-0.6} (\alpha_i - \alpha^*)`, towards the acceptance
    rate ``target_accept_prob``; it is frozen after warmup.

    With ``adapt_covariance`` (the default) the walk's shape is learned as well, the way
    NumPyro's HMC learns a dense mass matrix: the proposal is :math:`u' = u + h\,L\,
    \varepsilon`, and warmup is cut into Stan's windows
    (:func:`numpyro.infer.hmc_util.build_adaptation_schedule`). At the end of each slow window
    :math:`L` becomes the Cholesky factor of the sample covariance of the window's draws of
    :math:`u` (NumPyro's Welford estimate, shrunk a little towards :math:`10^{-3} I`), the step
    restarts at :math:`2.38/\sqrt{D}` (the optimal random-walk scale on a :math:`D`-dimensional
    Gaussian target) and its recursion restarts. A window with fewer than
    ``MIN_WINDOW_ACCEPTS`` accepted moves keeps the previous shape: the draws of a chain that
    barely moved say nothing about the posterior's. With strongly correlated or differently
    scaled hyperparameters this is what lets the walk move along their ridge (two sites of
    posterior correlation -0.92: ESS of the worse one 247 instead of 110 from 2000 draws,
    ``benchmarks/results/pmmh_adaptation.md``); with one scalar it only sets the scale, as the
    step's recursion does. Adaptation needs at least 20 warmup
    iterations (fewer make one window, in which the shape is not adapted).

    Parameters
    ----------
    model
        A NumPyro model with one DiffusionPrior site and other continuous latent sites
        (see :func:`read_hierarchical_model`).
    method
        The SMC sampler of ``x`` given theta: ``"tds"`` (default), ``"mcgdiff"`` (linear
        Gaussian likelihoods; no network gradient), the class ``dp.TDS`` / ``dp.MCGdiff``, or
        an instance with options, e.g. ``dp.TDS(model, variance_inflation=None)``.
    num_particles, num_steps
        Particles and diffusion steps of each SMC run.
    step_size
        Initial random-walk scale on the unconstrained theta.
    target_accept_prob
        Acceptance rate the warmup adapts the step to (0.25 by default; lower, about 0.1,
        suits a noisy evidence).
    adapt_step_size
        Whether to adapt the step during warmup.
    adapt_covariance
        Whether to adapt the random walk's covariance during warmup (above).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.ones(2))
    >>> def model(y=None):
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)
    >>> mcmc = numpyro.infer.MCMC(
    ...     dp.PMMH(model, num_particles=32, num_steps=10),
    ...     num_warmup=20, num_samples=20, progress_bar=False,
    ... )
    >>> mcmc.run(jax.random.key(0), y=jnp.array([1.5, 0.2]))
    >>> {name: value.shape for name, value in mcmc.get_samples().items()}
    {'sigma': (20,), 'x': (20, 2)}
    """

    def __init__(
        self,
        model: Callable,
        method: Any = "tds",
        *,
        num_particles: int,
        num_steps: int,
        step_size: float = 0.5,
        target_accept_prob: float = 0.25,
        adapt_step_size: bool = True,
        adapt_covariance: bool = True,
    ):
        super().__init__(model, num_particles, num_steps, "uniform")
        self.method = _resolve_method(method, model)
        self.spacing = self.method.spacing
        if not float(step_size) > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        if not 0.0 < float(target_accept_prob) < 1.0:
            raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob!r}")
        if not isinstance(adapt_step_size, bool):
            raise TypeError(f"adapt_step_size must be True or False, got {adapt_step_size!r}")
        if not isinstance(adapt_covariance, bool):
            raise TypeError(f"adapt_covariance must be True or False, got {adapt_covariance!r}")
        self.step_size = float(step_size)
        self.target_accept_prob = float(target_accept_prob)
        self.adapt_step_size = adapt_step_size
        self.adapt_covariance = adapt_covariance

    def _check(self, hm: HierarchicalModel) -> None:
        theta = hm.constrain(
            {name: jnp.zeros(site.unconstrained_shape) for name, site in hm.theta_sites.items()}
        )
        self.method.check(hm.observation_model(theta).in_latent_space())

    def get_diagnostics_str(self, state: PMMHState) -> str:
        return (
            f"step size {float(state.step_size):.2e}. acc. prob={float(state.mean_accept_prob):.2f}"
        )

    def _smc(self, key, hm: HierarchicalModel, theta, times) -> tuple[Array, dict]:
        return smc_given_theta(key, self.method, hm, theta, times, self.num_particles)

    def _init_chain(self, rng_key, init_params, hm, model_args, model_kwargs):
        times = self._timesteps(hm)
        names = list(hm.theta_sites)
        if init_params is None:
            template = {
                name: jnp.zeros(site.unconstrained_shape, jnp.result_type(float))
                for name, site in hm.theta_sites.items()
            }
        else:
            missing = [name for name in names if name not in init_params]
            if missing:
                raise ValueError(
                    f"init_params must give every latent site besides {hm.prior_site!r} "
                    f"(unconstrained); missing {missing}"
                )
            template = {name: jnp.asarray(init_params[name]) for name in names}
        flat, unravel = ravel_pytree(template)

        key_theta, key_smc, key = jax.random.split(rng_key, 3)
        if init_params is None:
            # as NumPyro's init_to_uniform: uniform on (-2, 2) in unconstrained space
            u = unravel(jax.random.uniform(key_theta, flat.shape, minval=-2.0, maxval=2.0))
        else:
            u = template
        log_evidence, draws = self._smc(key_smc, hm, hm.constrain(u), times)
        log_density = _finite_or(log_evidence + hm.log_prior_unconstrained(u), -jnp.inf)
        dtype = jnp.result_type(float)
        zero = jnp.zeros((), dtype)
        welford_init, _, _ = welford_covariance(diagonal=False)
        mean, m2, count = welford_init(flat.size)
        return PMMHState(
            jnp.zeros((), jnp.int32),
            {**u, **draws},
            log_density,
            log_evidence,
            zero,
            zero,
            jnp.asarray(self.step_size / np.sqrt(flat.size), dtype),
            jnp.eye(flat.size, dtype=dtype),
            (mean.astype(dtype), m2.astype(dtype), count),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
            key,
        )

    def _initialise(self, init_fn, rng_key, init_params):
        """Start where the SMC evidence is finite: chains that drew a theta without one draw
        again (up to a limit; with ``init_params`` they cannot)."""
        state = init_fn(rng_key, init_params)
        for _ in range(_MAX_INIT_TRIES if init_params is None else 1):
            valid = jnp.isfinite(state.log_density)
            if bool(jnp.all(valid)):
                return state
            # the state's key is already a fresh one, split from the last
            state = _where_valid(valid, state, init_fn(state.rng_key, None))
        raise RuntimeError(
            f"PMMH found no starting value of {list(self._hm.theta_sites)} with a finite SMC "
            f"evidence in {_MAX_INIT_TRIES} tries; pass init_params, or use more particles"
        )

    def _sample_chain(self, state: PMMHState, hm, model_args, model_kwargs) -> PMMHState:
        times = self._timesteps(hm)
        key, key_move, key_smc, key_accept = jax.random.split(state.rng_key, 4)
        u = {name: state.z[name] for name in hm.theta_sites}
        flat, unravel = ravel_pytree(u)
        move = state.scale_tril @ jax.random.normal(key_move, flat.shape)
        proposal = unravel(flat + state.step_size * move)
        log_evidence, draws = self._smc(key_smc, hm, hm.constrain(proposal), times)
        log_density = _finite_or(log_evidence + hm.log_prior_unconstrained(proposal), -jnp.inf)
        log_ratio = _finite_or(log_density - state.log_density, -jnp.inf)
        accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accept = jax.random.uniform(key_accept) < accept_prob

        z = jax.tree.map(
            lambda new, old: jnp.where(accept, new, old),
            {**proposal, **draws},
            state.z,
        )
        i = state.i + 1
        warmup = state.i < self._num_warmup
        step_size = state.step_size
        if self.adapt_step_size:
            rate = (state.i - state.adapt_start + 1.0) ** -0.6
            adapted = step_size * jnp.exp(rate * (accept_prob - self.target_accept_prob))
            step_size = jnp.where(warmup, adapted, step_size)
        # the running mean restarts when sampling starts
        count = jnp.where(warmup, i, i - self._num_warmup)
        mean_accept = state.mean_accept_prob + (accept_prob - state.mean_accept_prob) / count
        new_state = PMMHState(
            i,
            z,
            jnp.where(accept, log_density, state.log_density),
            jnp.where(accept, log_evidence, state.log_evidence),
            accept_prob,
            mean_accept,
            step_size,
            state.scale_tril,
            state.covariance,
            state.window_accepts,
            state.adapt_start,
            key,
        )
        if self.adapt_covariance:
            new_state = self._adapt_covariance(new_state, state.i, hm, accept)
        return new_state

    def _adapt_covariance(
        self, state: PMMHState, i: Array, hm: HierarchicalModel, accepted: Array
    ) -> PMMHState:
        """Add the draw of iteration ``i`` to its slow window's covariance estimate and, at the
        window's end, take that estimate as the walk's shape (class docstring)."""
        windows = _covariance_windows(self._num_warmup)
        if not windows:
            return state
        starts = jnp.asarray([start for start, _ in windows])
        ends = jnp.asarray([end for _, end in windows])
        in_window = jnp.any((i >= starts) & (i <= ends))
        at_end = jnp.any(i == ends)
        flat, _ = ravel_pytree({name: state.z[name] for name in hm.theta_sites})
        welford_init, welford_update, welford_final = welford_covariance(diagonal=False)
        updated = welford_update(flat, state.covariance)
        covariance = jax.tree.map(
            lambda new, old: jnp.where(in_window, new, old), updated, state.covariance
        )
        accepts = state.window_accepts + (in_window & accepted).astype(jnp.int32)
        estimate, _, _ = welford_final(covariance, regularize=True)
        tril = jnp.linalg.cholesky(estimate.astype(state.scale_tril.dtype))
        adopt = at_end & (accepts >= MIN_WINDOW_ACCEPTS) & jnp.all(jnp.isfinite(tril))
        restart_step = jnp.asarray(2.38 / np.sqrt(flat.size), state.step_size.dtype)
        fresh = welford_init(flat.size)
        fresh = tuple(jnp.asarray(a, b.dtype) for a, b in zip(fresh, covariance, strict=True))
        return state._replace(
            scale_tril=jnp.where(adopt, tril, state.scale_tril),
            step_size=jnp.where(adopt, restart_step, state.step_size),
            adapt_start=jnp.where(adopt, i + 1, state.adapt_start),
            covariance=jax.tree.map(lambda f, c: jnp.where(at_end, f, c), fresh, covariance),
            window_accepts=jnp.where(at_end, 0, accepts),
        )


#: Accepted moves a slow window needs before PMMH takes its draws' covariance as the walk's shape.
MIN_WINDOW_ACCEPTS = 5


def smc_given_theta(
    key: Array,
    method: Method,
    hm: HierarchicalModel,
    theta: Mapping[str, Array],
    times: Array,
    num_particles: int,
) -> tuple[Array, dict]:
    """One SMC run of ``method`` (TDS or MCGdiff) on ``x`` given ``theta`` over the grid
    ``times``: ``(log p^(y | theta), draws)`` with ``draws`` the prior site's ``x``, one
    particle drawn by its final weight, and the missing entries of any ``obs_mask=`` site
    drawn given ``(x, theta)``; ``-inf`` for a non-finite evidence. Pure JAX (jit-, vmap-able
    in ``key`` and ``theta``)."""
    prior = hm.prior
    obs = hm.observation_model(theta).in_latent_space()
    algorithm = method.build(prior, obs, times)
    key_init, key_run, key_draw = jax.random.split(key, 3)
    if hm.missing:
        key_draw, key_missing = jax.random.split(key_draw)
    state = algorithm.init(prior.sample_reference(key_init, (num_particles,)))

    def body(state, key):
        return algorithm.step(key, state)[0], None

    state, _ = jax.lax.scan(body, state, jax.random.split(key_run, times.shape[0] - 1))
    index = jax.random.categorical(key_draw, state.log_weights)
    x = prior.decode(state.particles[index])
    draws = {hm.prior_site: x}
    if hm.missing:
        draws.update(hm.sample_unobserved(key_missing, x, theta))
    return _finite_or(state.log_evidence, -jnp.inf), draws


def _covariance_windows(num_warmup: int) -> list[tuple[int, int]]:
    """The slow windows ``(start, end)`` (inclusive) of Stan's warmup schedule for
    ``num_warmup`` iterations, at whose ends PMMH adapts its covariance; none under 20."""
    if num_warmup < 20:
        return []
    schedule = build_adaptation_schedule(num_warmup)
    return [(window.start, window.end) for window in schedule[1:-1]]


def _probe_thetas(hm: HierarchicalModel) -> list[dict[str, Array]]:
    """Two values of theta at which to read the likelihood's structure: the images of 0 and
    of 0.5 in unconstrained space (nothing is drawn)."""
    return [
        hm.constrain(
            {
                name: jnp.full(site.unconstrained_shape, value, jnp.result_type(float))
                for name, site in hm.theta_sites.items()
            }
        )
        for value in (0.0, 0.5)
    ]


def _where_valid(valid: Array, kept: Any, fresh: Any) -> Any:
    """Per chain, ``kept`` where ``valid`` else ``fresh`` (leaves with a leading chain axis
    shaped like ``valid``)."""

    def select(old, new):
        return jnp.where(jnp.reshape(valid, valid.shape + (1,) * (old.ndim - valid.ndim)), old, new)

    return jax.tree.map(select, kept, fresh)


#: Draws of unconstrained theta PMMH tries before it gives up on a finite evidence.
_MAX_INIT_TRIES = 100


def _resolve_method(method: Any, model: Callable) -> Method:
    """A method given by name, class or instance, bound to ``model``; SMC methods only."""
    if isinstance(method, str):
        if method.lower() not in PMMH_METHODS:
            raise ValueError(
                f"method must be one of {tuple(PMMH_METHODS)} or a dp.TDS / dp.MCGdiff class or "
                f"instance, got {method!r}"
            )
        return PMMH_METHODS[method.lower()](model)
    if isinstance(method, type) and issubclass(method, Method):
        method = method(model)
    if not isinstance(method, Method) or not method.is_smc:
        raise ValueError(
            'method must be an SMC method with an evidence estimate ("tds", "mcgdiff", '
            f"dp.TDS, dp.MCGdiff, or an instance such as dp.TDS(model, ...)), got {method!r}"
        )
    return method


class ParticleGibbsState(NamedTuple):
    """State of :class:`ParticleGibbs`.

    z
        Current draw: the theta sites in unconstrained space and ``x``.
    theta_state
        The theta kernel's state (e.g. NUTS's ``HMCState``), its cached potential refreshed
        at the current ``x``.
    path
        ``(num_steps + 1, *event_shape)`` the reference path of the conditional SMC (on the
        prior's latent for a :class:`~diffprior.LatentDiffusionPrior`); ``x`` is its decoded
        last entry.
    diverging
        Whether the theta kernel's last transition diverged (NUTS and HMC; False otherwise).
    ancestor_moves
        Fraction of the last sweep's steps where ancestor sampling moved the reference off its
        own history (near zero means the path is frozen).
    marginal_accept_prob
        Mean Metropolis-Hastings acceptance probability of the last iteration's marginal moves
        (0 without them).
    marginal_step_size
        Random-walk scale of the marginal moves on the unconstrained theta (adapted during
        warmup).
    i
        Iteration (warmup included).
    rng_key
        The chain's key.
    """

    z: dict
    theta_state: Any
    path: Array
    diverging: Array
    ancestor_moves: Array
    marginal_accept_prob: Array
    marginal_step_size: Array
    i: Array
    rng_key: Array


class ParticleGibbs(_HierarchicalKernel):
    r"""Particle Gibbs with ancestor sampling on a hierarchical model (Andrieu, Doucet &
    Holenstein 2010; Lindsten, Jordan & Schön 2014), as a NumPyro
    :class:`~numpyro.infer.mcmc.MCMCKernel`.

    Each iteration chains moves that all leave :math:`p(\theta, x_{0:K} \mid y)` invariant,
    :math:`x_{0:K}` the reverse diffusion path of the discretised prior:

    1. :math:`\theta \mid x, y`: one transition of ``theta_kernel`` (NUTS by default) on
       :math:`p(\theta)\, p(y \mid x, \theta)` with ``x`` fixed (the prior's density does not
       involve :math:`\theta`, so it drops out);
    2. :math:`x_{0:K} \mid \theta, y`: one sweep of conditional twisted SMC with ancestor
       sampling (:mod:`diffprior.kernels.csmc`) with TDS's twists and proposal (``proposal``:
       the subspace one for a linear Gaussian likelihood, the guided one otherwise), which
       keeps the current path as its reference and draws a new one;
    3. :math:`(\theta, x_{0:K})` together (``marginal_moves`` > 0): particle marginal
       Metropolis-Hastings moves on the extended target of particle MCMC, below.

    The chain targets :math:`p(\theta, x \mid y)` exactly for any number of particles
    :math:`N \ge 2`; more particles make consecutive ``x`` less correlated. Moves 1 and 2
    alone never need a precise evidence estimate, but ``x`` given :math:`\theta` and
    :math:`\theta` given ``x`` can pin each other (an unknown noise level when ``x`` has
    directions the data do not see, which can absorb the noise): then :math:`\theta` only
    moves as far as ``x`` lets it at each iteration. Move 3 proposes :math:`\theta'` with a
    fresh path drawn given :math:`\theta'`, so it is not held back by the current ``x``.

    **The marginal move** (Andrieu, Doucet & Holenstein 2010, the extended target on which
    both PMMH and particle Gibbs are exact). Write :math:`\xi` for every particle and ancestor
    index of one sweep of twisted SMC at :math:`\theta` (multinomial resampling at every step,
    the sweep's proposal), :math:`\psi_\theta(\xi)` for its law when run unconditionally,
    :math:`\hat Z_\theta(\xi) = \prod_k \frac1N \sum_i w^i_k` for its evidence estimate and
    :math:`W^j` for its final normalised weights. The extended target

    .. math::
        \tilde\pi(\theta, \xi, j) = p(\theta)\, \psi_\theta(\xi)\, \hat Z_\theta(\xi)\,
        W^j / p(y)

    is a probability (the estimate is unbiased), the path of particle :math:`j` traced back
    through its ancestors, with :math:`\theta`, has law :math:`p(\theta, x_{0:K} \mid y)`
    under it, and given :math:`\theta`, :math:`j` and that path (with its ancestry), the
    other particles have the law of conditional SMC's other particles with that path as the
    reference (and :math:`\hat Z_\theta` is symmetric in the particles, so the reference may
    sit in slot 0). One marginal move from :math:`(\theta, x^*_{0:K})`:

    a. a sweep of conditional SMC at :math:`\theta` with reference :math:`x^*_{0:K}`,
       *without* ancestor sampling: an exact Gibbs draw of the other particles from
       :math:`\tilde\pi`'s conditional; its new path, drawn by the final weights, is the
       Gibbs draw of :math:`j` (:math:`\tilde\pi(j \mid \theta, \xi) = W^j`), and its
       :math:`\hat Z_\theta(\xi)`, computed with the reference's weight like any other's,
       is the extended state's estimate;
    b. :math:`u' = u + h \varepsilon` on the unconstrained :math:`\theta`
       (:math:`\varepsilon \sim N(0, I)`), one unconditional sweep at :math:`\theta'`
       (:math:`\xi' \sim \psi_{\theta'}`, :math:`j' \sim W'`), accepted with probability

       .. math::
           \min\Big(1, \frac{\hat Z_{\theta'}(\xi')\, p(\theta')\, \lvert J(u')
           \rvert}{\hat Z_\theta(\xi)\, p(\theta)\, \lvert J(u) \rvert}\Big),

       the Metropolis-Hastings ratio for :math:`\tilde\pi` (in :math:`u`) with this
       proposal: :math:`\psi` and :math:`W` cancel. Otherwise the state stays at step a's.

    Both steps leave :math:`\tilde\pi` invariant, so the :math:`(\theta, x)` they hand on
    has the posterior's law, for any :math:`N`: nothing else has to be carried, since the
    next iteration redraws the other particles from their exact conditional in step a. With
    ``marginal_moves`` = m, step b runs m times in a row after one step a, the current
    estimate being the last accepted one (PMMH on :math:`\tilde\pi`). Unlike :class:`PMMH`'s,
    the current estimate is redrawn at every iteration, so one lucky estimate does not hold
    the chain; but where one sweep's log-evidence varies by several units (the guided
    proposal's at a noise level near zero, where ``x`` interpolates the data) the moves rarely
    get in or out. The step
    :math:`h` is adapted during warmup as :class:`PMMH` adapts its own (towards
    ``marginal_target_accept_prob``). Each iteration costs one more conditional sweep and m
    unconditional ones.

    Parameters
    ----------
    model
        A NumPyro model with one DiffusionPrior site and other continuous latent sites
        (see :func:`read_hierarchical_model`).
    num_particles, num_steps
        Particles (at least 2) and diffusion steps of each conditional SMC sweep.
    theta_kernel
        How to build the kernel on theta: ``None`` for ``numpyro.infer.NUTS``, a callable
        ``theta_kernel(model) -> MCMCKernel`` such as ``numpyro.infer.HMC`` or
        ``functools.partial(numpyro.infer.NUTS, target_accept_prob=0.9)``, or a kernel
        instance built on ``model`` (rebound with its ``wrap_model``). The kernel must
        implement ``refresh`` (NumPyro's HMC and NUTS do): ``x`` changes between its moves.
    scale, eta, variance_inflation, spacing
        The twisted proposal's options, as for :class:`diffprior.TDS` (``eta`` must be > 0).
    proposal
        ``"auto"`` (default), ``"guided"`` or ``"subspace"``, as for :class:`diffprior.TDS`.
        ``"subspace"``, for a likelihood linear in ``x`` with Normal noise (whose operator,
        gain and noise scale may depend on :math:`\theta`: the whitened SVD is computed in
        each sweep from the current :math:`\theta`), proposes the observed directions from
        the twisted transition's own Gaussian (:func:`diffprior.kernels.mcgdiff.subspace_proposal`;
        no network gradient); its weights, and so the sweep's evidence, stay precise down to
        near-noiseless data. ``"guided"`` shifts the reverse step along the twist's gradient,
        for any likelihood. ``"auto"`` takes ``"subspace"`` when the likelihood is linear
        Gaussian at two values of :math:`\theta` (the images of 0 and 0.5 in unconstrained
        space, read when the chain starts) and the guided-only options (``scale``,
        ``variance_inflation``) are at their defaults, else ``"guided"``. Measured
        (``benchmarks/results/hierarchical.md``; d = 80, unknown noise level, 16
        observations, 64 particles, 30 steps): one subspace sweep's log-evidence has a
        standard deviation of 0.28 at :math:`\sigma = 0.1` (guided: 4.2), so that with
        ``marginal_moves=1`` the chain reaches the small noise levels (Kolmogorov distance
        0.047, R-hat 1.010; guided: 0.138 and 1.054), and with 2 moves 0.027 and 1.001.
    ancestor_sampling
        Redraw the reference's ancestors (default); ``False`` is plain particle Gibbs, valid
        but with a reference path that rarely moves at high noise.
    marginal_moves
        Marginal moves of :math:`(\theta, x)` per iteration (default 0: none). Each costs
        about one more sweep (plus one conditional sweep per iteration). Measured on the
        benchmark of unknown noise levels and gains (``benchmarks/results/hierarchical.md``),
        one move per iteration draws 1.1 to 4 times more effective :math:`\theta` per
        iteration, which about pays for its cost where :math:`\theta` and ``x`` are tied
        (a gain; a noise level with more dimensions than observations) and does not where
        they are not (2.4 times fewer effective draws per second), hence off by default: turn
        it on (1 or 2) when :math:`\theta`'s effective sample size or R-hat says the chain
        is stuck. (Those measurements were with the guided sweep.) With the subspace sweep
        (4 chains x 500 draws, 64 particles, 30 steps), one move per iteration gave 1.3 to
        9 times more effective draws per second on three of the four problems and 0.6 times
        on the fourth, and without moves the noise level at d = 80 did not mix (ESS 9,
        R-hat 1.285; with one move 325 and 1.010). The moves need a precise evidence: on the
        shipped digits network (32 particles, 20 steps, a noise level of 0.1 on all 64
        pixels) they were accepted 1% of the time and the noise level did not mix with or
        without them (ESS 5-6 of 400-700 draws per chain), so the default stays 0.
    marginal_step_size
        Initial random-walk scale of the marginal moves on the unconstrained theta (divided by
        the square root of its dimension, as :class:`PMMH`'s ``step_size``).
    marginal_target_accept_prob
        Acceptance rate the warmup adapts the marginal moves' step to.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.ones(2))
    >>> def model(y=None):
    ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x, sigma).to_event(1), obs=y)
    >>> mcmc = numpyro.infer.MCMC(
    ...     dp.ParticleGibbs(model, num_particles=16, num_steps=10),
    ...     num_warmup=20, num_samples=20, progress_bar=False,
    ... )
    >>> mcmc.run(jax.random.key(0), y=jnp.array([1.5, 0.2]))
    >>> {name: value.shape for name, value in mcmc.get_samples().items()}
    {'sigma': (20,), 'x': (20, 2)}
    """

    def __init__(
        self,
        model: Callable,
        *,
        num_particles: int,
        num_steps: int,
        theta_kernel: Callable | MCMCKernel | None = None,
        scale: float = 1.0,
        eta: float = 1.0,
        variance_inflation: str | None = "jacobian",
        spacing: str = "uniform",
        proposal: str = "auto",
        ancestor_sampling: bool = True,
        marginal_moves: int = 0,
        marginal_step_size: float = 0.5,
        marginal_target_accept_prob: float = 0.25,
    ):
        super().__init__(model, num_particles, num_steps, spacing)
        if self.num_particles < 2:
            raise ValueError(
                "num_particles must be >= 2 for ParticleGibbs (one particle holds the "
                f"reference path), got {num_particles}"
            )
        # TDS validates the twist options and builds the twist from the model given theta
        self._tds = TDS(
            model, scale=scale, eta=eta, variance_inflation=variance_inflation, spacing=spacing
        )
        if not self._tds.options["eta"] > 0:
            raise ValueError("eta must be > 0 for ParticleGibbs (stochastic reverse steps)")
        if proposal not in TDS_PROPOSALS:
            raise ValueError(f"proposal must be one of {TDS_PROPOSALS}, got {proposal!r}")
        self.proposal = proposal
        self._subspace_ok = _check_subspace_options(
            self.__class__.__name__, proposal, self._tds.options
        )
        self._subspace = proposal == "subspace"
        if not isinstance(ancestor_sampling, bool):
            raise TypeError(f"ancestor_sampling must be True or False, got {ancestor_sampling!r}")
        if not (theta_kernel is None or callable(theta_kernel)):
            raise TypeError(
                "theta_kernel must be None (NUTS), a callable theta_kernel(model) -> "
                f"MCMCKernel such as numpyro.infer.HMC, or a kernel instance; got {theta_kernel!r}"
            )
        if not float(marginal_step_size) > 0:
            raise ValueError(f"marginal_step_size must be > 0, got {marginal_step_size!r}")
        if not 0.0 < float(marginal_target_accept_prob) < 1.0:
            raise ValueError(
                "marginal_target_accept_prob must be in (0, 1), got "
                f"{marginal_target_accept_prob!r}"
            )
        self.theta_kernel = theta_kernel
        self.ancestor_sampling = ancestor_sampling
        self.marginal_moves = _check_count("marginal_moves", marginal_moves, 0)
        self.marginal_step_size = float(marginal_step_size)
        self.marginal_target_accept_prob = float(marginal_target_accept_prob)
        self._inner: MCMCKernel | None = None

    def _build_inner(self, hm: HierarchicalModel) -> MCMCKernel:
        theta_model = hm.theta_model(X_KWARG)
        if self.theta_kernel is None:
            return NUTS(theta_model)
        if isinstance(self.theta_kernel, MCMCKernel):
            try:
                return self.theta_kernel.wrap_model(lambda model: hm.theta_model(X_KWARG, model))
            except NotImplementedError:
                raise TypeError(
                    f"theta_kernel {type(self.theta_kernel).__name__} cannot be rebound to the "
                    "model of theta given x (no wrap_model); pass a callable "
                    "theta_kernel(model) -> MCMCKernel instead"
                ) from None
        inner = self.theta_kernel(theta_model)
        if not isinstance(inner, MCMCKernel):
            raise TypeError(
                f"theta_kernel(model) must return a numpyro MCMCKernel, got {type(inner).__name__}"
            )
        return inner

    def _check(self, hm: HierarchicalModel) -> None:
        self._inner = self._build_inner(hm)
        # the likelihood must be linear Gaussian in x whatever theta: read at two values
        self._subspace = all(
            _use_subspace(
                self.__class__.__name__,
                self.proposal,
                hm.observation_model(theta).in_latent_space(),
                self._subspace_ok,
            )
            for theta in _probe_thetas(hm)
        )

    def get_diagnostics_str(self, state: ParticleGibbsState) -> str:
        return self._inner.get_diagnostics_str(state.theta_state) if self._inner else ""

    def _sweep(self, key, hm: HierarchicalModel, theta, path, ancestor_sampling=None):
        """One sweep of twisted SMC given theta: conditional on ``path``, or unconditional when
        it is None; the one algorithm (twists, proposal, resampling, evidence) of every move."""
        if ancestor_sampling is None:
            ancestor_sampling = self.ancestor_sampling
        prior = hm.prior
        obs = hm.observation_model(theta).in_latent_space()
        options = self._tds.options
        times = self._timesteps(hm)
        if self._subspace:
            # the whitened SVD of the likelihood at this (traced) theta
            svd, setup = _subspace_setup(prior, obs, times)
            proposal = mcgdiff.subspace_proposal(
                prior.denoiser, times, svd, eta=options["eta"], **setup
            )
        else:
            proposal = csmc.guided_proposal(
                prior.denoiser,
                self._tds.twist_fn(prior, obs),
                times,
                eta=options["eta"],
                scale=options["scale"],
            )
        return csmc.sweep_with(
            key,
            path,
            proposal,
            self.num_particles,
            prior.sample_reference,
            ancestor_sampling=ancestor_sampling,
        )

    def _refresh(self, theta_state, model_args, model_kwargs, x):
        kwargs = {**dict(model_kwargs or {}), X_KWARG: x}
        try:
            return self._inner.refresh(theta_state, model_args, kwargs)
        except NotImplementedError:
            raise TypeError(
                f"theta_kernel {type(self._inner).__name__} does not implement refresh, so it "
                "cannot follow x as it changes; use NUTS or HMC"
            ) from None

    def _theta(self, hm: HierarchicalModel, theta_state) -> dict[str, Array]:
        return hm.constrain({name: theta_state.z[name] for name in hm.theta_sites})

    def _state(
        self, hm, theta_state, path, info, accept_prob, step_size, i, key
    ) -> ParticleGibbsState:
        x = hm.prior.decode(path[-1])
        diverging = getattr(theta_state, "diverging", jnp.zeros((), bool))
        moves = jnp.mean(info.reference_ancestors != 0)
        missing = {}
        if hm.missing:
            # the missing entries of obs_mask= sites, drawn given (x, theta): they enter no
            # other move, so a fresh draw at every iteration is exact
            key, key_missing = jax.random.split(key)
            missing = hm.sample_unobserved(key_missing, x, self._theta(hm, theta_state))
        return ParticleGibbsState(
            {**theta_state.z, hm.prior_site: x, **missing},
            theta_state,
            path,
            diverging,
            moves,
            accept_prob,
            step_size,
            i,
            key,
        )

    def _init_chain(self, rng_key, init_params, hm, model_args, model_kwargs):
        key_x, key_theta, key_path, key = jax.random.split(rng_key, 4)
        # a prior draw of x to start theta from; the first sweep then draws x given theta
        x_start = hm.prior.sample(key_x)
        kwargs = {**dict(model_kwargs or {}), X_KWARG: x_start}
        theta_state = self._inner.init(key_theta, self._num_warmup, init_params, model_args, kwargs)
        path, info = self._sweep(key_path, hm, self._theta(hm, theta_state), None)
        theta_state = self._refresh(
            theta_state, model_args, model_kwargs, hm.prior.decode(path[-1])
        )
        size = sum(int(np.prod(site.unconstrained_shape)) for site in hm.theta_sites.values())
        dtype = jnp.result_type(float)
        step_size = jnp.asarray(self.marginal_step_size / np.sqrt(size), dtype)
        zero = jnp.zeros((), dtype)
        return self._state(
            hm, theta_state, path, info, zero, step_size, jnp.zeros((), jnp.int32), key
        )

    def _sample_chain(self, state: ParticleGibbsState, hm, model_args, model_kwargs):
        key, key_sweep, key_marginal = jax.random.split(state.rng_key, 3)
        x = state.z[hm.prior_site]
        kwargs = {**dict(model_kwargs or {}), X_KWARG: x}
        theta_state = self._inner.sample(state.theta_state, model_args, kwargs)
        path, info = self._sweep(key_sweep, hm, self._theta(hm, theta_state), state.path)
        accept_prob = jnp.zeros_like(state.marginal_accept_prob)
        step_size = state.marginal_step_size
        if self.marginal_moves:
            u = {name: theta_state.z[name] for name in hm.theta_sites}
            u, path, accept_prob = self._marginal_moves(key_marginal, hm, u, path, step_size)
            # the theta kernel continues from the moved theta (refreshed below with the new x)
            theta_state = theta_state._replace(z={**theta_state.z, **u})
            warmup = state.i < self._num_warmup
            rate = (state.i + 1.0) ** -0.6
            adapted = step_size * jnp.exp(rate * (accept_prob - self.marginal_target_accept_prob))
            step_size = jnp.where(warmup, adapted, step_size)
        theta_state = self._refresh(
            theta_state, model_args, model_kwargs, hm.prior.decode(path[-1])
        )
        return self._state(hm, theta_state, path, info, accept_prob, step_size, state.i + 1, key)

    def _marginal_moves(self, key, hm: HierarchicalModel, u, path, step_size):
        """Move 3 of the class docstring: a conditional sweep without ancestor sampling at
        the current (theta, path), then ``marginal_moves`` Metropolis-Hastings steps on the
        extended target. Returns the unconstrained theta, the path and the mean acceptance
        probability."""
        key_refresh, key_moves = jax.random.split(key)
        # (a) the other particles from their exact conditional, and the extended state's
        # evidence estimate (the reference weighted like any other particle)
        path, info = self._sweep(key_refresh, hm, hm.constrain(u), path, ancestor_sampling=False)
        log_density = _finite_or(info.log_evidence + hm.log_prior_unconstrained(u), -jnp.inf)

        def move(carry, key):
            u, path, log_density = carry
            key_step, key_smc, key_accept = jax.random.split(key, 3)
            flat, unravel = ravel_pytree(u)
            proposal = unravel(flat + step_size * jax.random.normal(key_step, flat.shape))
            # (b) the same sweep, unconditional, at the proposed theta
            new_path, new_info = self._sweep(key_smc, hm, hm.constrain(proposal), None)
            new_log_density = _finite_or(
                new_info.log_evidence + hm.log_prior_unconstrained(proposal), -jnp.inf
            )
            # a current estimate of zero (a degenerate sweep) is left for any finite proposal
            log_ratio = new_log_density - log_density
            log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
            accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
            accept = jax.random.uniform(key_accept) < accept_prob
            carry = jax.tree.map(
                lambda new, old: jnp.where(accept, new, old),
                (proposal, new_path, new_log_density),
                carry,
            )
            return carry, accept_prob

        keys = jax.random.split(key_moves, self.marginal_moves)
        (u, path, _), accept_probs = jax.lax.scan(move, (u, path, log_density), keys)
        return u, path, jnp.mean(accept_probs)

    @property
    def default_fields(self) -> tuple[str, ...]:
        return ("z", "diverging")
