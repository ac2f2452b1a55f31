"""Fixed costs of a TDS step: one jit-compiled step of TDS with the guided proposal on the
d = 800 Gaussian-mixture problem of ``diffprior benchmark gmm`` (cell 800x4), 4 chains x 512
particles vmapped over chains as the Sampler runs them, against the work no implementation can
skip, timed in the same process: the denoiser's value-and-gradient through x0_hat of the twist
at the same particles, plus one (chains * particles, d) normal draw.

    python benchmarks/step_cost.py [--dim 800] [--obs-dim 4] [--chains 4] [--particles 512]
        [--steps 100] [--repeats 30] [--pieces] [--clock wall|cpu] [--label after]
        [--note TEXT] [--out benchmarks/results/step_cost.md] [--append]

Prints the median times and their ratio (target: <= 1.2). ``--pieces`` also times the parts of
the step (resampling decision and gather, proposal, weight) on their own. ``--out`` writes the
command, the machine and the table as markdown (``--append`` adds a section to the file).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

import diffprior as dp
from diffprior.benchmark import mixture_model
from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.infer.twists import likelihood_twist
from diffprior.kernels import smc
from diffprior.model import read_model
from diffprior.problems import mixture_problem


def interleaved_medians(calls, repeats, clock=time.perf_counter):
    """Median seconds of each ``(fn, *args)`` in ``calls``, compiled and warmed up first, then
    timed in turn within each repeat, so that a slow spell of a shared machine falls on all of
    them alike. ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (the CPU
    seconds of this process, steadier on a busy machine when XLA runs on one thread)."""
    for fn, *fn_args in calls:
        jax.block_until_ready(fn(*fn_args))
        jax.block_until_ready(fn(*fn_args))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for index, (fn, *fn_args) in enumerate(calls):
            start = clock()
            jax.block_until_ready(fn(*fn_args))
            times[index].append(clock() - start)
    return [float(np.median(seconds)) for seconds in times]


def machine_line() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.platform()}, {os.cpu_count()} cores, {device.platform} "
        f"({device.device_kind}), jax {jax.__version__}"
    )


def build(problem_args, y, num_steps):
    """The TDS algorithm, its twist and time grid, built from the model as the Sampler does
    (inside the traced function: the problem enters as data)."""
    method = dp.TDS(mixture_model, proposal="guided")
    obs = read_model(mixture_model, problem_args, {"y": y}).in_latent_space()
    method.check(obs)
    times = make_timesteps(obs.prior.schedule, num_steps, method.spacing)
    return method.build(obs.prior, obs, times), obs, method, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=800)
    parser.add_argument("--obs-dim", type=int, default=4)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--particles", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pieces", action="store_true", help="also time the parts of the step")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall seconds, or CPU seconds of the process (steadier on a busy machine; run "
        "XLA on one thread, XLA_FLAGS=--xla_cpu_multi_thread_eigen=false)",
    )
    parser.add_argument("--label", default="", help="a name for this run's section")
    parser.add_argument("--note", default="", help="a line of text under the section's title")
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)

    problem = mixture_problem(jax.random.key(0), args.dim, args.obs_dim)
    data = ((problem.prior, problem.A, problem.sigma_y), problem.y)
    shape = (args.chains, args.particles)
    mid = args.steps // 2

    @jax.jit
    def init(key, data):
        algorithm, obs, _, _ = build(*data, args.steps)
        x = obs.prior.sample_reference(key, shape)
        return jax.vmap(algorithm.init)(x)

    @jax.jit
    def step(key, states, data):
        algorithm = build(*data, args.steps)[0]
        return jax.vmap(algorithm.step)(jax.random.split(key, args.chains), states)

    @jax.jit
    def unavoidable(key, x, data):
        _, obs, method, times = build(*data, args.steps)
        twist = likelihood_twist(obs.prior, obs, method.options["variance_inflation"])
        denoiser, t = obs.prior.denoiser, times[mid]

        def one(x):
            x0_hat = denoiser.x0(x, t)
            return twist(x0_hat, t), x0_hat

        value_and_grad = jax.vmap(jax.vmap(jax.value_and_grad(one, has_aux=True)))(x)
        noise = jax.random.normal(key, (args.chains * args.particles, args.dim))
        return value_and_grad, noise

    keys = jax.random.split(jax.random.key(1), mid + 3)
    states = init(keys[0], data)
    # run to mid-way, so the step reads a real state at a middle time
    for key in keys[1 : mid + 1]:
        states, _ = step(key, states, data)
    step_key, draw_key = keys[mid + 1], keys[mid + 2]
    jax.block_until_ready(states)

    calls = [(step, step_key, states, data), (unavoidable, draw_key, states.particles, data)]
    names = ["TDS step (a)", "unavoidable work (b)"]
    if args.pieces:
        more_names, more_calls = pieces(args, data, states, step_key, mid)
        names, calls = names + more_names, calls + more_calls
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    medians = interleaved_medians(calls, args.repeats, clock)
    rows = list(zip(names, medians, strict=True))
    t_step, t_work = medians[:2]
    ratio = t_step / t_work
    flags = os.environ.get("XLA_FLAGS")
    command = (
        (f"XLA_FLAGS={shlex.quote(flags)} " if flags else "")
        + "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    )
    label = f" ({args.label})" if args.label else ""
    lines = [
        f"## {args.chains} chains x {args.particles} particles, d = {args.dim}{label}",
        "",
        *([args.note, ""] if args.note else []),
        f"`{command}`",
        "",
        f"Machine: {machine_line()}",
        "",
        f"| what | median ms ({args.clock} clock) |",
        "|---|---|",
        *(f"| {name} | {1e3 * seconds:.1f} |" for name, seconds in rows),
        f"| ratio a / b (target <= 1.2) | {ratio:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if args.append and path.exists() else "w"
        with path.open(mode) as handle:
            if mode == "w":
                handle.write(
                    "# TDS step against its unavoidable work\n\nWritten by "
                    "`benchmarks/step_cost.py`.\n\n"
                )
            handle.write(text + "\n")


def pieces(args, data, states, key, mid):
    """The step's parts on the same particles, each jit-compiled and vmapped over chains."""
    from diffprior.kernels.guidance import potential_and_grad

    ess_threshold = 0.5

    @jax.jit
    def resample(key, states):
        def one(key, state):
            decision = smc.maybe_resample(key, state.log_weights, ess_threshold)
            carried = (state.particles, state.reward, state.grad, state.x0_hat)
            return jax.lax.cond(
                decision.resampled,
                lambda: smc.gather(carried, decision.ancestors),
                lambda: carried,
            )

        return jax.vmap(one)(jax.random.split(key, args.chains), states)

    @jax.jit
    def weight(states, data):
        _, obs, method, times = build(*data, args.steps)
        twist = likelihood_twist(obs.prior, obs, method.options["variance_inflation"])
        evaluate = jax.vmap(potential_and_grad, in_axes=(None, None, 0, None))
        return jax.vmap(lambda x: evaluate(obs.prior.denoiser, twist, x, times[mid + 1]))(
            states.particles
        )

    @jax.jit
    def draw(key):
        return jax.random.normal(key, (args.chains * args.particles, args.dim))

    names = [
        "part: resampling decision + gather",
        "part: weight (value-and-grad at the proposals)",
        "part: one (N, d) normal draw",
    ]
    return names, [(resample, key, states), (weight, states, data), (draw, key)]


if __name__ == "__main__":
    main()
