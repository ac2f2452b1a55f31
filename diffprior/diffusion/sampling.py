"""Plain reverse diffusion: the initial distribution and the unguided ancestral step.

These are the building blocks of :class:`diffprior.DiffusionPrior.sample` and of the
``unguided`` kernel; guided kernels add their guidance to the same step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.schedules import Schedule
from diffprior.diffusion.transitions import sample_transition
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["initial_std", "sample_initial", "ancestral_step", "reverse_diffusion"]


def initial_std(schedule: Schedule) -> Array:
    r"""Standard deviation of the reference :math:`x_{t_{max}} \sim N(0, (\alpha^2 + \sigma^2) I)`
    at ``t_max`` (1 for VP schedules; about :math:`\sigma_{max}` for VE and EDM)."""
    t_max = schedule.t_max
    return jnp.sqrt(schedule.alpha(t_max) ** 2 + schedule.sigma(t_max) ** 2)


def sample_initial(rng_key: PRNGKey, schedule: Schedule, shape: Sequence[int]) -> Array:
    """Draw ``shape``-shaped starting points from the reference at ``t_max``."""
    return initial_std(schedule) * jax.random.normal(rng_key, tuple(shape))


def ancestral_step(
    rng_key: PRNGKey,
    denoiser: Denoiser,
    x_t: Array,
    t: ArrayLike,
    s: ArrayLike,
    eta: ArrayLike = 1.0,
) -> tuple[Array, Array]:
    """One unguided step for a single particle: returns ``(x_s, x0_hat)``."""
    x0_hat, _ = denoiser.predict(x_t, t)
    transition = denoiser.transition(x_t, x0_hat, t, s, eta)
    return sample_transition(rng_key, transition), x0_hat


def reverse_diffusion(
    rng_key: PRNGKey,
    denoiser: Denoiser,
    shape: Sequence[int],
    times: Array,
    eta: ArrayLike = 1.0,
    x_init: Array | None = None,
) -> Array:
    """Sample ``shape = (n, *event_shape)`` by reverse diffusion along ``times`` (decreasing
    to 0): one ``lax.scan`` over steps, ``vmap`` over the ``n`` particles. The chains start
    from ``x_init`` when given, else from :func:`sample_initial`."""
    init_key, scan_key = jax.random.split(rng_key)
    x = sample_initial(init_key, denoiser.schedule, shape) if x_init is None else x_init
    step = jax.vmap(ancestral_step, in_axes=(0, None, 0, None, None, None))

    def body(x_t, inputs):
        key, t, s = inputs
        keys = jax.random.split(key, shape[0])
        x_s, _ = step(keys, denoiser, x_t, t, s, eta)
        return x_s, None

    num_steps = times.shape[0] - 1
    keys = jax.random.split(scan_key, num_steps)
    x, _ = jax.lax.scan(body, x, (keys, times[:-1], times[1:]))
    return x
