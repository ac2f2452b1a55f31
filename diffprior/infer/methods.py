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
import optax
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.grids import SPACINGS
from diffprior.diffusion.transitions import tweedie_variance
from diffprior.infer.twists import likelihood_twist, observation_gains
from diffprior.kernels import diffpir, dps, fk, mcgdiff, pigdm, resample, smc, tds, unguided
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
    "MCGdiff",
    "ReSample",
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


def _check_variance_inflation(variance_inflation: Any) -> None:
    if variance_inflation not in VARIANCE_INFLATIONS:
        raise ValueError(
            f"variance_inflation must be one of {VARIANCE_INFLATIONS}, got {variance_inflation!r}"
        )


def _check_eta(eta: Any) -> float:
    eta = _check_positive("eta", eta, allow_zero=True)
    if eta > 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    return eta


class Method:
    """Base of the methods. Subclasses set ``is_smc`` and implement :meth:`build`."""

    is_smc: ClassVar[bool] = False
    #: Whether the model must have an observed site to condition on (every method but
    #: :class:`Unguided`, which also draws from the prior through a model with none).
    requires_observation: ClassVar[bool] = True

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

    It also takes a model with no observed site, so it draws from the prior through a model,
    as ``numpyro.infer.Predictive`` would (the other methods refuse such a model: there is
    nothing to condition on). ``to_arviz()`` then has no ``observed_data`` or
    ``log_likelihood`` group.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> def model():
    ...     numpyro.sample("x", prior)
    >>> sampler = dp.Sampler(dp.Unguided(model, eta=1.0), 16, 10, progress_bar=False)
    >>> sampler.run(jax.random.key(0))
    >>> sampler.get_samples()["x"].shape
    (16, 2)
    """

    requires_observation = False

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
        ``"jacobian"`` (default), ``"pigdm"`` or ``None``: the twist smooths the model's
        likelihood, whatever its family, over the uncertainty of :math:`\hat x_0`, Gaussian noise
        of variance :math:`r_t^2 g_i` on each observation's location, with :math:`r_t^2 =
        \mathrm{Var}[x_0 \mid x_t]` for Gaussian data of the prior's variance and :math:`g_i`
        the squared gradient of the location (``"jacobian"``) or 1 (``"pigdm"``); ``None`` is
        the TDS paper's plain :math:`p(y \mid \hat x_0)` (see
        :func:`diffprior.infer.twists.likelihood_twist`).
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
        _check_variance_inflation(variance_inflation)
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
        _check_variance_inflation(variance_inflation)
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
    r"""The prior's data variance averaged over coordinates (the one number every Tweedie
    variance :math:`\mathrm{Var}[x_0 \mid x_t]` of the methods uses)."""
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


class MCGdiff(Method):
    r"""Monte Carlo guided diffusion (:mod:`diffprior.kernels.mcgdiff`): asymptotically exact in
    the number of particles for linear models with Gaussian noise, with a log-evidence
    estimate, and no network gradient.

    The model's observation is whitened and decomposed,
    :math:`\mathrm{diag}(1/\sigma) A = U \mathrm{diag}(s) V^T`; each of the (at most
    :math:`d_y`) directions of :math:`V` with :math:`s_i > 0` carries the pseudo-observation
    :math:`(U^T \tilde y)_i / s_i` with noise ratio :math:`1/s_i`.

    Parameters
    ----------
    potential
        The intermediate potentials along the observed directions, which shape the proposal:
        ``"tweedie"`` (default; the likelihood given :math:`x_t` for a Gaussian denoiser,
        centred at each particle's own :math:`\hat x_0`, so it follows the mode the particle
        is in), ``"gaussian"`` (the same for a Gaussian prior with the prior's mean and
        variance), ``"flat"`` or ``"pinned"`` (the paper's noisy scheme); see
        :mod:`diffprior.kernels.mcgdiff`. All are exact in the limit of many particles.
    twisted
        Weight by the likelihood at the denoiser's :math:`\hat x_0` (TDS's twist, widened by
        the Tweedie variance) while proposing with the potentials; still no gradient. The
        default, and needed by ``"tweedie"``: on the Gaussian-mixture benchmark it keeps the
        log-evidence error within about 0.2 nats where the untwisted potentials scatter by a
        nat or more. ``MCGdiff(model, potential="pinned", twisted=False)`` is the paper's
        noisy algorithm and ``potential="flat", twisted=False, noiseless=True`` its noiseless
        one.
    noiseless
        Treat the observation as exact, :math:`y = A x` (the model's noise scale then only
        weights the observations); the samples reproduce ``y`` through ``A`` and the
        log-evidence is the density of :math:`A x` at ``y``. Needs :math:`A` of full row rank.
    ess_threshold, resampling
        Adaptive resampling as for :class:`TDS`.
    eta
        DDIM stochasticity of the reverse step; must be > 0.

    Examples
    --------
    >>> import jax, diffprior as dp
    >>> problem = dp.problems.mixture_problem(jax.random.key(0), 8, 2)
    >>> sampler = dp.Sampler(dp.MCGdiff(problem.model), 256, 20, progress_bar=False)
    >>> sampler.run(jax.random.key(1), *problem.model_args, **problem.model_kwargs)
    >>> sampler.get_samples()["x"].shape
    (256, 8)
    """

    is_smc = True

    def __init__(
        self,
        model: Callable,
        *,
        noiseless: bool = False,
        potential: str = "tweedie",
        twisted: bool = True,
        ess_threshold: float = 0.5,
        resampling: str = "systematic",
        eta: float = 1.0,
        spacing: str = "uniform",
    ):
        if not isinstance(twisted, bool):
            raise TypeError(f"twisted must be True or False, got {twisted!r}")
        if not isinstance(noiseless, bool):
            raise TypeError(f"noiseless must be True or False, got {noiseless!r}")
        if potential not in mcgdiff.POTENTIALS:
            raise ValueError(f"potential must be one of {mcgdiff.POTENTIALS}, got {potential!r}")
        if twisted and potential == "pinned":
            raise ValueError("twisted=True needs the 'tweedie', 'gaussian' or 'flat' potential")
        if not twisted and potential in mcgdiff.ANCHORED_POTENTIALS:
            raise ValueError(
                f"the {potential!r} potential needs twisted=True (it depends on the parent "
                "particle, so only the twist can weight it); with twisted=False choose "
                "'gaussian', 'flat' or 'pinned'"
            )
        smc.resampling_fn(resampling)
        eta = _check_eta(eta)
        if eta == 0:
            raise ValueError("MCGdiff needs stochastic reverse steps: eta must be > 0, got 0")
        super().__init__(
            model,
            spacing=spacing,
            noiseless=noiseless,
            potential=potential,
            twisted=twisted,
            ess_threshold=smc.check_ess_threshold(ess_threshold),
            resampling=resampling,
            eta=eta,
        )

    def resampling_fn(self) -> Callable:
        return smc.resampling_fn(self._options["resampling"])

    def check(self, obs: ObservationModel) -> None:
        families = obs.noise_families()
        if obs.decode is not None:
            raise ModelError(
                "MCGdiff needs a linear forward operator on the diffused variable; with a "
                "LatentDiffusionPrior the likelihood goes through the decoder, which is not "
                "linear. Use dp.ReSample, dp.TDS or dp.DPS for latent priors."
            )
        if not is_linear_gaussian(obs):
            detail = ", ".join(f"{site}: {family}" for site, family in families.items())
            raise ModelError(
                "MCGdiff needs a linear forward operator with Normal noise of fixed scale; "
                f"the model's observed sites are ({detail}) or A(x) is not linear. "
                "Use dp.TDS or dp.FK for other models."
            )
        if self._options["noiseless"]:
            singular = np.asarray(whitened_svd(obs).singular)
            rank = int(np.sum(singular > _RANK_RTOL * singular.max()))
            num_obs = int(obs.observed_flat.shape[0])
            if rank < num_obs:
                raise ModelError(
                    f"MCGdiff(noiseless=True) needs A of full row rank: {num_obs} observations "
                    f"but rank {rank}"
                )

    def build(self, prior, obs, timesteps):
        svd = whitened_svd(obs)
        num_obs, dim = svd.y_white.shape[0], svd.v.shape[0]
        rank = min(num_obs, dim)
        coords_y = svd.u.T @ svd.y_white
        singular = svd.singular[:rank]
        observed = singular > _RANK_RTOL * jnp.max(singular)
        safe = jnp.where(observed, singular, 1.0)
        pseudo_obs = jnp.where(observed, coords_y[:rank] / safe, 0.0)
        noiseless = self._options["noiseless"]
        noise_ratio = jnp.where(observed & (not noiseless), 1.0 / safe, 0.0)
        # p(y) from the SMC's integral over pseudo-observations: the whitening, the singular
        # values, and the directions of y that carry pure noise
        sigma = obs.observation_scale(jnp.zeros(obs.event_shape))
        offset = -jnp.sum(jnp.log(sigma)) - jnp.sum(jnp.where(observed, jnp.log(safe), 0.0))
        if not noiseless:
            unobserved = jnp.ones(num_obs, bool).at[:rank].set(~observed)
            noise_terms = -0.5 * (coords_y**2 + jnp.log(2 * jnp.pi))
            offset = offset + jnp.sum(jnp.where(unobserved, noise_terms, 0.0))
        basis = svd.v[:, :rank]
        data_mean, data_variance = _moments_along(prior, basis)
        return mcgdiff.as_top_level_api(
            prior.denoiser,
            timesteps,
            basis,
            pseudo_obs,
            noise_ratio,
            observed=observed,
            potential=self._options["potential"],
            twisted=self._options["twisted"],
            eta=self._options["eta"],
            data_mean=data_mean,
            data_variance=data_variance,
            ess_threshold=self._options["ess_threshold"],
            resampling=self._options["resampling"],
            log_evidence_offset=offset,
        )


#: Singular values below this fraction of the largest count as zero.
_RANK_RTOL = 1e-6


RESAMPLE_SPACES = ("latent", "pixel")


class ReSample(Method):
    r"""ReSample, hard data consistency with stochastic resampling
    (:mod:`diffprior.kernels.resample`; Song et al., ICLR 2024), the latent plug-and-play
    method.

    On a :class:`~diffprior.LatentDiffusionPrior` the particles are latents :math:`z` and the
    consistency step maximises :math:`\log p(y \mid D(z))` through the decoder; on a plain
    :class:`~diffprior.DiffusionPrior` (whose decoder is the identity) it works on :math:`x`
    itself. Any likelihood of the model works (Gaussian, Student-t, ...). Approximate:
    particles are independent, with equal weights.

    Parameters
    ----------
    gamma
        The paper's :math:`\gamma`: the resampling variance is :math:`\gamma` times the DDPM
        posterior variance; larger trusts the data-consistent estimate more (paper: 40).
    consistency_every
        The paper's skip step :math:`C`: data consistency every this many steps, counted back
        from the last step (which always has it when ``window`` reaches 1).
    window
        ``(start, stop)``, fractions of the trajectory (0 at the first step, 1 after the last)
        where consistency steps happen; the default leaves out the first third, where
        :math:`\hat z_0` is too poor to be worth fitting.
    num_grad_steps, learning_rate
        Adam steps (and step size, in units of the diffusion state) of each consistency step.
    proximal_weight
        :math:`\lambda`: the consistency step keeps :math:`\frac{\lambda}{2 r_t^2} \lVert z -
        \hat z_0 \rVert^2` with :math:`r_t^2 = \mathrm{Var}[z_0 \mid z_t]`; 0 is the paper's
        unregularised fit, 1 a MAP under a Gaussian approximation of :math:`p(z_0 \mid z_t)`.
    eta
        DDIM stochasticity of the unconditional step (paper: 0, deterministic DDIM).
    space
        ``"latent"`` (default): the consistency step optimises :math:`z` through the decoder;
        ``"pixel"``: it optimises the image :math:`x` from :math:`D(\hat z_0)`, then encodes
        it (the paper's pixel-space variant; needs a prior with an ``encoder``). On a plain
        prior the two are the same.

    Examples
    --------
    >>> import jax, diffprior as dp
    >>> problem = dp.problems.mixture_problem(jax.random.key(0), 4, 2)
    >>> sampler = dp.Sampler(dp.ReSample(problem.model), 16, 20, progress_bar=False)
    >>> sampler.run(jax.random.key(1), *problem.model_args, **problem.model_kwargs)
    >>> sampler.get_samples()["x"].shape
    (16, 4)
    """

    def __init__(
        self,
        model: Callable,
        *,
        gamma: float = 40.0,
        consistency_every: int = 10,
        window: tuple[float, float] = (1 / 3, 1.0),
        num_grad_steps: int = 50,
        learning_rate: float = 0.05,
        proximal_weight: float = 1.0,
        eta: float = 0.0,
        space: str = "latent",
        spacing: str = "uniform",
    ):
        if space not in RESAMPLE_SPACES:
            raise ValueError(f"space must be one of {RESAMPLE_SPACES}, got {space!r}")
        for name, value in (
            ("consistency_every", consistency_every),
            ("num_grad_steps", num_grad_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        try:
            start, stop = (float(v) for v in window)
        except (TypeError, ValueError):
            raise TypeError(
                f"window must be a pair (start, stop) of fractions, got {window!r}"
            ) from None
        if not 0.0 <= start < stop <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start < stop <= 1, got {window!r}")
        super().__init__(
            model,
            spacing=spacing,
            gamma=_check_positive("gamma", gamma),
            consistency_every=int(consistency_every),
            window=(start, stop),
            num_grad_steps=int(num_grad_steps),
            learning_rate=_check_positive("learning_rate", learning_rate),
            proximal_weight=_check_positive("proximal_weight", proximal_weight, allow_zero=True),
            eta=_check_eta(eta),
            space=space,
        )

    def check(self, obs: ObservationModel) -> None:
        if self._options["space"] == "pixel" and obs.decode is not None:
            if getattr(obs.prior, "encoder", None) is None:
                raise ModelError(
                    f"site {obs.prior_site!r}: ReSample(space='pixel') encodes the fitted image, "
                    "but this LatentDiffusionPrior has no encoder; pass encoder=E to it or use "
                    "space='latent'"
                )

    def build(self, prior, obs, timesteps):
        opts = self._options
        pixel = {}
        if opts["space"] == "pixel" and obs.decode is not None:
            pixel = {
                "decode": prior.decode,
                "encode": prior.encode,
                "image_log_likelihood_fn": obs.in_image_space().log_likelihood,
            }
        return resample.as_top_level_api(
            prior.denoiser,
            obs.log_likelihood,
            timesteps,
            gamma=opts["gamma"],
            eta=opts["eta"],
            consistency_every=opts["consistency_every"],
            window=opts["window"],
            num_grad_steps=opts["num_grad_steps"],
            optimizer=optax.adam(opts["learning_rate"]),
            proximal_weight=opts["proximal_weight"],
            data_variance=_unit_data_variance(prior),
            **pixel,
        )


def _moments_along(prior: DiffusionPrior, basis: Array) -> tuple[Array, Array]:
    """The prior's mean and variance along each column of ``basis`` (``(d, r)``): exact from
    the covariance where the prior has one, else from per-coordinate variances (mean zero
    where the prior does not know its mean)."""
    try:
        mean = jnp.ravel(prior.mean)
    except (NotImplementedError, AttributeError):
        mean = jnp.zeros(basis.shape[0])
    covariance = getattr(prior, "covariance", None)
    if covariance is not None:
        variance = jnp.einsum("dr,de,er->r", basis, covariance, basis)
    else:
        variance = (basis**2).T @ jnp.ravel(prior.variance)
    return mean @ basis, variance
