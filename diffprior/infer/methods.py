"""Methods for :class:`diffprior.Sampler`: each binds a NumPyro model and options to a kernel.

A method checks its options when it is made (before any heavy work) and, inside the compiled
run, turns the model's :class:`diffprior.model.ObservationModel` and the prior into a
BlackJAX-style ``SamplingAlgorithm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.grids import SPACINGS
from diffprior.diffusion.transitions import tweedie_variance
from diffprior.kernels import diffpir, dps, fk, pigdm, smc, tds, unguided
from diffprior.model import ModelError, ObservationModel
from diffprior.priors import DiffusionPrior
from diffprior.types import Array

__all__ = [
    "Method",
    "Unguided",
    "DPS",
    "TDS",
    "FK",
    "PiGDM",
    "DiffPIR",
    "VARIANCE_INFLATIONS",
    "observation_gains",
]

#: Twist variance inflations, see :meth:`TDS.twist_fn`.
VARIANCE_INFLATIONS = (None, "pigdm", "jacobian")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_eta(eta: Any) -> float:
    eta = _check_positive("eta", eta, allow_zero=True)
    if eta > 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    return eta


class Method:
    """Base of the methods. Subclasses set ``is_smc`` and implement :meth:`build`."""

    is_smc: ClassVar[bool] = False

    def __init__(self, model: Callable, *, spacing: str = "uniform", **options: Any):
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model function, got {type(model).__name__}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        self.model = model
        self.spacing = spacing
        self._options = dict(options, spacing=spacing)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def options(self) -> dict[str, Any]:
        """The method's options (for records such as ``to_arviz`` attributes)."""
        return dict(self._options)

    def build(
        self, prior: DiffusionPrior, obs: ObservationModel, timesteps: Array
    ) -> SamplingAlgorithm:
        raise NotImplementedError

    def check(self, obs: ObservationModel) -> None:
        """Checks on the concrete model before anything is compiled (raise ModelError)."""

    def resampling_fn(self) -> Callable:
        """Scheme used for the final equal-weight resampling."""
        return smc.resampling_fn("systematic")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{self.name}({opts})"


class Unguided(Method):
    """Plain reverse diffusion from the prior; ignores the observations (a baseline).

    Examples
    --------
    >>> import numpyro, diffprior as dp
    >>> method = dp.Unguided(lambda: None, eta=1.0)
    >>> method.options["eta"]
    1.0
    """

    def __init__(self, model: Callable, *, eta: float = 1.0, spacing: str = "uniform"):
        super().__init__(model, spacing=spacing, eta=_check_eta(eta))

    def build(self, prior, obs, timesteps):
        return unguided.as_top_level_api(prior.denoiser, timesteps, eta=self._options["eta"])


class DPS(Method):
    r"""Diffusion posterior sampling (:mod:`diffprior.kernels.dps`).

    Parameters
    ----------
    scale
        The step :math:`\zeta` (``zeta'`` of the paper when ``normalize=True``).
    normalize
        The paper's step :math:`\zeta / \lVert y - A(\hat x_0) \rVert` on the squared
        residual (per particle). With ``False``, a step ``scale`` along the gradient of the
        model's own log-likelihood (Gaussian, Student-t, ...).
    eta
        DDIM stochasticity of the underlying reverse step.
    """

    def __init__(
        self,
        model: Callable,
        *,
        scale: float = 1.0,
        normalize: bool = True,
        eta: float = 1.0,
        spacing: str = "uniform",
    ):
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        super().__init__(
            model,
            spacing=spacing,
            scale=_check_positive("scale", scale, allow_zero=True),
            normalize=normalize,
            eta=_check_eta(eta),
        )

    def build(self, prior, obs, timesteps):
        opts = self._options

        def residual_fn(x0):
            return obs.observed_flat - obs.observation_mean(x0)

        return dps.as_top_level_api(
            prior.denoiser,
            obs.log_likelihood,
            timesteps,
            scale=opts["scale"],
            normalize=opts["normalize"],
            residual_fn=residual_fn,
            eta=opts["eta"],
        )


class TDS(Method):
    r"""Twisted Diffusion Sampler (:mod:`diffprior.kernels.tds`): asymptotically exact in the
    number of particles, with a log-evidence estimate.

    Parameters
    ----------
    scale
        Multiplies the twist gradient in the proposal (any value keeps TDS exact).
    ess_threshold
        Resample when ESS / N falls below it (1.0: every step, 0.0: never).
    resampling
        ``"systematic"``, ``"stratified"``, ``"multinomial"`` or ``"residual"``.
    variance_inflation
        ``None`` or ``"pigdm"``: twist with the Gaussian or Student-t scale widened by
        :math:`r_t^2 = \sigma_t^2/(\alpha_t^2 + \sigma_t^2)` (other likelihoods unchanged).
    eta
        DDIM stochasticity of the transition; must be > 0 for guided proposals to matter.
    """

    is_smc = True

    def __init__(
        self,
        model: Callable,
        *,
        scale: float = 1.0,
        ess_threshold: float = 0.5,
        resampling: str = "systematic",
        variance_inflation: str | None = "jacobian",
        eta: float = 1.0,
        spacing: str = "uniform",
    ):
        smc.resampling_fn(resampling)
        if variance_inflation not in VARIANCE_INFLATIONS:
            raise ValueError(
                f"variance_inflation must be one of {VARIANCE_INFLATIONS}, "
                f"got {variance_inflation!r}"
            )
        super().__init__(
            model,
            spacing=spacing,
            scale=_check_positive("scale", scale, allow_zero=True),
            ess_threshold=smc.check_ess_threshold(ess_threshold),
            resampling=resampling,
            variance_inflation=variance_inflation,
            eta=_check_eta(eta),
        )

    def resampling_fn(self) -> Callable:
        return smc.resampling_fn(self._options["resampling"])

    def twist_fn(self, prior: DiffusionPrior, obs: ObservationModel):
        return likelihood_twist(prior, obs, self._options["variance_inflation"])

    def build(self, prior, obs, timesteps):
        opts = self._options
        return tds.as_top_level_api(
            prior.denoiser,
            obs.log_likelihood,
            timesteps,
            twist_fn=self.twist_fn(prior, obs),
            eta=opts["eta"],
            scale=opts["scale"],
            ess_threshold=opts["ess_threshold"],
            resampling=opts["resampling"],
        )


class FK(Method):
    r"""Feynman-Kac steering (:mod:`diffprior.kernels.fk`).

    Parameters
    ----------
    potential
        ``"difference"``, ``"max"`` or ``"sum"``.
    proposal
        ``"guided"`` (TDS's proposal) or ``"prior"``.
    lam
        :math:`\lambda`: the target is :math:`p(x) \exp(\lambda r(x))`; 1 with the default
        reward is the posterior.
    reward
        ``reward(x0) -> scalar``; default the model's log-likelihood (widened at high noise as
        ``variance_inflation`` says; any user function is used as given).
    ess_threshold, resample_every, resampling
        Adaptive resampling: when ESS / N < ``ess_threshold``, at steps that are multiples of
        ``resample_every``.
    scale, eta, variance_inflation
        As for :class:`TDS`. ``FK(model, potential="difference", proposal="guided")`` is
        exactly ``TDS(model)``.
    """

    is_smc = True

    def __init__(
        self,
        model: Callable,
        *,
        potential: str = "difference",
        proposal: str = "guided",
        lam: float = 1.0,
        reward: Callable | None = None,
        ess_threshold: float = 0.5,
        resample_every: int = 1,
        resampling: str = "systematic",
        scale: float = 1.0,
        variance_inflation: str | None = "jacobian",
        eta: float = 1.0,
        spacing: str = "uniform",
    ):
        if potential not in fk.POTENTIALS:
            raise ValueError(f"potential must be one of {fk.POTENTIALS}, got {potential!r}")
        if proposal not in fk.PROPOSALS:
            raise ValueError(f"proposal must be one of {fk.PROPOSALS}, got {proposal!r}")
        if reward is not None and not callable(reward):
            raise TypeError(f"reward must be a function reward(x0) -> scalar, got {reward!r}")
        if isinstance(resample_every, bool) or not isinstance(resample_every, int):
            raise TypeError(f"resample_every must be an integer, got {resample_every!r}")
        if resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {resample_every}")
        if variance_inflation not in VARIANCE_INFLATIONS:
            raise ValueError(
                f"variance_inflation must be one of {VARIANCE_INFLATIONS}, "
                f"got {variance_inflation!r}"
            )
        smc.resampling_fn(resampling)
        super().__init__(
            model,
            spacing=spacing,
            potential=potential,
            proposal=proposal,
            lam=_check_positive("lam", lam, allow_zero=True),
            reward=reward,
            ess_threshold=smc.check_ess_threshold(ess_threshold),
            resample_every=resample_every,
            resampling=resampling,
            scale=_check_positive("scale", scale, allow_zero=True),
            variance_inflation=variance_inflation,
            eta=_check_eta(eta),
        )

    def resampling_fn(self) -> Callable:
        return smc.resampling_fn(self._options["resampling"])

    def build(self, prior, obs, timesteps):
        opts = self._options
        if opts["reward"] is None:
            reward_fn = likelihood_twist(prior, obs, opts["variance_inflation"])
        else:
            user_reward = opts["reward"]

            def reward_fn(x0_hat, t):
                return user_reward(x0_hat)

        return fk.as_top_level_api(
            prior.denoiser,
            reward_fn,
            timesteps,
            potential=opts["potential"],
            proposal=opts["proposal"],
            lam=opts["lam"],
            eta=opts["eta"],
            scale=opts["scale"],
            ess_threshold=opts["ess_threshold"],
            resample_every=opts["resample_every"],
            resampling=opts["resampling"],
        )


def likelihood_twist(prior: DiffusionPrior, obs: ObservationModel, inflation: str | None):
    r"""``twist_fn(x0_hat, t)``: the log-likelihood at :math:`\hat x_0` with Gaussian and
    Student-t scales widened for the error of :math:`\hat x_0`.

    With :math:`r_t^2 = \mathrm{Var}[x_0 \mid x_t]` per coordinate for Gaussian data of
    the prior's variance :math:`v` (``prior.variance``, averaged over coordinates),
    :func:`~diffprior.diffusion.transitions.tweedie_variance`, an observation
    :math:`y_i = A_i(x) + \text{noise}` gets the variance :math:`\sigma_i^2 + r_t^2 g_i`:

    - ``"jacobian"``: :math:`g_i = \sum_j J_{ij}^2`, with :math:`J` the Jacobian of
      :math:`E[y \mid x]` at :math:`x = 0` (exact for a linear operator), so that
      :math:`r_t^2 g_i = \mathrm{Var}[A_i x_0 \mid x_t]` for independent coordinates;
    - ``"pigdm"``: :math:`g_i = 1` (the :math:`r_t^2` of pseudo-inverse guidance);
    - ``None``: no inflation, :math:`\tilde p_t(y \mid x_t) = p(y \mid \hat x_0)` as
      in the TDS paper.

    Any choice keeps TDS and FK exact (the last twist is the exact likelihood); inflation keeps
    the twists from over-trusting :math:`\hat x_0` at high noise, which otherwise makes the
    weights, and the evidence, far more variable when the observation is informative.
    """
    if inflation is None:
        return lambda x0_hat, t: obs.log_likelihood(x0_hat)
    schedule = prior.schedule
    data_variance = jnp.mean(prior.variance)
    if inflation == "jacobian":
        gains = observation_gains(obs)
    else:
        gains = {name: 1.0 for name in obs.observed}

    def twist_fn(x0_hat, t):
        r2 = jnp.where(t > 0, tweedie_variance(schedule, t, data_variance), 0.0)
        extra = {name: r2 * gain for name, gain in gains.items()}
        return obs.log_likelihood(x0_hat, extra_variance=extra)

    return twist_fn


def observation_gains(obs: ObservationModel) -> dict[str, jax.Array]:
    r"""Per observed site, :math:`\sum_j J_{ij}^2` shaped like the observation, with :math:`J`
    the Jacobian of :math:`E[y \mid x]` at :math:`x = 0`."""
    jacobian = jax.jacfwd(obs.observation_mean)(jnp.zeros(obs.event_shape))
    gain_flat = jnp.sum(jacobian.reshape((jacobian.shape[0], -1)) ** 2, axis=1)
    gains, start = {}, 0
    for name, value in obs.observed.items():
        size = int(np.prod(jnp.shape(value)))
        gains[name] = gain_flat[start : start + size].reshape(jnp.shape(value))
        start += size
    return gains


# -- linear-Gaussian structure ---------------------------------------------------------------
class WhitenedSVD(NamedTuple):
    r"""A linear Gaussian observation :math:`y = A x + b + \mathrm{diag}(\sigma) \varepsilon`
    whitened (:math:`\tilde A = \mathrm{diag}(1/\sigma) A`, :math:`\tilde y = (y - b) /
    \sigma`) and decomposed, :math:`\tilde A = U \mathrm{diag}(s) V^T`.

    u ``(dy, dy)``, singular ``(d,)`` (zeros past the rank, so it lines up with ``v``),
    v ``(d, d)``, y_white ``(dy,)``.
    """

    u: Array
    singular: Array
    v: Array
    y_white: Array


def is_linear_gaussian(obs: ObservationModel, rtol: float = 1e-4) -> bool:
    """Whether every observed site is Normal with a scale that does not depend on ``x`` and
    its mean is affine in ``x`` (checked at random points; concrete values only)."""
    if not obs.observed or set(obs.noise_families().values()) != {"Normal"}:
        return False
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, obs.event_shape) for k in keys)
    zero = jnp.zeros(obs.event_shape)
    mean = obs.observation_mean
    residual = mean(a + b) - mean(a) - mean(b) + mean(zero)
    size = jnp.abs(mean(a)) + jnp.abs(mean(b)) + 1.0
    scales_fixed = jnp.allclose(obs.observation_scale(a), obs.observation_scale(zero))
    return bool(jnp.all(jnp.abs(residual) <= rtol * size)) and bool(scales_fixed)


def whitened_svd(obs: ObservationModel) -> WhitenedSVD:
    """The :class:`WhitenedSVD` of a linear Gaussian model (from the Jacobian of its mean)."""
    zero = jnp.zeros(obs.event_shape)
    offset = obs.observation_mean(zero)
    matrix = jax.jacfwd(obs.observation_mean)(zero).reshape((offset.shape[0], -1))
    sigma = obs.observation_scale(zero)
    u, s, vt = jnp.linalg.svd(matrix / sigma[:, None], full_matrices=True)
    dim = matrix.shape[1]
    singular = jnp.zeros(dim).at[: s.shape[0]].set(s[:dim])
    return WhitenedSVD(u, singular, vt.T, (obs.observed_flat - offset) / sigma)


def _unit_data_variance(prior: DiffusionPrior) -> Array:
    return jnp.mean(prior.variance)


class PiGDM(Method):
    r"""Pseudoinverse-guided diffusion (:mod:`diffprior.kernels.pigdm`).

    For a linear model with Gaussian noise the guidance is the paper's,
    :math:`\log N(y; A \hat x_0, r_t^2 A A^T + \sigma_y^2 I)` with
    :math:`r_t^2 = \mathrm{Var}[x_0 \mid x_t]` for data of the prior's variance, computed in the
    SVD of the whitened operator. For any other likelihood (Student-t, Poisson, nonlinear
    :math:`A`) it falls back to the model's likelihood with each observation's variance widened
    by :math:`r_t^2 \sum_j J_{ij}^2` (as TDS's twist).

    Parameters
    ----------
    scale
        Multiplies the guidance (1 is Bayes' rule).
    eta
        DDIM stochasticity.
    """

    def __init__(
        self, model: Callable, *, scale: float = 1.0, eta: float = 1.0, spacing: str = "uniform"
    ):
        super().__init__(
            model,
            spacing=spacing,
            scale=_check_positive("scale", scale, allow_zero=True),
            eta=_check_eta(eta),
        )
        self._linear_gaussian = None

    def check(self, obs: ObservationModel) -> None:
        self._linear_gaussian = is_linear_gaussian(obs)

    def build(self, prior, obs, timesteps):
        schedule = prior.schedule
        data_variance = _unit_data_variance(prior)
        if self._linear_gaussian:
            svd = whitened_svd(obs)
            coords_y = svd.u.T @ svd.y_white  # (dy,)
            num = coords_y.shape[0]
            rank_s = jnp.zeros(num).at[: min(num, svd.singular.shape[0])].set(svd.singular[:num])

            x_dim = svd.v.shape[0]

            def guidance_fn(x0_hat, t):
                r2 = jnp.where(t > 0, tweedie_variance(schedule, t, data_variance), 0.0)
                coords_x = svd.v.T @ x0_hat.reshape(-1)  # (d,)
                k = min(num, x_dim)
                predicted = jnp.zeros(num).at[:k].set(svd.singular[:k] * coords_x[:k])
                variance = r2 * rank_s**2 + 1.0
                residual = coords_y - predicted
                return -0.5 * jnp.sum(residual**2 / variance + jnp.log(2 * jnp.pi * variance))

        else:
            guidance_fn = likelihood_twist(prior, obs, "jacobian")
        return pigdm.as_top_level_api(
            prior.denoiser,
            guidance_fn,
            timesteps,
            scale=self._options["scale"],
            eta=self._options["eta"],
        )


class DiffPIR(Method):
    r"""DiffPIR, plug-and-play with a proximal data step (:mod:`diffprior.kernels.diffpir`).

    The data step :math:`\arg\min_x -\log p(y \mid x) + \frac{\rho_t}{2}\lVert x - \hat
    x_0\rVert^2` is solved in closed form in the SVD for a linear model with Gaussian noise, and
    by ``num_grad_steps`` gradient steps (step :math:`1/(\rho_t + L)`, :math:`L` the
    likelihood's curvature bound :math:`\max_i \sum_j J_{ij}^2 / \sigma_i^2`) for any other
    likelihood (Student-t, nonlinear :math:`A`).

    Parameters
    ----------
    lam
        The paper's :math:`\lambda` (data-step weight; :math:`\rho_t = \lambda \alpha_t^2 /
        \sigma_t^2`).
    zeta
        The paper's :math:`\zeta`: fraction of fresh noise in each step.
    num_grad_steps
        Gradient steps of the data step when there is no closed form.
    """

    def __init__(
        self,
        model: Callable,
        *,
        lam: float = 7.0,
        zeta: float = 0.3,
        num_grad_steps: int = 10,
        spacing: str = "uniform",
    ):
        zeta = _check_positive("zeta", zeta, allow_zero=True)
        if zeta > 1:
            raise ValueError(f"zeta must be in [0, 1], got {zeta}")
        if isinstance(num_grad_steps, bool) or not isinstance(num_grad_steps, int):
            raise TypeError(f"num_grad_steps must be an integer, got {num_grad_steps!r}")
        if num_grad_steps < 1:
            raise ValueError(f"num_grad_steps must be >= 1, got {num_grad_steps}")
        super().__init__(
            model,
            spacing=spacing,
            lam=_check_positive("lam", lam),
            zeta=zeta,
            num_grad_steps=num_grad_steps,
        )
        self._linear_gaussian = None

    def check(self, obs: ObservationModel) -> None:
        self._linear_gaussian = is_linear_gaussian(obs)

    def build(self, prior, obs, timesteps):
        if self._linear_gaussian:
            svd = whitened_svd(obs)
            num, dim = svd.y_white.shape[0], svd.v.shape[0]
            k = min(num, dim)
            s = svd.singular
            # s_i (U^T y~)_i on the first k coordinates of the right basis, zero elsewhere
            data_term = jnp.zeros(dim).at[:k].set(s[:k] * (svd.u.T @ svd.y_white)[:k])

            def proximal_fn(x0_hat, rho):
                coords = svd.v.T @ x0_hat.reshape(-1)
                solved = (data_term + rho * coords) / (s**2 + rho)
                return (svd.v @ solved).reshape(x0_hat.shape)

        else:
            log_likelihood = obs.log_likelihood
            curvature = _curvature_bound(obs)
            num_steps = self._options["num_grad_steps"]

            def proximal_fn(x0_hat, rho):
                grad_fn = jax.grad(log_likelihood)
                step = 1.0 / (rho + curvature)

                def body(_, x):
                    return x + step * (grad_fn(x) - rho * (x - x0_hat))

                return jax.lax.fori_loop(0, num_steps, body, x0_hat)

        return diffpir.as_top_level_api(
            prior.denoiser,
            proximal_fn,
            timesteps,
            lam=self._options["lam"],
            zeta=self._options["zeta"],
        )


def _curvature_bound(obs: ObservationModel) -> Array:
    r""":math:`\max_i \sum_j J_{ij}^2 / \sigma_i^2` (1 where observations have no scale)."""
    gains = jnp.concatenate([jnp.ravel(g) for g in observation_gains(obs).values()])
    try:
        scale = obs.observation_scale(jnp.zeros(obs.event_shape))
    except ModelError:
        return jnp.maximum(jnp.max(gains), 1.0)
    return jnp.max(gains / scale**2)
