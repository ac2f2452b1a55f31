"""Methods for :class:`diffprior.Sampler`: each binds a NumPyro model and options to a kernel.

A method checks its options when it is made (before any heavy work) and, inside the compiled
run, turns the model's :class:`diffprior.model.ObservationModel` and the prior into a
BlackJAX-style ``SamplingAlgorithm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from blackjax.base import SamplingAlgorithm

from diffprior import linear_gaussian as lg
from diffprior.diffusion.grids import SPACINGS
from diffprior.infer.twists import likelihood_twist, observation_gains
from diffprior.kernels import diffpir, dps, fk, mcgdiff, pigdm, resample, smc, tds, unguided
from diffprior.linear_gaussian import WhitenedSVD
from diffprior.model import ModelError, ObservationModel
from diffprior.operators import Inpaint
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
    "TDS_PROPOSALS",
    "FK_PROPOSALS",
    "observation_gains",
]

#: Twist variance inflations, see :meth:`TDS.twist_fn`.
VARIANCE_INFLATIONS = (None, "pigdm", "jacobian")
#: :class:`TDS`'s proposals; ``"auto"`` is ``"subspace"`` where it applies, else ``"guided"``.
TDS_PROPOSALS = ("auto", "guided", "subspace")
#: :class:`FK`'s proposals: the kernel's (:data:`diffprior.kernels.fk.PROPOSALS`) and TDS's
#: ``"subspace"``.
FK_PROPOSALS = ("auto", *fk.PROPOSALS, "subspace")


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
    """Base of the methods: binds a NumPyro model and options to a kernel for
    :class:`diffprior.Sampler`. Subclasses implement :meth:`build` and may override the other
    hooks.

    The hooks, in the order the Sampler uses them:

    - ``__init__(model, *, options..., spacing="uniform")``: a subclass checks its options here,
      before any heavy work, and passes them on as keywords of ``super().__init__``; they are
      then :attr:`options` (recorded in ``to_arviz()`` attributes and the ``repr``). ``spacing``
      names the timestep grid (``"uniform"``, ``"quadratic"`` or ``"edm"``).
    - :meth:`check`: the model read with concrete values, before anything is compiled.
    - :meth:`build`: the kernel, inside the compiled run.
    - ``is_smc`` (class attribute, default ``False``): ``True`` when the kernel weights its
      particles. The Sampler then requires the SMC fields of the kernel protocol
      (:mod:`diffprior.kernels.base`: ``log_weights`` and ``log_evidence`` in the state,
      :data:`~diffprior.kernels.base.SMC_INFO_FIELDS` in Info), resamples the last particles to
      equal weights with :meth:`resampling_fn` and reports ``sampler.log_evidence``. With
      ``False`` the last particles are equally weighted draws and there is no evidence.
    - ``requires_observation`` (class attribute, default ``True``): whether the model must have
      an observed site.

    :doc:`/write_your_own_kernel` writes two methods, one of each kind.
    """

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
        """The class name, used in progress bars, warnings and ``to_arviz()`` attributes."""
        return type(self).__name__

    @property
    def options(self) -> dict[str, Any]:
        """A copy of the method's options, ``spacing`` included, as given to ``__init__``:
        what :meth:`build` reads, and what records such as ``to_arviz`` attributes show."""
        return dict(self._options)

    def build(
        self, prior: DiffusionPrior, obs: ObservationModel, timesteps: Array
    ) -> SamplingAlgorithm:
        """The kernel: a ``blackjax.base.SamplingAlgorithm(init, step)`` that keeps the kernel
        protocol of :mod:`diffprior.kernels.base` (the SMC part too when ``is_smc``).

        Called once per compilation, while the Sampler's run is traced: the arrays of
        ``prior`` and ``obs`` may be tracers, so nothing here may convert them to Python or
        NumPy values (checks on concrete values belong in :meth:`check`).

        Parameters
        ----------
        prior
            The model's :class:`~diffprior.DiffusionPrior`; ``prior.denoiser`` is its
            :class:`~diffprior.Denoiser`.
        obs
            The model's likelihood as a function of one particle
            (:meth:`~diffprior.model.ObservationModel.in_latent_space`: of the latent of a
            :class:`~diffprior.LatentDiffusionPrior`), e.g. ``obs.log_likelihood(x)``.
        timesteps
            ``(num_steps + 1,)`` decreasing times from the schedule's ``t_max`` to exactly 0,
            spaced as :attr:`options` ``["spacing"]`` says; ``step`` is called ``num_steps``
            times.
        """
        raise NotImplementedError

    def check(self, obs: ObservationModel) -> None:
        """Checks on the concrete model (``obs``, as :meth:`build` gets it) before anything is
        compiled: raise :class:`~diffprior.model.ModelError` for a model the method cannot
        sample. It may also record what :meth:`build` needs to know about the model (PiGDM and
        DiffPIR record whether it is linear Gaussian). The default accepts every model.

        The checks of diffprior's own methods read the model's structure and parameters, never
        the observed values: :meth:`~diffprior.Sampler.run` skips them on a rerun whose
        arguments differ from the last run's only in the observed values. A check defined
        outside this module runs at every run."""

    def resampling_fn(self) -> Callable:
        """The scheme of the final equal-weight resampling of an SMC method's particles, a
        :mod:`blackjax.smc.resampling` function (default systematic; methods with a
        ``resampling`` option return :func:`diffprior.kernels.smc.resampling_fn` of it)."""
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
        # masked (and scaled) observations weigh in the residual as in the likelihood
        weights = obs.observation_weights()
        root = None if weights is None else jnp.sqrt(weights)

        def residual_fn(x0):
            residual = obs.observed_flat - obs.observation_mean(x0)
            return residual if root is None else root * residual

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
    proposal
        ``"auto"`` (default), ``"guided"`` or ``"subspace"``. ``"guided"`` is the paper's:
        the reverse step shifted along the twist's gradient (one network value-and-gradient
        per particle). ``"subspace"``, for a linear model with Gaussian noise, proposes the
        observed directions (the right singular basis of the whitened operator) from the
        twisted transition's own Gaussian, a Kalman update in closed form, and weights by the
        twist in the same basis: the kernel of :class:`MCGdiff` (no network gradient). For a
        Gaussian prior its weights are exactly uniform; for a mixture or a network the
        weights keep it exact as the particles grow, at any number of observations and down
        to near-noiseless data. ``scale``, ``variance_inflation`` other than ``"jacobian"``
        (the subspace twist is its exact form) and ``eta=0`` have no meaning there and are
        refused. ``"auto"`` takes ``"subspace"`` when the model is linear Gaussian on the
        diffused variable and none of those guided-only options is set, else ``"guided"``
        (decided when the sampler first reads the model).
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
        proposal: str = "auto",
        spacing: str = "uniform",
    ):
        smc.resampling_fn(resampling)
        _check_variance_inflation(variance_inflation)
        if proposal not in TDS_PROPOSALS:
            raise ValueError(f"proposal must be one of {TDS_PROPOSALS}, got {proposal!r}")
        super().__init__(
            model,
            spacing=spacing,
            scale=_check_positive("scale", scale, allow_zero=True),
            ess_threshold=smc.check_ess_threshold(ess_threshold),
            resampling=resampling,
            variance_inflation=variance_inflation,
            eta=_check_eta(eta),
            proposal=proposal,
        )
        self._subspace_ok = _check_subspace_options(self.name, proposal, self._options)
        self._subspace = proposal == "subspace"

    def resampling_fn(self) -> Callable:
        return smc.resampling_fn(self._options["resampling"])

    def twist_fn(self, prior: DiffusionPrior, obs: ObservationModel):
        return likelihood_twist(prior, obs, self._options["variance_inflation"])

    def check(self, obs: ObservationModel) -> None:
        self._subspace = _use_subspace(self.name, self._options["proposal"], obs, self._subspace_ok)

    def build(self, prior, obs, timesteps):
        opts = self._options
        if self._subspace:
            return _subspace_kernel(prior, obs, timesteps, opts)
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

    ``proposal="subspace"`` is :class:`TDS`'s subspace proposal (linear Gaussian models
    only; the same kernel, so the same samples for the same key): the posterior with the
    model's own likelihood, so it needs the ``"difference"`` potential, ``lam=1``, no
    ``reward``, ``resample_every=1``, ``scale=1``, ``variance_inflation="jacobian"`` and
    ``eta > 0``, and refuses anything else. ``proposal="auto"`` (the default) takes it where
    those options and the model allow, as :class:`TDS` does, and the guided proposal
    elsewhere: on near-noiseless linear Gaussian data (sigma_y = 1e-4 on a d = 8 mixture, 4 x
    64 particles, 20 steps) the guided proposal's log-evidence was off by thousands of nats,
    with a collapse warning, and the subspace proposal's by 0.1-1.1 nats.

    Parameters
    ----------
    potential
        ``"difference"``, ``"max"`` or ``"sum"``.
    proposal
        ``"auto"`` (default, see above), ``"guided"`` (TDS's guided proposal), ``"prior"``, or
        ``"subspace"`` (TDS's subspace proposal, linear Gaussian models only).
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
        exactly ``TDS(model, proposal="guided")``.
    """

    is_smc = True

    def __init__(
        self,
        model: Callable,
        *,
        potential: str = "difference",
        proposal: str = "auto",
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
        if proposal not in FK_PROPOSALS:
            raise ValueError(f"proposal must be one of {FK_PROPOSALS}, got {proposal!r}")
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
        self._subspace_ok = _check_subspace_options(self.name, proposal, self._options)
        self._subspace = proposal == "subspace"

    def resampling_fn(self) -> Callable:
        return smc.resampling_fn(self._options["resampling"])

    def check(self, obs: ObservationModel) -> None:
        self._subspace = _use_subspace(self.name, self._options["proposal"], obs, self._subspace_ok)

    def build(self, prior, obs, timesteps):
        opts = self._options
        if self._subspace:
            return _subspace_kernel(prior, obs, timesteps, opts)
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
            proposal="guided" if opts["proposal"] == "auto" else opts["proposal"],
            lam=opts["lam"],
            eta=opts["eta"],
            scale=opts["scale"],
            ess_threshold=opts["ess_threshold"],
            resample_every=opts["resample_every"],
            resampling=opts["resampling"],
        )


# -- linear-Gaussian structure ---------------------------------------------------------------
def _unit_data_variance(prior: DiffusionPrior) -> Array:
    r"""The prior's data variance averaged over coordinates (the one number every Tweedie
    variance :math:`\mathrm{Var}[x_0 \mid x_t]` of the methods uses)."""
    return jnp.mean(prior.variance)


def _require_linear_gaussian(method: str, obs: ObservationModel, others: str) -> None:
    """A ModelError naming the sites when ``obs`` is not linear with Normal noise."""
    if not obs.is_linear_gaussian():
        detail = ", ".join(f"{site}: {family}" for site, family in obs.noise_families().items())
        raise ModelError(
            f"{method} needs a linear forward operator with Normal noise of fixed scale; "
            f"the model's observed sites are ({detail}) or A(x) is not linear. {others}"
        )


#: The options that only the guided proposal reads, with the value that leaves the subspace
#: proposal unchanged (its twist is the exact form of ``"jacobian"``).
_SUBSPACE_NEUTRAL = {
    "potential": "difference",
    "lam": 1.0,
    "reward": None,
    "resample_every": 1,
    "scale": 1.0,
    "variance_inflation": "jacobian",
}


def _check_subspace_options(method: str, proposal: str, options: dict[str, Any]) -> bool:
    """Whether the subspace proposal can honour ``options``; a ValueError naming the others
    when ``proposal`` is ``"subspace"`` and it cannot."""
    conflicts = [
        f"{name}={options[name]!r}"
        for name, neutral in _SUBSPACE_NEUTRAL.items()
        if name in options and options[name] is not neutral and options[name] != neutral
    ]
    if options["eta"] == 0:
        conflicts.append("eta=0 (its proposal needs stochastic reverse steps)")
    if proposal == "subspace" and conflicts:
        raise ValueError(
            f"{method}(proposal='subspace') proposes and weights in the observed subspace "
            f"with the model's own likelihood; {', '.join(conflicts)} only apply to the "
            "guided proposal: leave them at their defaults or use proposal='guided'"
        )
    return not conflicts


def _require_subspace_model(method: str, obs: ObservationModel, others: str) -> None:
    """A ModelError unless the MCGdiff kernel can take ``obs``: linear Gaussian on the
    diffused variable, with a whitened SVD within the size limits."""
    if obs.decode is not None:
        raise ModelError(
            f"{method} needs a linear forward operator on the diffused variable; with a "
            "LatentDiffusionPrior the likelihood goes through the decoder, which is not "
            f"linear. {others}"
        )
    _require_linear_gaussian(method, obs, others)
    obs.linear_gaussian()  # its size and structure checks, before compiling


def _use_subspace(method: str, proposal: str, obs: ObservationModel, compatible: bool) -> bool:
    """Whether ``proposal`` means the subspace proposal for ``obs``: always for
    ``"subspace"`` (after the model checks), for ``"auto"`` when the options allow it and the
    model is linear Gaussian on the diffused variable with a whitened SVD of allowed size."""
    if proposal == "subspace":
        _require_subspace_model(method, obs, "Use proposal='guided' for other models.")
        return True
    if proposal != "auto" or not compatible:
        return False
    try:
        _require_subspace_model(method, obs, "")
    except ModelError:
        return False
    return True


def _subspace_setup(prior, obs, timesteps) -> tuple[WhitenedSVD, dict[str, Any]]:
    """The model's whitened SVD and the options of the subspace proposal on it: the prior's
    moments along its directions, and the calibrated twist where the prior is calibrated
    (the one setup of :func:`_subspace_kernel` and of particle Gibbs's subspace sweep)."""
    svd = obs.linear_gaussian()
    data_mean, data_variance = _moments_along(prior, svd)
    options = {"data_mean": data_mean, "data_variance": data_variance}
    calibration = getattr(prior, "calibration", None)
    if calibration is not None:
        options["data_variance"] = _calibrated_variance(prior, svd, timesteps, data_variance)
        options["twist_shrinkage"] = jax.vmap(calibration.shrinkage_at)(timesteps)
        centre = jnp.reshape(calibration.mean, (1, *prior.latent_shape))
        options["twist_centre"] = svd.V_T(centre)[0]
    return svd, options


def _subspace_kernel(prior, obs, timesteps, options, **mcgdiff_options) -> SamplingAlgorithm:
    """The MCGdiff kernel of the model (its defaults: the tweedie potential and the twist
    unless ``mcgdiff_options`` say otherwise), with ``eta``, ``ess_threshold`` and
    ``resampling`` from ``options``: :class:`MCGdiff`, and TDS's and FK's subspace proposal."""
    svd, setup = _subspace_setup(prior, obs, timesteps)
    return mcgdiff.from_linear_gaussian(
        prior.denoiser,
        timesteps,
        svd,
        eta=options["eta"],
        ess_threshold=options["ess_threshold"],
        resampling=options["resampling"],
        **{**setup, **mcgdiff_options},
    )


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
        self._linear_gaussian = obs.is_linear_gaussian()
        if self._linear_gaussian:
            obs.linear_gaussian()  # its size and structure checks, before compiling

    def build(self, prior, obs, timesteps):
        options = {"scale": self._options["scale"], "eta": self._options["eta"]}
        if self._linear_gaussian:
            return pigdm.from_linear_gaussian(
                prior.denoiser,
                obs.linear_gaussian(),
                timesteps,
                data_variance=_unit_data_variance(prior),
                **options,
            )
        guidance_fn = likelihood_twist(prior, obs, "jacobian")
        return pigdm.as_top_level_api(prior.denoiser, guidance_fn, timesteps, **options)


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
        self._linear_gaussian = obs.is_linear_gaussian()
        if self._linear_gaussian:
            obs.linear_gaussian()  # its size and structure checks, before compiling

    def build(self, prior, obs, timesteps):
        options = {"lam": self._options["lam"], "zeta": self._options["zeta"]}
        if self._linear_gaussian:
            svd = obs.linear_gaussian()
            return diffpir.from_linear_gaussian(prior.denoiser, svd, timesteps, **options)
        proximal_fn = diffpir.gradient_proximal(
            obs.log_likelihood, _curvature_bound(obs), self._options["num_grad_steps"]
        )
        return diffpir.as_top_level_api(prior.denoiser, proximal_fn, timesteps, **options)


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
        if not isinstance(noiseless, bool):
            raise TypeError(f"noiseless must be True or False, got {noiseless!r}")
        mcgdiff.check_options(potential, twisted)
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
        others = "Use dp.TDS or dp.FK for other models."
        if obs.decode is not None:
            others = "Use dp.ReSample, dp.TDS or dp.DPS for latent priors."
        _require_subspace_model("MCGdiff", obs, others)
        svd = obs.linear_gaussian()
        if self._options["noiseless"]:
            rank = int(svd.num_observed)
            if rank < svd.num_obs:
                raise ModelError(
                    f"MCGdiff(noiseless=True) needs A of full row rank: {svd.num_obs} "
                    f"observations but rank {rank}"
                )

    def build(self, prior, obs, timesteps):
        options = {name: self._options[name] for name in ("noiseless", "potential", "twisted")}
        return _subspace_kernel(prior, obs, timesteps, self._options, **options)


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


def _moments_along(prior: DiffusionPrior, svd: WhitenedSVD) -> tuple[Array, Array]:
    """The prior's mean and variance along each right coordinate of ``svd`` (``(r,)`` each).

    The mean is projected (zero where the prior does not know its mean). The variance is exact
    where the prior gives it along directions (a Gaussian mixture's ``variance_along``), for a
    dense basis, and for a permutation basis (inpainting); otherwise the per-coordinate
    variances are averaged. These moments only shape MCGdiff's proposal: the weights keep it
    exact whatever they are.
    """
    event_shape = tuple(prior.event_shape)
    try:
        mean = svd.V_T(jnp.reshape(prior.mean, event_shape))
    except (NotImplementedError, AttributeError):
        mean = jnp.zeros(svd.dim)
    variance_along = getattr(prior, "variance_along", None)
    if variance_along is not None:
        variance = variance_along(lambda v: svd.V_T(v.reshape((-1, *event_shape))))
        return mean, jnp.reshape(variance, (svd.dim,))
    per_coordinate = jnp.broadcast_to(jnp.asarray(prior.variance), event_shape)
    return mean, _variance_along(svd, per_coordinate)


def _variance_along(svd: WhitenedSVD, per_coordinate: Array) -> Array:
    """``(r,)`` the variance along each right coordinate of ``svd`` of independent coordinates
    with variances ``per_coordinate`` (exact for a dense or a permutation basis, else their
    mean)."""
    basis = getattr(svd.basis, "op", svd.basis)  # an operator behind a reshaping adapter
    if isinstance(basis, lg._DenseBasis):
        return (basis.columns**2).T @ per_coordinate.reshape(-1)
    if isinstance(basis, Inpaint):
        return jnp.reshape(svd.V_T(per_coordinate), (svd.dim,))
    return jnp.full((svd.dim,), jnp.mean(per_coordinate))


def _calibrated_variance(
    prior: DiffusionPrior, svd: WhitenedSVD, timesteps: Array, data_variance: Array
) -> Array:
    r"""``(K + 1, r)``: at each grid time, the data variance along each direction whose Tweedie
    spread :math:`v \sigma_t^2 / (\alpha_t^2 v + \sigma_t^2)` is the calibrated
    :math:`r_t^2` (:func:`diffprior.calibrate`, times its inflation), so that MCGdiff's
    potentials and twist use the measured spread of :math:`\hat x_0` instead of that of
    Gaussian data. Where the measured spread is at or above the trivial one
    (:math:`\sigma_t^2 / \alpha_t^2`, the network no better than :math:`x_t / \alpha_t`) it
    is capped at ten times the prior's."""
    schedule = prior.schedule
    event_shape = tuple(prior.latent_shape)
    cap = 10.0 * jnp.maximum(data_variance, jnp.finfo(jnp.float32).tiny)

    def at(t):
        r2 = prior.calibration.twist_variance_at(t)
        r2 = _variance_along(svd, jnp.reshape(r2, event_shape))
        alpha2, sigma2 = schedule.alpha(t) ** 2, schedule.sigma(t) ** 2
        room = sigma2 - alpha2 * r2
        v = jnp.where(room > 0, r2 * sigma2 / jnp.where(room > 0, room, 1.0), cap)
        # at t = 0 the spread is 0 whatever v: keep the prior's (the last step's spread)
        return jnp.where(t > 0, jnp.minimum(v, cap), data_variance)

    return jax.vmap(at)(timesteps)
