r"""Read a user's NumPyro model: find its :class:`~diffprior.DiffusionPrior` site and build the
likelihood of the observations given that site.

A model in diffprior's sense has exactly one latent site ``x`` whose distribution is a
``DiffusionPrior``, and observed sites ``y_j`` whose distributions may depend on ``x`` through any
JAX function (a forward operator :math:`A`)::

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.StudentT(4.0, A(x), 0.1).to_event(1), obs=y)

:func:`read_model` checks the model once, with concrete values, and returns an
:class:`ObservationModel` whose methods are pure JAX functions of ``x``:

.. math::
    \log p(y \mid x) = \sum_j s_j \log p_j(y_j \mid x),

where :math:`s_j` is the site's ``scale`` (from :func:`numpyro.handlers.scale`, 1 by default) and
masked entries (:func:`numpyro.handlers.mask`) contribute zero. The densities are NumPyro's own
(:func:`numpyro.infer.util.compute_log_probs`) on the model with ``x`` substituted and the prior
site hidden, so the prior's expensive ``log_prob`` and ``sample`` are never called.

Variance inflation (used by twisted SMC, e.g. TDS and the guided proposals of FK steering):
``log_likelihood(x, extra_variance=v)`` replaces every Normal and Student-t observation scale
:math:`\sigma` by :math:`\sqrt{\sigma^2 + v}`, so that for a Gaussian site

.. math::
    \log N(y; A(x), (\sigma^2 + v) I),

the likelihood of :math:`y` given a denoised :math:`\hat x_0` whose error has variance ``v``.
Other likelihoods are left unchanged.

Missing observations (``obs_mask=``): ``numpyro.sample("y", fn, obs=y, obs_mask=m)`` becomes, as
in NumPyro, an observed site ``y_observed`` (``fn`` masked where ``m`` is False: those entries
contribute zero), a latent site ``y_unobserved`` (the missing entries) and a deterministic
``y``. Given ``x`` the missing entries enter no other density, so their posterior is the
likelihood itself, :math:`p(y_\text{miss} \mid x)`: the samplers draw ``x`` from
:math:`p(x \mid y_\text{obs})` and then ``y_unobserved`` from the likelihood at each draw
(:meth:`ObservationModel.sample_unobserved`); ``y_unobserved`` is never a latent site of the
diffusion sampler. The mask broadcasts against the site's batch shape (one entry per event, as
in NumPyro) or, for a site whose event dimensions are independent entries (``.to_event``), against
its whole shape (one entry per element, e.g. per pixel), which NumPyro itself does not read.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.primitives
from numpyro import handlers
from numpyro.distributions.distribution import Unit
from numpyro.infer.util import compute_log_probs
from numpyro.ops.provenance import eval_provenance
from numpyro.primitives import Messenger

from diffprior import linear_gaussian as lg
from diffprior.operators import LinearOperator, record_calls
from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.types import Array, ArrayLike

__all__ = [
    "ModelError",
    "ModelReader",
    "OBS_MASK_KEY",
    "ObservationModel",
    "arguments_key",
    "check_missing_unused",
    "hide_unobserved",
    "inflate_variance",
    "model_arguments",
    "reading_obs_mask",
    "read_model",
    "sample_sites_at_zeros",
    "is_diffusion_prior",
    "missing_sites",
    "unwrap_distribution",
]

_WRAPPERS = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)


class ModelError(ValueError):
    """A NumPyro model that diffprior cannot sample: the message names the site and the
    expected versus the given value."""


def unwrap_distribution(fn: dist.Distribution) -> dist.Distribution:
    """The distribution inside any ``Independent`` / ``Expanded`` / ``Masked`` wrappers."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def is_diffusion_prior(fn: Any) -> bool:
    """Whether a sample site's distribution is a (possibly wrapped) DiffusionPrior."""
    return isinstance(fn, dist.Distribution) and isinstance(unwrap_distribution(fn), DiffusionPrior)


def _is_factor(site: Mapping[str, Any]) -> bool:
    """Whether a site is a :func:`numpyro.factor` term (a ``Unit`` pseudo-observation)."""
    return isinstance(unwrap_distribution(site["fn"]), Unit)


def _inflate(fn: dist.Distribution, extra_variance: ArrayLike) -> dist.Distribution:
    """``fn`` with every Normal / StudentT scale replaced by ``sqrt(scale**2 + extra_variance)``,
    rebuilding the Independent / Expanded / Masked wrappers around it."""
    if isinstance(fn, dist.Normal):
        return dist.Normal(fn.loc, jnp.sqrt(fn.scale**2 + extra_variance))
    if isinstance(fn, dist.StudentT):
        return dist.StudentT(fn.df, fn.loc, jnp.sqrt(fn.scale**2 + extra_variance))
    if isinstance(fn, dist.Independent):
        base = _inflate(fn.base_dist, extra_variance)
        return (
            base if base is fn.base_dist else dist.Independent(base, fn.reinterpreted_batch_ndims)
        )
    if isinstance(fn, dist.ExpandedDistribution):
        base = _inflate(fn.base_dist, extra_variance)
        return base if base is fn.base_dist else dist.ExpandedDistribution(base, fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        base = _inflate(fn.base_dist, extra_variance)
        return base if base is fn.base_dist else dist.MaskedDistribution(base, fn._mask)
    return fn


class inflate_variance(Messenger):
    r"""Inflate the variance of every Normal and Student-t observation by ``extra_variance``:
    the scale :math:`\sigma` of an observed site becomes :math:`\sqrt{\sigma^2 + v}`.
    Other observed sites and all latent sites are left alone. ``extra_variance`` may be a
    traced scalar, an array that broadcasts against the site's shape, or a mapping from site
    name to such values (sites not in the mapping are left alone).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro import handlers
    >>> def model():
    ...     numpyro.sample("y", dist.Normal(0.0, 3.0), obs=1.0)
    >>> tr = handlers.trace(inflate_variance(model, extra_variance=16.0)).get_trace()
    >>> float(tr["y"]["fn"].scale)
    5.0
    """

    def __init__(self, fn: Callable | None = None, extra_variance: ArrayLike = 0.0) -> None:
        self.extra_variance = extra_variance
        super().__init__(fn)

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            extra = self.extra_variance
            if isinstance(extra, Mapping):
                if msg["name"] not in extra:
                    return
                extra = extra[msg["name"]]
            msg["fn"] = _inflate(msg["fn"], extra)


# -- missing observations (obs_mask=) -------------------------------------------------------------
#: Key of the ``infer`` dict that marks the two sample sites of
#: ``numpyro.sample(name, fn, obs=..., obs_mask=...)`` while diffprior reads a model (its value:
#: ``name``): the observed ``name + "_observed"`` and the latent ``name + "_unobserved"``.
OBS_MASK_KEY = "diffprior_obs_mask"


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` without growing it."""
    shape, target = tuple(shape), tuple(target)
    if len(shape) > len(target):
        return False
    return all(n in (1, m) for n, m in zip(reversed(shape), reversed(target), strict=False))


def _entries(fn: dist.Distribution) -> dist.Distribution | None:
    """``fn`` as independent entries: batch shape ``fn.shape()``, event shape ``()`` and the
    same log-density summed over the entries; ``None`` when its event does not split so (a
    multivariate distribution such as ``MultivariateNormal``)."""
    if not fn.event_shape:
        return fn
    if isinstance(fn, dist.Independent):
        return _entries(fn.base_dist)
    if isinstance(fn, dist.ExpandedDistribution):
        base = _entries(fn.base_dist)
        return None if base is None else base.expand(tuple(fn.shape()))
    if isinstance(fn, dist.MaskedDistribution):
        base = _entries(fn.base_dist)
        if base is None:
            return None
        mask = fn._mask
        if not isinstance(mask, bool):
            mask = jnp.reshape(mask, jnp.shape(mask) + (1,) * len(fn.event_shape))
        return base.mask(mask)
    return None


def _masked_observe(
    name: str, fn: dist.Distribution, obs: ArrayLike | None, obs_mask: ArrayLike, **kwargs: Any
) -> Array:
    """diffprior's reading of ``numpyro.sample(name, fn, obs=obs, obs_mask=obs_mask)``: NumPyro's
    split into ``name_observed`` (masked by ``obs_mask``), ``name_unobserved`` (masked by its
    negation) and the deterministic ``name``, both sample sites marked with
    :data:`OBS_MASK_KEY`. A mask that broadcasts to the site's batch shape masks whole events,
    as in NumPyro; one that broadcasts only to the site's whole shape masks single entries of a
    distribution whose event splits into independent entries (``.to_event``), where NumPyro
    would broadcast the distribution against the mask. Anything else is a :class:`ModelError`
    naming the site."""
    if is_diffusion_prior(fn):
        raise ModelError(
            f"site {name!r}: obs_mask= on the DiffusionPrior site, which NumPyro splits into an "
            f"observed site {name + '_observed'!r} and a latent site {name + '_unobserved'!r}; "
            "the DiffusionPrior site must be one latent site to sample (no obs=, no obs_mask=): "
            "put obs_mask on an observed site that depends on it"
        )
    if jnp.result_type(obs_mask) != jnp.bool_:
        raise ModelError(
            f"site {name!r}: obs_mask must be a boolean array (True where y is observed), got "
            f"dtype {jnp.result_type(obs_mask)}"
        )
    event = tuple(fn.event_shape)
    shape = tuple(fn.shape()) if obs is None else tuple(jnp.shape(obs))
    batch = shape[: len(shape) - len(event)]
    mask_shape = tuple(jnp.shape(obs_mask))
    missing = (not obs_mask) if isinstance(obs_mask, bool) else jnp.logical_not(obs_mask)
    if _broadcasts_to(mask_shape, batch):
        observed_fn, unobserved_fn = fn.mask(obs_mask), fn.mask(missing)
        where = jnp.reshape(obs_mask, mask_shape + (1,) * len(event))
    elif event and _broadcasts_to(mask_shape, shape):
        entries = _entries(fn)
        if entries is None:
            raise ModelError(
                f"site {name!r}: obs_mask of shape {_shape_str(mask_shape)} masks single "
                f"entries of the event {_shape_str(event)}, but the log-density of "
                f"{type(unwrap_distribution(fn)).__name__} does not split into entries; mask "
                f"whole events with a mask of the batch shape {_shape_str(batch)}"
            )
        where = jnp.broadcast_to(obs_mask, shape)
        observed_fn = entries.mask(where).to_event(len(event))
        unobserved_fn = entries.mask(jnp.logical_not(where)).to_event(len(event))
    else:
        entrywise = (
            f" or to its shape {_shape_str(shape)} (one entry per element, for a distribution "
            "made of independent entries such as dist.Normal(loc, scale).to_event(1))"
            if event
            else ""
        )
        raise ModelError(
            f"site {name!r}: obs_mask has shape {_shape_str(mask_shape)}, but it must broadcast "
            f"to the site's batch shape {_shape_str(batch)} (one entry per event, as in "
            f"NumPyro){entrywise}"
        )
    infer = {**(kwargs.pop("infer", None) or {}), OBS_MASK_KEY: name}
    observed = numpyro.sample(f"{name}_observed", observed_fn, obs=obs, infer=infer, **kwargs)
    unobserved = numpyro.sample(f"{name}_unobserved", unobserved_fn, infer=infer, **kwargs)
    return numpyro.deterministic(name, jnp.where(where, observed, unobserved))


class _ObsMaskReading:
    """Puts :func:`_masked_observe` in place of NumPyro's own while diffprior runs a model
    (``numpyro.sample`` looks it up at every call), counted so that nested and concurrent
    readings share one replacement and the last one out restores NumPyro's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._numpyro_version: Callable | None = None

    @contextlib.contextmanager
    def active(self):
        with self._lock:
            if self._depth == 0:
                self._numpyro_version = getattr(numpyro.primitives, "_masked_observe", None)
                numpyro.primitives._masked_observe = _masked_observe
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    numpyro.primitives._masked_observe = self._numpyro_version


_OBS_MASK_READING = _ObsMaskReading()


def reading_obs_mask(model: Callable) -> Callable:
    """``model``, with ``numpyro.sample(..., obs_mask=m)`` read as diffprior reads it while it
    runs (module docstring): its two sample sites marked with :data:`OBS_MASK_KEY`, and a
    mask of the site's whole shape masking single entries. Every handler diffprior applies to a
    user's model wraps this."""

    def model_reading_obs_mask(*args: Any, **kwargs: Any) -> Any:
        with _OBS_MASK_READING.active():
            return model(*args, **kwargs)

    return model_reading_obs_mask


def _unobserved_of(site: Mapping[str, Any]) -> str | None:
    """The obs_mask site whose missing entries the sample site ``site`` is (its latent
    ``name_unobserved``), or ``None``."""
    name = (site.get("infer") or {}).get(OBS_MASK_KEY)
    if name is None or site["is_observed"] or site["name"] != f"{name}_unobserved":
        return None
    return name


def missing_sites(sample_sites: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Among the sample sites of a trace of a model read through :func:`reading_obs_mask`,
    the latent site of each ``obs_mask=`` site's missing entries -> its observed site, e.g.
    ``{"y_unobserved": "y_observed"}``."""
    return {
        site["name"]: f"{_unobserved_of(site)}_observed"
        for site in sample_sites
        if _unobserved_of(site) is not None
    }


class hide_unobserved(Messenger):
    """Fix the latent site ``name_unobserved`` of every ``obs_mask=`` site (read through
    :func:`reading_obs_mask`) at ``values[name_unobserved]``, the site's observed value when
    ``values`` has none, and hide it from the handlers outside: it is then no latent site and
    has no density. Given the DiffusionPrior site nothing else depends on it (:func:`read_model`
    checks), so the likelihood of ``x`` is unchanged.

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro import handlers
    >>> def model(y):
    ...     numpyro.sample("y", dist.Normal(0.0, 1.0).expand([3]), obs=y, obs_mask=y > 0)
    >>> model = reading_obs_mask(hide_unobserved(model))
    >>> sorted(handlers.trace(model).get_trace(jnp.array([1.0, -1.0, 2.0])))
    ['y', 'y_observed']
    """

    def __init__(self, fn: Callable | None = None, values: Mapping[str, Any] | None = None):
        self.values = {} if values is None else values
        self._observed: dict[str, Any] = {}
        super().__init__(fn)

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample":
            return
        name = (msg.get("infer") or {}).get(OBS_MASK_KEY)
        if name is None:
            return
        if msg["is_observed"]:
            self._observed[name] = msg["value"]
            return
        if _unobserved_of(msg) is None:
            return
        value = self.values.get(msg["name"])
        if value is None:
            value = self._observed.get(name)
        if value is not None:
            msg["value"] = value
            msg["stop"] = True


def _shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(n) for n in shape))


class ObservationModel:
    r"""The likelihood :math:`p(y \mid x)` of a NumPyro model with one DiffusionPrior site ``x``.

    Build it with :func:`read_model`. All methods are pure JAX functions of ``x`` (jit-able,
    vmap-able, differentiable); ``x`` has the prior's ``event_shape``.

    Attributes
    ----------
    prior_site
        Name of the DiffusionPrior sample site.
    prior
        The :class:`~diffprior.DiffusionPrior` at that site.
    event_shape
        Shape of one ``x``.
    observed
        Observed site name -> observed value, in the model's order (``numpyro.factor`` terms
        are not observations and are left out here, but count in the log-likelihoods). An
        ``obs_mask=`` site ``y`` is observed as ``y_observed``, its missing entries masked.
    observed_flat
        The observed values flattened and concatenated in that order.
    likelihood_sites
        The sites whose log-densities make up :meth:`log_likelihood`: the observed sites and any
        ``numpyro.factor`` terms that depend on ``x``.
    fixed_sites
        Observed sites whose density does not depend on ``x`` (typically latents fixed with
        ``numpyro.handlers.condition``): constants in ``x``, left out of every term here.
    decode
        ``None``, or (for the model returned by :meth:`in_latent_space`) the prior's decoder:
        the methods then take a latent ``z`` of shape :attr:`event_shape` (the prior's
        ``latent_shape``) and evaluate the model at ``x = decode(z)``.
    missing
        The latent site of each ``obs_mask=`` site's missing entries -> its observed site,
        e.g. ``{"y_unobserved": "y_observed"}``: not sampled by the diffusion samplers (it is
        fixed and hidden in every method here), drawn given ``x`` by
        :meth:`sample_unobserved`.
    """

    def __init__(
        self,
        model: Callable,
        args: tuple,
        kwargs: dict,
        prior_site: str,
        prior: DiffusionPrior,
        observed: dict[str, Array],
        likelihood_sites: Sequence[str] | None = None,
        fixed_sites: Sequence[str] = (),
        missing: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.prior_site = prior_site
        self.prior = prior
        self.event_shape = tuple(prior.event_shape)
        self.observed = observed
        self.likelihood_sites = tuple(observed if likelihood_sites is None else likelihood_sites)
        self.fixed_sites = tuple(fixed_sites)
        self.missing = dict(missing or {})
        self.decode: Callable[[Array], Array] | None = None
        self.observed_flat = jnp.concatenate(
            [jnp.zeros((0,), jnp.result_type(float))]
            + [jnp.ravel(value).astype(jnp.result_type(float)) for value in observed.values()]
        )

    def __repr__(self) -> str:
        sites = ", ".join(f"{name}{_shape_str(v.shape)}" for name, v in self.observed.items())
        latent = ", latent" if self.decode is not None else ""
        return (
            f"ObservationModel(prior_site={self.prior_site!r}, "
            f"event_shape={self.event_shape}{latent}, observed=[{sites}])"
        )

    def in_latent_space(self) -> ObservationModel:
        r"""This likelihood as a function of the prior's latent :math:`z`,
        :math:`\log p(y \mid x = D(z))` with :math:`D` the prior's ``decode``: a copy whose
        :attr:`event_shape` is the prior's ``latent_shape`` (what the samplers' particles
        are). ``self`` for a prior that diffuses ``x`` itself (a plain
        :class:`~diffprior.DiffusionPrior`, whose ``decode`` is the identity)."""
        if type(self.prior).decode is DiffusionPrior.decode or self.decode is not None:
            return self
        latent = copy.copy(self)
        latent.event_shape = tuple(self.prior.latent_shape)
        latent.decode = self.prior.decode
        return latent

    def in_image_space(self) -> ObservationModel:
        r"""The inverse of :meth:`in_latent_space`: the likelihood as a function of the image
        :math:`x` (of the prior's ``event_shape``); ``self`` when it already is."""
        if self.decode is None:
            return self
        image = copy.copy(self)
        image.event_shape = tuple(self.prior.event_shape)
        image.decode = None
        return image

    def likelihood_model(self, values: Mapping[str, Any] | None = None) -> Callable:
        """The model as every method here reads it: ``obs_mask=`` sites read through
        :func:`reading_obs_mask`, their missing entries fixed at ``values`` (default:
        placeholders) and hidden (:class:`hide_unobserved`). Handlers that evaluate the
        likelihood (e.g. a twist's) wrap this, not :attr:`model`."""
        return reading_obs_mask(hide_unobserved(self.model, values))

    def _conditioned(
        self,
        x: ArrayLike,
        extra_variance: ArrayLike | None,
        *,
        values: Mapping[str, Any] | None = None,
        rng_key: Array | None = None,
        hide_missing: bool = True,
    ) -> Callable:
        """The model with ``x`` (or ``decode(x)`` for a latent ``x``) substituted and the prior
        site hidden from outer handlers; the missing entries of ``obs_mask=`` sites fixed at
        ``values`` (default: placeholders) and hidden too (:class:`hide_unobserved`), or left
        latent sites, drawn from ``rng_key``, with ``hide_missing=False``."""
        x = jnp.asarray(x)
        if x.shape != self.event_shape:
            what = "latent z" if self.decode is not None else "x"
            shape = "latent shape" if self.decode is not None else "event shape"
            raise ValueError(
                f"site {self.prior_site!r}: {what} has shape {_shape_str(x.shape)}, but the "
                f"prior's {shape} is {self.event_shape} (vmap over a batch of {what})"
            )
        if self.decode is not None:
            x = self.decode(x)
        model = self.likelihood_model(values) if hide_missing else reading_obs_mask(self.model)
        model = handlers.substitute(model, data={self.prior_site: x})
        if extra_variance is not None:
            model = inflate_variance(model, extra_variance=extra_variance)
        # block sits outside substitute: a blocked message stops before reaching outer handlers,
        # and the prior site must be substituted before it can be hidden from the trace.
        model = handlers.block(model, hide=[self.prior_site])
        return handlers.seed(model, rng_seed=0 if rng_key is None else rng_key)

    def _site_log_probs(
        self,
        x: ArrayLike,
        extra_variance: ArrayLike | None,
        sum_log_prob: bool,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Array]:
        log_probs, _ = compute_log_probs(
            self._conditioned(x, extra_variance, values=values),
            self.args,
            self.kwargs,
            params={},
            sum_log_prob=sum_log_prob,
        )
        return {name: log_probs[name] for name in self.likelihood_sites}

    def log_likelihood(self, x: ArrayLike, extra_variance: ArrayLike | None = None) -> Array:
        r""":math:`\log p(y \mid x) = \sum_j s_j \log p_j(y_j \mid x)`, a scalar.

        With ``extra_variance`` :math:`v`, every Normal and Student-t observation scale
        :math:`\sigma` is replaced by :math:`\sqrt{\sigma^2 + v}` (:class:`inflate_variance`).
        """
        log_probs = self._site_log_probs(x, extra_variance, sum_log_prob=True)
        return sum(log_probs.values(), start=jnp.zeros((), jnp.result_type(float)))

    def pointwise_log_likelihood(self, x: ArrayLike) -> dict[str, Array]:
        r"""Per site of :attr:`likelihood_sites`, :math:`s_j \log p_j(y_j \mid x)` with event
        dimensions summed and batch (plate) dimensions kept, for ArviZ's ``log_likelihood``
        group. The entries sum to :meth:`log_likelihood`."""
        return self._site_log_probs(x, None, sum_log_prob=False)

    def sample_unobserved(self, rng_key: Array, x: ArrayLike) -> dict[str, Array]:
        r"""A draw of the missing entries of every ``obs_mask=`` site given ``x``: each site of
        :attr:`missing` (e.g. ``y_unobserved``) drawn from the likelihood
        :math:`p(y \mid x)`, which is their posterior given ``x``. As NumPyro's latent site it
        has the whole site's shape; the entries where the mask is True are draws too, which the
        model ignores. ``{}`` for a model without ``obs_mask``."""
        if not self.missing:
            return {}
        model = self._conditioned(x, None, rng_key=rng_key, hide_missing=False)
        tr = handlers.trace(model).get_trace(*self.args, **self.kwargs)
        return {name: tr[name]["value"] for name in self.missing}

    def observation_weights(self) -> Array | None:
        """Each observed entry's weight in :meth:`log_likelihood`, flattened in the order of
        :attr:`observed_flat`: 0 where it is masked (``numpyro.handlers.mask``, ``.mask(...)``,
        the missing entries of ``obs_mask=``), times the site's ``numpyro.handlers.scale``.
        ``None`` when no observed site is masked or scaled (every weight 1)."""
        x = jnp.zeros(self.event_shape, jnp.result_type(float))
        tr = handlers.trace(self._conditioned(x, None)).get_trace(*self.args, **self.kwargs)
        weights, weighted = [], False
        for name in self.observed:
            site = tr[name]
            shape = tuple(site["fn"].shape())
            weight = jnp.ones(shape, jnp.result_type(float))
            layer = site["fn"]
            while isinstance(layer, _WRAPPERS):
                if isinstance(layer, dist.MaskedDistribution) and layer._mask is not True:
                    weighted = True
                    mask = jnp.broadcast_to(jnp.asarray(layer._mask), tuple(layer.batch_shape))
                    mask = mask.reshape(mask.shape + (1,) * len(layer.event_shape))
                    weight = weight * jnp.broadcast_to(mask, shape)
                layer = layer.base_dist
            if site.get("scale") is not None:
                weighted = True
                fn = site["fn"]
                scale = jnp.broadcast_to(jnp.asarray(site["scale"]), tuple(fn.batch_shape))
                weight = weight * jnp.broadcast_to(
                    scale.reshape(scale.shape + (1,) * len(fn.event_shape)), shape
                )
            weights.append(jnp.ravel(weight))
        if not weighted:
            return None
        return jnp.concatenate([jnp.zeros((0,), jnp.result_type(float)), *weights])

    def noise_families(self) -> dict[str, str]:
        """Observed site -> the class name of its (unwrapped) distribution, e.g. ``"Normal"``."""
        x = jnp.zeros(self.event_shape, jnp.result_type(float))
        tr = handlers.trace(self._conditioned(x, None)).get_trace(*self.args, **self.kwargs)
        return {name: type(unwrap_distribution(tr[name]["fn"])).__name__ for name in self.observed}

    def observation_scale(self, x: ArrayLike) -> Array:
        """Each observed site's noise ``scale`` (Normal, StudentT, Laplace, ...), broadcast to
        the site's shape, flattened and concatenated in the order of :attr:`observed_flat`.

        Raises :class:`ModelError` naming the site when its distribution has no ``scale``.
        """
        tr = handlers.trace(self._conditioned(x, None)).get_trace(*self.args, **self.kwargs)
        scales = []
        for name in self.observed:
            fn = tr[name]["fn"]
            base = unwrap_distribution(fn)
            if not hasattr(base, "scale"):
                raise ModelError(
                    f"site {name!r}: {type(base).__name__} observations have no noise scale"
                )
            scales.append(jnp.ravel(jnp.broadcast_to(base.scale, fn.shape())))
        return jnp.concatenate([jnp.zeros((0,), jnp.result_type(float)), *scales])

    def observation_mean(self, x: ArrayLike) -> Array:
        r""":math:`E[y \mid x]`: each observed site's mean, flattened and concatenated in the
        order of :attr:`observed_flat` (for a Student-t with ``df <= 1`` the mean is infinite)."""
        tr = handlers.trace(self._conditioned(x, None)).get_trace(*self.args, **self.kwargs)
        means = [
            jnp.ravel(jnp.broadcast_to(tr[name]["fn"].mean, tr[name]["fn"].shape()))
            for name in self.observed
        ]
        return jnp.concatenate([jnp.zeros((0,), jnp.result_type(float)), *means])

    # -- linear Gaussian structure --------------------------------------------------------------
    def is_linear_gaussian(self, rtol: float = 1e-4) -> bool:
        """Whether every observed site is Normal with a scale that does not depend on ``x`` and
        its mean is affine in ``x`` (checked at random points; needs concrete values), and no
        other term (a ``numpyro.factor`` depending on ``x``) enters the likelihood."""
        if not self.observed or set(self.noise_families().values()) != {"Normal"}:
            return False
        if set(self.likelihood_sites) != set(self.observed):
            return False
        keys = jax.random.split(jax.random.key(0), 2)
        a, b = (jax.random.normal(k, self.event_shape) for k in keys)
        zero = jnp.zeros(self.event_shape)
        mean = self.observation_mean
        residual = mean(a + b) - mean(a) - mean(b) + mean(zero)
        size = jnp.abs(mean(a)) + jnp.abs(mean(b)) + 1.0
        scales_fixed = jnp.allclose(self.observation_scale(a), self.observation_scale(zero))
        return bool(jnp.all(jnp.abs(residual) <= rtol * size)) and bool(scales_fixed)

    def _structured_operator(self) -> tuple[LinearOperator | None, bool]:
        """The one :mod:`diffprior.operators` operator that maps ``x`` to the only observed
        site, if there is one, and whether that site's noise scale is a single number."""
        zero = jnp.zeros(self.event_shape, jnp.result_type(float))
        with record_calls() as calls:
            tr = handlers.trace(self._conditioned(zero, None)).get_trace(*self.args, **self.kwargs)
        if self.decode is not None or len(self.observed) != 1:
            return None, False
        (name,) = self.observed
        ops = []
        size = int(np.prod(self.event_shape))
        for op in calls:
            if op.in_dim == size and all(op is not seen for seen in ops):
                ops.append(op)
        if len(ops) != 1 or ops[0].out_dim != int(np.size(self.observed[name])):
            return None, False
        scale = getattr(unwrap_distribution(tr[name]["fn"]), "scale", None)
        return ops[0], scale is not None and int(np.size(scale)) == 1

    def linear_gaussian(self) -> lg.WhitenedSVD:
        r"""The whitened SVD (:class:`diffprior.linear_gaussian.WhitenedSVD`) of a linear
        Gaussian model :math:`y = g A x + b + \sigma \varepsilon`.

        When the one observed site's mean is :math:`g A(x) + b` for one
        :mod:`diffprior.operators` operator ``A`` applied to ``x`` in the model (a scalar gain
        :math:`g` and offset :math:`b` allowed) with one noise scale (or one per observation
        for :class:`~diffprior.operators.Inpaint` and
        :class:`~diffprior.operators.Downsample`), the SVD is the operator's own: no dense
        matrix exists, whatever ``d``. Otherwise it is the thin SVD of the mean's dense
        Jacobian, refused with a ``ModelError`` naming the structured operators above
        :data:`diffprior.linear_gaussian.MAX_DENSE_ENTRIES` entries.

        The model must be linear Gaussian (:meth:`is_linear_gaussian`); with concrete values
        the structured form is checked against the model's own mean. Masked observations
        (``numpyro.handlers.mask``, ``obs_mask=``) and scaled sites (``numpyro.handlers.scale``)
        weigh each row by :meth:`observation_weights`: a masked row is no observation.
        """
        families = self.noise_families()
        if not families or set(families.values()) != {"Normal"}:
            detail = ", ".join(f"{site}: {family}" for site, family in families.items())
            raise ModelError(f"a whitened SVD needs Normal observations; the model has ({detail})")
        zero = jnp.zeros(self.event_shape, jnp.result_type(float))
        offset = self.observation_mean(zero)
        scale = self.observation_scale(zero)
        op, scalar_scale = self._structured_operator()
        weights = self.observation_weights()
        # weighted rows are a noise scale per row: operators whose rows are orthogonal only
        scalar_scale = scalar_scale and weights is None
        usable = op is not None and (scalar_scale or isinstance(op, lg._PERMUTATION_LEFT))
        if usable:
            probe = jax.random.normal(jax.random.key(0), self.event_shape)
            change = self.observation_mean(probe) - offset
            applied = jnp.ravel(op(probe.reshape(op.in_shape)))
            gain = jnp.vdot(change, applied) / jnp.vdot(applied, applied)
            if not _is_traced(change) and not bool(
                jnp.allclose(
                    change, gain * applied, rtol=1e-4, atol=1e-4 * jnp.max(jnp.abs(change))
                )
            ):
                raise ModelError(
                    f"the mean of site {next(iter(self.observed))!r} is linear in x but is not a "
                    f"multiple of {type(op).__name__}(x), the only operator the model applies to "
                    "x: write the whole linear map as one diffprior.operators operator"
                )
            return lg.from_operator(
                op,
                scale[:1] if scalar_scale else scale,
                self.observed_flat,
                offset,
                gain,
                event_shape=self.event_shape,
                weight=weights,
            )
        num_obs = int(self.observed_flat.shape[0])
        try:
            matrix = lg.jacobian_matrix(self.observation_mean, self.event_shape, num_obs)
        except ValueError as err:
            raise ModelError(str(err)) from None
        return lg.from_matrix(
            matrix, scale, self.observed_flat, offset, self.event_shape, weight=weights
        )


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_prior_site(site: Mapping[str, Any]) -> DiffusionPrior:
    name, fn = site["name"], site["fn"]
    prior = unwrap_distribution(fn)
    if site["is_observed"]:
        raise ModelError(
            f"site {name!r}: the DiffusionPrior site is observed (obs=...), but it must be the "
            "latent to sample; observe a different site that depends on it"
        )
    if tuple(fn.shape()) != tuple(prior.event_shape):
        raise ModelError(
            f"site {name!r}: the DiffusionPrior site has shape {_shape_str(fn.shape())}, but the "
            f"prior's event shape is {_shape_str(prior.event_shape)}; put it outside any plate "
            "and do not expand it"
        )
    if site.get("scale") is not None:
        raise ModelError(
            f"site {name!r}: the DiffusionPrior site is scaled (numpyro.handlers.scale), which "
            "the samplers cannot honour; apply the scale to the observed sites only"
        )
    wrapper = fn
    while isinstance(wrapper, _WRAPPERS):
        if isinstance(wrapper, dist.MaskedDistribution):
            mask = wrapper._mask
            if isinstance(mask, jax.core.Tracer) or not np.all(np.asarray(mask)):
                raise ModelError(
                    f"site {name!r}: the DiffusionPrior site is masked (mask={mask!r}), which "
                    "the samplers cannot honour; mask the observed sites instead"
                )
        wrapper = wrapper.base_dist
    return prior


def _check_observed(site: Mapping[str, Any]) -> Array:
    name, value = site["name"], site["value"]
    expected = tuple(site["fn"].shape())
    given = tuple(jnp.shape(value))
    if given != expected:
        raise ModelError(
            f"site {name!r}: observed value has shape {_shape_str(given)}, but the likelihood "
            f"has shape {_shape_str(expected)}"
        )
    if isinstance(value, jax.core.Tracer):
        return value  # read inside a transformation: only the static checks apply
    concrete = np.asarray(value)
    if np.issubdtype(concrete.dtype, np.inexact):
        num_nan = int(np.isnan(concrete).sum())
        num_inf = int(np.isinf(concrete).sum())
        if num_nan or num_inf:
            raise ModelError(
                f"site {name!r}: observed value has {num_nan} NaN and {num_inf} inf entries "
                f"(out of {concrete.size}); every observation must be finite (mask missing "
                "entries with numpyro.handlers.mask or drop them)"
            )
    return jnp.asarray(value)


def _constraint_words(constraint: Any) -> str:
    """A constraint in words, e.g. ``"> 0"`` for ``constraints.positive``."""
    kinds = {cls.__name__ for cls in type(constraint).__mro__}
    if "_IndependentConstraint" in kinds:
        return _constraint_words(constraint.base_constraint)
    if "_Real" in kinds:
        return "finite"
    if "_GreaterThanEq" in kinds:
        return f">= {constraint.lower_bound}"
    if "_GreaterThan" in kinds:
        return f"> {constraint.lower_bound}"
    if "_LessThan" in kinds:
        return f"< {constraint.upper_bound}"
    if "_OpenInterval" in kinds:
        return f"in ({constraint.lower_bound}, {constraint.upper_bound})"
    if "_Interval" in kinds:
        return f"in [{constraint.lower_bound}, {constraint.upper_bound}]"
    return f"valid ({constraint!r})"


def _check_parameters(site: Mapping[str, Any]) -> None:
    """Raise a :class:`ModelError` naming the site and the parameter when a concrete parameter
    of the site's distribution, or of any distribution it wraps, breaks its ``arg_constraints``
    (the check NumPyro's ``validate_args`` makes, with the site's name and the value given)."""
    layer = site["fn"]
    while isinstance(layer, dist.Distribution):
        for param, value in layer.get_args().items():
            constraint = layer.arg_constraints[param]
            if isinstance(value, jax.core.Tracer) or dist.constraints.is_dependent(constraint):
                continue
            try:
                valid = constraint(value)
            except Exception:  # noqa: BLE001 -- a constraint that cannot judge is no verdict
                continue
            if isinstance(valid, jax.core.Tracer):
                continue
            invalid = ~np.asarray(valid, bool)
            if not invalid.any():
                continue
            given = np.asarray(value)
            if invalid.shape == given.shape and given.size > 1:
                first = given[invalid].ravel()[0]
                given_str = f"{first} ({int(invalid.sum())} of {invalid.size} entries invalid)"
            elif given.size == 1:
                given_str = f"{given.ravel()[0]}"
            else:
                given_str = f"{int(invalid.sum())} invalid of {invalid.size}"
            raise ModelError(
                f"site {site['name']!r}: {type(layer).__name__} {param} must be "
                f"{_constraint_words(constraint)}, got {given_str}"
            )
        layer = layer.base_dist if isinstance(layer, _WRAPPERS) else None


#: JAX's errors about a traced value used as a concrete one: reported as they are (they name
#: the operation), never wrapped.
_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def sample_sites_at_zeros(
    model: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The model's sample sites, traced once with zeros at every DiffusionPrior site (no
    diffusion is run) and a fixed seed for any other latent site.

    Every concrete distribution parameter is checked against its ``arg_constraints``, so a
    likelihood such as ``dist.Normal(A @ x, -1.0)`` fails here with a :class:`ModelError`
    naming the site and the parameter. An error raised while tracing (NumPyro's validation, a
    forward operator applied to an ``x`` of the wrong shape, ...) becomes a :class:`ModelError`
    that names the last site reached and the DiffusionPrior site's shape.
    """

    def zeros_at_prior(msg: dict[str, Any]) -> Array | None:
        if msg["type"] == "sample" and not msg["is_observed"] and is_diffusion_prior(msg["fn"]):
            return jnp.zeros(msg["fn"].shape(), jnp.result_type(float))
        return None

    def tracer() -> handlers.trace:
        return handlers.trace(
            handlers.seed(handlers.substitute(model, substitute_fn=zeros_at_prior), rng_seed=0)
        )

    def sample_sites(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [site for site in trace.values() if site["type"] == "sample"]

    first = tracer()
    try:
        sites = sample_sites(first.get_trace(*args, **kwargs))
    except (ModelError, *_TRACER_ERRORS):
        raise
    except (TypeError, ValueError, IndexError) as err:
        # NumPyro's argument validation names the distribution but not the site: trace again
        # without it, so that the check below can name the site and the value
        try:
            with numpyro.validation_enabled(False):
                unvalidated = sample_sites(tracer().get_trace(*args, **kwargs))
        except Exception:  # noqa: BLE001 -- the first error is the one to report
            unvalidated = []
        for site in unvalidated:
            if not is_diffusion_prior(site["fn"]) and not _is_factor(site):
                try:
                    _check_parameters(site)
                except ModelError as named:
                    raise named from err
        raise _tracing_error(sample_sites(first.trace), err) from err
    for site in sites:
        if not is_diffusion_prior(site["fn"]) and not _is_factor(site):
            _check_parameters(site)
    return sites


def _tracing_error(reached: list[dict[str, Any]], err: Exception) -> ModelError:
    """A one-line :class:`ModelError` for an error raised inside the model while it is read:
    the last site reached, the DiffusionPrior site's shape and the error's first line."""
    detail = (str(err).strip().splitlines() or [""])[0].rstrip(".")
    priors = [site for site in reached if is_diffusion_prior(site["fn"])]
    where = f" after site {reached[-1]['name']!r}" if reached else " before its first site"
    hint = ""
    if priors:
        name, shape = priors[0]["name"], _shape_str(priors[0]["fn"].shape())
        where += f" (the DiffusionPrior site {name!r} has shape {shape})"
        if "shape" in detail:
            hint = (
                f"; the forward operator must map an {name} of shape {shape} (the prior's event "
                "shape) to the observation's shape"
            )
    return ModelError(f"the model raised {type(err).__name__}{where}: {detail}{hint}")


def _array_if_numbers(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):  # strings, ragged lists, objects: the model's own business
        return value


def model_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model's ``args`` and ``kwargs`` with every list of numbers made a JAX array, so that
    ``run(key, y=[1.0, 2.0])`` observes an array as ``y=jnp.array([1.0, 2.0])`` would (NumPyro
    passes lists through, and ``y - loc`` then fails). Tuples are left alone: models use them
    for shapes and other static values. Lists that are not all numbers are left alone too.

    Examples
    --------
    >>> args, kwargs = model_arguments(([1, 2], (3, 4)), {"y": [0.5], "names": ["a"]})
    >>> isinstance(args[0], jax.Array), args[1], kwargs["y"].shape, kwargs["names"]
    (True, (3, 4), (1,), ['a'])
    """
    return (
        tuple(_array_if_numbers(value) for value in args),
        {name: _array_if_numbers(value) for name, value in (kwargs or {}).items()},
    )


def read_model(
    model: Callable,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    require_observation: bool = True,
) -> ObservationModel:
    """Check a NumPyro model and return its :class:`ObservationModel`.

    The model is traced once, under ``seed(rng_seed=0)``, with zeros substituted at every
    DiffusionPrior site (so no diffusion is ever run), and is rejected with a
    :class:`ModelError` naming the site when:

    - it has no DiffusionPrior site, or more than one, or the DiffusionPrior site is observed,
      inside a plate, scaled or masked;
    - it has no observed site (or ``numpyro.factor``) whose density depends on ``x``: there is
      nothing to condition on (unless ``require_observation=False``: draws from the prior
      through the model, as :class:`~diffprior.Unguided` makes them);
    - it has other latent sample sites (fix them, e.g. with ``numpyro.handlers.condition``);
      the missing entries of an ``obs_mask=`` site are none (:attr:`ObservationModel.missing`,
      module docstring), unless another site's density uses them;
    - an ``obs_mask`` has a shape that is neither the site's batch shape nor (for independent
      entries) its whole shape, or sits on the DiffusionPrior site;
    - an observed value's shape differs from its site's distribution shape, or it holds NaN or
      inf;
    - a distribution parameter breaks its constraint (e.g. a Normal scale <= 0 or NaN), or the
      model raises while it is traced (e.g. a forward operator applied to an ``x`` of the wrong
      shape): see :func:`sample_sites_at_zeros`;
    - it is not traceable by ``jax.jit`` as a function of ``x``.

    Which observed sites depend on ``x`` is found by provenance tracking through the model's
    jaxpr; those that do not (latents fixed with ``condition``) become
    :attr:`ObservationModel.fixed_sites`, constants left out of the likelihood.

    Parameters
    ----------
    model
        A NumPyro model, called as ``model(*args, **kwargs)``.
    args, kwargs
        The model's arguments, typically the observations (as for ``numpyro.infer.MCMC.run``).
    require_observation
        Refuse a model with nothing to condition on (the default). With ``False`` such a model
        reads as an :class:`ObservationModel` with no likelihood sites (log-likelihood 0).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> A = jnp.array([[1.0, 2.0]])
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(A @ x, 0.5).to_event(1), obs=y)
    >>> obs = read_model(model, kwargs={"y": jnp.array([1.0])})
    >>> obs.prior_site, obs.event_shape, list(obs.observed)
    ('x', (2,), ['y'])
    >>> float(obs.observation_mean(jnp.array([1.0, 1.0]))[0])
    3.0
    >>> round(float(obs.log_likelihood(jnp.zeros(2))), 4)  # log N(1; 0, 0.5^2)
    -2.2258
    """
    return _read_model(model, args, kwargs, require_observation=require_observation)[0]


class _Structure(NamedTuple):
    """What :func:`read_model` finds that the observed values cannot change: every sample
    site's name and kind in the model's order (:func:`_site_kinds`) and the likelihood sites
    whose density depends on ``x`` (provenance tracking, the costly part of a read)."""

    site_kinds: tuple[tuple[str, str], ...]
    depends: frozenset[str]


def _site_kinds(sample_sites: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    def kind(site: Mapping[str, Any]) -> str:
        if is_diffusion_prior(site["fn"]):
            return "prior"
        if _is_factor(site):
            return "factor"
        if _unobserved_of(site) is not None:
            return "missing"
        return "observed" if site["is_observed"] else "latent"

    return tuple((site["name"], kind(site)) for site in sample_sites)


def _read_model(
    model: Callable,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    *,
    require_observation: bool,
    known: _Structure | None = None,
) -> tuple[ObservationModel, _Structure, tuple[Any, ...]]:
    """:func:`read_model`, every check included; also the structure it found and the values
    of the sites in :attr:`ObservationModel.observed` as the model passed them (``obs=``;
    those of the fixed sites, parameters of the likelihood, are not among them). With ``known`` (the structure of an earlier
    read of ``model`` with arguments of the same :func:`arguments_key`) the provenance
    tracking is skipped when the model's sample sites are the ones ``known`` lists."""
    args = tuple(args)
    kwargs = dict(kwargs or {})
    # obs_mask= sites read as diffprior reads them; their latent missing entries left in the
    # trace (drawn at x = 0), to be told apart from the other latent sites here
    sample_sites = sample_sites_at_zeros(reading_obs_mask(model), args, kwargs)

    prior_sites = [site for site in sample_sites if is_diffusion_prior(site["fn"])]
    if not prior_sites:
        found = ", ".join(
            f"{site['name']!r} ({type(unwrap_distribution(site['fn'])).__name__})"
            for site in sample_sites
        )
        raise ModelError(
            "the model has no DiffusionPrior sample site; write x = numpyro.sample('x', prior) "
            f"with prior a diffprior.DiffusionPrior (sample sites found: {found or 'none'})"
        )
    if len(prior_sites) > 1:
        names = " and ".join(repr(site["name"]) for site in prior_sites)
        raise ModelError(
            f"the model has {len(prior_sites)} DiffusionPrior sites, {names}, but exactly one "
            "is supported; stack them into one prior with a joint event shape"
        )
    prior_site = prior_sites[0]
    prior = _check_prior_site(prior_site)

    observed_sites = [
        site
        for site in sample_sites
        if site["is_observed"] and site is not prior_site and not _is_factor(site)
    ]
    factors = [site["name"] for site in sample_sites if _is_factor(site)]
    missing = missing_sites(sample_sites)
    others = [
        site["name"]
        for site in sample_sites
        if not site["is_observed"] and site is not prior_site and site["name"] not in missing
    ]
    if not observed_sites and not factors and require_observation:
        hint = (
            f"; the unobserved sites {others} may be missing their data (pass it in args/kwargs)"
            if others
            else ""
        )
        raise ModelError(
            "the model has no observed sample site (obs=...), so there is nothing to condition "
            f"the DiffusionPrior site {prior_site['name']!r} on{hint}; to draw from the prior "
            "through the model, use dp.Unguided(model)"
        )
    if others:
        listed = ", ".join(repr(name) for name in others)
        example = ", ".join(f"{name!r}: value" for name in others)
        forward = (
            "; to draw them given the prior draws, use numpyro.infer.Predictive(model, "
            "sampler.get_samples())"
            if not observed_sites and not factors
            else ""
        )
        raise ModelError(
            f"latent sample sites {listed} besides the DiffusionPrior site "
            f"{prior_site['name']!r} are not supported by dp.Sampler: sample them together "
            "with it as NumPyro MCMC, numpyro.infer.MCMC(dp.ParticleGibbs(model, "
            "num_particles=..., num_steps=...), ...) or dp.PMMH(model, ...), or fix them, e.g. "
            f"with numpyro.handlers.condition(model, data={{{example}}}){forward}"
        )

    observed = {site["name"]: _check_observed(site) for site in observed_sites}
    likelihood_sites = [site["name"] for site in sample_sites if site["is_observed"]]
    site_kinds = _site_kinds(sample_sites)
    if known is not None and known.site_kinds == site_kinds:
        depends = known.depends
    else:
        candidate = ObservationModel(
            model,
            args,
            kwargs,
            prior_site["name"],
            prior,
            observed,
            likelihood_sites=likelihood_sites,
            missing=missing,
        )
        depends = frozenset(_sites_depending_on_x(candidate) if likelihood_sites else ())
    fixed = [name for name in likelihood_sites if name not in depends]
    if len(fixed) == len(likelihood_sites) and require_observation:
        raise ModelError(
            f"no observed site depends on the DiffusionPrior site {prior_site['name']!r} "
            f"(observed: {likelihood_sites}), so there is nothing to condition "
            "it on; to draw from the prior through the model, use dp.Unguided(model)"
        )
    obs = ObservationModel(
        model,
        args,
        kwargs,
        prior_site["name"],
        prior,
        {name: value for name, value in observed.items() if name not in fixed},
        likelihood_sites=[name for name in likelihood_sites if name not in fixed],
        fixed_sites=[name for name in fixed if name not in factors],
        missing=missing,
    )
    passed = tuple(site["value"] for site in observed_sites if site["name"] in obs.observed)
    return obs, _Structure(site_kinds, depends), passed


def arguments_key(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> Hashable | None:
    """What of a model's arguments a read of the model may depend on beyond the arrays' values:
    their tree structure, every non-array leaf (with its type) and every array's shape and
    dtype, the split ``eqx.partition((args, kwargs), eqx.is_array)`` makes for a compiled
    program. ``None`` when a non-array leaf cannot be hashed.

    Examples
    --------
    >>> y = jnp.zeros(3)
    >>> arguments_key((1.0,), {"y": y}) == arguments_key((1.0,), {"y": y + 1.0})
    True
    >>> arguments_key((1.0,), {"y": y}) == arguments_key((2.0,), {"y": y})
    False
    >>> arguments_key((1.0,), {"y": y}) == arguments_key((1.0,), {"y": jnp.zeros(4)})
    False
    """
    leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs or {})))
    parts = tuple(
        (
            "array",
            tuple(np.shape(leaf)),
            np.dtype(leaf.dtype),
            bool(getattr(leaf, "weak_type", False)),
        )
        if eqx.is_array(leaf)
        else ("static", type(leaf), leaf)
        for leaf in leaves
    )
    key = (treedef, parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class ModelReader:
    """:func:`read_model` for one model read again with new values, as
    :class:`~diffprior.Sampler` does at every run.

    Which likelihood sites depend on the DiffusionPrior site is found by provenance tracking
    through the model's jaxpr, the costly part of a read; it depends on the model and on its
    arguments' :func:`arguments_key` (structure, non-array values, array shapes and dtypes),
    not on the arrays' values. The reader keeps it for the last ``max_entries`` keys. A read
    with a kept key traces the model once, as :func:`read_model` does, and makes every check
    of :func:`read_model` on the new values (observed values finite and of the site's shape,
    distribution parameters within their constraints, the model's sites); it skips the
    provenance tracking only when the model's sample sites (names and kinds) are the ones read
    before. This holds for a model that is traceable by ``jax.jit`` in its array arguments, as
    the compiled run of :class:`~diffprior.Sampler` requires: no Python ``if`` on their values.

    ``observed_values`` holds the values of the last read's
    :attr:`ObservationModel.observed` sites as the model passed them (``obs=``).

    Examples
    --------
    >>> import numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> reader = ModelReader(model)
    >>> first = reader((), {"y": jnp.array(1.0)})
    >>> float(reader((), {"y": jnp.array(2.0)}).observed["y"])  # provenance kept, not tracked
    2.0
    >>> reader((), {"y": jnp.array(jnp.nan)})
    Traceback (most recent call last):
    ...
    diffprior.model.ModelError: site 'y': observed value has 1 NaN and 0 inf entries (out of 1); every observation must be finite (mask missing entries with numpyro.handlers.mask or drop them)
    """

    def __init__(self, model: Callable, *, require_observation: bool = True, max_entries: int = 8):
        self.model = model
        self.require_observation = require_observation
        self.max_entries = int(max_entries)
        self.observed_values: tuple[Any, ...] = ()
        self._structures: OrderedDict[Hashable, _Structure] = OrderedDict()

    def __call__(
        self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
    ) -> ObservationModel:
        key = arguments_key(args, kwargs)
        known = None if key is None else self._structures.get(key)
        obs, structure, self.observed_values = _read_model(
            self.model, args, kwargs, require_observation=self.require_observation, known=known
        )
        if key is not None:
            self._structures[key] = structure
            self._structures.move_to_end(key)
            while len(self._structures) > self.max_entries:
                self._structures.popitem(last=False)
        return obs


def _sites_depending_on_x(obs: ObservationModel) -> set[str]:
    """Names of the likelihood sites whose log-density depends on ``x``, found by tracking
    provenance through the model's jaxpr (abstract evaluation: nothing is computed).

    Raises a :class:`ModelError` when one depends on the missing entries of an ``obs_mask=``
    site (:func:`check_missing_unused`)."""

    def site_terms(x, missing):
        return obs._site_log_probs(x, None, sum_log_prob=True, values=missing)

    x = jnp.zeros(obs.event_shape, jnp.result_type(float))
    try:
        provenance = eval_provenance(site_terms, x=x, missing=_placeholders(obs))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise ModelError(
            f"site {obs.prior_site!r}: the model must be a pure JAX function of the "
            "DiffusionPrior value (traceable by jax.jit: no Python `if` on it, no NumPy "
            f"calls on it), but tracing it failed with {type(err).__name__}"
        ) from err
    check_missing_unused(obs, {name: "missing" in sources for name, sources in provenance.items()})
    return {name for name, sources in provenance.items() if "x" in sources}


def _placeholders(obs: ObservationModel) -> dict[str, Array]:
    """A value for each site of ``obs.missing``: the observed value of its site."""
    return {name: jnp.asarray(obs.observed[site]) for name, site in obs.missing.items()}


def check_missing_unused(obs: ObservationModel, uses_missing: Mapping[str, bool]) -> None:
    """Refuse a model in which a site's density (``uses_missing``: site name -> whether it
    depends on the missing entries of an ``obs_mask=`` site, by provenance tracking) depends
    on those missing entries: they would be latent variables of the likelihood, not draws
    from it given ``x``, which is all the samplers make of them."""
    users = [name for name, uses in uses_missing.items() if uses]
    if users:
        sites = ", ".join(repr(name.removesuffix("_unobserved")) for name in obs.missing)
        raise ModelError(
            f"site {users[0]!r}: its density depends on the value returned by the obs_mask= "
            f"site(s) {sites}, whose missing entries ({list(obs.missing)}) are then latent "
            "variables of the likelihood; diffprior draws them from the likelihood given x "
            "only. Use the observed value (the obs= array) there instead"
        )
