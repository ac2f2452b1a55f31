r"""A network plus a schedule: the one place where Tweedie's formula and the conversions between
parameterizations live. Every sampler calls :class:`Denoiser`; nothing else converts.

With :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`:

- ``"eps"``: the network predicts :math:`\varepsilon`; :math:`\hat x_0 = (x_t - \sigma_t
  \hat\varepsilon) / \alpha_t`;
- ``"x0"``: the network predicts :math:`\hat x_0 = E[x_0 | x_t]` (Tweedie);
- ``"v"``: the network predicts :math:`v = \alpha_t \varepsilon - \sigma_t x_0` (Salimans & Ho
  2022), so :math:`\hat x_0 = (\alpha_t x_t - \sigma_t v) / (\alpha_t^2 + \sigma_t^2)`;
- ``"score"``: the network predicts :math:`\nabla \log p_t(x_t) = -\hat\varepsilon / \sigma_t`.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp

from diffprior.diffusion.schedules import Schedule
from diffprior.diffusion.transitions import Transition, reverse_transition
from diffprior.types import Array, ArrayLike

__all__ = ["Denoiser", "PARAMETERIZATIONS"]

PARAMETERIZATIONS = ("eps", "x0", "v", "score")


class Denoiser(eqx.Module):
    r"""A denoising network with its schedule and parameterization.

    ``local_variance`` (default 0, the usual DDPM step) is the per-coordinate variance of the
    data around its local structure (within a mixture component, say) that :meth:`transition`
    adds back to each reverse step (``data_variance`` of
    :func:`diffprior.diffusion.reverse_transition`).

    ``clip_x0`` (default None) clips :math:`\hat x_0` to ``[-clip_x0, clip_x0]`` (the data range)
    and recomputes :math:`\hat\varepsilon` from it, as DDPM samplers do for bounded data.

    ``net_fn(x, t)`` takes one unbatched ``x`` (the event shape) and a scalar ``t`` in ``[0, 1]``
    and returns an array shaped like ``x``; samplers ``vmap`` it over particles. It may be a plain
    function or an Equinox module: its arrays become pytree leaves (so the denoiser passes
    through ``jax.jit`` as an argument) and everything else is kept static.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import diffprior as dp
    >>> sched = dp.schedules.VP.linear()
    >>> den = dp.Denoiser(lambda x, t: jnp.zeros_like(x), schedule=sched, parameterization="eps")
    >>> den.x0(jnp.ones(3), 0.5).shape
    (3,)
    """

    net_params: object
    net_static: object = eqx.field(static=True)
    schedule: Schedule
    parameterization: str = eqx.field(static=True)
    local_variance: float = eqx.field(static=True)
    clip_x0: float | None = eqx.field(static=True)

    def __init__(
        self,
        net_fn: Callable[[Array, Array], Array],
        schedule: Schedule,
        parameterization: str = "eps",
        *,
        local_variance: float = 0.0,
        clip_x0: float | None = None,
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
            )
        if not callable(net_fn):
            raise TypeError(f"net_fn must be callable as net_fn(x, t), got {type(net_fn)}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffprior Schedule, got {type(schedule)}")
        self.net_params, self.net_static = eqx.partition(net_fn, eqx.is_array)
        self.schedule = schedule
        self.parameterization = parameterization
        local_variance = float(local_variance)
        if not local_variance >= 0:
            raise ValueError(f"local_variance must be >= 0, got {local_variance}")
        self.local_variance = local_variance
        if clip_x0 is not None and not float(clip_x0) > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0}")
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)

    @property
    def net_fn(self) -> Callable[[Array, Array], Array]:
        """The network, reassembled from its arrays and its static part."""
        return eqx.combine(self.net_params, self.net_static)

    def predict(self, x: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """One network call: ``(x0_hat, eps_hat)`` at ``(x, t)``."""
        x = jnp.asarray(x)
        t = jnp.asarray(t, dtype=jnp.float32)
        out = self.net_fn(x, t)
        x0_hat, eps_hat = self.from_output(out, x, t)
        if self.clip_x0 is not None:
            # keep x0_hat in the data range (errors of an eps-network are amplified by
            # 1 / alpha_t at high noise) and make eps_hat consistent with it
            x0_hat = jnp.clip(x0_hat, -self.clip_x0, self.clip_x0)
            alpha_t, sigma_t = self.schedule.alpha(t), self.schedule.sigma(t)
            eps_hat = (x - alpha_t * x0_hat) / sigma_t
        return x0_hat, eps_hat

    def from_output(self, out: Array, x: Array, t: Array) -> tuple[Array, Array]:
        """Convert a network output in this parameterization to ``(x0_hat, eps_hat)``."""
        alpha_t, sigma_t = self.schedule.alpha(t), self.schedule.sigma(t)
        match self.parameterization:
            case "eps":
                eps_hat = out
                x0_hat = (x - sigma_t * eps_hat) / alpha_t
            case "score":
                eps_hat = -sigma_t * out
                x0_hat = (x - sigma_t * eps_hat) / alpha_t
            case "x0":
                x0_hat = out
                eps_hat = (x - alpha_t * x0_hat) / sigma_t
            case "v":
                norm = alpha_t**2 + sigma_t**2
                x0_hat = (alpha_t * x - sigma_t * out) / norm
                eps_hat = (sigma_t * x + alpha_t * out) / norm
        return x0_hat, eps_hat

    def to_output(self, x0: Array, eps: Array, t: ArrayLike) -> Array:
        """What a network in this parameterization should output for a given ``(x0, eps)``
        (the training target of denoising score matching)."""
        t = jnp.asarray(t, dtype=jnp.float32)
        alpha_t, sigma_t = self.schedule.alpha(t), self.schedule.sigma(t)
        match self.parameterization:
            case "eps":
                return eps
            case "x0":
                return x0
            case "v":
                return alpha_t * eps - sigma_t * x0
            case "score":
                return -eps / sigma_t

    def transition(
        self, x_t: Array, x0_hat: Array, t: ArrayLike, s: ArrayLike, eta: ArrayLike = 1.0
    ) -> Transition:
        """The reverse step from ``t`` to ``s`` given ``x0_hat``, with this denoiser's
        schedule and ``local_variance`` (:func:`diffprior.diffusion.reverse_transition`)."""
        return reverse_transition(self.schedule, x_t, x0_hat, t, s, eta, self.local_variance)

    def x0(self, x: ArrayLike, t: ArrayLike) -> Array:
        r"""Tweedie's posterior mean :math:`\hat x_0(x_t) = E[x_0 \mid x_t]`."""
        return self.predict(x, t)[0]

    def eps(self, x: ArrayLike, t: ArrayLike) -> Array:
        r"""Predicted noise :math:`\hat\varepsilon = (x_t - \alpha_t \hat x_0) / \sigma_t`."""
        return self.predict(x, t)[1]

    def score(self, x: ArrayLike, t: ArrayLike) -> Array:
        r"""Score :math:`\nabla_{x_t} \log p_t(x_t) = -\hat\varepsilon / \sigma_t`."""
        t = jnp.asarray(t, dtype=jnp.float32)
        return -self.eps(x, t) / self.schedule.sigma(t)
