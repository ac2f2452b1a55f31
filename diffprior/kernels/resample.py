r"""ReSample: latent diffusion with hard data consistency and stochastic resampling (Song, Kwon,
Zhang, Hu, Qu & Shen, "Solving inverse problems with latent diffusion models via hard data
consistency", ICLR 2024, openreview j8hdRqOUhN, Algorithm 1).

The particles are the diffusion's states :math:`z_t` (the latent of a latent diffusion prior, or
the image itself for a plain one) and ``log_likelihood_fn(z)`` is :math:`\log p(y \mid D(z))`.
Each step from :math:`t` to :math:`s < t` first takes the unconditional DDIM step
(:func:`~diffprior.diffusion.reverse_transition`, stochasticity ``eta``; the paper's is 0),

.. math::
    z'_s \sim N\big(\alpha_s \hat z_0 + \sqrt{\sigma_s^2 - c^2}\, \hat\varepsilon,\; c^2 I\big),
    \qquad \hat z_0 = E[z_0 \mid z_t].

At the *consistency steps* (every ``consistency_every``-th step counted back from the last, the
paper's skip step :math:`C`, inside a ``window`` of the trajectory: by default not in its first
third, where :math:`\hat z_0` is still too poor) it then

1. enforces **hard data consistency** from :math:`\hat z_0` (the paper's eq. 6, solved in latent
   space): ``num_grad_steps`` steps of ``optimizer`` (Adam, as the paper's implementation) on

   .. math::
       \hat z_0(y) \approx \arg\max_z\; \log p(y \mid D(z)) - \frac{\rho_t}{2}
       \lVert z - \hat z_0 \rVert^2, \qquad \rho_t = \lambda / r_t^2,

   started at :math:`\hat z_0`, where :math:`r_t^2 = \mathrm{Var}[z_0 \mid z_t]` for Gaussian
   data of variance ``data_variance`` (:func:`~diffprior.diffusion.tweedie_variance`). The paper
   regularises by early stopping; the proximal term (weight ``proximal_weight``
   :math:`\lambda`) does it explicitly: with :math:`\lambda = 1` the solution is the MAP of
   :math:`N(z; \hat z_0, r_t^2 I)\, p(y \mid D(z))`. Any likelihood works (Gaussian,
   Student-t, ...), being the model's own;
2. **stochastically resamples** :math:`z_s` (the paper's eq. 8) from the product of the forward
   noising of :math:`\hat z_0(y)`, :math:`N(\alpha_s \hat z_0(y), \sigma_s^2 I)`, and a Gaussian
   :math:`N(z'_s, \hat\sigma_s^2 I)` around the unconditional step:

   .. math::
       z_s \sim N\Big(\frac{\hat\sigma_s^2 \alpha_s \hat z_0(y) + \sigma_s^2 z'_s}
       {\hat\sigma_s^2 + \sigma_s^2},\; \frac{\hat\sigma_s^2 \sigma_s^2}
       {\hat\sigma_s^2 + \sigma_s^2} I\Big), \qquad
       \hat\sigma_s^2 = \gamma\, \frac{\sigma_s^2}{\sigma_t^2}\Big(\sigma_t^2 -
       \frac{\alpha_t^2}{\alpha_s^2}\sigma_s^2\Big),

   which for a VP schedule is the paper's :math:`\hat\sigma^2 = \gamma \frac{1 - \bar\alpha_s}
   {1 - \bar\alpha_t}\big(1 - \frac{\bar\alpha_t}{\bar\alpha_s}\big)` (the DDPM posterior
   variance; :math:`\gamma = 40` in the paper). With :math:`w = \hat\sigma_s^2 /
   (\hat\sigma_s^2 + \sigma_s^2) = \gamma c / (\gamma c + 1)`, :math:`c = 1 - \alpha_t^2
   \sigma_s^2 / (\alpha_s^2 \sigma_t^2)`, this is :math:`z_s = w \alpha_s \hat z_0(y) + (1 - w)
   z'_s + \sqrt{w}\, \sigma_s \xi`, defined also at :math:`s = 0` (:math:`c = 1`), so the last
   step (a consistency step by default) returns :math:`(\gamma \hat z_0(y) + z'_0)/(\gamma + 1)`.

With ``decode`` and ``encode`` (and ``image_log_likelihood_fn``, :math:`\log p(y \mid x)`)
step 1 runs in **pixel space** instead, the paper's other variant: the same optimisation over
the image :math:`x`, from :math:`D(\hat z_0)` and with the proximal term
:math:`\frac{\rho_t}{2} \lVert x - D(\hat z_0) \rVert^2`, then :math:`\hat z_0(y) =
E(x^\star)`. It costs no decoder Jacobian; how well it works depends on how faithfully the
encoder inverts the decoder.

Not included: the implementation's look-ahead ("time travel") DDIM steps before the
optimisation. Approximate:
particles are independent, with equal weights. Jit-able; ``vmap`` over particles; the inner
optimisation is a ``lax.fori_loop`` whose trip count is zero at the other steps (so only the
consistency steps pay for it).

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import diffprior as dp
>>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
>>> loglik = lambda x: -0.5 * ((x[0] - 1.0) / 0.1) ** 2
>>> algo = dp.kernels.resample.as_top_level_api(
...     gmm.denoiser, loglik, gmm.timesteps(10), consistency_every=2)
>>> state = algo.init(jax.random.normal(jax.random.key(0), (8, 2)))
>>> step = jax.jit(algo.step)
>>> for key in jax.random.split(jax.random.key(1), 10):
...     state, info = step(key, state)
>>> bool(jnp.all(jnp.abs(state.particles[:, 0] - 1.0) < 0.3))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from blackjax.base import SamplingAlgorithm

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.schedules import Schedule
from diffprior.diffusion.transitions import sample_transition, tweedie_variance
from diffprior.kernels import base
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "ReSampleState",
    "ReSampleInfo",
    "init",
    "build_kernel",
    "as_top_level_api",
    "consistency_steps",
    "data_consistency",
    "stochastic_resample",
]


#: The shared :class:`diffprior.kernels.base.ParticleState`: particles ``(N, *shape)`` at
#: ``timesteps[step]``.
ReSampleState = base.ParticleState


class ReSampleInfo(NamedTuple):
    r"""x0_hat: the denoiser's :math:`\hat z_0` per particle before the step; x0_star: the
    data-consistent :math:`\hat z_0(y)` (equal to x0_hat at steps without consistency);
    log_likelihood: :math:`\log p(y \mid D(\cdot))` at x0_star; consistency: whether this step
    enforced data consistency (a boolean scalar); num_nonfinite: the particles whose step was
    not finite (kept in place, :mod:`diffprior.kernels.base`)."""

    x0_hat: Array
    x0_star: Array
    log_likelihood: Array
    consistency: Array
    num_nonfinite: Array


init = base.init


def consistency_steps(
    num_steps: int, consistency_every: int = 10, window: Sequence[float] = (1 / 3, 1.0)
) -> np.ndarray:
    """Which of ``num_steps`` steps enforce data consistency, a boolean ``(num_steps,)`` array.

    Step ``k`` (from ``timesteps[k]`` to ``timesteps[k + 1]``) does when ``num_steps - 1 - k``
    is a multiple of ``consistency_every`` (so the last step does) and the fraction of the
    trajectory done after it, ``(k + 1) / num_steps``, lies in ``(window[0], window[1]]``.

    Examples
    --------
    >>> consistency_steps(20, 5, (0.5, 1.0)).nonzero()[0].tolist()
    [14, 19]
    """
    k = np.arange(num_steps)
    progress = (k + 1) / num_steps
    start, stop = window
    return ((num_steps - 1 - k) % consistency_every == 0) & (progress > start) & (progress <= stop)


def data_consistency(
    log_likelihood_fn: Callable[[Array], Array],
    x0_hat: Array,
    rho: ArrayLike,
    num_iters: ArrayLike,
    optimizer: optax.GradientTransformation,
) -> Array:
    r"""``num_iters`` steps of ``optimizer`` on :math:`-\log p(y \mid D(z)) + \frac{\rho}{2}
    \lVert z - \hat z_0\rVert^2` from :math:`z = \hat z_0`; ``x0_hat`` back if the result is
    not finite. Non-finite gradient entries count as zero. ``num_iters`` may be traced."""

    def objective(z):
        return -log_likelihood_fn(z) + 0.5 * rho * jnp.sum((z - x0_hat) ** 2)

    grad_fn = jax.grad(objective)

    def body(_, carry):
        z, opt_state = carry
        grads = grad_fn(z)
        grads = jnp.where(jnp.isfinite(grads), grads, 0.0)
        updates, opt_state = optimizer.update(grads, opt_state, z)
        return optax.apply_updates(z, updates), opt_state

    z, _ = jax.lax.fori_loop(0, num_iters, body, (x0_hat, optimizer.init(x0_hat)))
    return jnp.where(jnp.all(jnp.isfinite(z)), z, x0_hat)


def stochastic_resample(
    rng_key: PRNGKey,
    schedule: Schedule,
    x0_star: Array,
    x_prime: Array,
    t: ArrayLike,
    s: ArrayLike,
    gamma: ArrayLike = 40.0,
) -> Array:
    r"""The paper's stochastic resampling: :math:`z_s = w \alpha_s \hat z_0(y) + (1 - w) z'_s +
    \sqrt{w}\, \sigma_s \xi` with :math:`w = \gamma c / (\gamma c + 1)` (module docstring)."""
    alpha_t, sigma_t = schedule.alpha(t), schedule.sigma(t)
    alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
    ratio = (alpha_t / alpha_s) ** 2 * sigma_s**2 / sigma_t**2
    c = jnp.clip(1.0 - ratio, 0.0, 1.0)
    weight = gamma * c / (gamma * c + 1.0)
    noise = jax.random.normal(rng_key, x0_star.shape, x0_star.dtype)
    return (
        weight * alpha_s * x0_star + (1.0 - weight) * x_prime + jnp.sqrt(weight) * sigma_s * noise
    )


def build_kernel(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    gamma: ArrayLike = 40.0,
    eta: ArrayLike = 0.0,
    consistency_every: int = 10,
    window: Sequence[float] = (1 / 3, 1.0),
    num_grad_steps: int = 50,
    optimizer: optax.GradientTransformation | None = None,
    proximal_weight: ArrayLike = 1.0,
    data_variance: ArrayLike = 1.0,
    decode: Callable[[Array], Array] | None = None,
    encode: Callable[[Array], Array] | None = None,
    image_log_likelihood_fn: Callable[[Array], Array] | None = None,
) -> Callable[[PRNGKey, ReSampleState], tuple[ReSampleState, ReSampleInfo]]:
    """Build the ReSample step (options as in :func:`as_top_level_api`)."""
    pixel_space = _check_pixel_space(decode, encode, image_log_likelihood_fn)
    schedule = denoiser.schedule
    optimizer = optax.adam(0.05) if optimizer is None else optimizer
    active_steps = jnp.asarray(
        consistency_steps(timesteps.shape[0] - 1, consistency_every, tuple(window))
    )

    def particle_step(key, x_t, times):
        t, s = times.t, times.s
        active = active_steps[times.index]
        # the unconditional step draws with the particle's key itself, as the unguided kernel
        # does: without consistency steps, ReSample is that kernel draw for draw
        resample_key = jax.random.fold_in(key, 1)
        x0_hat = denoiser.x0(x_t, t)
        x_prime = sample_transition(key, denoiser.transition(x_t, x0_hat, t, s, eta))
        r2 = tweedie_variance(schedule, t, data_variance)
        rho = proximal_weight / jnp.maximum(r2, 1e-12)
        num_iters = jnp.where(active, num_grad_steps, 0)
        if pixel_space:
            image = data_consistency(
                image_log_likelihood_fn, decode(x0_hat), rho, num_iters, optimizer
            )
            x0_star = jnp.where(active, encode(image), x0_hat)
            x0_star = jnp.where(jnp.all(jnp.isfinite(x0_star)), x0_star, x0_hat)
        else:
            x0_star = data_consistency(log_likelihood_fn, x0_hat, rho, num_iters, optimizer)
        resampled = stochastic_resample(resample_key, schedule, x0_star, x_prime, t, s, gamma)
        x_s = jnp.where(active, resampled, x_prime)
        return x_s, (x0_hat, x0_star, log_likelihood_fn(x0_star))

    def make_info(outputs, times, num_nonfinite):
        x0_hat, x0_star, log_likelihood = outputs
        active = active_steps[times.index]
        return ReSampleInfo(x0_hat, x0_star, log_likelihood, active, num_nonfinite)

    return base.from_particle_step(particle_step, timesteps, make_info).step


def _check_pixel_space(decode, encode, image_log_likelihood_fn) -> bool:
    given = [f is not None for f in (decode, encode, image_log_likelihood_fn)]
    if any(given) and not all(given):
        raise ValueError(
            "pixel-space data consistency needs all of decode, encode and "
            "image_log_likelihood_fn; got only "
            + ", ".join(
                name
                for name, g in zip(
                    ("decode", "encode", "image_log_likelihood_fn"), given, strict=True
                )
                if g
            )
        )
    return all(given)


def as_top_level_api(
    denoiser: Denoiser,
    log_likelihood_fn: Callable[[Array], Array],
    timesteps: Array,
    *,
    gamma: ArrayLike = 40.0,
    eta: ArrayLike = 0.0,
    consistency_every: int = 10,
    window: Sequence[float] = (1 / 3, 1.0),
    num_grad_steps: int = 50,
    optimizer: optax.GradientTransformation | None = None,
    proximal_weight: ArrayLike = 1.0,
    data_variance: ArrayLike = 1.0,
    decode: Callable[[Array], Array] | None = None,
    encode: Callable[[Array], Array] | None = None,
    image_log_likelihood_fn: Callable[[Array], Array] | None = None,
) -> SamplingAlgorithm:
    r"""ReSample as a ``SamplingAlgorithm(init, step)``; see the module docstring.

    ``log_likelihood_fn(z)`` is :math:`\log p(y \mid D(z))` for one particle; ``optimizer``
    (default ``optax.adam(0.05)``) runs the ``num_grad_steps`` data-consistency steps. Passing
    ``decode``, ``encode`` and ``image_log_likelihood_fn`` (:math:`\log p(y \mid x)`) moves
    them to pixel space."""
    kernel = build_kernel(
        denoiser,
        log_likelihood_fn,
        timesteps,
        gamma=gamma,
        eta=eta,
        consistency_every=consistency_every,
        window=window,
        num_grad_steps=num_grad_steps,
        optimizer=optimizer,
        proximal_weight=proximal_weight,
        data_variance=data_variance,
        decode=decode,
        encode=encode,
        image_log_likelihood_fn=image_log_likelihood_fn,
    )
    return SamplingAlgorithm(init, kernel)
