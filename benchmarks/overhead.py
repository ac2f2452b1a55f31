"""Per-step overhead of TDS: one jit-compiled TDS step against the network's own
value-and-gradient through x0_hat on the same particles, in one process.

    python benchmarks/overhead.py [--dim 64] [--num-particles 512] [--width 512] [--depth 4]

Prints the median times and their ratio (target: <= 1.2).
"""

from __future__ import annotations

import argparse
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import diffprior as dp


class TimeMLP(eqx.Module):
    """An eps-network: an MLP on ``[x, t]``."""

    mlp: eqx.nn.MLP

    def __init__(self, dim, width, depth, key):
        self.mlp = eqx.nn.MLP(dim + 1, dim, width, depth, activation=jax.nn.silu, key=key)

    def __call__(self, x, t):
        return self.mlp(jnp.concatenate([x, jnp.atleast_1d(t)]))


def median_time(fn, *args, repeats=30):
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--num-particles", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    key_net, key_a, key_x, key_y = jax.random.split(jax.random.key(0), 4)
    net = TimeMLP(args.dim, args.width, args.depth, key_net)
    denoiser = dp.Denoiser(net, dp.schedules.VP.linear(), "eps")
    obs_dim = args.dim // 2
    A = jax.random.normal(key_a, (obs_dim, args.dim)) / np.sqrt(args.dim)
    y = jax.random.normal(key_y, (obs_dim,))

    def log_likelihood(x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(y, A @ x, 0.1))

    times = dp.diffusion.timesteps(denoiser.schedule, 100)
    tds = dp.kernels.tds.as_top_level_api(denoiser, log_likelihood, times, ess_threshold=0.5)
    particles = jax.random.normal(key_x, (args.num_particles, args.dim))
    state = tds.init(particles)
    t = times[10]

    @jax.jit
    def network_value_and_grad(x):
        def one(x):
            return log_likelihood(denoiser.x0(x, t))

        return jax.vmap(jax.value_and_grad(one))(x)

    step = jax.jit(tds.step)
    # the step reads the time from the state: place it mid-way, as in a real run
    state = state._replace(step=jnp.asarray(10, jnp.int32))
    key = jax.random.key(1)
    reference = median_time(network_value_and_grad, particles, repeats=args.repeats)
    tds_step = median_time(step, key, state, repeats=args.repeats)
    print(
        f"machine: {platform.machine()} {platform.processor()} | jax {jax.__version__} "
        f"| devices {jax.devices()}"
    )
    print(f"MLP d={args.dim} width={args.width} depth={args.depth}, {args.num_particles} particles")
    print(f"network value_and_grad through x0_hat: {reference * 1e3:.2f} ms (median)")
    print(f"one TDS step:                          {tds_step * 1e3:.2f} ms (median)")
    print(f"ratio: {tds_step / reference:.3f}")


if __name__ == "__main__":
    main()
