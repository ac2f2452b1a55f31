"""Image-scale dimensions: the SVD-based samplers (MCGdiff, PiGDM, DiffPIR) and TDS on colour
images up to d = 3 x 128 x 128 = 49152, with blur, inpainting and 2x downsampling.

The prior is a Gaussian mixture of three isotropic components (its denoiser is exact and
cheap, so the numbers show what the samplers themselves cost). The operators are
``dp.operators`` operators, so ``ObservationModel.linear_gaussian()`` uses their structured
SVDs (an FFT for the blur, a permutation for inpainting, block bases for downsampling) and no
d x d array exists. Each (size, operator, method) runs in its own process so that its peak
resident memory (``ru_maxrss``) is its own; seconds per step are those of a second, compiled
run. MCGdiff's log-evidence is compared with the closed form.

Usage::

    python benchmarks/image_scale.py --out benchmarks/results/image_scale.md
    python benchmarks/image_scale.py --sizes 32 --particles 8 --steps 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

SIZES = (32, 64, 128)
OPERATORS = ("blur", "inpaint", "downsample")
METHODS = ("MCGdiff", "PiGDM", "DiffPIR", "TDS")
SIGMA_Y = 0.1


def _problem(size: int, operator: str):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    import diffprior as dp

    shape = (3, size, size)
    dim = math.prod(shape)
    key_means, key_x, key_noise = jax.random.split(jax.random.key(size), 3)
    # modes a few prior scales apart (well separated in every coordinate, they would make the
    # benchmark a test of mode finding among thousands of observations, not of cost)
    means = 3.0 * jax.random.normal(key_means, (3, dim)) / math.sqrt(dim)
    prior = dp.GaussianMixture(means, jnp.array([0.2, 0.3, 0.5]), scale=0.5)
    if operator == "blur":
        A = dp.operators.Blur(dp.operators.gaussian_kernel(5, 1.5), shape, boundary="circular")
    elif operator == "inpaint":
        A = dp.operators.Inpaint(dp.operators.half_mask(shape, side="left"))
    else:
        A = dp.operators.Downsample(2, shape)

    def model(y=None):
        x = numpyro.sample("x", prior)
        mean = A(x.reshape(shape)).reshape(-1)
        numpyro.sample("y", dist.Normal(mean, SIGMA_Y).to_event(1), obs=y)

    x_true = prior.sample(key_x)
    y = A(x_true.reshape(shape)).reshape(-1)
    y = y + SIGMA_Y * jax.random.normal(key_noise, y.shape)
    return prior, A, model, y


def run_one(size: int, operator: str, method: str, particles: int, steps: int) -> dict:
    """One cell, in this process: seconds per step of the second run, peak memory."""
    import jax

    import diffprior as dp

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prior, A, model, y = _problem(size, operator)
    sampler = dp.Sampler(getattr(dp, method)(model), particles, steps, progress_bar=False)
    sampler.run(jax.random.key(0), y=y)  # compiles
    start = time.perf_counter()
    sampler.run(jax.random.key(1), y=y)
    jax.block_until_ready(sampler.get_samples())
    seconds = time.perf_counter() - start
    row = {
        "d": math.prod((3, size, size)),
        "dy": A.out_dim,
        "seconds_per_step": seconds / steps,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "start_mb": before / 1024,
        "compilations": sampler.num_compilations,
        "evidence_error": None,
    }
    if method == "MCGdiff":
        exact = float(prior.log_evidence(A, SIGMA_Y, y.reshape(A.out_shape)))
        row["evidence_error"] = float(sampler.log_evidence.mean()) - exact
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=3, metavar=("SIZE", "OPERATOR", "METHOD"))
    args = parser.parse_args(argv)
    if args.one:
        size, operator, method = args.one
        print(json.dumps(run_one(int(size), operator, method, args.particles, args.steps)))
        return

    import jax

    rows = []
    for size in args.sizes:
        for operator in args.operators:
            for method in args.methods:
                command = [sys.executable, __file__, "--one", str(size), operator, method]
                command += ["--particles", str(args.particles), "--steps", str(args.steps)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    error = (done.stderr.strip().splitlines() or ["failed"])[-1]
                    row = {"error": error}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(size=size, operator=operator, method=method)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    _write(args, rows, jax)


def _write(args, rows, jax) -> None:
    given = list(sys.argv[1:])
    if "--out" in given:
        del given[given.index("--out") : given.index("--out") + 2]
    command = " ".join(["python benchmarks/image_scale.py", *given])
    lines = [
        "# Image-scale dimensions",
        "",
        "SVD-based samplers and TDS on colour images, a three-component isotropic Gaussian-mixture "
        "prior, y = A x + N(0, 0.1^2), A a `dp.operators` operator used through its structured SVD "
        "(`ObservationModel.linear_gaussian()`). One process per row: peak memory is the process's "
        "peak resident set (`ru_maxrss`; the Python process with JAX imported starts at the "
        "'start' column), seconds per step those of a second, compiled run. MCGdiff's "
        "log-evidence error is against the closed form.",
        "",
        f"Command: `{command} --out {args.out}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"devices {[d.platform for d in jax.devices()]}, float32; {args.particles} particles, "
        f"{args.steps} steps, one chain.",
        "",
        "| d | operator | dy | method | seconds / step | peak MB | start MB | "
        "MCGdiff log Z error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = 3 * row["size"] ** 2
        if "error" in row:
            lines.append(
                f"| {d} | {row['operator']} | | {row['method']} | failed: {row['error']} | | | |"
            )
            continue
        error = row["evidence_error"]
        lines.append(
            f"| {d} | {row['operator']} | {row['dy']} | {row['method']} | "
            f"{row['seconds_per_step']:.4f} | {row['peak_mb']:.0f} | {row['start_mb']:.0f} | "
            f"{'' if error is None else f'{error:+.2f}'} |"
        )
    text = "\n".join(lines) + "\n"
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
