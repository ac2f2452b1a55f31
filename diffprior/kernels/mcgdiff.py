r"""Monte Carlo guided diffusion, MCGdiff (Cardoso, Janati el Idrissi, Le Corff & Moulines,
ICLR 2024, arXiv 2308.07983, Algorithms 1 and 2).

For a linear Gaussian observation written in the right singular basis :math:`V` of the
(whitened) operator, each observed coordinate is a *pseudo-observation*
:math:`\tilde y_i = \bar x_{0,i} + c_i \varepsilon_i` of :math:`\bar x_0 = V^T x_0`, with noise
ratio :math:`c_i = \sigma_y / s_i` (:math:`c_i = 0` noiseless). The particles run the prior's
reverse chain on a grid :math:`t_0 > \dots > t_K = 0`; along each observed direction they
carry a Gaussian potential

.. math::
    g_{k,i}(\bar x_{t_k,i}) = N\big(\tilde y_i;\ a_{k,i}\, \bar x_{t_k,i} + b_{k,i},\
    e_{k,i}\big)

that ends at the exact likelihood, :math:`g_{K,i} = N(\tilde y_i; \bar x_{0,i}, c_i^2)`, so
the final target is the posterior for any intermediate choice (which only sets the variance of
the weights). Four choices (``potential``):

- ``"gaussian"``: :math:`p(\tilde y_i \mid \bar x_{t,i})` exactly when
  :math:`\bar x_{0,i} \sim N(\mu_i, v_i)` (the prior's moments along the direction):
  :math:`a = \alpha_t v / D`, :math:`b = \mu \sigma_t^2 / D`,
  :math:`e = c^2 + v \sigma_t^2 / D`, :math:`D = \alpha_t^2 v + \sigma_t^2`; exact weights
  for a Gaussian prior, and close to ``"flat"`` for a broad one;
- ``"flat"``: its limit :math:`v \to \infty`, :math:`a = 1/\alpha_t`, :math:`b = 0`,
  :math:`e = c^2 + \sigma_t^2/\alpha_t^2`; for :math:`c = 0` it is the paper's noiseless
  potential :math:`N(\bar x_t; \alpha_t \tilde y, \sigma_t^2)`;
- ``"pinned"``: the paper's noisy scheme. The observation looks like the forward process at
  the time :math:`\tau_i` where :math:`\rho_t = \sigma_t/\alpha_t` equals :math:`c_i`; with
  :math:`k_i = \min\{k : \rho_{t_k} \le c_i\}`, :math:`a = 1/\alpha_t`, :math:`b = 0`,
  :math:`e = \lvert \rho_t^2 - c_i^2 \rvert` up to :math:`k_i` (the forward noising of the
  pinned value before, the exact likelihood of :math:`\tilde y_i` given
  :math:`\bar x_{t_{k_i}}` at :math:`k_i`), and no potential after;
- ``"tweedie"`` (the default, with the twist below, as in :class:`diffprior.MCGdiff`): the
  ``"gaussian"`` slope and variance, but centred at the parent particle's own denoiser
  estimate instead of the prior mean. The Tweedie mean is a martingale along the reverse
  chain, :math:`E[\hat x_0(x_s) \mid x_t] = \hat x_0(x_t)`, so with the slope
  :math:`a_s` of a Gaussian denoiser the proposal potential for the step from :math:`x_t` is

  .. math::
      g(\bar x_s \mid x_t) = N\big(\tilde y_i;\ \bar{\hat x}_{0,i}(x_t) + a_{s,i}(\bar x_{s,i}
      - \bar m_i),\ e_{s,i}\big),

  the twist :math:`h_s` linearised around the reverse mean :math:`\bar m` without a network
  gradient. It knows which mode the particle is in, where the prior-mean potentials do not,
  so the proposal follows the twist that weights it. For a Gaussian prior it is the exact
  conditional and every weight increment is zero.

Each step proposes the observed coordinates from the reverse Gaussian step
:math:`N(\bar m, v)` times the potential (a Kalman update in closed form; a zero variance pins
the coordinate, as in the noiseless case at :math:`t = 0`), the others from the reverse step
alone, and weights by

.. math::
    w_k = \prod_{i\ \mathrm{active}} \frac{N(\tilde y_i;\ a_{k,i} \bar m_i + b_{k,i},\
    a_{k,i}^2 v + e_{k,i})}{g_{k-1,i}(\bar x_{t_{k-1},i})}.

(with the ``"tweedie"`` potential, :math:`w_k = N(\tilde y;\ \bar{\hat x}_0(x_t),\ a^2 v +
e_k)\, h_k(x_{t_k}) / \big(g(\bar x_{t_k} \mid x_{t_{k-1}})\, h_{k-1}(x_{t_{k-1}})\big)`
per coordinate, with :math:`h_K` the likelihood). Only the observed directions (at most
``dy``) are touched, so a step costs one network
evaluation per particle plus :math:`O(d\,d_y)`; no gradient is needed. The product of the
normalising constants estimates :math:`\int p(x_0) \prod_i N(\tilde y_i; \bar x_{0,i}, c_i^2)
\, dx_0`; ``log_evidence_offset`` adds the change of variables to :math:`p(y)`.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> basis = jnp.array([[1.0], [0.0]])  # observe the first coordinate
>>> algo = dp.kernels.mcgdiff.as_top_level_api(
...     gmm.denoiser, gmm.timesteps(10), basis, jnp.array([1.5]), jnp.array([0.5])
... )
>>> state = algo.init(jax.random.normal(jax.random.key(0), (32, 2)))
>>> state, info = algo.step(jax.random.key(1), state)
>>> state.particles.shape
(32, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.transitions import tweedie_variance
from diffprior.kernels import csmc, smc
from diffprior.linear_gaussian import WhitenedSVD
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "MCGdiffState",
    "MCGdiffInfo",
    "PotentialPlan",
    "potential_plan",
    "check_options",
    "init",
    "build_kernel",
    "as_top_level_api",
    "from_linear_gaussian",
    "subspace_proposal",
]


class MCGdiffState(NamedTuple):
    r"""What the next step needs: ``particles`` ``(N, *event_shape)`` at ``timesteps[step]``,
    normalised ``log_weights`` ``(N,)``, the running ``log_evidence``, ``step``, the
    denoiser's ``x0_hat`` at the particles and ``log_correction`` ``(N,)``, the twist over the
    potential :math:`\log h_k - \log g_k` (zero without a twist)."""

    particles: Array
    log_weights: Array
    log_evidence: Array
    step: Array
    x0_hat: Array
    log_correction: Array


#: Per-step diagnostics: the shared :class:`diffprior.kernels.smc.SMCInfo` (ESS, resampling,
#: ancestors, log-weights, the log-evidence increment, degeneracy and non-finite proposals).
MCGdiffInfo = smc.SMCInfo


class PotentialPlan(NamedTuple):
    r"""The potentials on the grid, one row per grid time :math:`t_k`:
    :math:`g_{k,i}(\bar x) = N(\tilde y_i;\ a_{k,i} \bar x + b_{k,i},\ e_{k,i})` where
    ``active``, and 1 elsewhere.

    slope, offset, variance
        ``(K + 1, r)`` :math:`a`, :math:`b`, :math:`e`.
    active
        ``(K + 1, r)`` whether coordinate :math:`i` carries a potential at :math:`t_k`.
    """

    slope: Array
    offset: Array
    variance: Array
    active: Array


POTENTIALS = ("gaussian", "flat", "pinned", "tweedie")

#: The potentials centred at each particle's denoiser estimate; they need the twist.
ANCHORED_POTENTIALS = ("tweedie",)


def potential_plan(
    denoiser: Denoiser,
    timesteps: Array,
    noise_ratio: Array,
    observed: Array,
    potential: str = "tweedie",
    data_mean: ArrayLike = 0.0,
    data_variance: ArrayLike = 1.0,
) -> PotentialPlan:
    r"""The potentials of the module docstring for noise ratios :math:`c_i` (``0``
    noiseless); coordinates with ``observed`` False are never active. ``data_mean`` and
    ``data_variance`` (per coordinate, or scalars) are the prior's moments along the observed
    directions, used by the ``"gaussian"`` and ``"tweedie"`` potentials (``"tweedie"`` has the
    ``"gaussian"`` slope and variance; its offset is per particle, set in the kernel)."""
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    schedule = denoiser.schedule
    alpha = jax.vmap(schedule.alpha)(timesteps)[:, None]
    sigma = jax.vmap(schedule.sigma)(timesteps)[:, None]
    c2 = jnp.asarray(noise_ratio, jnp.float32)[None, :] ** 2
    num = timesteps.shape[0]
    all_times = jnp.broadcast_to(observed[None, :], (num, observed.shape[0]))
    if potential in ("gaussian", "tweedie"):
        mean = jnp.asarray(data_mean, jnp.float32)
        v = jnp.asarray(data_variance, jnp.float32)
        denom = alpha**2 * v + sigma**2
        slope = alpha * v / denom
        offset = mean * sigma**2 / denom
        variance = c2 + v * sigma**2 / denom
        active = all_times
    elif potential == "flat":
        slope = 1.0 / alpha
        offset = jnp.zeros_like(slope)
        variance = c2 + (sigma / alpha) ** 2
        active = all_times
    else:
        rho2 = (sigma / alpha) ** 2
        # k_i: the first grid time at which the diffusion is no noisier than the observation
        first = jnp.argmax(rho2 <= c2, axis=0)  # always found: rho = 0 at t = 0
        active = (jnp.arange(num)[:, None] <= first[None, :]) & all_times
        slope = 1.0 / alpha
        offset = jnp.zeros_like(slope)
        variance = jnp.abs(rho2 - c2)
    shape = (num, observed.shape[0])
    return PotentialPlan(
        jnp.broadcast_to(slope, shape),
        jnp.broadcast_to(offset, shape),
        jnp.broadcast_to(variance, shape),
        active,
    )


def _per_time(data_variance: ArrayLike, num_times: int, shape: tuple[int, ...]) -> Array:
    """``data_variance`` as ``(num_times, *shape)``: a ``(num_times, r)`` array is one row per
    grid time (a calibrated prior), anything else is the same at every time."""
    return jnp.broadcast_to(jnp.asarray(data_variance, jnp.float32), (num_times, *shape))


def check_options(potential: str, twisted: bool) -> None:
    """Raise a clear error for a ``potential`` / ``twisted`` pair the kernel cannot run."""
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    if not isinstance(twisted, bool):
        raise TypeError(f"twisted must be True or False, got {twisted!r}")
    if twisted and potential == "pinned":
        raise ValueError("twisted=True needs the 'tweedie', 'gaussian' or 'flat' potential")
    if not twisted and potential in ANCHORED_POTENTIALS:
        raise ValueError(
            f"the {potential!r} potential needs twisted=True (it depends on the parent "
            "particle, so only the twist can weight it); with twisted=False choose "
            "'gaussian', 'flat' or 'pinned'"
        )


def _log_normal(x: Array, mean: Array, variance: Array) -> Array:
    variance = jnp.maximum(variance, jnp.finfo(jnp.float32).tiny)
    return -0.5 * ((x - mean) ** 2 / variance + jnp.log(2 * jnp.pi * variance))


def _log_potential(coords: Array, pseudo_obs: Array, plan: PotentialPlan, k: Array) -> Array:
    """Sum of the active potentials at grid index ``k`` for coordinates ``(N, r)``."""
    terms = _log_normal(pseudo_obs, plan.slope[k] * coords + plan.offset[k], plan.variance[k])
    return jnp.sum(jnp.where(plan.active[k], terms, 0.0), axis=-1)


def _project(basis: Array | WhitenedSVD, x: Array) -> Array:
    """Coordinates ``(N, r)`` of particles ``(N, *event_shape)`` along the observed directions."""
    if hasattr(basis, "V_T"):
        return basis.V_T(x)
    return x.reshape((x.shape[0], -1)) @ basis


def _lift(basis: Array | WhitenedSVD, coords: Array, shape: tuple[int, ...]) -> Array:
    """``sum_i coords_i v_i`` for coordinates ``(N, r)``, shaped ``shape``."""
    if hasattr(basis, "V"):
        return basis.V(coords).reshape(shape)
    return (coords @ basis.T).reshape(shape)


def _x0_hat(denoiser: Denoiser, particles: Array, t: Array) -> Array:
    return jax.vmap(lambda x: denoiser.predict(x, t)[0])(particles)


def init(
    particles: Array,
    denoiser: Denoiser,
    timesteps: Array,
    basis: Array,
    pseudo_obs: Array,
    plan: PotentialPlan,
    twist: Twist | None = None,
    log_evidence_offset: ArrayLike = 0.0,
    *,
    axis_name: str | None = None,
) -> MCGdiffState:
    """Weight reference draws at ``timesteps[0]`` by the first potentials (or twists);
    ``axis_name`` as for the step (:func:`build_kernel`)."""
    x0_hat = _x0_hat(denoiser, particles, timesteps[0])
    log_potential = _log_potential(_project(basis, particles), pseudo_obs, plan, 0)
    correction = _log_correction(
        twist, basis, pseudo_obs, x0_hat, log_potential, 0, False, plan.active[0]
    )
    update = smc.initial_weights(log_potential + correction, axis_name)
    log_evidence = update.log_evidence_increment + jnp.asarray(log_evidence_offset, jnp.float32)
    step = jnp.zeros((), jnp.int32)
    return MCGdiffState(particles, update.log_weights, log_evidence, step, x0_hat, correction)


class Twist(NamedTuple):
    r"""The twist :math:`h_k(x) = \prod_i N(\tilde y_i;\ (V^T \hat x_0(x))_i,\ e_{k,i})`
    with ``variance`` ``(K + 1, r)`` :math:`e_{k,i} = c_i^2 + \mathrm{Var}[\bar x_{0,i} \mid
    x_{t_k}]`. With ``shrinkage`` ``(K + 1,)`` :math:`a_k` and ``centre`` ``(r,)`` :math:`\bar
    m` (a calibrated prior, :func:`diffprior.calibrate`) the twist's mean is the shrunk
    :math:`\bar m + a_k (V^T \hat x_0 - \bar m)`; :math:`a_K = 1` keeps the last twist the
    likelihood."""

    variance: Array
    shrinkage: Array | None = None
    centre: Array | None = None

    def coords(self, basis, x0_hat: Array, k: Array) -> Array:
        """The twist's mean at grid index ``k`` for estimates ``x0_hat`` ``(N, ...)``."""
        coords = _project(basis, x0_hat)
        if self.shrinkage is None:
            return coords
        return self.centre + self.shrinkage[k] * (coords - self.centre)


def _log_correction(twist, basis, pseudo_obs, x0_hat, log_potential, k, is_last, active):
    r""":math:`\log h_k - \log g_k` at the particles, over the ``active`` (observed)
    directions; zero at the last step (both are the likelihood there) and without a twist."""
    if twist is None:
        return jnp.zeros_like(log_potential)
    terms = _log_normal(pseudo_obs, twist.coords(basis, x0_hat, k), twist.variance[k])
    twist_sum = jnp.sum(jnp.where(active, terms, 0.0), axis=-1)
    return jnp.where(is_last, 0.0, twist_sum - log_potential)


def _last_step_variance(denoiser: Denoiser, timesteps: Array, data_variance: ArrayLike) -> Array:
    r"""The floor on the last reverse step's variance: the last step of a network without
    local variance is deterministic, and a pinned (noiseless) coordinate needs its spread
    :math:`\mathrm{Var}[x_0 \mid x_{t_{K-1}}]` for the weights to exist."""
    variance_rows = jnp.asarray(data_variance, jnp.float32)
    last_row = variance_rows[-2] if variance_rows.ndim == 2 else variance_rows
    return tweedie_variance(denoiser.schedule, timesteps[-2], jnp.mean(last_row))


class _ObservedGaussian(NamedTuple):
    """The proposal along the observed directions, ``(N, r)`` each: its ``mean`` and ``std``,
    and ``total`` :math:`a^2 v + e`, the variance of its normaliser :math:`N(\\tilde y;\\
    \\text{predicted},\\ a^2 v + e)`."""

    mean: Array
    std: Array
    total: Array


def _observed_gaussian(mean_coords, variance, predicted, slope, obs_variance, pseudo_obs):
    """The reverse step :math:`N(\\bar m, v)` times the potential :math:`N(\\tilde y;\\
    \\text{predicted} + a (\\bar x - \\bar m),\\ e)`, a Kalman update in closed form; a zero
    total variance pins the coordinate."""
    total = slope**2 * variance + obs_variance
    pinned = total <= 0.0
    gain = jnp.where(pinned, 1.0 / slope, slope * variance / jnp.where(pinned, 1.0, total))
    proposal_mean = mean_coords + gain * (pseudo_obs - predicted)
    # v (1 - gain a) = v e / total: no cancellation when e << a^2 v (near-noiseless y)
    proposal_var = jnp.where(pinned, 0.0, variance * obs_variance / jnp.where(pinned, 1.0, total))
    return _ObservedGaussian(proposal_mean, jnp.sqrt(jnp.maximum(proposal_var, 0.0)), total)


def _draw(basis, step_mean, variance, noise, mean_coords, gaussian, active):
    """``(x_s, V^T x_s)`` from one standard normal ``noise`` (particles' shape): the reverse
    step ``N(step_mean, variance)`` (``variance`` ``(N,)``) off the ``active`` directions,
    ``gaussian`` along them."""
    x_prior = step_mean + jnp.sqrt(variance).reshape((-1,) + (1,) * (noise.ndim - 1)) * noise
    noise_coords = _project(basis, noise)
    prior_coords = mean_coords + jnp.sqrt(variance[:, None]) * noise_coords
    new_coords = jnp.where(active, gaussian.mean + gaussian.std * noise_coords, prior_coords)
    return x_prior + _lift(basis, new_coords - prior_coords, x_prior.shape), new_coords


def _make_twist(
    denoiser: Denoiser,
    timesteps: Array,
    noise_ratio: Array,
    data_variance: ArrayLike,
    twist_shrinkage: ArrayLike | None = None,
    twist_centre: ArrayLike | None = None,
) -> Twist:
    """The :class:`Twist` for noise ratios :math:`c_i` ``(r,)`` (options as in
    :func:`as_top_level_api`)."""
    noise_ratio = jnp.asarray(noise_ratio, jnp.float32)
    # Var[x0_i | x_t] along each direction, (K + 1, r)
    direction_variance = _per_time(data_variance, timesteps.shape[0], noise_ratio.shape)
    tweedie = jax.vmap(lambda t, v: tweedie_variance(denoiser.schedule, t, v))(
        timesteps, direction_variance
    )
    variance = noise_ratio[None, :] ** 2 + tweedie
    if twist_shrinkage is None:
        return Twist(variance)
    shrinkage = jnp.broadcast_to(jnp.asarray(twist_shrinkage, jnp.float32), timesteps.shape)
    centre = jnp.broadcast_to(jnp.asarray(twist_centre, jnp.float32), noise_ratio.shape)
    return Twist(variance, shrinkage, centre)


def _pseudo_observations(svd: WhitenedSVD, noiseless: bool = False):
    r"""``(pseudo_obs, noise_ratio, observed, log_evidence_offset)`` of a whitened SVD, as
    :func:`from_linear_gaussian` describes them."""
    observed = svd.observed
    safe = jnp.where(observed, svd.singular, 1.0)
    pseudo_obs = jnp.where(observed, svd.coords_y / safe, 0.0)
    noise_ratio = jnp.where(observed & (not noiseless), 1.0 / safe, 0.0)
    offset = -svd.log_scale_sum - jnp.sum(jnp.where(observed, jnp.log(safe), 0.0))
    if not noiseless:
        offset = offset + svd.log_residual_density()
    return pseudo_obs, noise_ratio, observed, offset


def build_kernel(
    denoiser: Denoiser,
    timesteps: Array,
    basis: Array,
    pseudo_obs: Array,
    plan: PotentialPlan,
    *,
    twist: Twist | None = None,
    eta: ArrayLike = 1.0,
    data_variance: ArrayLike = 1.0,
    ess_threshold: float = 0.5,
    resample_fn: Callable = smc.RESAMPLING_SCHEMES["systematic"],
    anchored: bool = False,
) -> Callable[[PRNGKey, MCGdiffState], tuple[MCGdiffState, MCGdiffInfo]]:
    """Build the MCGdiff step (arguments as in :func:`as_top_level_api`). ``anchored``
    centres the potentials at the parent particle's denoiser estimate (the ``"tweedie"``
    potential of the module docstring) and needs ``twist``.

    The step is ``kernel(rng_key, state, *, axis_name=None)``; ``axis_name`` names the mapped
    axis over which the particles are split, if they are (see
    :func:`diffprior.kernels.fk.build_kernel`)."""
    if anchored and twist is None:
        raise ValueError("anchored potentials need the twist: the potential depends on the parent")
    last_step = timesteps.shape[0] - 2
    last_variance = _last_step_variance(denoiser, timesteps, data_variance)

    def transition(x_t, x0_hat, t, s):
        return denoiser.transition(x_t, x0_hat, t, s, eta)

    def kernel(
        rng_key: PRNGKey, state: MCGdiffState, *, axis_name: str | None = None
    ) -> tuple[MCGdiffState, MCGdiffInfo]:
        k = state.step
        t, s = timesteps[k], timesteps[k + 1]
        slope, offset = plan.slope[k + 1], plan.offset[k + 1]
        obs_variance, active = plan.variance[k + 1], plan.active[k + 1]

        def propose_fn(noise_key, x_t, carried):
            x0_hat_t, _ = carried
            step = jax.vmap(transition, in_axes=(0, 0, None, None))(x_t, x0_hat_t, t, s)
            variance = jnp.where(
                k == last_step, jnp.maximum(step.variance, last_variance), step.variance
            )
            # one draw for the step: the same noise however the particles are split
            noise = smc.particle_normals(noise_key, x_t.shape, axis_name, x_t.dtype)
            # drawn once: fused into each of its uses (the step, its projection) XLA would
            # recompute it there, which dominates the step at image sizes on CPU
            noise = jax.lax.optimization_barrier(noise)
            mean_coords = _project(basis, step.mean)
            if anchored:  # E[x0_hat(x_s) | x_t] = x0_hat(x_t); the last potential is the likelihood
                anchor = twist.coords(basis, x0_hat_t, k)
                predicted = jnp.where(k == last_step, mean_coords, anchor)
            else:
                anchor = None
                predicted = slope * mean_coords + offset
            # one isotropic variance per particle, against (N, r)
            gaussian = _observed_gaussian(
                mean_coords, variance[:, None], predicted, slope, obs_variance, pseudo_obs
            )
            x_s, new_coords = _draw(
                basis, step.mean, variance, noise, mean_coords, gaussian, active
            )
            # new_coords is V^T x_s: the weights need not project x_s again
            return x_s, (mean_coords, anchor, predicted, gaussian.total, new_coords)

        def weight_fn(x_t, carried, x_s, aux):
            _, correction_t = carried
            mean_coords, anchor, predicted, total, coords_s = aux
            # predictive of the new potentials over the previous ones (module docstring)
            log_numerator = jnp.sum(
                jnp.where(active, _log_normal(pseudo_obs, predicted, total), 0.0), axis=-1
            )
            x0_hat_s = _x0_hat(denoiser, x_s, s)
            correction_s = correction_t
            if anchored:
                # the twist over the proposal potential at x_s (both are the likelihood at the
                # last step), over the parent's twist
                potential_s = _log_normal(
                    pseudo_obs,
                    predicted + slope * (coords_s - mean_coords),
                    obs_variance,
                )
                twist_s = _log_normal(
                    pseudo_obs, twist.coords(basis, x0_hat_s, k + 1), twist.variance[k + 1]
                )
                twist_t = _log_normal(pseudo_obs, anchor, twist.variance[k])
                terms = jnp.where(k == last_step, 0.0, twist_s - potential_s) - twist_t
                log_increment = log_numerator + jnp.sum(jnp.where(active, terms, 0.0), axis=-1)
            else:
                previous = _log_normal(
                    pseudo_obs,
                    plan.slope[k] * _project(basis, x_t) + plan.offset[k],
                    plan.variance[k],
                )
                log_denominator = jnp.sum(jnp.where(active, previous, 0.0), axis=-1)
                log_increment = log_numerator - log_denominator
                if twist is not None:
                    log_potential_s = _log_potential(coords_s, pseudo_obs, plan, k + 1)
                    correction_s = _log_correction(
                        twist,
                        basis,
                        pseudo_obs,
                        x0_hat_s,
                        log_potential_s,
                        k + 1,
                        k == last_step,
                        active,
                    )
                    log_increment = log_increment + correction_s - correction_t
            return log_increment, (x0_hat_s, correction_s)

        result, info = smc.step(
            rng_key,
            state.particles,
            state.log_weights,
            state.log_evidence,
            propose_fn,
            weight_fn,
            carried=(state.x0_hat, state.log_correction),
            ess_threshold=ess_threshold,
            resample_fn=resample_fn,
            axis_name=axis_name,
        )
        x0_hat, correction = result.carried
        new_state = MCGdiffState(
            result.particles, result.log_weights, result.log_evidence, k + 1, x0_hat, correction
        )
        return new_state, info

    return kernel


def as_top_level_api(
    denoiser: Denoiser,
    timesteps: Array,
    basis: Array,
    pseudo_obs: Array,
    noise_ratio: Array,
    *,
    observed: Array | None = None,
    potential: str = "tweedie",
    twisted: bool = True,
    eta: ArrayLike = 1.0,
    data_mean: ArrayLike = 0.0,
    data_variance: ArrayLike = 1.0,
    twist_shrinkage: ArrayLike | None = None,
    twist_centre: ArrayLike | None = None,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    log_evidence_offset: ArrayLike = 0.0,
) -> SamplingAlgorithm:
    r"""MCGdiff as a ``SamplingAlgorithm(init, step)``.

    Parameters
    ----------
    denoiser
        The prior's denoiser.
    timesteps
        Decreasing times ending at 0.
    basis
        ``(d, r)`` orthonormal columns :math:`V_r`, the observed directions of the flattened
        event; or an object with ``V_T`` (particles to ``(N, r)`` coordinates) and ``V``
        (back), such as a :class:`diffprior.linear_gaussian.WhitenedSVD` or a
        :mod:`diffprior.operators` operator, so that nothing ``d x r`` is stored.
    pseudo_obs
        ``(r,)`` :math:`\tilde y`, the observation in those directions divided by the singular
        values.
    noise_ratio
        ``(r,)`` :math:`c_i = \sigma_y / s_i`; ``0`` for noiseless coordinates.
    observed
        ``(r,)`` booleans; False drops a direction (a zero singular value). Default all.
    eta
        DDIM stochasticity of the reverse step (must be > 0 for the proposal to move).
    potential
        ``"tweedie"`` (default), ``"gaussian"``, ``"flat"`` or ``"pinned"`` (module
        docstring; ``"tweedie"`` needs ``twisted=True``, ``"pinned"`` needs
        ``twisted=False``). The defaults are those of :class:`diffprior.MCGdiff`.
    twisted
        Reweight by the twist :math:`h_k` of :class:`Twist` (the likelihood at the denoiser's
        :math:`\hat x_0`, widened by its Tweedie variance) in place of the potentials, which
        then only shape the proposal: :math:`w_k = \frac{\int p\, g_k}{g_{k-1}}
        \frac{h_k / g_k}{h_{k-1} / g_{k-1}}`, with :math:`h_K = g_K` the likelihood
        (default ``True``).
    data_mean, data_variance
        The prior's mean and variance along the observed directions (``(r,)`` or scalars):
        the ``"gaussian"`` and ``"tweedie"`` potentials use them, and the mean variance sets
        the spread of the last step when the network's own last step is deterministic.
        ``data_variance`` may also be ``(K + 1, r)``, one row per grid time: the variance of
        Gaussian data whose Tweedie spread :math:`\mathrm{Var}[x_0 \mid x_t]` is the one
        measured at that time (a calibrated prior, :func:`diffprior.calibrate`).
    twist_shrinkage, twist_centre
        ``(K + 1,)`` and ``(r,)``: centre the twist on the shrunk estimate (:class:`Twist`);
        the last entry of ``twist_shrinkage`` must be 1 (a calibrated prior's is).
    ess_threshold, resampling
        Adaptive resampling with a :mod:`blackjax.smc.resampling` scheme.
    log_evidence_offset
        Constant added to the log-evidence (the change of variables to :math:`p(y)`).
    """
    check_options(potential, twisted)
    ess_threshold = smc.check_ess_threshold(ess_threshold)
    resample_fn = smc.resampling_fn(resampling)
    if not hasattr(basis, "V_T"):
        basis = jnp.asarray(basis, jnp.float32)
    pseudo_obs = jnp.asarray(pseudo_obs, jnp.float32)
    if observed is None:
        observed = jnp.ones(pseudo_obs.shape, bool)
    plan = potential_plan(
        denoiser, timesteps, noise_ratio, observed, potential, data_mean, data_variance
    )
    anchored = potential in ANCHORED_POTENTIALS
    twist = None
    if twisted:
        twist = _make_twist(
            denoiser, timesteps, noise_ratio, data_variance, twist_shrinkage, twist_centre
        )
    kernel = build_kernel(
        denoiser,
        timesteps,
        basis,
        pseudo_obs,
        plan,
        twist=twist,
        eta=eta,
        data_variance=data_variance,
        ess_threshold=ess_threshold,
        resample_fn=resample_fn,
        anchored=anchored,
    )

    def init_fn(
        particles: Array, rng_key: PRNGKey | None = None, *, axis_name: str | None = None
    ) -> MCGdiffState:
        return init(
            particles,
            denoiser,
            timesteps,
            basis,
            pseudo_obs,
            plan,
            twist,
            log_evidence_offset,
            axis_name=axis_name,
        )

    return SamplingAlgorithm(init_fn, kernel)


def from_linear_gaussian(
    denoiser: Denoiser,
    timesteps: Array,
    svd: WhitenedSVD,
    *,
    noiseless: bool = False,
    potential: str = "tweedie",
    twisted: bool = True,
    eta: ArrayLike = 1.0,
    data_mean: ArrayLike = 0.0,
    data_variance: ArrayLike = 1.0,
    twist_shrinkage: ArrayLike | None = None,
    twist_centre: ArrayLike | None = None,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
) -> SamplingAlgorithm:
    r"""MCGdiff for a linear Gaussian observation given as its whitened SVD
    (:meth:`diffprior.model.ObservationModel.linear_gaussian`, or
    :func:`diffprior.linear_gaussian.from_operator` / ``from_matrix`` on plain arrays), with
    the log-evidence of :math:`y` itself.

    Each observed direction :math:`i` (:math:`s_i > 0`) carries the pseudo-observation
    :math:`(U^T \tilde y)_i / s_i` with noise ratio :math:`1/s_i` (0 with ``noiseless``: the
    samples then reproduce :math:`y` through :math:`A`, and the evidence is the density of
    :math:`A x` at :math:`y`). The change of variables from the pseudo-observations to
    :math:`y`, :math:`-\sum_j \log \sigma_j - \sum_i \log s_i`, and the directions of
    :math:`\tilde y` that no :math:`x` explains (standard normal) are the log-evidence offset.
    ``data_mean`` and ``data_variance`` are the prior's moments along the ``svd``'s right
    coordinates (``(r,)`` or scalars); other options as in :func:`as_top_level_api`.

    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> from diffprior.linear_gaussian import from_operator
    >>> gmm = dp.GaussianMixture(jnp.zeros((1, 4)), jnp.ones(1))
    >>> A = dp.operators.Inpaint(jnp.array([True, True, False, False]))
    >>> y = jnp.array([1.0, -1.0])
    >>> svd = from_operator(A, scale=0.5, y=y)
    >>> algo = dp.kernels.mcgdiff.from_linear_gaussian(gmm.denoiser, gmm.timesteps(20), svd)
    >>> state = algo.init(jax.random.normal(jax.random.key(0), (256, 4)))
    >>> for key in jax.random.split(jax.random.key(1), 20):
    ...     state, info = algo.step(key, state)
    >>> exact = gmm.log_evidence(A.matrix(), 0.5, y)
    >>> bool(abs(state.log_evidence - exact) < 0.05)
    True
    """
    pseudo_obs, noise_ratio, observed, offset = _pseudo_observations(svd, noiseless)
    return as_top_level_api(
        denoiser,
        timesteps,
        svd,
        pseudo_obs,
        noise_ratio,
        observed=observed,
        potential=potential,
        twisted=twisted,
        eta=eta,
        data_mean=data_mean,
        data_variance=data_variance,
        twist_shrinkage=twist_shrinkage,
        twist_centre=twist_centre,
        ess_threshold=ess_threshold,
        resampling=resampling,
        log_evidence_offset=offset,
    )


def subspace_proposal(
    denoiser: Denoiser,
    timesteps: Array,
    svd: WhitenedSVD,
    *,
    eta: ArrayLike = 1.0,
    data_mean: ArrayLike = 0.0,
    data_variance: ArrayLike = 1.0,
    twist_shrinkage: ArrayLike | None = None,
    twist_centre: ArrayLike | None = None,
) -> csmc.Proposal:
    r"""The twisted step of this kernel (the ``"tweedie"`` potential with the twist, the
    defaults of :func:`from_linear_gaussian`) as a :class:`diffprior.kernels.csmc.Proposal`,
    for the conditional SMC sweep of particle Gibbs (:func:`diffprior.kernels.csmc.sweep_with`,
    whose module docstring has its weights).

    The particles are proposed as this kernel proposes them (one standard normal draw per
    step: the Kalman update along the observed directions, the reverse step elsewhere); the
    twist is :class:`Twist`, the exact likelihood of the particle itself at ``t = 0``; and the
    weight :math:`Z\, h_k / (g\, h_{k-1})` is evaluated at any child, so that the reference
    path is weighted as a drawn particle would be. The twist over the potential is taken
    direction by direction from one residual, so that at the last step, where both are the
    likelihood, it is exactly 1 (the reference's likelihood does not enter its weight through
    float rounding, however small the noise). The log-evidence is that of
    :math:`y` (with :func:`from_linear_gaussian`'s offset). Options as in
    :func:`from_linear_gaussian`; ``svd`` may hold traced values (a noise level or a gain
    sampled with ``x``).
    """
    pseudo_obs, noise_ratio, observed, offset = _pseudo_observations(svd)
    plan = potential_plan(
        denoiser, timesteps, noise_ratio, observed, "tweedie", data_mean, data_variance
    )
    twist = _make_twist(
        denoiser, timesteps, noise_ratio, data_variance, twist_shrinkage, twist_centre
    )
    num_steps = timesteps.shape[0] - 1
    last_variance = _last_step_variance(denoiser, timesteps, data_variance)
    step_fn = jax.vmap(denoiser.transition, in_axes=(0, 0, None, None, None))

    def evaluate(x, k):
        x0_hat = _x0_hat(denoiser, x, timesteps[k])
        coords = _project(svd, x)
        # the twist per direction; at t = 0 the likelihood of x itself
        at_end = k == num_steps
        residual = pseudo_obs - jnp.where(at_end, coords, twist.coords(svd, x0_hat, k))
        variance = jnp.where(at_end, noise_ratio**2, twist.variance[k])
        terms = jnp.where(observed, _log_normal(residual, 0.0, variance), 0.0)
        return csmc.Particles(x, jnp.sum(terms, axis=-1), (x0_hat, coords, terms))

    def transition(particles, k):
        x0_hat = particles.extra[0]
        step = step_fn(particles.x, x0_hat, timesteps[k], timesteps[k + 1], eta)
        is_last = k == num_steps - 1
        variance = jnp.where(is_last, jnp.maximum(step.variance, last_variance), step.variance)
        mean_coords = _project(svd, step.mean)
        # E[x0_hat(x_s) | x_t] = x0_hat(x_t); the last potential is the likelihood
        predicted = jnp.where(is_last, mean_coords, twist.coords(svd, x0_hat, k))
        gaussian = _observed_gaussian(
            mean_coords,
            variance[:, None],
            predicted,
            plan.slope[k + 1],
            plan.variance[k + 1],
            pseudo_obs,
        )
        # the variance depends on t and s only
        return csmc.Move(step.mean, variance[0], (mean_coords, predicted, gaussian))

    def sample(rng_key, parents, move, k):
        mean_coords, _, gaussian = move.extra
        noise = jax.random.normal(rng_key, parents.x.shape)
        variance = jnp.broadcast_to(move.variance, parents.log_twist.shape)
        return _draw(svd, move.mean, variance, noise, mean_coords, gaussian, observed)[0]

    def log_weight(parents, move, children, k):
        # Z(x_t) h_s(x_s) / (g(V^T x_s | x_t) h_t(x_t)), h_s / g direction by direction
        mean_coords, predicted, gaussian = move.extra
        _, coords, twist_terms = children.extra
        slope = plan.slope[k + 1]
        # y~ - predicted - a (x_s - m), from the twist's residual at the last step (y~ - x_s),
        # where a = 1 and predicted = m: both the likelihood, cancelling exactly
        residual = (
            (pseudo_obs - coords)
            + (1.0 - slope) * (coords - mean_coords)
            + (mean_coords - predicted)
        )
        potential = _log_normal(residual, 0.0, plan.variance[k + 1])
        normaliser = _log_normal(pseudo_obs, predicted, gaussian.total)
        terms = jnp.where(observed, normaliser + (twist_terms - potential), 0.0)
        return jnp.sum(terms, axis=-1) - parents.log_twist

    return csmc.Proposal(evaluate, transition, sample, log_weight, num_steps, offset)
