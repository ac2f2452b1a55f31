r"""Noise schedules on continuous time ``t`` in ``[0, 1]``.

Every schedule defines the forward (noising) marginal

.. math::  x_t = \alpha(t)\, x_0 + \sigma(t)\, \varepsilon, \qquad \varepsilon \sim N(0, I),

and its log signal-to-noise ratio :math:`\lambda(t) = 2 \log(\alpha(t) / \sigma(t))`, which
decreases in ``t``. Schedules are Equinox modules: plain pytrees that pass through ``jax.jit``.

Examples
--------
>>> import diffprior as dp
>>> sched = dp.schedules.VP.linear()
>>> float(sched.alpha(0.0)), round(float(sched.sigma(1.0)), 4)
(1.0, 1.0)
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffprior.types import Array, ArrayLike

__all__ = ["Schedule", "VP", "VE", "EDM"]


class Schedule(eqx.Module):
    """Base class: subclasses define :meth:`log_alpha` and :meth:`log_sigma`.

    ``t_max`` is the largest time at which samplers start; ``0`` is the clean end.
    """

    t_max: float = eqx.field(static=True, default=1.0, kw_only=True)

    def __check_init__(self):
        if not 0 < self.t_max <= 1:
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max}")

    def log_alpha(self, t: ArrayLike) -> Array:
        raise NotImplementedError

    def log_sigma(self, t: ArrayLike) -> Array:
        raise NotImplementedError

    def alpha(self, t: ArrayLike) -> Array:
        r"""Signal coefficient :math:`\alpha(t)`."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> Array:
        r"""Noise coefficient :math:`\sigma(t)`."""
        return jnp.exp(self.log_sigma(t))

    def log_snr(self, t: ArrayLike) -> Array:
        r""":math:`\lambda(t) = 2 (\log \alpha(t) - \log \sigma(t))`, decreasing in ``t``."""
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def t_from_log_snr(self, log_snr: ArrayLike, num_iters: int = 60) -> Array:
        """Invert :meth:`log_snr` on ``[0, t_max]`` by bisection (it is monotone)."""
        log_snr = jnp.asarray(log_snr, dtype=jnp.float32)
        lo = jnp.zeros_like(log_snr)
        hi = jnp.full_like(log_snr, self.t_max)

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            # log_snr decreases in t: if log_snr(mid) > target, the answer is above mid
            above = self.log_snr(mid) > log_snr
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, num_iters, body, (lo, hi))
        return 0.5 * (lo + hi)

    def d_log_alpha(self, t: ArrayLike) -> Array:
        r""":math:`d \log \alpha / dt` (by automatic differentiation)."""
        return _scalar_grad(self.log_alpha, t)

    def d_log_sigma(self, t: ArrayLike) -> Array:
        r""":math:`d \log \sigma / dt` (by automatic differentiation)."""
        return _scalar_grad(self.log_sigma, t)


def _scalar_grad(fn, t):
    t = jnp.asarray(t, dtype=jnp.float32)
    grad = jax.grad(lambda s: fn(s).sum())
    return jnp.vectorize(grad)(t)


class VP(Schedule):
    r"""Variance-preserving schedules: :math:`\alpha(t)^2 + \sigma(t)^2 = 1`.

    ``log_alpha_fn`` is built by the constructors :meth:`linear` and :meth:`cosine`; the discrete
    DDPM table is stored as an array so that the schedule stays a plain pytree.
    """

    kind: str = eqx.field(static=True)
    beta_min: float = eqx.field(static=True, default=0.1)
    beta_max: float = eqx.field(static=True, default=20.0)
    cosine_s: float = eqx.field(static=True, default=0.008)
    log_alpha_table: Array | None = None

    @classmethod
    def linear(
        cls,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        *,
        discrete: bool = False,
        num_train_steps: int = 1000,
    ) -> VP:
        r"""Linear :math:`\beta`: continuous :math:`\beta(t) = \beta_{min} + t(\beta_{max} -
        \beta_{min})` (Song et al. 2021), or, with ``discrete=True``, the DDPM table
        :math:`\beta_n` linear from 1e-4 to 0.02 over ``num_train_steps`` steps (Ho et al. 2020),
        with :math:`t = n / N` and :math:`\log\bar\alpha` interpolated linearly between steps.
        """
        if not discrete:
            return cls(kind="linear", beta_min=beta_min, beta_max=beta_max)
        if not isinstance(num_train_steps, int) or num_train_steps < 1:
            raise ValueError(f"num_train_steps must be a positive integer, got {num_train_steps!r}")
        # the table is accumulated in float64 (NumPy) and stored in float32
        betas = np.linspace(1e-4, 0.02, num_train_steps, dtype=np.float64)
        log_alpha_bar = np.concatenate([np.zeros(1), np.cumsum(np.log1p(-betas))])
        table = jnp.asarray(0.5 * log_alpha_bar, dtype=jnp.float32)
        return cls(kind="discrete", log_alpha_table=table)

    @classmethod
    def cosine(cls, s: float = 0.008, t_max: float = 0.999) -> VP:
        r"""Cosine schedule of Nichol & Dhariwal (2021):
        :math:`\bar\alpha(t) = \cos^2(\frac{t + s}{1 + s}\frac{\pi}{2}) / \cos^2(\frac{s}{1 +
        s}\frac{\pi}{2})`. ``t_max < 1`` keeps :math:`\alpha(t_{max}) > 0`.
        """
        return cls(kind="cosine", cosine_s=s, t_max=t_max)

    def log_alpha(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, dtype=jnp.float32)
        if self.kind == "linear":
            return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
        if self.kind == "cosine":
            # f(0) by the same float32 operations as f(t), so that alpha(0) is exactly 1;
            # clamp at 0: in float32 the ratio can round above 1 near t = 0
            log_f = jnp.log(jnp.maximum(self._cosine_f(t), 1e-20))
            log_f0 = jnp.log(self._cosine_f(jnp.zeros_like(t)))
            return jnp.minimum(log_f - log_f0, 0.0)
        table = self.log_alpha_table
        num = table.shape[0] - 1
        return jnp.interp(t * num, jnp.arange(num + 1, dtype=jnp.float32), table)

    def _cosine_f(self, t: Array) -> Array:
        s = self.cosine_s
        return jnp.cos((t + s) / (1 + s) * (jnp.pi / 2))

    def __check_init__(self):
        if self.kind not in ("linear", "cosine", "discrete"):
            raise ValueError(
                f"VP kind must be 'linear', 'cosine' or 'discrete' (use VP.linear() or "
                f"VP.cosine()), got {self.kind!r}"
            )
        if self.kind == "linear" and not 0 < self.beta_min <= self.beta_max:
            raise ValueError(
                f"VP.linear needs 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}"
            )
        if self.kind == "cosine" and (self.cosine_s < 0 or self.t_max >= 1):
            raise ValueError(
                "VP.cosine needs s >= 0 and t_max < 1 (alpha(1) = 0), got "
                f"s={self.cosine_s}, t_max={self.t_max}"
            )
        if self.kind == "discrete" and (
            self.log_alpha_table is None or self.log_alpha_table.shape[0] < 2
        ):
            raise ValueError("VP.linear(discrete=True) needs num_train_steps >= 1")

    def log_sigma(self, t: ArrayLike) -> Array:
        # sigma^2 = 1 - alpha^2, computed stably as -expm1(2 log alpha)
        return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))


class VE(Schedule):
    r"""Variance-exploding schedule (Song et al. 2021): :math:`\alpha = 1`,
    :math:`\sigma(t) = \sigma_{min} (\sigma_{max} / \sigma_{min})^t`.
    """

    sigma_min: float = eqx.field(static=True, default=0.01)
    sigma_max: float = eqx.field(static=True, default=50.0)

    def __check_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"VE needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.float32))

    def log_sigma(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, dtype=jnp.float32)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return lo + t * (hi - lo)


class EDM(Schedule):
    r"""EDM noise levels (Karras et al. 2022): :math:`\alpha = 1`,
    :math:`\sigma(t) = (\sigma_{min}^{1/\rho} + t(\sigma_{max}^{1/\rho} -
    \sigma_{min}^{1/\rho}))^\rho`, so that a uniform grid in ``t`` is EDM's rho spacing.
    """

    sigma_min: float = eqx.field(static=True, default=0.002)
    sigma_max: float = eqx.field(static=True, default=80.0)
    rho: float = eqx.field(static=True, default=7.0)

    def __check_init__(self):
        if not 0 < self.sigma_min < self.sigma_max or self.rho <= 0:
            raise ValueError(
                "EDM needs 0 < sigma_min < sigma_max and rho > 0, got "
                f"{self.sigma_min}, {self.sigma_max}, {self.rho}"
            )

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.float32))

    def log_sigma(self, t: ArrayLike) -> Array:
        t = jnp.asarray(t, dtype=jnp.float32)
        inv = 1.0 / self.rho
        lo, hi = self.sigma_min**inv, self.sigma_max**inv
        return self.rho * jnp.log(lo + t * (hi - lo))
