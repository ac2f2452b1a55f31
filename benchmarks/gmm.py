"""The Gaussian-mixture benchmark (the MCGdiff paper's problem, `diffprior.problems`):
sliced Wasserstein to exact posterior samples relative to the exact-sample floor, log-evidence
error and seconds, per (d, dy) cell and method.

    python benchmarks/gmm.py --methods tds dps --cells 8x1 8x2 80x1 80x2 800x4 --seeds 3 \
        --out benchmarks/results/tds.md

Each run uses 2048 particles in total (TDS: 4 chains x 512) and 100 steps unless told
otherwise. Seconds are wall time of a second, already compiled run (the first compiles).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np

import diffprior as dp
from diffprior.diagnostics import sliced_wasserstein

METHODS = {
    "tds": lambda model: dp.TDS(model),
    "tds-every-step": lambda model: dp.TDS(model, ess_threshold=1.0),
    "dps": lambda model: dp.DPS(model),
    "unguided": lambda model: dp.Unguided(model),
}
CHAINS = {"tds": 4, "tds-every-step": 4}


def run_cell(method_name, dim, obs_dim, seed, num_steps, total_particles, num_samples):
    problem = dp.problems.mixture_problem(jax.random.key(seed), dim, obs_dim)
    num_chains = CHAINS.get(method_name, 1)
    sampler = dp.Sampler(
        METHODS[method_name](problem.model),
        num_particles=total_particles // num_chains,
        num_steps=num_steps,
        num_chains=num_chains,
        progress_bar=False,
    )
    args, kwargs = problem.model_args, problem.model_kwargs
    sampler.run(jax.random.key(1000 + seed), *args, **kwargs)  # compile
    start = time.perf_counter()
    sampler.run(jax.random.key(seed), *args, **kwargs)
    seconds = time.perf_counter() - start
    post = problem.posterior
    key_a, key_b, key_p = jax.random.split(jax.random.key(10_000 + seed), 3)
    exact = post.sample(key_a, (num_samples,))
    floor = float(sliced_wasserstein(key_p, exact, post.sample(key_b, (num_samples,))))
    samples = sampler.get_samples()["x"][:num_samples]
    finite = bool(np.all(np.isfinite(np.asarray(samples))))
    distance = float(sliced_wasserstein(key_p, samples, exact)) if finite else float("nan")
    if sampler.log_evidence is not None:
        evidence_error = float(np.median(np.asarray(sampler.log_evidence)) - problem.log_evidence)
    else:
        evidence_error = float("nan")
    return distance / floor, evidence_error, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tds"], choices=sorted(METHODS))
    parser.add_argument("--cells", nargs="+", default=["8x1", "8x2", "80x1", "80x2", "800x4"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--particles", type=int, default=2048)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--out", default=None, help="markdown file to write (atomically)")
    args = parser.parse_args(argv)

    lines = [
        "| method | (d, dy) | SW / floor, median [min, max] | log-evidence error, median "
        "[min, max] | seconds, median |",
        "|---|---|---|---|---|",
    ]
    for method in args.methods:
        for cell in args.cells:
            dim, obs_dim = (int(v) for v in cell.split("x"))
            rows = np.array(
                [
                    run_cell(
                        method, dim, obs_dim, seed, args.num_steps, args.particles, args.num_samples
                    )
                    for seed in range(args.seeds)
                ]
            )
            ratio, error, seconds = rows.T

            def fmt(values):
                return f"{np.median(values):.2f} [{np.min(values):.2f}, {np.max(values):.2f}]"

            lines.append(
                f"| {method} | ({dim}, {obs_dim}) | {fmt(ratio)} | {fmt(error)} | "
                f"{np.median(seconds):.2f} |"
            )
            print(lines[-1], flush=True)
    header = [
        "# Gaussian-mixture benchmark",
        "",
        f"Command: `python benchmarks/gmm.py {' '.join(argv or [])}`".replace("  ", " "),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"devices {[d.platform for d in jax.devices()]}, float32.",
        f"{args.seeds} problems per cell (seeds 0..{args.seeds - 1}), {args.num_steps} steps, "
        f"{args.particles} particles in total, SW with 1000 projections on {args.num_samples} "
        "samples; floor = SW between two exact sample sets.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.out:
        directory = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.chmod(f.name, 0o644)
        os.replace(f.name, args.out)
    else:
        print(text)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
