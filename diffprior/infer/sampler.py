"""The sampler driver: model -> kernel -> one compiled ``lax.scan`` over diffusion steps.

Chains run side by side (``vmap`` inside each step, or ``lax.map`` for ``"sequential"``, or
sharded over devices for ``"parallel"``); with ``shard_particles=True`` every chain's particles
are split over the devices instead (:mod:`diffprior.infer.sharding`). The progress bar is fed
from inside the scan by a host callback that is compiled in only when ``progress_bar=True``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Hashable
from functools import partial
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from tqdm.auto import tqdm

from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.infer import sharding
from diffprior.infer.methods import Method
from diffprior.kernels.base import INFO_FIELDS, SMC_INFO_FIELDS
from diffprior.model import ModelReader, arguments_key, model_arguments, read_model
from diffprior.types import PRNGKey

__all__ = ["Sampler", "ParticleResults", "CHAIN_METHODS", "ProgressBar", "as_key"]

CHAIN_METHODS = ("vectorized", "sequential", "parallel")


class ProgressBar:
    """A tqdm bar that a compiled scan updates through a host callback.

    The callback closes over this object, not over one bar, so a cached compiled run shows a
    fresh bar each time :meth:`Sampler.run` opens one.

    Compiling can take longer than the run. The traced function calls :meth:`compiling` (which
    runs only when the program is traced, not for a cached one), so the bar reads
    ``"<description>: compiling"`` until the first step reports. That first report restarts
    the bar's clock and counts from there (tqdm's ``initial``), so the rate and the remaining
    time are measured on the compiled steps only: the estimate appears from the second report.
    """

    COMPILING = "compiling"

    def __init__(self):
        self.bar = None
        self.description = ""
        self._started = False

    def open(self, total: int, description: str):
        self.description = description
        self._started = False
        self.bar = tqdm(total=total, desc=description, leave=True)

    def compiling(self):
        """Say that the program is being traced and compiled (called at trace time)."""
        if self.bar is not None and not self._started:
            self.bar.set_description_str(f"{self.description}: {self.COMPILING}")

    def update(self, step):
        if self.bar is None:
            return
        step = int(step)
        if self._started and step <= self.bar.n:
            return  # a program over several devices reports each step from each of them
        if not self._started:
            # compile time (and start-up) would pollute the rate: the clock starts here
            self._started = True
            self.bar.reset(total=self.bar.total)
            self.bar.initial = step
            self.bar.set_description_str(self.description, refresh=False)
        self.bar.n = step
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ParticleResults:
    """What a particle sampler's results share: ``_result`` (with ``"samples"`` of shape
    ``(num_chains, num_particles, *event)``) and ``_obs`` (the model read at the last run), set
    by ``run``; :class:`Sampler` and :class:`diffprior.baselines.TemperedSMC` use it."""

    _result: dict[str, Any] | None = None
    _obs: Any = None

    def _require_result(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("call run(rng_key, *model_args) before reading results")
        return self._result

    def get_samples(self, group_by_chain: bool = False) -> dict[str, jax.Array]:
        """Equal-weight posterior draws ``{site: (num_chains * num_particles, *event)}``, or
        ``(num_chains, num_particles, *event)`` with ``group_by_chain=True``: the
        DiffusionPrior site and, for each ``obs_mask=`` site ``y``, ``y_unobserved`` drawn from
        the likelihood at each draw of ``x`` (the posterior predictive of its missing entries;
        :meth:`~diffprior.model.ObservationModel.sample_unobserved`)."""
        result = self._require_result()
        draws = {self._obs.prior_site: result["samples"], **result.get("unobserved", {})}
        if not group_by_chain:
            draws = {name: value.reshape((-1, *value.shape[2:])) for name, value in draws.items()}
        return draws


class Sampler(ParticleResults):
    """Sample the posterior of a NumPyro model with a diffusion prior.

    With a :class:`~diffprior.LatentDiffusionPrior` every method runs on the latent (the
    likelihood composed with the decoder, :meth:`~diffprior.model.ObservationModel.in_latent_space`)
    and the draws are decoded: samples are images, as the model's site.

    Parameters
    ----------
    method
        A method bound to the model, e.g. ``dp.TDS(model)``, ``dp.DPS(model, scale=0.5)``.
    num_particles
        Particles per chain.
    num_steps
        Diffusion steps (the grid comes from the prior's schedule and the method's spacing).
    num_chains
        Independent chains (each an independent particle system).
    chain_method
        ``"vectorized"`` (vmap), ``"sequential"`` (one chain after another inside the compiled
        step, less memory) or ``"parallel"`` (chains sharded over the available devices).
    progress_bar
        Show a tqdm bar updated from inside the compiled scan.
    shard_particles
        Split every chain's particles over all devices (``jax.devices()``, every host's after
        ``jax.distributed.initialize``) for the SMC methods (TDS, FK, MCGdiff): weights, ESS,
        log-evidence and resampling stay global, and a given key gives the run of one device
        up to floating-point rounding (:mod:`diffprior.infer.sharding`). ``num_particles``
        must be a multiple of the number of devices; chains then run ``"vectorized"`` or
        ``"sequential"`` on every device.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> def model(y=None):
    ...     x = numpyro.sample("x", prior)
    ...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
    >>> sampler = dp.Sampler(dp.TDS(model), num_particles=64, num_steps=20, progress_bar=False)
    >>> sampler.run(jax.random.key(0), y=1.5)
    >>> sampler.get_samples()["x"].shape
    (64, 2)
    """

    def __init__(
        self,
        method: Method,
        num_particles: int,
        num_steps: int,
        num_chains: int = 1,
        chain_method: str = "vectorized",
        progress_bar: bool = True,
        shard_particles: bool = False,
    ):
        if not isinstance(method, Method):
            raise TypeError(
                "method must be a diffprior method bound to a model, e.g. dp.TDS(model); "
                f"got {type(method).__name__}"
            )
        for name, value in (
            ("num_particles", num_particles),
            ("num_steps", num_steps),
            ("num_chains", num_chains),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if chain_method not in CHAIN_METHODS:
            raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
        if not isinstance(shard_particles, bool):
            raise TypeError(f"shard_particles must be True or False, got {shard_particles!r}")
        self._mesh = None
        if shard_particles:
            if not method.is_smc:
                raise ValueError(
                    f"shard_particles=True splits one SMC chain's particles over devices; "
                    f"{type(method).__name__} moves its particles independently, so split them "
                    "as chains instead: num_chains=<devices>, chain_method='parallel'"
                )
            if chain_method == "parallel":
                raise ValueError(
                    "shard_particles=True already puts every chain on all devices; use "
                    "chain_method='vectorized' or 'sequential' with it"
                )
            self._mesh = sharding.particle_mesh()
            sharding.check_divisible(int(num_particles), self._mesh)
        self.method = method
        self.num_particles = int(num_particles)
        self.num_steps = int(num_steps)
        self.num_chains = int(num_chains)
        self.chain_method = chain_method
        self.shard_particles = shard_particles
        self.progress_bar = bool(progress_bar)
        self._progress = ProgressBar()
        self._num_compilations = 0
        self._compiled = eqx.filter_jit(self._run_impl)
        self._reader = ModelReader(method.model, require_observation=method.requires_observation)
        self._checked: _CheckedRun | None = None
        self._result: dict[str, Any] | None = None
        self._obs = None
        self.seconds: float | None = None

    # -- the compiled run ---------------------------------------------------------------------
    def _run_impl(self, rng_key, prior, dynamic_args, static_args):
        self._num_compilations += 1  # Python side effect: runs once per trace
        args, kwargs = eqx.combine(dynamic_args, static_args)
        obs = read_model(
            self.method.model, args, kwargs, require_observation=self.method.requires_observation
        )
        method = self.method
        times = make_timesteps(prior.schedule, self.num_steps, method.spacing)
        # the kernels run where the diffusion runs: on the latent z of a LatentDiffusionPrior,
        # with the likelihood log p(y | decode(z)); x itself for a plain DiffusionPrior
        algorithm = method.build(prior, obs.in_latent_space(), times)
        num_chains, num_particles = self.num_chains, self.num_particles

        init_key, run_key, final_key = jax.random.split(rng_key, 3)
        x_init = prior.sample_reference(init_key, (num_chains, num_particles))
        if self.chain_method == "parallel":
            x_init = _shard_chains(x_init)
        mesh = self._mesh

        def init_chains(x, **axis):
            return jax.vmap(partial(algorithm.init, **axis))(x)

        def step_chains(keys, states, **axis):
            step = partial(algorithm.step, **axis)
            if self.chain_method == "sequential" or num_chains == 1:
                # unbatched, a kernel's lax.cond stays a branch (vmap would run both sides)
                return jax.lax.map(lambda ks: step(*ks), (keys, states))
            return jax.vmap(step)(keys, states)

        if mesh is not None:
            # each device runs the kernel on its block of every chain's particles (axis 1)
            init_chains = sharding.shard_over_particles(init_chains, mesh, particle_dim=1)
            step_chains = sharding.shard_over_particles(step_chains, mesh, particle_dim=1)
        states = init_chains(x_init)

        progress = self._progress if self.progress_bar else None
        if progress is not None:
            progress.compiling()  # this code runs only while tracing: a compile follows
        every = max(1, self.num_steps // 50)
        # JAX orders host callbacks only in a program on one device
        ordered = mesh is None and self.chain_method != "parallel"

        def body(states, inputs):
            index, key = inputs
            states, info = step_chains(jax.random.split(key, num_chains), states)
            if progress is not None:
                jax.lax.cond(
                    ((index + 1) % every == 0) | (index + 1 == self.num_steps),
                    lambda: jax.debug.callback(progress.update, index + 1, ordered=ordered),
                    lambda: None,
                )
            return states, _step_summary(info, method.is_smc)

        step_keys = jax.random.split(run_key, self.num_steps)
        states, per_step = jax.lax.scan(body, states, (jnp.arange(self.num_steps), step_keys))

        particles = jax.vmap(jax.vmap(prior.decode))(states.particles)
        if method.is_smc:
            log_weights = states.log_weights
            log_evidence = states.log_evidence
        else:
            log_weights = jnp.full((num_chains, num_particles), -math.log(num_particles))
            log_evidence = jnp.full((num_chains,), jnp.nan)
        # equal-weight draws: one final resampling per chain
        resample_fn = method.resampling_fn()

        def final_resample(key, x, log_w):
            resample_key, order_key = jax.random.split(key)
            weights = jnp.exp(log_w - logsumexp(log_w))
            idx = resample_fn(resample_key, weights, num_particles)
            # resampling returns the copies of a particle side by side (and neighbours share
            # ancestors): in a random order a chain is exchangeable, so ArviZ's ESS and trace
            # plots do not read the copies as a stuck Markov chain
            return x[jax.random.permutation(order_key, idx)]

        if obs.missing:
            final_key, missing_key = jax.random.split(final_key)
        if method.is_smc:
            samples = jax.vmap(final_resample)(
                jax.random.split(final_key, num_chains), particles, log_weights
            )
        else:
            samples = particles
        pointwise = jax.vmap(jax.vmap(obs.pointwise_log_likelihood))(samples)
        unobserved = {}
        if obs.missing:
            # the missing entries of obs_mask= sites: their posterior given x is the likelihood
            draw_keys = jax.random.split(missing_key, (num_chains, num_particles))
            unobserved = jax.vmap(jax.vmap(obs.sample_unobserved))(draw_keys, samples)
        result = {
            "samples": samples,
            "particles": particles,
            "log_weights": log_weights,
            "log_evidence": log_evidence,
            "per_step": per_step,
            "pointwise_log_likelihood": pointwise,
            "unobserved": unobserved,
        }
        if mesh is not None and jax.process_count() > 1:
            # every process reads the whole run, as on one host
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            result = jax.lax.with_sharding_constraint(result, replicated)
        return result

    # -- public API ---------------------------------------------------------------------------
    def run(self, rng_key: PRNGKey, *args: Any, **kwargs: Any) -> None:
        """Run the sampler; ``args``/``kwargs`` are the model's, as in NumPyro's ``MCMC.run``.

        The model is read and checked first (clear errors before any sampling). A second call
        with arrays of the same shapes reuses the compiled program. Lists of numbers among the
        model's arguments are made arrays (:func:`~diffprior.model.model_arguments`).

        Repeated runs with new values skip the work that only the arguments' structure decides
        (:func:`~diffprior.model.arguments_key`: non-array arguments, array shapes and dtypes,
        the split that keys the compiled program). The Sampler keeps, for its last 8 such
        keys, which observed sites depend on the DiffusionPrior site
        (:class:`~diffprior.model.ModelReader`); every run still traces the model once and
        checks its values (NaN or inf or a wrong shape in an observation, a distribution
        parameter breaking its constraint, such as a Normal scale <= 0). The method's
        :meth:`~diffprior.infer.Method.check` (e.g. whether the model is linear Gaussian) runs
        again unless the last successful run had the same key and prior and differs only in
        the observed values (``obs=``) and the method is one of diffprior's, whose checks
        never read observed values; any other array argument that changed (a forward operator,
        a noise scale) runs it again.
        """
        rng_key = as_key(rng_key)
        args, kwargs = model_arguments(args, kwargs)
        obs = self._reader(args, kwargs)
        checked = _CheckedRun.of(args, kwargs, obs.prior, self._reader.observed_values)
        if not (_check_ignores_observations(self.method) and checked.same_as(self._checked)):
            self.method.check(obs.in_latent_space())
        self._obs = obs
        dynamic, static = eqx.partition((args, kwargs), eqx.is_array)
        if self.progress_bar:
            self._progress.open(self.num_steps, f"{self.method.name} ({self.num_chains} chains)")
        start = time.perf_counter()
        try:
            result = self._compiled(rng_key, obs.prior, dynamic, static)
            result = jax.block_until_ready(result)
        finally:
            self._progress.close()
        self.seconds = time.perf_counter() - start
        self._result = result
        self._checked = checked  # its compiled program exists: a rerun may skip the check
        degenerate = result["per_step"].get("degenerate")
        if degenerate is not None and bool(jnp.any(degenerate)):
            steps = np.flatnonzero(np.asarray(jnp.any(degenerate, axis=1)))
            warnings.warn(
                f"{self.method.name}: every particle had zero weight at step(s) "
                f"{steps.tolist()[:10]}; the log-evidence is -inf and the samples are not "
                "reliable (check the likelihood, or use more particles or steps)",
                RuntimeWarning,
                stacklevel=2,
            )
        nonfinite = np.asarray(result["per_step"]["num_nonfinite"])  # (step, chain)
        if nonfinite.any():
            steps = np.flatnonzero(nonfinite.sum(axis=1))
            warnings.warn(
                f"{self.method.name}: {int(nonfinite.sum())} proposed particles were not finite "
                f"(NaN or inf) at step(s) {steps.tolist()[:10]}"
                f"{' ...' if steps.size > 10 else ''}; each was kept at its previous value"
                f"{' with weight zero' if self.method.is_smc else ''}. Check the network and "
                "the likelihood at those noise levels, or lower the guidance scale",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.method.is_smc:
            from diffprior.diagnostics import collapse_of_result, evidence_disagreement

            collapse = collapse_of_result(result, self.num_particles, self.method.name)
            if collapse.message:
                warnings.warn(collapse.message, RuntimeWarning, stacklevel=2)
            else:
                disagreement = evidence_disagreement(result["log_evidence"], self.method.name)
                if disagreement:
                    warnings.warn(disagreement, RuntimeWarning, stacklevel=2)

    @property
    def sample_dims(self):
        # arviz.from_numpyro reads this first from anything that is not a numpyro MCMC object;
        # a property that raises keeps hasattr(sampler, "sample_dims") False, as before
        raise AttributeError(
            "'Sampler' object has no attribute 'sample_dims': a dp.Sampler is not a "
            "numpyro.infer.MCMC, so arviz.from_numpyro cannot read it; use sampler.to_arviz() or "
            "dp.to_arviz(sampler)"
        )

    def print_summary(self, prob: float = 0.9, max_rows: int = 8) -> None:
        """Print the run's summary in NumPyro's layout, SMC-aware
        (:func:`diffprior.diagnostics.print_summary`).

        For the SMC methods a table per chain comes first (final and smallest ESS, resampling
        steps, distinct draws, log-evidence, and the log-evidence's spread across chains), then
        per site ``mean``, ``std``, ``median``, the central ``prob`` interval and ``r_hat``
        across chains; sites with more than ``max_rows`` elements show the ``max_rows`` with the
        largest ``r_hat`` and a line over all elements. Last, the verdict of
        :func:`diffprior.smc_health`.
        """
        from diffprior.diagnostics import print_summary

        print_summary(self.to_arviz(), prob=prob, max_rows=max_rows)

    @property
    def log_evidence(self) -> jax.Array | None:
        r"""``(num_chains,)`` estimates of :math:`\log p(y)`; ``None`` for methods without one."""
        result = self._require_result()
        return result["log_evidence"] if self.method.is_smc else None

    @property
    def num_compilations(self) -> int:
        """How many times the run was traced and compiled (1 after repeated same-shape runs)."""
        return self._num_compilations

    def to_arviz(self):
        """The run as an ArviZ ``xarray.DataTree`` (see :func:`diffprior.diagnostics.to_datatree`,
        which also says how to read ArviZ's ``ess_bulk`` for resampled draws);
        ``dp.to_arviz(sampler)`` is the same."""
        from diffprior.diagnostics import to_datatree

        return to_datatree(self, self._require_result(), self._obs)


class _CheckedRun(NamedTuple):
    """What a method's check read on a run, besides the observed values: the arguments'
    :func:`~diffprior.model.arguments_key`, the prior, and every other array argument with
    its position among the flattened arguments (NumPy arrays copied, as they can change in
    place)."""

    key: Hashable | None
    prior: Any
    arrays: tuple[tuple[int, Any], ...]

    @classmethod
    def of(cls, args, kwargs, prior, observed_values) -> _CheckedRun:
        observed = {id(value) for value in observed_values}
        leaves = jax.tree_util.tree_leaves((tuple(args), dict(kwargs)))
        arrays = tuple(
            (position, np.array(leaf) if isinstance(leaf, np.ndarray | np.generic) else leaf)
            for position, leaf in enumerate(leaves)
            if eqx.is_array(leaf) and id(leaf) not in observed
        )
        return cls(arguments_key(args, kwargs), prior, arrays)

    def same_as(self, other: _CheckedRun | None) -> bool:
        """Whether a check's outcome on ``other`` holds here: same key, same prior object, the
        same positions of non-observed arrays with equal values."""
        if other is None or self.key is None or self.key != other.key:
            return False
        if self.prior is not other.prior or len(self.arrays) != len(other.arrays):
            return False
        for (position, value), (other_position, other_value) in zip(
            self.arrays, other.arrays, strict=True
        ):
            if position != other_position:
                return False
            if value is not other_value and not np.array_equal(
                np.asarray(value), np.asarray(other_value)
            ):
                return False
        return True


def _check_ignores_observations(method: Method) -> bool:
    """Whether the method's check is one of diffprior's (:mod:`diffprior.infer.methods`):
    those read the model's structure and parameters (linearity, noise family, rank, sizes),
    never the observed values, so their outcome holds for new observed values. A user's
    check may read them: it runs at every run."""
    return getattr(type(method).check, "__module__", None) == Method.__module__


def _step_summary(info, is_smc: bool) -> dict[str, jax.Array]:
    """Per-step, per-chain scalars kept from a kernel's Info (never per-particle arrays): the
    fields of the kernel protocol (:mod:`diffprior.kernels.base`), so that a kernel missing one
    fails here, by name, rather than leaving a hole in the results."""
    fields = INFO_FIELDS + (SMC_INFO_FIELDS if is_smc else ())
    missing = [name for name in fields if not hasattr(info, name)]
    if missing:
        raise TypeError(
            f"the kernel's Info ({type(info).__name__}) lacks {missing}, which the kernel "
            "protocol of diffprior.kernels.base requires"
        )
    return {name: getattr(info, name) for name in fields}


def _shard_chains(x):
    devices = jax.devices()
    num_chains = x.shape[0]
    count = math.gcd(num_chains, len(devices))
    if count <= 1:
        return x
    mesh = jax.sharding.Mesh(np.array(devices[:count]), ("chain",))
    spec = jax.sharding.PartitionSpec("chain")
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def as_key(rng_key):
    """One typed PRNG key from an int seed, a typed key or a legacy ``uint32[2]`` key; a
    TypeError naming what was given otherwise.

    >>> as_key(0).shape, as_key(jax.random.PRNGKey(0)).shape
    ((), ())
    >>> as_key("abc")
    Traceback (most recent call last):
    ...
    TypeError: rng_key must be a jax.random.key, a legacy uint32[2] key, or an int seed; got 'abc' (str)
    """
    if isinstance(rng_key, int | np.integer) and not isinstance(rng_key, bool | np.bool_):
        return jax.random.key(int(rng_key))
    expected = "rng_key must be a jax.random.key, a legacy uint32[2] key, or an int seed"
    if isinstance(rng_key, jax.Array | np.ndarray):
        if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
            if rng_key.shape == ():
                return rng_key
            raise TypeError(
                f"{expected}; got a batch of keys of shape {rng_key.shape} (pass one key: one "
                "run already splits it for its chains)"
            )
        if rng_key.shape == (2,) and rng_key.dtype == np.uint32:
            return jax.random.wrap_key_data(jnp.asarray(rng_key))
        given = f"an array of dtype {rng_key.dtype} and shape {rng_key.shape}"
    else:
        given = f"{rng_key!r} ({type(rng_key).__name__})"
    raise TypeError(f"{expected}; got {given}")
