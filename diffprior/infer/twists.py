r"""Twisting potentials for TDS and FK steering: the likelihood of the observations given a
noisy particle :math:`x_t`, smoothed over the uncertainty of :math:`x_0` given :math:`x_t`.

The ideal twist is :math:`p(y \mid x_t) = \int p(y \mid x_0)\, p(x_0 \mid x_t)\, dx_0`. The
twists here approximate :math:`p(x_0 \mid x_t)` by a Gaussian around the denoiser's estimate,
:math:`N(\hat x_0, r_t^2 I)` with :math:`r_t^2 = \mathrm{Var}[x_0 \mid x_t]` for Gaussian data
of the prior's variance (:func:`~diffprior.diffusion.transitions.tweedie_variance`), and push it
through each observation's *location* :math:`\eta_i(x)` (the ``loc`` of a Normal, the logits of
a Bernoulli, the log-rate of a Poisson, ...): :math:`\eta_i(x_0)` then has variance
:math:`v_i = r_t^2 g_i`, with :math:`g_i = E \lVert \nabla_x \eta_i \rVert^2` the operator's gain
(:func:`location_gains`). Each observed element is smoothed over :math:`\eta_i + N(0, v_i)`:

- Normal, Student-t, Cauchy, LogNormal: the scale becomes :math:`\sqrt{s_i^2 + v_i}` (exact
  for the Normal and the LogNormal; the same widening for the heavy-tailed ones);
- Laplace: the exact convolution with the Gaussian (:class:`SmoothedLaplace`);
- Bernoulli and Binomial with logits: the logits shrink by
  :math:`(1 + \pi v_i / 8)^{-1/2}` (the probit approximation of a logistic-Gaussian integral);
- Gamma (a multiplicative noise): the log-mean is pulled towards the likelihood's peak at
  :math:`\log y` by :math:`\sqrt{s_i^2 / (s_i^2 + v_i)}`, which for a Gaussian in the log-mean is
  exactly the inflation above;
- Poisson, Exponential and any other univariate likelihood: variance-matched tempering,
  :math:`p(y_i \mid \hat x_0)^{\lambda_i}` with :math:`\lambda_i = s_i^2 / (s_i^2 + v_i)`, where
  :math:`s_i^2` is the likelihood's width in the location's units (:class:`Tempered`). For a
  Gaussian likelihood this is the variance inflation above up to a constant.

A prior calibrated on data (:func:`diffprior.calibrate`) replaces :math:`r_t^2` by the spread
measured there (averaged over coordinates) and :math:`\hat x_0` by the shrunk estimate
:math:`m + a_t (\hat x_0 - m)` the calibration fitted.

At :math:`t = 0`, :math:`v_i = 0` and every twist is the model's own likelihood, so TDS and FK
stay asymptotically exact whatever the approximation (the twists telescope); the smoothing only
lowers the variance of the weights. A likelihood none of these cover (a multivariate one, a
``numpyro.factor`` term, a distribution inside an unknown wrapper) is used unsmoothed with a
:class:`TwistWarning` naming the site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import log_ndtr
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.distribution import Unit
from numpyro.infer.util import compute_log_probs
from numpyro.primitives import Messenger

from diffprior.diffusion.transitions import tweedie_variance
from diffprior.model import ObservationModel
from diffprior.priors import DiffusionPrior
from diffprior.types import Array, ArrayLike

__all__ = [
    "CONSTRUCTIONS",
    "SmoothedLaplace",
    "Tempered",
    "TwistWarning",
    "likelihood_twist",
    "location_gains",
    "observation_gains",
    "site_kinds",
    "smooth_likelihood",
]

#: How the twist smooths each likelihood: ``"auto"`` (closed forms where they exist,
#: variance-matched tempering otherwise), ``"temper"`` (tempering everywhere) or
#: ``"monte_carlo"`` (an average of the likelihood over fixed draws of :math:`x_0`).
CONSTRUCTIONS = ("auto", "temper", "monte_carlo")

# number of fixed draws of the Monte Carlo twist and of the points at which the gains are taken
_NUM_DRAWS = 16
_NUM_GAIN_POINTS = 8


class TwistWarning(UserWarning):
    """A likelihood the twist cannot smooth: it is used as is at every noise level (still
    exact, but the weights may collapse when the observation is informative)."""


# -- smoothed distributions --------------------------------------------------------------------
class Tempered(dist.Distribution):
    r"""``base`` raised to the power ``power`` elementwise: ``log_prob = power *
    base.log_prob`` (not normalised; a twist only needs it up to a constant in ``x``).

    Examples
    --------
    >>> import numpyro.distributions as dist
    >>> float(Tempered(dist.Poisson(2.0), 0.5).log_prob(3.0))  # doctest: +ELLIPSIS
    -0.856...
    """

    arg_constraints = {}
    pytree_data_fields = ("base", "power")

    def __init__(self, base: dist.Distribution, power: ArrayLike):
        self.base = base
        self.power = jnp.asarray(power)
        batch_shape = jnp.broadcast_shapes(tuple(base.batch_shape), jnp.shape(self.power))
        super().__init__(batch_shape=batch_shape, event_shape=base.event_shape)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return self.base.support

    def sample(self, key, sample_shape=()):
        return self.base.expand(self.batch_shape).sample(key, sample_shape)

    def log_prob(self, value):
        return self.power * self.base.log_prob(value)


class SmoothedLaplace(dist.Distribution):
    r"""A Laplace observation whose location carries Gaussian noise of variance
    ``location_variance`` :math:`v`:
    the density of :math:`y = \eta + u + e`, :math:`u \sim N(0, v)`, :math:`e \sim
    \mathrm{Laplace}(0, b)`,

    .. math::
        \frac{e^{v / 2b^2}}{2b} \Big[ e^{-d/b}\, \Phi\big(\tfrac{d}{\sqrt v} -
        \tfrac{\sqrt v}{b}\big) + e^{d/b}\, \Phi\big(-\tfrac{d}{\sqrt v} -
        \tfrac{\sqrt v}{b}\big) \Big], \qquad d = y - \eta,

    evaluated in log space with :func:`jax.scipy.special.log_ndtr`; the Laplace density itself
    where :math:`v = 0`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> exact = SmoothedLaplace(0.0, 1.0, 0.0).log_prob(0.5)
    >>> bool(jnp.allclose(exact, dist.Laplace(0.0, 1.0).log_prob(0.5)))
    True
    """

    arg_constraints = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "location_variance": constraints.nonnegative,
    }
    support = constraints.real
    reparametrized_params = ["loc", "scale", "location_variance"]
    pytree_data_fields = ("loc", "scale", "location_variance")

    def __init__(self, loc: ArrayLike, scale: ArrayLike, location_variance: ArrayLike):
        self.loc, self.scale, self.location_variance = jnp.broadcast_arrays(
            *(jnp.asarray(a, jnp.result_type(float)) for a in (loc, scale, location_variance))
        )
        super().__init__(batch_shape=jnp.shape(self.loc))

    def sample(self, key, sample_shape=()):
        key_laplace, key_normal = jax.random.split(key)
        shape = tuple(sample_shape) + self.batch_shape
        noise = jnp.sqrt(self.location_variance) * jax.random.normal(key_normal, shape)
        return dist.Laplace(self.loc, self.scale).sample(key_laplace, sample_shape) + noise

    def log_prob(self, value):
        scale, variance = self.scale, self.location_variance
        smoothed = variance > 0
        std = jnp.sqrt(jnp.where(smoothed, variance, 1.0))
        residual = value - self.loc
        log_mass = jnp.logaddexp(
            -residual / scale + log_ndtr(residual / std - std / scale),
            residual / scale + log_ndtr(-residual / std - std / scale),
        )
        log_smoothed = variance / (2 * scale**2) - jnp.log(2 * scale) + log_mass
        plain = -jnp.abs(residual) / scale - jnp.log(2 * scale)
        return jnp.where(smoothed, log_smoothed, plain)


# -- per-family rules --------------------------------------------------------------------------
def _location(base: dist.Distribution) -> Array | None:
    """The parameter the twist smooths over, for each supported family (``None`` if none)."""
    if isinstance(base, dist.Normal | dist.StudentT | dist.Cauchy | dist.Laplace | dist.LogNormal):
        return base.loc
    if isinstance(base, dist.BernoulliLogits | dist.BernoulliProbs):
        return base.logits
    if isinstance(base, dist.BinomialLogits | dist.BinomialProbs):
        return base.logits
    if isinstance(base, dist.Poisson) and type(base) is dist.Poisson:
        return jnp.log(base.rate)
    if isinstance(base, dist.Gamma) and type(base) is dist.Gamma:
        return jnp.log(base.concentration) - jnp.log(base.rate)
    if isinstance(base, dist.Exponential):
        return -jnp.log(base.rate)
    if base.event_shape == () and not isinstance(base, Unit):
        return base.mean
    return None


def _widened(scale: Array, variance: Array) -> Array:
    return jnp.sqrt(scale**2 + variance)


def _smooth_leaf(
    base: dist.Distribution, variance: Array, value: Array, construction: str
) -> dist.Distribution:
    """``base`` (a univariate distribution at the particle's :math:`\\hat x_0`) smoothed over
    Gaussian noise of ``variance`` on its location."""
    closed_form = construction == "auto"
    if closed_form and isinstance(base, dist.Normal):
        return dist.Normal(base.loc, _widened(base.scale, variance))
    if closed_form and isinstance(base, dist.StudentT):
        return dist.StudentT(base.df, base.loc, _widened(base.scale, variance))
    if closed_form and isinstance(base, dist.Cauchy):
        return dist.Cauchy(base.loc, _widened(base.scale, variance))
    if closed_form and isinstance(base, dist.LogNormal):
        return dist.LogNormal(base.loc, _widened(base.scale, variance))
    if closed_form and isinstance(base, dist.Laplace):
        return SmoothedLaplace(base.loc, base.scale, variance)
    if closed_form and isinstance(base, dist.BernoulliLogits | dist.BernoulliProbs):
        return dist.BernoulliLogits(base.logits * _probit_shrinkage(variance))
    if closed_form and isinstance(base, dist.BinomialLogits | dist.BinomialProbs):
        logits = base.logits * _probit_shrinkage(variance)
        return dist.BinomialLogits(logits, total_count=base.total_count)
    if closed_form and type(base) is dist.Gamma:
        # shrink the log-mean towards the likelihood's peak at log y: a Gaussian in the
        # log-mean would be inflated exactly so, and unlike tempering it also flattens the
        # double-exponential wall below the peak
        peak = jnp.log(jnp.where(value > 0, value, 1.0))
        log_mean = _shrunk(_location(base), peak, base, variance, value)
        return dist.Gamma(base.concentration, base.concentration * jnp.exp(-log_mean))
    return Tempered(base, _tempering_power(base, variance, value))


def _shrunk(location, peak, base, variance, value):
    r""":math:`\eta^* + \kappa (\eta - \eta^*)` with :math:`\kappa = s / \sqrt{s^2 + v}`: for
    a Gaussian of variance :math:`s^2` in :math:`\eta` peaked at :math:`\eta^*` this is the
    inflation to :math:`s^2 + v` (up to a constant)."""
    width = jax.lax.stop_gradient(_width(base, value))
    shrinkage = jnp.sqrt(width / (width + variance))
    return peak + shrinkage * (location - peak)


def _probit_shrinkage(variance: Array) -> Array:
    # E[sigmoid(a)] for a ~ N(m, v) is close to sigmoid(m / sqrt(1 + pi v / 8))
    return 1.0 / jnp.sqrt(1.0 + (math.pi / 8.0) * variance)


def _width(base: dist.Distribution, value: Array) -> Array:
    r"""The likelihood's variance in its location's units, :math:`s_i^2`: the inverse of the
    curvature of :math:`-\log p(y_i \mid \eta)` at its peak where that is known in closed
    form, else the inverse Fisher information at :math:`\hat x_0`."""
    if isinstance(base, dist.Normal | dist.StudentT | dist.LogNormal):
        df = base.df if isinstance(base, dist.StudentT) else jnp.inf
        # Student-t: inverse Fisher information (df + 3) / (df + 1) s^2
        ratio = jnp.where(jnp.isfinite(df), (df + 3.0) / (df + 1.0), 1.0)
        return ratio * base.scale**2
    if isinstance(base, dist.Cauchy):
        return 2.0 * base.scale**2
    if isinstance(base, dist.Laplace):
        return base.scale**2
    if isinstance(base, dist.BernoulliLogits | dist.BernoulliProbs):
        probs = jax.nn.sigmoid(base.logits)
        return 1.0 / (probs * (1.0 - probs))
    if isinstance(base, dist.BinomialLogits | dist.BinomialProbs):
        probs = jax.nn.sigmoid(base.logits)
        return 1.0 / (base.total_count * probs * (1.0 - probs))
    if isinstance(base, dist.Poisson) and type(base) is dist.Poisson:
        # -log p(y | eta) = exp(eta) - y eta + c peaks at eta = log y with curvature y; a
        # count of 0 has no peak, and rates of order 1 are the natural scale there
        return 1.0 / jnp.maximum(value, 1.0)
    if isinstance(base, dist.Gamma) and type(base) is dist.Gamma:
        return 1.0 / base.concentration
    if isinstance(base, dist.Exponential):
        return jnp.ones_like(base.rate)
    return base.variance


def _tempering_power(base: dist.Distribution, variance: Array, value: Array) -> Array:
    width = jax.lax.stop_gradient(_width(base, value))
    power = width / (width + variance)
    # an infinite or undefined width (a heavy tail): no tempering rather than NaN
    return jnp.where(jnp.isfinite(power), power, 1.0)


_WRAPPERS = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)


def _smooth(
    fn: dist.Distribution, variance: Array, value: Array, construction: str
) -> dist.Distribution | None:
    """``fn`` with its univariate leaf smoothed and the wrappers rebuilt around it; ``None``
    when it holds something the twist cannot smooth."""
    if isinstance(fn, dist.Independent):
        base = _smooth(fn.base_dist, variance, value, construction)
        return None if base is None else dist.Independent(base, fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        base = _smooth(fn.base_dist, variance, value, construction)
        return None if base is None else dist.ExpandedDistribution(base, fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        base = _smooth(fn.base_dist, variance, value, construction)
        return None if base is None else dist.MaskedDistribution(base, fn._mask)
    if fn.event_shape != () or _location(fn) is None:
        return None
    return _smooth_leaf(fn, variance, value, construction)


def _leaf(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


class smooth_likelihood(Messenger):
    r"""Smooth each observed site named in ``variance`` over Gaussian noise of that variance on
    its location (see the module docstring); other sites are left alone.

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro import handlers
    >>> def model():
    ...     numpyro.sample("y", dist.Normal(0.0, 3.0), obs=1.0)
    >>> tr = handlers.trace(smooth_likelihood(model, variance={"y": 16.0})).get_trace()
    >>> float(tr["y"]["fn"].scale)
    5.0
    """

    def __init__(
        self,
        fn: Callable | None = None,
        variance: Mapping[str, ArrayLike] | None = None,
        construction: str = "auto",
    ) -> None:
        self.variance = dict(variance or {})
        self.construction = construction
        super().__init__(fn)

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample" or not msg["is_observed"] or msg["name"] not in self.variance:
            return
        variance = jnp.broadcast_to(self.variance[msg["name"]], msg["fn"].shape())
        smoothed = _smooth(msg["fn"], variance, msg["value"], self.construction)
        if smoothed is not None:
            msg["fn"] = smoothed


# -- model-level pieces --------------------------------------------------------------------------
def _conditioned(obs: ObservationModel, x: Array, handler: Callable | None = None) -> Callable:
    """The model at ``x`` (decoded for a latent ``x``), optionally under ``handler``, with the
    prior site hidden."""
    if obs.decode is not None:
        x = obs.decode(x)
    model = handlers.substitute(obs.likelihood_model(), data={obs.prior_site: x})
    if handler is not None:
        model = handler(model)
    return handlers.seed(handlers.block(model, hide=[obs.prior_site]), rng_seed=0)


def _trace(obs: ObservationModel, x: Array) -> dict[str, Any]:
    return handlers.trace(_conditioned(obs, x)).get_trace(*obs.args, **obs.kwargs)


def site_kinds(obs: ObservationModel) -> dict[str, str]:
    """Likelihood site -> how the twist smooths it: the family's name (``"Normal"``,
    ``"Laplace"``, ...) for observed sites it can smooth, else why not (``"factor"``,
    ``"multivariate"`` or ``"unsupported"``).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> from diffprior.model import read_model
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Laplace(x, 0.1).to_event(1), obs=y)
    >>> site_kinds(read_model(model, kwargs={"y": jnp.zeros(2)}))
    {'y': 'Laplace'}
    """
    tr = _trace(obs, jnp.zeros(obs.event_shape, jnp.result_type(float)))
    kinds = {}
    for name in obs.likelihood_sites:
        fn = tr[name]["fn"]
        leaf = _leaf(fn)
        if name not in obs.observed or isinstance(leaf, Unit):
            kinds[name] = "factor"
        elif leaf.event_shape != ():
            kinds[name] = "multivariate"
        elif _smooth(fn, jnp.zeros(fn.shape()), tr[name]["value"], "auto") is None:
            kinds[name] = "unsupported"
        else:
            kinds[name] = type(leaf).__name__
    return kinds


def _unsmoothable(obs: ObservationModel) -> dict[str, str]:
    return {
        name: kind
        for name, kind in site_kinds(obs).items()
        if kind in ("factor", "multivariate", "unsupported")
    }


def _warn_unsmoothable(obs: ObservationModel) -> None:
    reasons = {
        "factor": "a numpyro.factor term has no location to smooth",
        "multivariate": "a multivariate likelihood does not factorise over elements",
        "unsupported": "its distribution (or a wrapper around it) is not one the twist knows",
    }
    for name, kind in _unsmoothable(obs).items():
        warnings.warn(
            f"site {name!r}: the TDS/FK twist cannot smooth this likelihood ({reasons[kind]}); "
            "it is used unsmoothed at every noise level, which stays exact but can make the "
            "weights collapse when the observation is informative (watch the ESS; use "
            "independent univariate observations, e.g. dist.Normal(...).to_event(1), or more "
            "particles)",
            TwistWarning,
            stacklevel=4,
        )


def _location_flat(obs: ObservationModel, x: Array) -> Array:
    tr = _trace(obs, x)
    parts = [jnp.zeros((0,), jnp.result_type(float))]
    for name in obs.observed:
        fn = tr[name]["fn"]
        location = _location(_leaf(fn))
        if location is None:
            location = jnp.zeros(())
        parts.append(jnp.ravel(jnp.broadcast_to(location, fn.shape())))
    return jnp.concatenate(parts)


def _split_sites(obs: ObservationModel, flat: Array) -> dict[str, Array]:
    out, start = {}, 0
    for name, value in obs.observed.items():
        size = int(np.prod(jnp.shape(value)))
        out[name] = flat[start : start + size].reshape(jnp.shape(value))
        start += size
    return out


def _gain_points(prior: DiffusionPrior, shape: tuple[int, ...]) -> Array:
    """Fixed points spread like the prior (its mean and standard deviation where it has them)."""
    try:
        mean = jnp.broadcast_to(prior.mean, shape)
    except (NotImplementedError, AttributeError):
        mean = jnp.zeros(shape)
    std = jnp.broadcast_to(jnp.sqrt(prior.variance), shape)
    draws = jax.random.normal(jax.random.key(0), (_NUM_GAIN_POINTS, *shape))
    return mean + std * draws


def location_gains(prior: DiffusionPrior, obs: ObservationModel) -> dict[str, Array]:
    r"""Per observed site, :math:`g_i = E \lVert \nabla_x \eta_i(x) \rVert^2` shaped like the
    observation, with :math:`\eta_i` the location the twist smooths (:func:`site_kinds`) and
    the average over a few fixed points spread like the prior: so that :math:`r^2 g_i` is the
    variance of :math:`\eta_i(x_0)` for :math:`x_0 \sim N(\hat x_0, r^2 I)`. Exact for a
    linear location (a Gaussian ``A @ x``, a Poisson ``exp(A @ x)``, a Bernoulli
    ``logits=A @ x``); for a nonlinear one an average of the local gains, which also avoids
    the kinks of e.g. ``abs`` at zero."""
    points = _gain_points(prior, obs.event_shape)
    gains = _row_norms_sq(lambda x: _location_flat(obs, x), points, obs.observed_flat.shape[0])
    return _split_sites(obs, gains)


def observation_gains(obs: ObservationModel) -> dict[str, Array]:
    r"""Per observed site, :math:`\sum_j J_{ij}^2` shaped like the observation, with :math:`J`
    the Jacobian of :math:`E[y \mid x]` at :math:`x = 0`."""
    zero = jnp.zeros((1, *obs.event_shape))
    gain_flat = _row_norms_sq(obs.observation_mean, zero, obs.observed_flat.shape[0])
    return _split_sites(obs, gain_flat)


#: Above this many Jacobian entries (points x observations x d) the gains are estimated
#: matrix-free (:func:`_row_norms_sq`) instead of from dense Jacobians.
MAX_JACOBIAN_ENTRIES = 2**24

#: Rademacher probes of the matrix-free estimate.
NUM_GAIN_PROBES = 64


def _row_norms_sq(fn: Callable[[Array], Array], points: Array, num_out: int) -> Array:
    r""":math:`\sum_j J_{ij}(p)^2` of ``fn`` (``x`` to ``(num_out,)``), averaged over
    ``points``.

    Exact from dense Jacobians while they have at most :data:`MAX_JACOBIAN_ENTRIES` entries;
    beyond, estimated without any ``(num_out, d)`` array from :data:`NUM_GAIN_PROBES`
    Rademacher probes, :math:`E[(J z)_i^2] = \sum_j J_{ij}^2`, one Jacobian-vector product at a
    time: exact when each output depends on one coordinate (inpainting), with a relative error
    of about :math:`\sqrt{2/64} \approx 0.18` per output otherwise (a blur). The gains only
    set how much the twist smooths; the twist at ``t = 0`` is the likelihood whatever they are.
    """
    dim = math.prod(points.shape[1:])
    if points.shape[0] * num_out * dim <= MAX_JACOBIAN_ENTRIES:
        jacobians = jax.vmap(jax.jacfwd(fn))(points).reshape((points.shape[0], num_out, dim))
        return jnp.mean(jnp.sum(jacobians**2, axis=2), axis=0)
    signs = jax.random.rademacher(jax.random.key(1), (NUM_GAIN_PROBES, *points.shape[1:]))
    signs = signs.astype(points.dtype)

    def at(point):
        def squared(_, z):
            return None, jax.jvp(fn, (point,), (z,))[1] ** 2

        return jnp.mean(jax.lax.scan(squared, None, signs)[1], axis=0)

    return jnp.mean(jax.lax.map(at, points), axis=0)


def _smoothed_log_likelihood(
    obs: ObservationModel, x: Array, variance: Mapping[str, Array], construction: str
) -> Array:
    def handler(model):
        return smooth_likelihood(model, variance=variance, construction=construction)

    log_probs, _ = compute_log_probs(
        _conditioned(obs, x, handler), obs.args, obs.kwargs, params={}, sum_log_prob=True
    )
    terms = [log_probs[name] for name in obs.likelihood_sites]
    return sum(terms, start=jnp.zeros((), jnp.result_type(float)))


def likelihood_twist(
    prior: DiffusionPrior,
    obs: ObservationModel,
    inflation: str | None,
    construction: str = "auto",
) -> Callable[[Array, Array], Array]:
    r"""``twist_fn(x0_hat, t)``: :math:`\log p(y \mid x_t)` approximated by smoothing the
    model's likelihood at :math:`\hat x_0` over Gaussian noise of variance :math:`r_t^2 g_i` on
    each observation's location (see the module docstring).

    Whatever the choice, the twist at ``t = 0`` is the model's likelihood, so TDS and FK stay
    exact. Sites the twist cannot smooth are used as they are, with a :class:`TwistWarning`.

    Parameters
    ----------
    prior, obs
        The prior and its model's likelihood.
    inflation
        The gains :math:`g_i`: ``"jacobian"`` (:func:`location_gains`), ``"pigdm"`` (1, the
        :math:`r_t^2` of pseudo-inverse guidance) or ``None`` (no smoothing: the TDS paper's
        plain :math:`p(y \mid \hat x_0)`).
    construction
        One of :data:`CONSTRUCTIONS`; ``"auto"`` is the default of :class:`diffprior.TDS`.
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {CONSTRUCTIONS}, got {construction!r}")
    if inflation is None:
        return lambda x0_hat, t: obs.log_likelihood(x0_hat)
    schedule = prior.schedule
    data_variance = jnp.mean(prior.variance)
    calibration = getattr(prior, "calibration", None)

    def r2_at(t):
        if calibration is not None:  # the spread measured on data (diffprior.calibrate)
            return jnp.where(t > 0, jnp.mean(calibration.twist_variance_at(t)), 0.0)
        return jnp.where(t > 0, tweedie_variance(schedule, t, data_variance), 0.0)

    def centre(x0_hat, t):
        # a calibrated prior's twist follows the shrunk estimate m + a_t (x0_hat - m)
        return x0_hat if calibration is None else calibration.estimate(x0_hat, t)

    if construction == "monte_carlo":
        draws = jax.random.normal(jax.random.key(0), (_NUM_DRAWS, *obs.event_shape))

        def twist_fn(x0_hat, t):
            shifted = centre(x0_hat, t) + jnp.sqrt(r2_at(t)) * draws
            values = jax.vmap(obs.log_likelihood)(shifted)
            return jax.nn.logsumexp(values) - math.log(_NUM_DRAWS)

        return twist_fn

    _warn_unsmoothable(obs)
    if inflation == "jacobian":
        gains = location_gains(prior, obs)
    else:
        gains = {name: jnp.ones(jnp.shape(value)) for name, value in obs.observed.items()}

    def twist_fn(x0_hat, t):
        r2 = r2_at(t)
        variance = {name: r2 * gain for name, gain in gains.items()}
        return _smoothed_log_likelihood(obs, centre(x0_hat, t), variance, construction)

    return twist_fn
