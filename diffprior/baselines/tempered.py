r"""Adaptive tempered SMC (Del Moral et al. 2006) on a diffprior model, assembled from
BlackJAX's SMC parts, with :class:`diffprior.Sampler`'s interface:
:class:`diffprior.baselines.TemperedSMC`.

Which part comes from where:

- the step from :math:`\lambda_n` to :math:`\lambda_{n+1}`, the next temperature solved for a
  target ESS by bisection (Jasra et al. 2011), and its ``log_likelihood_increment``, which
  adds up to the log-evidence: ``blackjax.smc.adaptive_tempered``;
- the re-tuning of the inner MCMC move between steps: ``blackjax.smc.inner_kernel_tuning``,
  with a parameter-update function that scales the move by the weighted particle covariance
  (:func:`weighted_covariance`) and adapts its step size to the acceptance rate
  (``blackjax.smc.tuning.from_kernel_info.update_scale_from_acceptance_rate``);
- the per-step ESS and the final equal-weight resampling: ``blackjax.smc.ess`` and
  ``blackjax.smc.resampling``, through :func:`diffprior.kernels.smc.ess` and
  :func:`diffprior.kernels.smc.resampling_fn` as in every diffprior SMC kernel;
- the ArviZ tree: :func:`diffprior.diagnostics.to_datatree`, the one :class:`diffprior.Sampler`
  uses, so that :func:`diffprior.diagnostics.smc_health` and
  :func:`diffprior.diagnostics.print_summary` read a tempered run as they read a diffusion SMC
  run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import blackjax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.mcmc import random_walk
from blackjax.smc import adaptive_tempered, inner_kernel_tuning
from blackjax.smc.inner_kernel_tuning import StateWithParameterOverride
from blackjax.smc.tuning.from_kernel_info import update_scale_from_acceptance_rate

from diffprior.baselines._common import check_positive_int, require_log_density
from diffprior.infer.sampler import ParticleResults, ProgressBar, as_key
from diffprior.kernels.smc import ess, resampling_fn
from diffprior.model import read_model
from diffprior.types import Array, PRNGKey

__all__ = ["TemperedSMC", "MCMC_KERNELS", "DENSE_MAX_DIM", "weighted_covariance"]

#: Inner MCMC moves of :class:`~diffprior.baselines.TemperedSMC` and the acceptance rate their
#: step size adapts to (Roberts et al. 1997 for random-walk Metropolis; Beskos et al. 2013 for
#: HMC).
MCMC_KERNELS: dict[str, float] = {"rmh": 0.234, "hmc": 0.65}
#: :class:`~diffprior.baselines.TemperedSMC` scales its moves by the dense particle covariance
#: up to this event size (``covariance="auto"``), by the per-coordinate variances above it.
DENSE_MAX_DIM = 200
# random-walk steps are N(0, (2.38 s)^2 Sigma / d) (Roberts et al. 1997)
_RANDOM_WALK_SCALE = 2.38


class _Move(NamedTuple):
    """An inner MCMC move in the form BlackJAX's SMC takes it.

    ``step_fn(rng_key, state, logdensity_fn, step_size, <factor>)`` is one move,
    ``init_fn(position, logdensity_fn)`` its state; ``parameters(covariance, step_size)`` the
    parameter dictionary for a particle covariance (each entry with a leading axis of 1:
    BlackJAX shares such parameters between the particles).
    """

    step_fn: Callable
    init_fn: Callable
    parameters: Callable[[Array, Array], dict[str, Array]]
    initial_step_size: float
    target_acceptance: float


def _move(mcmc: str, dim: int, step_size: float | None, num_integration_steps: int) -> _Move:
    r"""Random-walk Metropolis steps :math:`N(0, (2.38\, s)^2 \Sigma / d)`, or HMC with
    inverse mass matrix :math:`\Sigma` and step size :math:`s`."""
    target = MCMC_KERNELS[mcmc]
    if mcmc == "rmh":
        random_walk_kernel = blackjax.additive_step_random_walk.build_kernel()
        unit = _RANDOM_WALK_SCALE / math.sqrt(dim)

        def random_walk_step(rng_key, state, logdensity_fn, step_size, covariance_factor):
            # covariance_factor: a Cholesky factor (dense) or standard deviations (diagonal)
            proposal = random_walk.normal(step_size * unit * covariance_factor)
            return random_walk_kernel(rng_key, state, logdensity_fn, proposal)

        def random_walk_parameters(covariance, step_size):
            if covariance.ndim == 2:
                factor = jnp.linalg.cholesky(covariance)
            else:
                factor = jnp.sqrt(covariance)
            return {"step_size": step_size[None], "covariance_factor": factor[None]}

        return _Move(
            random_walk_step,
            blackjax.additive_step_random_walk.init,
            random_walk_parameters,
            1.0 if step_size is None else step_size,
            target,
        )
    hmc_kernel = blackjax.hmc.build_kernel()

    def hmc_step(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix):
        return hmc_kernel(
            rng_key, state, logdensity_fn, step_size, inverse_mass_matrix, num_integration_steps
        )

    def hmc_parameters(covariance, step_size):
        return {"step_size": step_size[None], "inverse_mass_matrix": covariance[None]}

    return _Move(
        hmc_step,
        blackjax.hmc.init,
        hmc_parameters,
        dim**-0.25 if step_size is None else step_size,
        target,
    )


def weighted_covariance(particles: Array, weights: Array, dense: bool) -> Array:
    r"""Covariance :math:`\Sigma = \sum_i w_i (x_i - \bar x)(x_i - \bar x)^\top` of weighted
    particles ``(N, *event)``, flattened to ``(d, d)``, or its diagonal ``(d,)`` when not
    ``dense``, with a small jitter so that a coordinate on which the particles agree does not
    freeze the moves.

    The weights matter: after a tempering step the particles were moved under
    :math:`\pi_{\lambda_n}` and weighted to :math:`\pi_{\lambda_{n+1}}`, the target of the next
    move (the helpers of ``blackjax.smc.tuning.from_particles`` ignore the weights).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    >>> w = jnp.array([0.25, 0.5, 0.25])
    >>> weighted_covariance(x, w, dense=False).round(3).tolist()
    [2.0, 0.0]
    """
    num_particles = weights.shape[0]
    centred = particles.reshape((num_particles, -1))
    centred = centred - weights @ centred
    variance = weights @ centred**2
    jitter = 1e-6 * jnp.mean(variance) + 1e-12
    if not dense:
        return variance + jitter
    identity = jnp.eye(centred.shape[1], dtype=centred.dtype)
    return (centred.T * weights) @ centred + jitter * identity


class _LoopState(NamedTuple):
    """Carry of the tempering ``while_loop`` (leading axis of ``state``: chains)."""

    step: Array
    rng_key: PRNGKey
    state: StateWithParameterOverride  # TemperedSMCState and the move's parameters
    log_evidence: Array
    num_tempering_steps: Array
    per_step: dict[str, Array]  # (max_tempering_steps, num_chains) each; NaN / False when idle


class _MethodRecord(NamedTuple):
    """What :func:`diffprior.diagnostics.to_datatree` reads of a method."""

    name: str
    options: dict[str, Any]
    is_smc: bool


class _RunRecord(NamedTuple):
    """What :func:`diffprior.diagnostics.to_datatree` reads of a sampler."""

    method: _MethodRecord
    num_steps: int
    num_particles: int
    num_chains: int
    chain_method: str
    seconds: float | None


class TemperedSMC(ParticleResults):
    r"""Adaptive tempered SMC (BlackJAX) on a diffprior model, with :class:`diffprior.Sampler`'s
    interface.

    Particles start as prior draws (``prior.sample``) and move through
    :math:`\pi_\lambda(x) \propto p(x)\, p(y \mid x)^{\lambda}`; each step picks the next
    :math:`\lambda` so that the incremental weights :math:`p(y \mid x)^{\Delta\lambda}` have
    ESS ``target_ess`` (BlackJAX's bisection), resamples, and applies ``num_mcmc_steps``
    moves that leave :math:`\pi_\lambda` invariant (``blackjax.smc.adaptive_tempered``).
    The log-evidence is the sum of the log mean incremental weights,

    .. math::
        \log \hat p(y) = \sum_n \log \frac{1}{N} \sum_i p(y \mid x_i^{(n)})^{\lambda_{n+1} -
        \lambda_n},

    BlackJAX's ``log_likelihood_increment``. The loop runs until :math:`\lambda = 1`, compiled
    as one ``lax.while_loop``; draws are the final particles after one equal-weight
    resampling, in a random order (as for :class:`diffprior.Sampler`).

    Between steps ``blackjax.smc.inner_kernel_tuning`` re-tunes the moves: they are scaled by
    the weighted particle covariance :math:`\Sigma`
    (:func:`~diffprior.baselines.tempered.weighted_covariance`; dense up to
    :data:`~diffprior.baselines.tempered.DENSE_MAX_DIM` coordinates, else its diagonal), and a step size :math:`s` follows
    the acceptance rate :math:`\bar a` of the last step towards a target :math:`a^*` (0.234 for
    RMH, 0.65 for HMC), :math:`s \leftarrow s\, e^{\bar a - a^*}`
    (``update_scale_from_acceptance_rate`` of ``blackjax.smc.tuning.from_kernel_info``).
    Random-walk steps are :math:`N(0, (2.38\, s)^2 \Sigma / d)` (Roberts et al. 1997); HMC uses
    the inverse mass matrix :math:`\Sigma` and step size :math:`s`.

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
        ``"dense"``, ``"diag"`` or ``"auto"`` (dense up to :data:`~diffprior.baselines.tempered.DENSE_MAX_DIM` coordinates):
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
        shapes (as for ``seconds`` of :class:`diffprior.Sampler`).

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
        self.num_particles = check_positive_int("num_particles", num_particles)
        self.num_mcmc_steps = check_positive_int("num_mcmc_steps", num_mcmc_steps)
        self.num_integration_steps = check_positive_int(
            "num_integration_steps", num_integration_steps
        )
        self.num_chains = check_positive_int("num_chains", num_chains)
        self.max_tempering_steps = check_positive_int("max_tempering_steps", max_tempering_steps)
        if not 0.0 < float(target_ess) < 1.0:
            raise ValueError(f"target_ess must be in (0, 1), got {target_ess!r}")
        if mcmc not in MCMC_KERNELS:
            raise ValueError(f"mcmc must be one of {tuple(MCMC_KERNELS)}, got {mcmc!r}")
        if covariance not in ("auto", "dense", "diag"):
            raise ValueError(f"covariance must be 'auto', 'dense' or 'diag', got {covariance!r}")
        if step_size is not None and not float(step_size) > 0:
            raise ValueError(f"step_size must be positive, got {step_size!r}")
        self._resampling_fn = resampling_fn(resampling)
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
    def _tuned_step(self, prior, obs, move: _Move, dense: bool) -> Callable:
        """One tempering step of one chain, ``(rng_key, state) -> (state, info)``, on a
        ``blackjax.smc.inner_kernel_tuning.StateWithParameterOverride``."""
        target_acceptance = move.target_acceptance

        def step(rng_key, state: StateWithParameterOverride):
            step_size = state.parameter_override["step_size"][0]

            # BlackJAX hands the update function the new state and info, not the parameters
            # that made them: the kernel is built around this step's step size (tracing only)
            def update_parameters(rng_key, smc_state, info):
                del rng_key
                new_step_size = step_size
                if self.adapt_step_size:
                    acceptance = jnp.mean(info.update_info.acceptance_rate)
                    new_step_size = update_scale_from_acceptance_rate(
                        step_size[None], acceptance[None], target_acceptance
                    )[0]
                covariance = weighted_covariance(smc_state.particles, smc_state.weights, dense)
                return move.parameters(covariance, new_step_size)

            kernel = inner_kernel_tuning.build_kernel(
                adaptive_tempered.as_top_level_api,
                prior.log_prob,
                obs.log_likelihood,
                move.step_fn,
                move.init_fn,
                self._resampling_fn,
                update_parameters,
                self.num_mcmc_steps,
                target_ess=self.target_ess,
            )
            return kernel(rng_key, state)

        return step

    def _run_impl(self, rng_key, prior, dynamic_args, static_args):
        args, kwargs = eqx.combine(dynamic_args, static_args)
        obs = read_model(self.model, args, kwargs)
        num_chains, num_particles = self.num_chains, self.num_particles
        dim = math.prod(obs.event_shape)
        dense = dim <= DENSE_MAX_DIM if self.covariance == "auto" else self.covariance == "dense"
        move = _move(self.mcmc, dim, self.step_size, self.num_integration_steps)
        tuned_step = self._tuned_step(prior, obs, move, dense)

        init_key, loop_key, final_key = jax.random.split(rng_key, 3)
        x_init = prior.sample(init_key, (num_chains, num_particles))
        dtype = x_init.dtype

        def init_tempered(particles):
            # BlackJAX starts from the Python float 0.0; the loop's carry needs an array
            return adaptive_tempered.init(particles)._replace(tempering_param=jnp.zeros((), dtype))

        def init_chain(particles):
            uniform = jnp.full((num_particles,), 1.0 / num_particles, dtype)
            covariance = weighted_covariance(particles, uniform, dense)
            initial = jnp.asarray(move.initial_step_size, dtype)
            return inner_kernel_tuning.init(
                init_tempered, particles, move.parameters(covariance, initial)
            )

        state = jax.vmap(init_chain)(x_init)
        max_steps = self.max_tempering_steps
        idle = jnp.full((max_steps, num_chains), jnp.nan, dtype)
        progress = self._progress if self.progress_bar else None
        if progress is not None:
            progress.compiling()  # runs only while tracing: a compile follows

        def cond(loop: _LoopState):
            return (loop.step < max_steps) & jnp.any(loop.state.sampler_state.tempering_param < 1)

        def body(loop: _LoopState) -> _LoopState:
            step_key, next_key = jax.random.split(loop.rng_key)
            keys = jax.random.split(step_key, num_chains)
            new_state, info = jax.vmap(tuned_step)(keys, loop.state)
            active = loop.state.sampler_state.tempering_param < 1.0  # finished chains stay
            state = jax.tree.map(
                lambda new, old: jnp.where(
                    active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old
                ),
                new_state,
                loop.state,
            )
            smc_state = state.sampler_state
            record = {
                "tempering_param": smc_state.tempering_param,
                # the step size that made this step's moves
                "step_size": loop.state.parameter_override["step_size"][:, 0],
                "acceptance_rate": jnp.mean(info.update_info.acceptance_rate, axis=(1, 2)),
                "ess": jax.vmap(ess)(jnp.log(new_state.sampler_state.weights)),
                "log_evidence_increment": info.log_likelihood_increment,
                "resampled": jnp.ones((num_chains,), bool),  # every tempering step resamples
            }
            per_step = {
                name: trace.at[loop.step].set(jnp.where(active, record[name], trace[loop.step]))
                for name, trace in loop.per_step.items()
            }
            if progress is not None:
                jax.debug.callback(
                    progress.update, 100 * jnp.min(smc_state.tempering_param), ordered=True
                )
            return _LoopState(
                loop.step + 1,
                next_key,
                state,
                loop.log_evidence + jnp.where(active, info.log_likelihood_increment, 0.0),
                loop.num_tempering_steps + active.astype(jnp.int32),
                per_step,
            )

        loop = jax.lax.while_loop(
            cond,
            body,
            _LoopState(
                jnp.zeros((), jnp.int32),
                loop_key,
                state,
                jnp.zeros((num_chains,), dtype),
                jnp.zeros((num_chains,), jnp.int32),
                {
                    "tempering_param": idle,
                    "step_size": idle,
                    "acceptance_rate": idle,
                    "ess": idle,
                    "log_evidence_increment": idle,
                    "resampled": jnp.zeros((max_steps, num_chains), bool),
                },
            ),
        )

        def final_draws(key, particles, weights):
            resample_key, order_key = jax.random.split(key)
            ancestors = self._resampling_fn(resample_key, weights, num_particles)
            # copies of a particle come out side by side: in a random order a chain is
            # exchangeable, so ArviZ's ESS and trace plots do not read them as a stuck chain
            return particles[jax.random.permutation(order_key, ancestors)]

        final = loop.state.sampler_state
        samples = jax.vmap(final_draws)(
            jax.random.split(final_key, num_chains), final.particles, final.weights
        )
        pointwise = jax.vmap(jax.vmap(obs.pointwise_log_likelihood))(samples)
        return {
            "samples": samples,
            "log_weights": jnp.log(final.weights),
            "log_evidence": loop.log_evidence,
            "num_tempering_steps": loop.num_tempering_steps,
            "final_tempering_param": final.tempering_param,
            "per_step": loop.per_step,
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
        require_log_density(self.model, args, kwargs)
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
        # the traces are as long as the slowest chain's run (the compiled loop's buffers hold
        # max_tempering_steps)
        num_steps = int(np.max(np.asarray(result["num_tempering_steps"])))
        result["per_step"] = {name: trace[:num_steps] for name, trace in result["per_step"].items()}
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
        r"""The run as an ArviZ ``xarray.DataTree``, built by
        :func:`diffprior.diagnostics.to_datatree` as for :class:`diffprior.Sampler`.

        ``posterior``: the equal-weight draws. ``sample_stats``: per chain ``log_evidence``,
        ``num_tempering_steps``, ``final_ess`` and ``num_distinct``; per draw ``log_weight``
        (before the final resampling); per tempering step (dimension ``step``, as long as the
        slowest chain's run; NaN, or False, after a chain reached :math:`\lambda = 1`)
        ``tempering_param``, ``step_size``, ``acceptance_rate``, ``ess`` (of the weights at the
        new temperature, in particles), ``log_evidence_increment``, ``resampled`` and
        ``collapsed``. Also ``observed_data`` and ``log_likelihood``. Attributes:
        ``method="TemperedSMC"``, its options, ``num_steps`` (the slowest chain's tempering
        steps), ``num_particles``, ``num_chains``, ``seconds``, the diffprior version and
        ``weight_collapse``.
        """
        import xarray as xr

        from diffprior.diagnostics import to_datatree

        result = self._require_result()
        run = _RunRecord(
            method=_MethodRecord(self.name, self.options, is_smc=True),
            num_steps=int(np.max(np.asarray(result["num_tempering_steps"]))),
            num_particles=self.num_particles,
            num_chains=self.num_chains,
            chain_method="vectorized",
            seconds=self.seconds,
        )
        tree = to_datatree(run, result, self._obs)
        stats = tree["sample_stats"].to_dataset()
        stats["num_tempering_steps"] = xr.Variable(
            ("chain",), np.asarray(result["num_tempering_steps"])
        )
        tree["sample_stats"] = xr.DataTree(stats)
        return tree
