"""The shipped digits network's derivatives inside a loop, where samplers take them: forward
pass, value-and-gradient (DPS, PiGDM, guided TDS and FK) and Jacobian-vector product, each
over ``--particles`` images per step of a jit-compiled ``lax.scan``, and one DPS run on a
held-out digit.

    python benchmarks/unet_gradient.py [--particles 256] [--steps 10] [--repeats 7]
        [--label NAME] [--out benchmarks/results/unet_gradient.md] [--append]

Prints milliseconds per step (medians over interleaved repeats, compiled and warmed up first)
and the ratio of each derivative to the forward pass; ``--out`` writes them as a markdown
section. Only public API, so the same script times an older version of the package for an A/B.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import diffprior as dp
from diffprior import operators, pretrained
from diffprior.io import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import interleaved_medians, machine_line  # noqa: E402  (benchmarks/ is not a package)


def loops(denoiser, steps):
    times = jnp.linspace(0.9, 0.1, steps)

    def scanned(update):
        def run(x):
            def body(x, t):
                return x - 1e-3 * update(x, t), None

            return jax.lax.scan(body, x, times)[0]

        return jax.jit(run)

    def forward(x, t):
        return jax.vmap(lambda z: denoiser.x0(z, t))(x)

    def gradient(x, t):
        return jax.vmap(jax.grad(lambda z: jnp.sum(denoiser.x0(z, t) ** 2)))(x)

    def jvp(x, t):
        return jax.vmap(lambda z: jax.jvp(lambda u: denoiser.x0(u, t), (z,), (z,))[1])(x)

    return {
        "forward pass": scanned(forward),
        "value-and-gradient": scanned(gradient),
        "Jacobian-vector product": scanned(jvp),
    }


def dps_seconds(particles, repeats):
    prior = pretrained.load("digits")
    _, test = pretrained.load_digits_split()
    mask = operators.Inpaint(operators.half_mask((8, 8), side="left"))

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(mask(x), 0.1).to_event(1), obs=y)

    sampler = dp.Sampler(dp.DPS(model), particles, 100, progress_bar=False)
    y = mask(test[0])
    sampler.run(jax.random.key(1), y=y)  # compile
    seconds = []
    for repeat in range(repeats):
        start = time.perf_counter()
        sampler.run(jax.random.key(repeat), y=y)
        jax.block_until_ready(sampler.get_samples()["x"])
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dps-repeats", type=int, default=3)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)

    denoiser = pretrained.load("digits").denoiser
    x = jax.random.normal(jax.random.key(0), (args.particles, 8, 8))
    fns = loops(denoiser, args.steps)
    medians = interleaved_medians([(fn, x) for fn in fns.values()], args.repeats)
    per_step = {name: 1e3 * s / args.steps for name, s in zip(fns, medians, strict=True)}
    dps = dps_seconds(args.particles, args.dps_repeats)

    base = per_step["forward pass"]
    lines = [
        f"## {args.label}",
        "",
        f"`python benchmarks/unet_gradient.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine_line()}; {args.particles} images per step, {args.steps} steps "
        "per compiled scan.",
        "",
        "| what | ms per step (median) | / forward pass |",
        "|---|---|---|",
        *(f"| {name} | {ms:.1f} | {ms / base:.2f} |" for name, ms in per_step.items()),
        f"| DPS, one digit, {args.particles} particles x 100 steps (s) | {dps:.2f} | |",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        previous = args.out.read_text() if args.append and args.out.exists() else ""
        header = "" if previous else "# The digits network's derivatives in a loop\n\n"
        write_text(args.out, previous + header + text)


if __name__ == "__main__":
    main()
