"""A diffusion model as a NumPyro distribution."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.grids import SPACINGS, timesteps
from diffprior.diffusion.sampling import initial_std, reverse_diffusion, sample_initial
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["DiffusionPrior"]


class DiffusionPrior(dist.Distribution):
    r"""The distribution of a diffusion model's samples, usable as a NumPyro prior.

    ``sample`` runs reverse diffusion (``num_steps`` steps on a ``spacing`` grid, DDIM
    stochasticity ``eta``: 1 is ancestral DDPM, 0 deterministic DDIM). ``log_prob`` integrates
    the probability-flow ODE (:meth:`ode_log_prob`): with :math:`y = x/\alpha_t` and
    :math:`\rho = \sigma_t/\alpha_t`, the ODE is :math:`dy/d\rho = \hat\varepsilon(\alpha_t y,
    t)` (Song et al. 2021, DDIM's ODE form), and the log density changes by minus the
    divergence. The divergence is exact (Jacobian trace) for event sizes up to
    ``exact_trace_max_dim`` and otherwise Hutchinson's estimate with ``num_probes`` Rademacher
    probes drawn once from ``probe_seed`` (so ``log_prob`` stays deterministic).

    Parameters
    ----------
    denoiser
        The network with its schedule and parameterization.
    event_shape
        Shape of one sample, e.g. ``(64,)`` or ``(8, 8)``.
    data_variance
        Per-coordinate variance of the data the network was trained on (1 for standardised
        data); :attr:`variance` reports it, and twisted samplers use it to judge how uncertain
        :math:`\hat x_0` is at high noise.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> den = dp.Denoiser(lambda x, t: jnp.zeros_like(x), dp.schedules.VP.linear(), "x0")
    >>> prior = dp.DiffusionPrior(den, event_shape=(3,), num_steps=10)
    >>> prior.sample(jax.random.key(0), (5,)).shape
    (5, 3)
    """

    arg_constraints = {}
    pytree_data_fields = ("denoiser", "calibration")
    #: How far to trust the denoiser's x0_hat at each time, measured on data
    #: (:func:`diffprior.calibrate`); ``None``: the spread of Gaussian data of the prior's
    #: variance.
    calibration = None
    pytree_aux_fields = (
        "num_steps",
        "eta",
        "spacing",
        "ode_steps",
        "num_probes",
        "exact_trace_max_dim",
        "probe_seed",
        "data_variance",
    )

    def __init__(
        self,
        denoiser: Denoiser,
        event_shape: Sequence[int],
        *,
        num_steps: int = 100,
        eta: float = 1.0,
        spacing: str = "uniform",
        ode_steps: int = 128,
        num_probes: int = 8,
        exact_trace_max_dim: int = 64,
        probe_seed: int = 0,
        data_variance: float = 1.0,
        validate_args: bool | None = None,
    ):
        if not isinstance(denoiser, Denoiser):
            raise TypeError(
                f"denoiser must be a diffprior.Denoiser, got {type(denoiser).__name__}; wrap a "
                "network with dp.Denoiser(net_fn, schedule, parameterization)"
            )
        event_shape = tuple(int(n) for n in event_shape)
        if not event_shape or any(n < 1 for n in event_shape):
            raise ValueError(f"event_shape must be a non-empty tuple of sizes, got {event_shape}")
        for name, value in (("num_steps", num_steps), ("ode_steps", ode_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.denoiser = denoiser
        self.num_steps = num_steps
        self.eta = float(eta)
        self.spacing = spacing
        self.ode_steps = ode_steps
        self.num_probes = num_probes
        self.exact_trace_max_dim = exact_trace_max_dim
        self.probe_seed = probe_seed
        data_variance = float(data_variance)
        if not data_variance > 0:
            raise ValueError(f"data_variance must be > 0, got {data_variance}")
        self.data_variance = data_variance
        super().__init__(batch_shape=(), event_shape=event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=None)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def schedule(self):
        """The denoiser's noise schedule."""
        return self.denoiser.schedule

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of the space the diffusion runs in: the event shape here (a
        :class:`~diffprior.LatentDiffusionPrior` diffuses a latent and decodes it)."""
        return tuple(self.event_shape)

    def decode(self, z: ArrayLike) -> Array:
        """The sample of one diffusion state ``z`` (``latent_shape``): the identity here,
        the decoder for a :class:`~diffprior.LatentDiffusionPrior`."""
        return jnp.asarray(z)

    @property
    def variance(self) -> Array:
        """Per-coordinate variance of the diffused data: ``data_variance`` broadcast to
        :attr:`latent_shape` (the event shape here)."""
        return jnp.full(self.latent_shape, self.data_variance, dtype=jnp.float32)

    @property
    def dim(self) -> int:
        """Number of scalars in one sample."""
        return math.prod(self.event_shape)

    def timesteps(self, num_steps: int | None = None) -> Array:
        """The sampling grid, ``(num_steps + 1,)`` times from ``t_max`` down to 0."""
        return timesteps(self.schedule, num_steps or self.num_steps, self.spacing)

    def sample(self, key: PRNGKey, sample_shape: Sequence[int] = ()) -> Array:
        return self.reverse_sample(key, sample_shape)

    def sample_reference(self, key: PRNGKey, sample_shape: Sequence[int] = ()) -> Array:
        r"""Starting points of the reverse chains at ``t_max``, shaped
        ``(*sample_shape, *latent_shape)``: :math:`N(0, (\alpha^2 + \sigma^2) I)`, the usual
        stand-in for the noised data distribution (priors that know their marginal at
        ``t_max`` override this, as :class:`~diffprior.GaussianMixture` does)."""
        shape = (*tuple(sample_shape), *self.latent_shape)
        return sample_initial(key, self.schedule, shape)

    def reverse_sample(
        self,
        key: PRNGKey,
        sample_shape: Sequence[int] = (),
        *,
        num_steps: int | None = None,
        eta: float | None = None,
    ) -> Array:
        """Sample by reverse diffusion with the denoiser (the generic path), in
        :attr:`latent_shape`, then :meth:`decode` each draw."""
        sample_shape = tuple(sample_shape)
        n = math.prod(sample_shape)
        eta = self.eta if eta is None else eta
        init_key, key = jax.random.split(key)
        flat = reverse_diffusion(
            key,
            self.denoiser,
            (n, *self.latent_shape),
            self.timesteps(num_steps),
            eta,
            x_init=self.sample_reference(init_key, (n,)),
        )
        flat = jax.vmap(self.decode)(flat)
        return flat.reshape(sample_shape + self.batch_shape + self.event_shape)

    def log_prob(self, value: ArrayLike) -> Array:
        return self.ode_log_prob(value)

    def ode_log_prob(
        self,
        value: ArrayLike,
        *,
        num_steps: int | None = None,
        exact: bool | None = None,
        num_probes: int | None = None,
    ) -> Array:
        r"""Log density by the probability-flow ODE (the generic path, used by :meth:`log_prob`).

        Fixed-step RK4 in :math:`u = \log\rho` from :math:`\rho = 10^{-3}` (or the schedule's
        smallest noise level) to ``t_max``, where the reference :math:`N(0, (\alpha^2 +
        \sigma^2) I)` is evaluated. ``exact`` forces the Jacobian trace (True) or Hutchinson
        (False); by default exact is used when the event size is at most
        ``exact_trace_max_dim``.
        """
        value = jnp.asarray(value, dtype=jnp.float32)
        event_ndim = len(self.event_shape)
        if value.shape[value.ndim - event_ndim :] != self.event_shape:
            raise ValueError(
                f"log_prob: value has trailing shape {value.shape[value.ndim - event_ndim :]}, "
                f"expected the event shape {self.event_shape}"
            )
        batch_shape = value.shape[: value.ndim - event_ndim]
        flat = value.reshape((-1, self.dim))
        exact = self.dim <= self.exact_trace_max_dim if exact is None else exact
        num_probes = num_probes or self.num_probes
        probes = jax.random.rademacher(
            jax.random.key(self.probe_seed), (num_probes, self.dim), dtype=jnp.float32
        )
        fn = jax.vmap(
            lambda x: _pf_ode_log_prob(
                self.denoiser, x, self.event_shape, num_steps or self.ode_steps, exact, probes
            )
        )
        return fn(flat).reshape(batch_shape)


def _pf_ode_log_prob(denoiser, x0_flat, event_shape, num_steps, exact, probes):
    schedule = denoiser.schedule
    t_max = schedule.t_max
    dim = x0_flat.shape[0]
    log_rho_max = -0.5 * schedule.log_snr(t_max)
    log_rho_min = jnp.maximum(-0.5 * schedule.log_snr(0.0), jnp.log(1e-3))
    t_min = schedule.t_from_log_snr(-2.0 * log_rho_min)

    def eps_in_y(y_flat, t):
        alpha_t = schedule.alpha(t)
        eps = denoiser.eps((alpha_t * y_flat).reshape(event_shape), t)
        return eps.reshape(-1)

    def velocity(u, state):
        y, _ = state
        rho = jnp.exp(u)
        t = schedule.t_from_log_snr(-2.0 * u)
        f = lambda y_: rho * eps_in_y(y_, t)  # noqa: E731
        if exact:
            dy = f(y)
            div = jnp.trace(jax.jacfwd(f)(y))
        else:
            dy, jvp_fn = jax.linearize(f, y)
            div = jnp.mean(jax.vmap(lambda v: jnp.dot(v, jvp_fn(v)))(probes))
        # d log p_y / du = -div, integrated from t_min to t_max, so accumulate +div
        return dy, div

    h = (log_rho_max - log_rho_min) / num_steps

    def rk4(state, i):
        u = log_rho_min + i * h
        y, acc = state
        k1 = velocity(u, (y, acc))
        k2 = velocity(u + h / 2, (y + h / 2 * k1[0], acc))
        k3 = velocity(u + h / 2, (y + h / 2 * k2[0], acc))
        k4 = velocity(u + h, (y + h * k3[0], acc))
        y = y + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        acc = acc + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        return (y, acc), None

    y0 = x0_flat / schedule.alpha(t_min)
    (y_end, div_integral), _ = jax.lax.scan(
        rk4, (y0, jnp.zeros((), jnp.float32)), jnp.arange(num_steps, dtype=jnp.float32)
    )
    alpha_max = schedule.alpha(t_max)
    x_end = alpha_max * y_end
    ref_std = initial_std(schedule)
    log_ref = jnp.sum(jax.scipy.stats.norm.logpdf(x_end, 0.0, ref_std))
    # densities of y and x differ by the Jacobian alpha^dim at each end
    return log_ref + dim * jnp.log(alpha_max) + div_integral - dim * jnp.log(schedule.alpha(t_min))
