"""Timestep grids: decreasing times ``t_max = t_N > ... > t_0 = 0`` for ``num_steps`` steps."""

from __future__ import annotations

import jax.numpy as jnp

from diffprior.diffusion.schedules import Schedule
from diffprior.types import Array

__all__ = ["timesteps", "SPACINGS"]

SPACINGS = ("uniform", "quadratic", "edm")


def timesteps(
    schedule: Schedule,
    num_steps: int,
    spacing: str = "uniform",
    *,
    rho: float = 7.0,
    t_min: float = 1e-3,
) -> Array:
    r"""Times ``(num_steps + 1,)`` from ``schedule.t_max`` down to exactly ``0``.

    - ``"uniform"``: equal steps in ``t`` (with the discrete DDPM schedule and 1000 training
      steps, 100 uniform steps are the usual respacing with stride 10);
    - ``"quadratic"``: :math:`t_i = t_{max} (i / N)^2`, denser near the data;
    - ``"edm"``: Karras et al.'s rho spacing of the noise-to-signal ratio
      :math:`\sigma/\alpha` between ``t_min`` and ``t_max``, then a final step to 0.

    Examples
    --------
    >>> import diffprior as dp
    >>> dp.diffusion.timesteps(dp.schedules.VP.linear(), 4).tolist()
    [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    t_max = schedule.t_max
    frac = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
    if spacing == "uniform":
        return t_max * frac
    if spacing == "quadratic":
        return t_max * frac**2
    if num_steps == 1:
        return jnp.array([t_max, 0.0], dtype=jnp.float32)
    # rho spacing of the noise-to-signal ratio, inverted through the log-SNR
    nsr_max = jnp.exp(-0.5 * schedule.log_snr(t_max))
    nsr_min = jnp.exp(-0.5 * schedule.log_snr(t_min))
    u = jnp.linspace(0.0, 1.0, num_steps, dtype=jnp.float32)
    nsr = (nsr_max ** (1 / rho) + u * (nsr_min ** (1 / rho) - nsr_max ** (1 / rho))) ** rho
    ts = schedule.t_from_log_snr(-2.0 * jnp.log(nsr))
    ts = ts.at[0].set(t_max)
    return jnp.concatenate([ts, jnp.zeros(1, dtype=jnp.float32)])
