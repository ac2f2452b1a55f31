"""Where an SMC method's error on the Gaussian-mixture problem comes from: the mixture weights.

For each problem of ``diffprior.problems.mixture_problem`` the posterior components are far
apart, so each draw belongs to the component whose posterior mean is nearest. The script
reports, per method and cell (means over the problems): the total variation between the draws'
component shares and the exact posterior weights (with the same figure for an exact sample
set, the floor), the number of resampling events per run and the median of the run's smallest
ESS. The problems, keys and exact sets are those of ``diffprior benchmark gmm``, so the
sliced-Wasserstein column matches its table.

    python benchmarks/gmm_mode_weights.py --methods mcgdiff mcgdiff-gaussian tds --cells 8x1 80x1 80x2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import diffprior as dp
from diffprior.benchmark import METHODS, exact_reference, mixture_model
from diffprior.diagnostics import sliced_wasserstein
from diffprior.problems import mixture_problem


def component_shares(x: jax.Array, means: jax.Array) -> jax.Array:
    """Fraction of the draws ``(n, d)`` nearest to each component mean ``(m, d)``."""
    distances = jnp.sum((x[:, None, :] - means[None]) ** 2, axis=-1)
    return jnp.bincount(jnp.argmin(distances, axis=1), length=means.shape[0]) / x.shape[0]


def total_variation(x: jax.Array, posterior) -> float:
    shares = component_shares(x, posterior.means)
    return 0.5 * float(jnp.sum(jnp.abs(shares - posterior.weights)))


def cell_summary(method: str, cell, seeds: int, particles: int, steps: int, samples: int):
    sampler = dp.Sampler(METHODS[method](mixture_model), particles, steps, progress_bar=False)
    rows = []
    for seed in range(seeds):
        problem = mixture_problem(jax.random.key(seed), *cell)
        post = problem.posterior
        exact, key_p, floor = exact_reference(problem, seed, samples)
        sampler.run(jax.random.key(seed), problem.prior, problem.A, problem.sigma_y, y=problem.y)
        x = sampler.get_samples()["x"][:samples]
        stats = sampler.to_arviz()["sample_stats"]
        rows.append(
            (
                float(sliced_wasserstein(key_p, x, exact)) / floor,
                total_variation(x, post),
                total_variation(exact, post),
                int(stats["resampled"].sum()),
                float(stats["ess"].min()),
            )
        )
    table = np.array(rows)
    return {
        "sw_median": float(np.median(table[:, 0])),
        "tv": float(table[:, 1].mean()),
        "tv_exact": float(table[:, 2].mean()),
        "resamplings": float(table[:, 3].mean()),
        "min_ess": float(np.median(table[:, 4])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smc = [name for name, make in METHODS.items() if make is not None]
    parser.add_argument("--methods", nargs="+", default=["mcgdiff", "tds"], choices=smc)
    parser.add_argument("--cells", nargs="+", default=["8x1", "80x1", "80x2"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--particles", type=int, default=2048)
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=2000)
    args = parser.parse_args()
    cells = [tuple(int(v) for v in cell.split("x")) for cell in args.cells]
    print(
        "| method | (d, dy) | SW / floor (median) | component TV | exact TV | resamplings | min ESS |"
    )
    print("|---|---|---|---|---|---|---|")
    for cell in cells:
        for method in args.methods:
            s = cell_summary(
                method, cell, args.seeds, args.particles, args.num_steps, args.num_samples
            )
            print(
                f"| {method} | {cell} | {s['sw_median']:.2f} | {s['tv']:.4f} | "
                f"{s['tv_exact']:.4f} | {s['resamplings']:.1f} | {s['min_ess']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
