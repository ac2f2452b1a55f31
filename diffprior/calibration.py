r"""How far to trust a network's :math:`\hat x_0` at each noise level, measured on data.

Twisted samplers smooth the likelihood over the spread of :math:`x_0` around the denoiser's
estimate, :math:`r_t^2 = E\,(x_0 - \hat x_0(x_t))^2`. Without a calibration that spread is the
one of Gaussian data of the prior's variance (:func:`~diffprior.diffusion.transitions.
tweedie_variance`): exact for a Gaussian prior, too wide for a multimodal one once a particle
has settled on a mode, and too narrow for a trained network whose :math:`\hat x_0` is worse
than the Bayes estimate. :func:`calibrate` measures it instead: for each time of a grid it
noises held-in data, :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, and records per
coordinate the mean squared error of :math:`\hat x_0(x_t)`, together with the least-squares
shrinkage :math:`a_t` of :math:`\hat x_0 - m` towards the data mean :math:`m` (1 for a
Bayes-optimal denoiser; near 0 where :math:`\hat x_0` carries no information).

The calibrated prior (``prior.calibration``) is used by TDS's and FK's twists and by the
subspace proposal of TDS, FK and MCGdiff; it never changes the prior itself, and every twist
is still the likelihood at :math:`t = 0` (the spread is 0 and the shrinkage 1 there), so the
samplers stay asymptotically exact. The twists are centred on the shrunk estimate :math:`m +
a_t (\hat x_0 - m)` with its measured spread: where a trained network's :math:`\hat x_0` is
noise (high noise levels), the twist no longer follows it and the weights stay even.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffprior.diffusion.grids import timesteps as grid_timesteps
from diffprior.priors import DiffusionPrior
from diffprior.types import Array, ArrayLike

__all__ = ["Calibration", "calibrate"]


class Calibration(NamedTuple):
    r"""Per-time statistics of a denoiser on held-in data (:func:`calibrate`).

    times
        ``(K,)`` increasing times in :math:`(0, t_{max}]`.
    residual_variance
        ``(K, *latent_shape)``: per coordinate, :math:`E\,(x_{0,i} - \tilde x_{0,i})^2`, the
        spread of :math:`x_0` around the shrunk estimate :math:`\tilde x_0 = m + a_t (\hat
        x_0(x_t) - m)`.
    shrinkage
        ``(K,)``: the least-squares :math:`a_t` in :math:`x_0 - m \approx a_t (\hat x_0 - m)`,
        clipped to :math:`[0, 1]`.
    mean
        ``latent_shape``: the data mean :math:`m`.
    num_samples
        Number of (data point, noise) pairs behind each time.
    inflation
        The factor :math:`c \ge 1` by which the twists widen the measured spread
        (:meth:`twist_variance_at`); 1 uses it as measured. See :func:`calibrate`.
    """

    times: Array
    residual_variance: Array
    shrinkage: Array
    mean: Array
    num_samples: int
    inflation: float = 1.0

    def _interpolate(self, values: Array, at_zero: ArrayLike, t: ArrayLike) -> Array:
        times = jnp.concatenate([jnp.zeros((1,)), jnp.asarray(self.times, jnp.float32)])
        values = jnp.asarray(values, jnp.float32)
        first = jnp.broadcast_to(jnp.asarray(at_zero, jnp.float32), (1, *values.shape[1:]))
        values = jnp.concatenate([first, values])
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, times[-1])
        upper = jnp.clip(jnp.searchsorted(times, t, side="right"), 1, times.shape[0] - 1)
        lower = upper - 1
        weight = (t - times[lower]) / (times[upper] - times[lower])
        return (1.0 - weight) * values[lower] + weight * values[upper]

    def variance_at(self, t: ArrayLike) -> Array:
        r""":math:`r_t^2` per coordinate at ``t`` (``latent_shape``): linear in ``t`` between
        the grid times and from 0 at ``t = 0`` (the clean end) to the first grid time."""
        return self._interpolate(self.residual_variance, 0.0, t)

    def twist_variance_at(self, t: ArrayLike) -> Array:
        r"""The spread the twists use at ``t``: :attr:`inflation` times :meth:`variance_at`
        (0 at ``t = 0``, so the last twist is still the likelihood)."""
        return self.inflation * self.variance_at(t)

    def shrinkage_at(self, t: ArrayLike) -> Array:
        """:math:`a_t` at ``t``, linear between the grid times, 1 at ``t = 0``."""
        return self._interpolate(self.shrinkage, 1.0, t)

    def estimate(self, x0_hat: Array, t: ArrayLike) -> Array:
        r"""The shrunk estimate :math:`m + a_t (\hat x_0 - m)`, whose spread around
        :math:`x_0` is :meth:`variance_at`; ``x0_hat`` itself at ``t = 0``."""
        return self.mean + self.shrinkage_at(t) * (x0_hat - self.mean)

    def mean_variance_at(self, t: ArrayLike) -> Array:
        """:meth:`variance_at` averaged over coordinates (a scalar)."""
        return jnp.mean(self.variance_at(t))

    def to_dict(self) -> dict:
        """Plain lists, for JSON (the shipped priors keep it in their metadata)."""

        def plain(values):
            return np.round(np.asarray(values, np.float64), 6).tolist()

        return {
            "times": plain(self.times),
            "residual_variance": plain(self.residual_variance),
            "shrinkage": plain(self.shrinkage),
            "mean": plain(self.mean),
            "num_samples": int(self.num_samples),
            "inflation": float(self.inflation),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(
            jnp.asarray(data["times"], jnp.float32),
            jnp.asarray(data["residual_variance"], jnp.float32),
            jnp.asarray(data["shrinkage"], jnp.float32),
            jnp.asarray(data["mean"], jnp.float32),
            int(data["num_samples"]),
            float(data.get("inflation", 1.0)),
        )


def calibrate(
    prior: DiffusionPrior,
    data: ArrayLike,
    *,
    num_times: int = 32,
    num_noise: int = 2,
    rng_key: int | Array = 0,
    batch_size: int = 512,
    inflation: float = 1.0,
) -> DiffusionPrior:
    r"""Measure how well ``prior``'s denoiser predicts :math:`x_0` at each noise level on
    ``data``, and return the prior with the result attached as ``prior.calibration``.

    Parameters
    ----------
    prior
        A :class:`~diffprior.DiffusionPrior`, or a :class:`~diffprior.LatentDiffusionPrior`
        (calibrated in its latent space, where it diffuses).
    data
        ``(n, *event_shape)`` held-in samples of the data the network models (for a trained
        network its training data; for a :class:`~diffprior.GaussianMixture`, its own draws).
        For a latent prior, either images, which its encoder maps to latents, or latents
        ``(n, *latent_shape)``. Measured on the shipped ``"digits-latent"`` prior (half of a
        held-out digit observed at sigma 0.1, TDS with 4 chains x 256 particles x 100 steps,
        3 digits): uncalibrated, every chain's weights collapsed (smallest ESS 1.0-1.9 of
        256) and the chains' log-evidences ranged over 46 to 529 nats; calibrated on its
        encoded training images (``examples/calibrate_digits.py --name digits-latent``), no
        run warned and the ranges were a few nats (``benchmarks/results/tds_regimes.md``).
    num_times
        Grid times (uniform in :math:`(0, t_{max}]`).
    num_noise
        Noise draws per data point and time.
    rng_key
        Seed or key of the noise.
    batch_size
        Denoiser calls per batch (memory).
    inflation
        A factor :math:`c \ge 1` by which the twists widen the measured spread
        (:attr:`Calibration.inflation`; ``calibration._replace(inflation=c)`` changes it
        later). The spread is a mean over data; a trained network's error is larger on some
        images than on others, and a twist fitted to the mean is then too confident about
        the joint of many observed coordinates, which shows as uneven weights. A wider twist
        is still exact at :math:`t = 0`. The shipped digits priors use the value chosen on
        their training images (``benchmarks/results/twist_inflation.md``).

    Returns
    -------
    A copy of ``prior`` with ``calibration`` a :class:`Calibration`.

    Examples
    --------
    For Gaussian data the calibrated spread is Tweedie's :math:`v \sigma_t^2 / (\alpha_t^2 v +
    \sigma_t^2)`:

    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1), 2.0)  # N(0, 4 I)
    >>> data = prior.sample(jax.random.key(0), (4000,))
    >>> calibrated = dp.calibrate(prior, data, num_times=4)
    >>> t = calibrated.calibration.times[1]
    >>> exact = dp.diffusion.tweedie_variance(prior.schedule, t, 4.0)
    >>> bool(jnp.abs(calibrated.calibration.mean_variance_at(t) / exact - 1) < 0.1)
    True
    """
    if not isinstance(prior, DiffusionPrior):
        raise TypeError(f"prior must be a diffprior.DiffusionPrior, got {type(prior).__name__}")
    sizes = (("num_times", num_times), ("num_noise", num_noise), ("batch_size", batch_size))
    for name, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(inflation, bool) or not isinstance(inflation, int | float):
        raise TypeError(f"inflation must be a number >= 1, got {inflation!r}")
    if not 1.0 <= inflation < float("inf"):
        raise ValueError(f"inflation must be a finite number >= 1, got {inflation!r}")
    data = jnp.asarray(data, jnp.float32)
    event_shape, latent_shape = tuple(prior.event_shape), tuple(prior.latent_shape)
    shape = tuple(data.shape[1:])
    if shape == event_shape != latent_shape:
        # a latent prior's data given as images: its encoder maps them to the diffused variable
        if getattr(prior, "encoder", None) is None:
            raise ValueError(
                f"data of shape (n, *{event_shape}) are images, and this latent prior has no "
                f"encoder to map them to its latent space; give latents of shape "
                f"(n, *{latent_shape}) instead"
            )
        if not bool(jnp.all(jnp.isfinite(data))):
            raise ValueError("data holds NaN or inf")
        data = jax.vmap(prior.encode)(data)
    elif data.ndim != len(latent_shape) + 1 or shape != latent_shape:
        images = f" (or images of shape (n, *{event_shape}))" if latent_shape != event_shape else ""
        raise ValueError(
            f"data must have shape (n, *{latent_shape}){images}, one sample per row; "
            f"got {data.shape}"
        )
    if data.shape[0] < 2:
        raise ValueError(f"data must hold at least 2 samples, got {data.shape[0]}")
    if not bool(jnp.all(jnp.isfinite(data))):
        raise ValueError("data holds NaN or inf")
    data_var = float(jnp.mean(jnp.var(data, axis=0)))
    prior_var = float(jnp.mean(prior.variance))
    if not 0.25 <= data_var / prior_var <= 4.0:
        warnings.warn(
            f"calibrate: the data's variance per coordinate ({data_var:.3g}) is not that of the "
            f"prior ({prior_var:.3g}, its data_variance) within a factor 4; is the data on the "
            "scale the network was trained on (e.g. images in [-1, 1])?",
            UserWarning,
            stacklevel=2,
        )
    key = jax.random.key(rng_key) if isinstance(rng_key, int) else rng_key
    schedule = prior.schedule
    times = grid_timesteps(schedule, num_times, "uniform")[:-1][::-1]  # increasing, no 0
    mean = jnp.mean(data, axis=0)
    stats = _statistics(prior.denoiser, data, mean, times, key, num_noise, batch_size)
    residual, shrinkage = stats
    bad = ~(
        jnp.all(jnp.isfinite(residual.reshape(times.shape[0], -1)), axis=1)
        & jnp.isfinite(shrinkage)
    )
    if bool(jnp.any(bad)):
        raise FloatingPointError(
            "calibrate: the denoiser's estimates were not finite on the data at t = "
            f"{np.asarray(times)[np.asarray(bad)].round(3).tolist()}; check the network there"
        )
    num_samples = int(data.shape[0] * num_noise)
    calibration = Calibration(times, residual, shrinkage, mean, num_samples, float(inflation))
    calibrated = copy.copy(prior)
    calibrated.calibration = calibration
    return calibrated


def _statistics(denoiser, data, mean, times, key, num_noise, batch_size):
    repeated = jnp.tile(data, (num_noise,) + (1,) * (data.ndim - 1))  # (n * num_noise, ...)
    total = repeated.shape[0]
    num_batches = -(-total // batch_size)
    padded = num_batches * batch_size
    valid = (jnp.arange(padded) < total).astype(jnp.float32)
    x0 = jnp.concatenate([repeated, jnp.broadcast_to(mean, (padded - total, *mean.shape))])
    x0 = x0.reshape((num_batches, batch_size, *mean.shape))
    valid = valid.reshape((num_batches, batch_size))

    @jax.jit
    def at_time(key, t):
        alpha, sigma = denoiser.schedule.alpha(t), denoiser.schedule.sigma(t)

        def batch(carry, inputs):
            cc, ch, hh = carry
            clean, mask, k = inputs
            x_t = alpha * clean + sigma * jax.random.normal(k, clean.shape)
            x0_hat = jax.vmap(lambda x: denoiser.predict(x, t)[0])(x_t)
            m = mask.reshape((-1,) + (1,) * (clean.ndim - 1))
            centred = (clean - mean) * m
            centred_hat = (x0_hat - mean) * m
            # per-coordinate sums of c^2, c h and h^2: E (c - a h)^2 for any a from them
            return (
                cc + jnp.sum(centred**2, axis=0),
                ch + jnp.sum(centred * centred_hat, axis=0),
                hh + jnp.sum(centred_hat**2, axis=0),
            ), None

        zeros = (jnp.zeros(mean.shape),) * 3
        keys = jax.random.split(key, num_batches)
        (cc, ch, hh), _ = jax.lax.scan(batch, zeros, (x0, valid, keys))
        # a shrinkage, in [0, 1]: where x0_hat ~ m (high noise) the ratio is noise over noise,
        # and a value above 1 would amplify that noise in the twist
        a = jnp.clip(jnp.sum(ch) / jnp.maximum(jnp.sum(hh), jnp.finfo(jnp.float32).tiny), 0.0, 1.0)
        residual = (cc - 2 * a * ch + a**2 * hh) / total
        return jnp.maximum(residual, 0.0), a

    results = [
        at_time(k, t) for k, t in zip(jax.random.split(key, times.shape[0]), times, strict=True)
    ]
    residual = jnp.stack([r for r, _ in results])
    shrinkage = jnp.stack([a for _, a in results])
    return residual, shrinkage
