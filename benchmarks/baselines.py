"""Time to an accurate posterior: TDS against NUTS on the MCGdiff paper's Gaussian-mixture problem
(:func:`diffprior.problems.mixture_problem`), and where NUTS gets stuck.

For each cell ``(d, dy)`` and seed (one problem each), both samplers run at increasing effort
until the sliced Wasserstein distance of their draws to exact posterior draws is within
``--target`` times the exact-sample floor (the distance between two exact sets, computed as in
:func:`diffprior.benchmark.gmm_rows`: 2000 draws each, 1000 projections), or until the next
setting would start after ``--max-seconds`` of that sampler's wall time on that problem:

- TDS: ``dp.Sampler(dp.TDS(model), num_particles=2048, num_steps=T)`` for the ``--tds-steps``
  in increasing order; its first 2000 draws are scored.
- NUTS: ``dp.baselines.NUTS(model, num_warmup=500, num_samples=S, num_chains=4)`` for the
  ``--nuts-samples`` (per chain) in increasing order, each a fresh run; all ``4 S`` draws are
  scored. ``nuts`` starts the chains as NumPyro does (uniform in (-2, 2) in unconstrained
  space), ``nuts-prior-init`` at prior draws (``init_to_sample``).

Each draw is assigned to the mixture component of its nearest prior mean (the components are 8
standard deviations apart), which gives each chain's mode occupancy and its total-variation
distance to the exact posterior component weights.

    python benchmarks/baselines.py --cells 8x1 8x2 80x1 80x2 --seeds 2 --max-seconds 120 \\
        --out benchmarks/results/baselines.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
from numpyro.infer import init_to_sample

import diffprior as dp
from diffprior.benchmark import exact_reference, mixture_model
from diffprior.diagnostics import sliced_wasserstein
from diffprior.io import write_text
from diffprior.problems import mixture_problem

NUM_EXACT = 2000  # exact draws, as in diffprior.benchmark.gmm_rows
NUM_CHAINS = 4
NUM_WARMUP = 500
NUTS_INITS = {"nuts": {}, "nuts-prior-init": {"init_strategy": init_to_sample}}


def cell(text: str) -> tuple[int, int]:
    dim, obs_dim = text.lower().split("x")
    return int(dim), int(obs_dim)


def components(draws: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The index of the nearest prior mean of each draw ``(..., d)``."""
    distances = (draws**2).sum(-1)[..., None] - 2 * draws @ means.T + (means**2).sum(-1)
    return np.argmin(distances, axis=-1)


def occupancy(labels: np.ndarray, num_components: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=num_components) / labels.size


def modes_text(weights: np.ndarray, threshold: float = 0.05) -> str:
    """``{component: weight}`` of the components above ``threshold``, largest first."""
    order = np.argsort(weights)[::-1]
    shown = [f"{k}: {weights[k]:.2f}" for k in order if weights[k] > threshold]
    return "{" + ", ".join(shown) + "}"


class Problem:
    """One seed of one cell: the problem, exact draws, the floor and the exact control."""

    def __init__(self, dim: int, obs_dim: int, seed: int):
        self.cell, self.seed = (dim, obs_dim), seed
        self.problem = mixture_problem(jax.random.key(seed), dim, obs_dim)
        posterior = self.problem.posterior
        self.exact, self.key_projections, self.floor = exact_reference(
            self.problem, seed, NUM_EXACT
        )
        self.means = np.asarray(self.problem.prior.means)
        self.weights = np.asarray(posterior.weights)
        control = posterior.sample(jax.random.key(20_000 + seed), (NUM_EXACT,))
        self.control_ratio = self.ratio(control)

    @property
    def args(self):
        return (self.problem.prior, self.problem.A, self.problem.sigma_y)

    def ratio(self, draws) -> float:
        draws = np.asarray(draws)
        if not np.all(np.isfinite(draws)):
            return float("nan")
        return float(sliced_wasserstein(self.key_projections, draws, self.exact)) / self.floor

    def modes(self, draws_by_chain: np.ndarray) -> dict:
        """Mode occupancy of ``(chains, draws, d)``: pooled and per-chain total variation to
        the exact component weights, and each chain's occupied components."""
        labels = components(draws_by_chain, self.means)
        num = len(self.weights)
        pooled = occupancy(labels, num)
        per_chain = [occupancy(chain, num) for chain in labels]
        return {
            "mode_tv": 0.5 * float(np.abs(pooled - self.weights).sum()),
            "chain_tv": [0.5 * float(np.abs(occ - self.weights).sum()) for occ in per_chain],
            "chain_modes": [modes_text(occ) for occ in per_chain],
        }


def run_tds(problem: Problem, samplers: dict, compile_seconds: dict, options) -> list[dict]:
    rows, spent = [], 0.0
    for steps in sorted(options.tds_steps):
        if spent >= options.max_seconds:
            break
        sampler = samplers.get(steps)
        if sampler is None:
            sampler = dp.Sampler(
                dp.TDS(mixture_model), num_particles=2048, num_steps=steps, progress_bar=False
            )
            samplers[steps] = sampler
        key = jax.random.key(problem.seed)
        start = time.perf_counter()
        sampler.run(key, *problem.args, y=problem.problem.y)
        first = time.perf_counter() - start
        start = time.perf_counter()
        sampler.run(key, *problem.args, y=problem.problem.y)
        compiled = time.perf_counter() - start
        # the compile time of this cell's program, measured on the problem that compiled it
        compile_seconds.setdefault(steps, max(first - compiled, 0.0))
        wall = compile_seconds[steps] + compiled
        spent += wall
        draws = np.asarray(sampler.get_samples(group_by_chain=True)["x"])
        ratio = problem.ratio(draws.reshape(-1, draws.shape[-1])[:NUM_EXACT])
        rows.append(
            {
                "method": "tds",
                "setting": f"{steps} steps",
                "seconds": wall,
                "compiled_seconds": compiled,
                "sw_ratio": ratio,
                "r_hat": float("nan"),
                **problem.modes(draws),
            }
        )
        if ratio <= options.target:
            break
    return rows


def run_nuts(problem: Problem, variant: str, options) -> list[dict]:
    rows, spent = [], 0.0
    for num_samples in sorted(options.nuts_samples):
        if spent >= options.max_seconds:
            break
        nuts = dp.baselines.NUTS(
            mixture_model,
            num_warmup=NUM_WARMUP,
            num_samples=num_samples,
            num_chains=NUM_CHAINS,
            progress_bar=False,
            **NUTS_INITS[variant],
        )
        nuts.run(jax.random.key(problem.seed), *problem.args, y=problem.problem.y)
        spent += nuts.seconds
        draws = np.asarray(nuts.get_samples(group_by_chain=True)["x"])
        table = dp.compare({variant: nuts})  # R-hat and ESS, as a user would read them
        rows.append(
            {
                "method": variant,
                "setting": f"{num_samples} x {NUM_CHAINS} draws",
                "seconds": nuts.seconds,
                "compiled_seconds": float("nan"),
                "sw_ratio": problem.ratio(draws.reshape(-1, draws.shape[-1])),
                "r_hat": float(table.loc[variant, "r_hat"]),
                **problem.modes(draws),
            }
        )
        if rows[-1]["sw_ratio"] <= options.target:
            break
    return rows


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def render(problems: list[Problem], rows: list[dict], options, command: str) -> str:
    target = options.target
    lines = [
        "# Baselines: time to an accurate posterior, TDS against NUTS",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"devices {[d.platform for d in jax.devices()]}, float32; shared with other jobs, so "
        "seconds are upper bounds.",
        "",
        "Problem: `diffprior.problems.mixture_problem` (the MCGdiff paper's 25-component "
        "mixture). SW / floor: sliced Wasserstein (1000 projections) to 2000 exact posterior "
        "draws over the distance between two exact sets; `exact` is a third exact set scored "
        "the same way (the noise of the criterion). Target: SW / floor <= "
        f"{target:g}; cap: a sampler stops raising its effort once it has used "
        f"{options.max_seconds:g} s on a problem. TDS: `dp.Sampler(dp.TDS(model), "
        "num_particles=2048, num_steps=T)`, first 2000 draws; seconds = compile time of the "
        "cell's program + a compiled run (the compiled run alone in brackets). NUTS: "
        f"`dp.baselines.NUTS(model, num_warmup={NUM_WARMUP}, num_samples=S, "
        f"num_chains={NUM_CHAINS})`, a fresh run per S (NumPyro compiles every run, so its "
        "seconds include compilation), all draws; `nuts` starts as NumPyro does (uniform in "
        "(-2, 2)), `nuts-prior-init` at prior draws. Mode TV: total variation between the "
        "share of draws nearest each prior mean and the exact posterior component weights "
        "(0: right weights, 1: all mass on components of no posterior weight).",
        "",
        "## Time to reach the target",
        "",
        "| (d, dy) | seed | exact | method | reached at | seconds | SW / floor | mode TV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for problem in problems:
        for method in ["tds", *options.nuts_inits]:
            mine = [
                r
                for r in rows
                if r["cell"] == problem.cell and r["seed"] == problem.seed and r["method"] == method
            ]
            if not mine:
                continue
            hit = next((r for r in mine if r["sw_ratio"] <= target), None)
            best = min(mine, key=lambda r: r["sw_ratio"] if np.isfinite(r["sw_ratio"]) else 1e9)
            total = sum(r["seconds"] for r in mine)
            if hit is not None:
                reached = hit["setting"]
                seconds = fmt(hit["seconds"], 1)
                if np.isfinite(hit["compiled_seconds"]):
                    seconds += f" ({fmt(hit['compiled_seconds'])})"
                shown = hit
            else:
                reached = f"not in {total:.0f} s (best: {best['setting']})"
                seconds = "-"
                shown = best
            lines.append(
                f"| {problem.cell} | {problem.seed} | {fmt(problem.control_ratio)} | {method} "
                f"| {reached} | {seconds} | {fmt(shown['sw_ratio'])} | {fmt(shown['mode_tv'])} |"
            )
    lines += [
        "",
        "## Every run",
        "",
        "| (d, dy) | seed | method | setting | seconds | SW / floor | R-hat (max) | mode TV "
        "| per-chain mode TV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = fmt(r["seconds"], 1)
        if np.isfinite(r["compiled_seconds"]):
            seconds += f" ({fmt(r['compiled_seconds'])})"
        chain_tv = ", ".join(fmt(v) for v in r["chain_tv"])
        lines.append(
            f"| {r['cell']} | {r['seed']} | {r['method']} | {r['setting']} | {seconds} | "
            f"{fmt(r['sw_ratio'])} | {fmt(r['r_hat'], 3)} | {fmt(r['mode_tv'])} | {chain_tv} |"
        )
    lines += [
        "",
        "## Mode occupancy: NUTS chains against the exact posterior weights",
        "",
        "Components holding more than 5% of the exact posterior, or of a chain's draws (the "
        "largest NUTS run of each problem); components are numbered as the prior's means.",
        "",
        "| (d, dy) | seed | exact posterior | method | chain 0 | chain 1 | chain 2 | chain 3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for problem in problems:
        for method in options.nuts_inits:
            mine = [
                r
                for r in rows
                if r["cell"] == problem.cell and r["seed"] == problem.seed and r["method"] == method
            ]
            if mine:
                chains = " | ".join(mine[-1]["chain_modes"])
                lines.append(
                    f"| {problem.cell} | {problem.seed} | {modes_text(problem.weights)} | "
                    f"{method} | {chains} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=cell, nargs="+", default=[(8, 1), (8, 2), (80, 1), (80, 2)])
    parser.add_argument("--seeds", type=int, default=3, help="problems per cell (default: 3)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="per sampler and problem: no new setting starts after this much wall time "
        "(default: 600)",
    )
    parser.add_argument("--target", type=float, default=2.0, help="SW / floor goal (default: 2)")
    parser.add_argument("--tds-steps", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--nuts-samples", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument(
        "--nuts-inits", nargs="+", choices=list(NUTS_INITS), default=list(NUTS_INITS)
    )
    parser.add_argument("--out", default="benchmarks/results/baselines.md")
    options = parser.parse_args(argv)
    command = "python benchmarks/baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)

    problems: list[Problem] = []
    rows: list[dict] = []
    for dim, obs_dim in options.cells:
        samplers: dict = {}  # one compiled TDS program per number of steps, for every seed
        compile_seconds: dict = {}
        for seed in range(options.seeds):
            problem = Problem(dim, obs_dim, seed)
            problems.append(problem)
            found = run_tds(problem, samplers, compile_seconds, options)
            for variant in options.nuts_inits:
                found += run_nuts(problem, variant, options)
            for row in found:
                row.update(cell=problem.cell, seed=seed)
                print(
                    f"{problem.cell} seed {seed} {row['method']} {row['setting']}: "
                    f"{row['seconds']:.1f} s, SW/floor {row['sw_ratio']:.2f}, "
                    f"mode TV {row['mode_tv']:.2f}",
                    flush=True,
                )
            rows += found
            write_text(options.out, render(problems, rows, options, command))
        del samplers
        jax.clear_caches()
    print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
