r"""Denoising score matching: train a network ``net(x, t)`` as a diffusion model's denoiser.

For data :math:`x_0`, :math:`t \sim U(t_{min}, 1)`, :math:`\varepsilon \sim N(0, I)` and
:math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, the loss is

.. math::  L(\theta) = E\, \mathrm{mean}\, \| \mathrm{net}_\theta(x_t, t) - y(x_0,
    \varepsilon, t) \|^2,

with the target :math:`y` given by :meth:`diffprior.Denoiser.to_output` for the chosen
parameterization (:math:`\varepsilon` for ``"eps"``: Ho et al. 2020, eq. 14; Song et al. 2021,
eq. 7 for the score). Its minimiser is the Tweedie denoiser :math:`E[x_0 \mid x_t]` in that
parameterization, so the trained network plugs into :class:`diffprior.Denoiser` unchanged.

Optimiser: AdamW with linear warm-up and cosine decay and global-norm clipping (optax); an
exponential moving average (EMA) of the weights is what is returned and checkpointed.

Examples
--------
>>> import jax
>>> import diffprior as dp
>>> from diffprior.nets import TimeMLP
>>> from diffprior.train import train
>>> data = jax.random.normal(jax.random.key(0), (256, 2))
>>> net, losses = train(TimeMLP(2, width=16, depth=1, key=jax.random.key(1)), data,
...                     dp.schedules.VP.linear(), num_steps=20, batch_size=32,
...                     progress_bar=False)
>>> losses.shape
(20,)
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.schedules import Schedule
from diffprior.io import write_atomically, write_json
from diffprior.types import Array, ArrayLike, ArrayTree, PRNGKey

__all__ = [
    "TrainState",
    "dsm_loss",
    "make_optimizer",
    "train",
    "save_atomically",
    "save_pretrained",
]


class TrainState(NamedTuple):
    """What one training step needs.

    params
        The network's arrays (the rest of the network is static).
    ema_params
        Exponential moving average of ``params`` (equal to ``params`` when EMA is off).
    opt_state
        The optax state.
    step
        Number of optimiser steps taken, an int32 scalar.
    """

    params: ArrayTree
    ema_params: ArrayTree
    opt_state: optax.OptState
    step: Array


def dsm_loss(
    net: Callable[[Array, Array], Array],
    x0: Array,
    rng_key: PRNGKey,
    schedule: Schedule,
    parameterization: str = "eps",
    t_min: float = 1e-3,
) -> Array:
    """Monte Carlo denoising-score-matching loss on a batch ``x0`` of shape ``(n, *event)``.

    One ``t`` and one ``eps`` per example; the target is
    :meth:`diffprior.Denoiser.to_output` so that the conversions live in one place.
    """
    t_key, eps_key = jax.random.split(rng_key)
    n = x0.shape[0]
    t = jax.random.uniform(t_key, (n,), minval=t_min, maxval=schedule.t_max)
    eps = jax.random.normal(eps_key, x0.shape)
    event_axes = (slice(None),) + (None,) * (x0.ndim - 1)
    alpha_t, sigma_t = schedule.alpha(t)[event_axes], schedule.sigma(t)[event_axes]
    x_t = alpha_t * x0 + sigma_t * eps
    denoiser = Denoiser(net, schedule, parameterization)
    target = jax.vmap(denoiser.to_output)(x0, eps, t)
    prediction = jax.vmap(denoiser.net_fn)(x_t, t)
    return jnp.mean((prediction - target) ** 2)


def make_optimizer(
    num_steps: int,
    learning_rate: float = 1e-3,
    *,
    warmup_steps: int | None = None,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up (default: 5% of the steps, at most 500) from 0 to
    ``learning_rate``, then cosine decay to 1% of it at ``num_steps``; gradients clipped to
    global norm ``clip_norm``."""
    if warmup_steps is None:
        warmup_steps = min(500, max(1, num_steps // 20))
    warmup_steps = min(warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(num_steps, warmup_steps + 1),
        end_value=0.01 * learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, weight_decay=weight_decay),
    )


def save_atomically(path: str | os.PathLike, tree: ArrayTree) -> None:
    """Write ``tree`` with :func:`equinox.tree_serialise_leaves` to ``path`` atomically
    (:func:`diffprior.io.write_atomically`): a reader never sees a partial file, even if
    training is killed mid-write."""

    def write(name):
        with open(name, "wb") as f:
            eqx.tree_serialise_leaves(f, tree)

    write_atomically(path, write)


def save_pretrained(
    out_dir: str | os.PathLike, name: str, tree: ArrayTree, record: dict
) -> tuple[str, dict]:
    """Write ``NAME.eqx`` (the serialised ``tree``) and ``NAME.json`` (``record`` plus the
    weights' file name, sha256 and the machine that trained them) into ``out_dir``, each
    atomically: the layout :func:`diffprior.pretrained.load` reads and checks.

    Returns the weights' path and the record as written.
    """
    weights_path = os.path.join(os.fspath(out_dir), f"{name}.eqx")
    save_atomically(weights_path, tree)
    with open(weights_path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    record = {
        **record,
        "trained_on": f"{platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}",
        "weights_file": f"{name}.eqx",
        "weights_sha256": sha256,
    }
    write_json(os.path.join(os.fspath(out_dir), f"{name}.json"), record)
    return weights_path, record


def train[Net: eqx.Module](
    net: Net,
    data: ArrayLike,
    schedule: Schedule,
    parameterization: str = "eps",
    *,
    num_steps: int = 10_000,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    warmup_steps: int | None = None,
    weight_decay: float = 1e-4,
    ema_decay: float | None = 0.999,
    t_min: float = 1e-3,
    seed: int = 0,
    steps_per_call: int = 1,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    progress_bar: bool = True,
) -> tuple[Net, np.ndarray]:
    r"""Train ``net`` on ``data`` of shape ``(n, *event_shape)`` by denoising score matching.

    Each step draws ``batch_size`` examples (with replacement), one time and one noise each,
    and takes an optimiser step (:func:`make_optimizer`) on :func:`dsm_loss`. Each step is
    jit-compiled; ``steps_per_call > 1`` runs chunks of steps in one ``lax.scan`` call, which
    saves dispatch time for tiny networks but is many times slower for convolutional ones on
    CPU (XLA's CPU backend runs convolutions inside loops on a slow path), hence the default 1.
    Same ``seed``, same data and settings: same result (and the same random draws whatever
    ``steps_per_call``).

    Parameters
    ----------
    net
        An Equinox module called as ``net(x, t)`` on one unbatched ``x`` (the event shape).
    data
        The training set, ``(n, *event_shape)``.
    schedule, parameterization
        What the network will be used with, as in :class:`diffprior.Denoiser`.
    ema_decay
        Decay of the weights' moving average (with the usual warm-up :math:`\min(d, (1 + k) /
        (10 + k))` at step ``k``); ``None`` or ``0`` turns it off.
    checkpoint_path, checkpoint_every
        If given, the network that would be returned (EMA weights when EMA is on) is written
        there (atomically, :func:`save_atomically`) every ``checkpoint_every`` steps and at the
        end; reload it with ``eqx.tree_deserialise_leaves(path, like_net)``.
    progress_bar
        A tqdm bar showing the mean loss of the last chunk.

    Returns
    -------
    ``(trained_net, losses)``: the network (EMA weights if used) and the loss of every step,
    ``(num_steps,)``.
    """
    data = jnp.asarray(data, dtype=jnp.float32)
    if data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(f"data must have shape (n, *event_shape) with n >= 1, got {data.shape}")
    if not np.all(np.isfinite(np.asarray(data))):
        raise ValueError("data contains NaN or inf")
    for name, value in (
        ("num_steps", num_steps),
        ("batch_size", batch_size),
        ("steps_per_call", steps_per_call),
        ("checkpoint_every", checkpoint_every),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= t_min < schedule.t_max:
        raise ValueError(f"t_min must be in [0, t_max={schedule.t_max}), got {t_min}")
    ema_decay = float(ema_decay or 0.0)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    Denoiser(net, schedule, parameterization)  # fails early on a bad parameterization

    settings = _Settings(
        parameterization=parameterization,
        t_min=float(t_min),
        batch_size=batch_size,
        num_steps=num_steps,
        learning_rate=float(learning_rate),
        warmup_steps=warmup_steps,
        weight_decay=float(weight_decay),
        ema_decay=ema_decay,
    )
    params, static = eqx.partition(net, eqx.is_inexact_array)
    state = _init_state(params, settings)
    base_key = jax.random.key(seed)
    losses = np.empty(num_steps, np.float32)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="train", unit="step")
    done = 0
    next_checkpoint = checkpoint_every
    try:
        while done < num_steps:
            # full chunks share one compilation; a short last chunk compiles once more
            size = min(steps_per_call, num_steps - done)
            state, chunk_losses = _run_steps(
                state, static, schedule, data, base_key, jnp.int32(done), size, settings
            )
            losses[done : done + size] = np.asarray(chunk_losses)
            done += size
            if bar is not None:
                bar.update(size)
                bar.set_postfix(loss=f"{float(np.mean(losses[done - size : done])):.4f}")
            if checkpoint_path is not None and (done >= next_checkpoint or done == num_steps):
                save_atomically(checkpoint_path, eqx.combine(state.ema_params, static))
                next_checkpoint = (done // checkpoint_every + 1) * checkpoint_every
    finally:
        if bar is not None:
            bar.close()
    if not math.isfinite(float(losses[-1])):
        raise FloatingPointError(
            "training diverged: the last loss is not finite; lower learning_rate"
        )
    return eqx.combine(state.ema_params, static), losses


class _Settings(NamedTuple):
    # hashable, so that the jitted functions below are compiled once per network structure
    # and settings, not once per call of `train`
    parameterization: str
    t_min: float
    batch_size: int
    num_steps: int
    learning_rate: float
    warmup_steps: int | None
    weight_decay: float
    ema_decay: float

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(
            self.num_steps,
            self.learning_rate,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
        )


@eqx.filter_jit
def _init_state(params: ArrayTree, settings: _Settings) -> TrainState:
    return TrainState(
        params=params,
        ema_params=params,
        opt_state=settings.optimizer().init(params),
        step=jnp.zeros((), jnp.int32),
    )


def _one_step(state, static, schedule, data, key, settings: _Settings):
    batch_key, loss_key = jax.random.split(key)
    idx = jax.random.randint(batch_key, (settings.batch_size,), 0, data.shape[0])

    def loss_fn(params):
        net = eqx.combine(params, static)
        return dsm_loss(
            net, data[idx], loss_key, schedule, settings.parameterization, settings.t_min
        )

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = settings.optimizer().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    if settings.ema_decay > 0:
        k = step.astype(jnp.float32)
        decay = jnp.minimum(settings.ema_decay, (1.0 + k) / (10.0 + k))
        ema_params = jax.tree.map(
            lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
        )
    else:
        ema_params = params
    return TrainState(params, ema_params, opt_state, step), loss


@eqx.filter_jit
def _run_steps(state, static, schedule, data, base_key, start, size: int, settings: _Settings):
    # step k uses fold_in(key(seed), k): the draws do not depend on how steps are chunked
    keys = jax.vmap(lambda k: jax.random.fold_in(base_key, k))(start + jnp.arange(size))
    if size == 1:
        state, loss = _one_step(state, static, schedule, data, keys[0], settings)
        return state, loss[None]

    def body(state, key):
        return _one_step(state, static, schedule, data, key, settings)

    return jax.lax.scan(body, state, keys)
