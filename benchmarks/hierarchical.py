"""Hierarchical models against exact answers: a scalar theta sampled with x by particle Gibbs
and PMMH, side by side with NUTS on theta alone using the exact mixture evidence, all in one
process.

    python benchmarks/hierarchical.py [--dims 8 80] [--num-warmup 300] [--num-samples 500]
        [--num-chains 4] [--num-particles 64] [--num-steps 30] [--problems noise gain]
        [--samplers ParticleGibbs PMMH NUTS] [--marginal-moves 0 1]
        [--out benchmarks/results/hierarchical.md]

Problems (prior: four Gaussian components on a 2-d grid embedded in d dimensions; A a
16 x d Gaussian matrix; y from a prior draw):

- (a) unknown noise, y = A x + sigma eps, sigma ~ HalfNormal(1), true sigma 0.5;
- (b) unknown gain, y = g A x + 0.5 eps, g ~ LogNormal(0, 0.5), true g 1.

p(y | theta) is exact (``GaussianMixture.log_evidence``), so p(theta | y) is exact by
quadrature on a grid. Per sampler: theta's Kolmogorov distance to the quadrature CDF (and the
same times sqrt(ESS), about 0.9 on average and below 1.6 in 99% of runs for a sampler that is
right), ESS of theta, split R-hat, the largest error of E[x | y] over coordinates in Monte Carlo
standard errors, and effective samples of theta per second of the second run (the first
compiles; the table gives both wall times). NUTS on theta uses ``numpyro.factor`` with the exact
log-evidence: the answer when the evidence is known, which it is not for a trained network.
Particle Gibbs runs once per value of ``--marginal-moves`` (its marginal moves of theta and x
together per iteration, 0 for none), with the mean acceptance rate of those moves.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import diffprior as dp

OBS_DIM = 16


def grid_mixture(dim: int) -> dp.GaussianMixture:
    means = np.zeros((4, dim), np.float32)
    means[:, 0] = [-2.0, 2.0, -2.0, 2.0]
    means[:, 1] = [-2.0, -2.0, 2.0, 2.0]
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    scales = np.array([0.5, 0.7, 0.6, 0.8], np.float32)
    return dp.GaussianMixture(means, weights, scales)


def make_problem(kind: str, dim: int, seed: int = 0) -> dict:
    prior = grid_mixture(dim)
    key_a, key_x, key_e = jax.random.split(jax.random.key(seed), 3)
    A = 2.0 * jax.random.normal(key_a, (OBS_DIM, dim)) / np.sqrt(dim)
    y = A @ prior.sample(key_x) + 0.5 * jax.random.normal(key_e, (OBS_DIM,))
    if kind == "noise":
        name, theta_prior, grid = "sigma", dist.HalfNormal(1.0), jnp.linspace(1e-3, 3.0, 3000)

        def operator_and_noise(theta):
            return A, theta
    else:
        name, theta_prior, grid = "gain", dist.LogNormal(0.0, 0.5), jnp.linspace(1e-3, 5.0, 3000)

        def operator_and_noise(theta):
            return theta * A, 0.5

    def model(A, y=None):
        theta = numpyro.sample(name, theta_prior)
        x = numpyro.sample("x", prior)
        operator, noise = operator_and_noise(theta)
        numpyro.sample("y", dist.Normal(operator @ x, noise).to_event(1), obs=y)

    def log_evidence(theta):
        if kind == "gain":
            # y = g A x + s eps is y / g = A x + (s / g) eps: the SVD stays the one of A (its
            # derivative with respect to a full-matrix SVD is not available to NUTS)
            return prior.log_evidence(A, 0.5 / theta, y / theta) - OBS_DIM * jnp.log(theta)
        return prior.log_evidence(A, theta, y)

    def exact_model(A, y=None):
        theta = numpyro.sample(name, theta_prior)
        numpyro.factor("evidence", log_evidence(theta))

    def log_joint(theta):
        return log_evidence(theta) + theta_prior.log_prob(theta)

    def moments(theta):
        operator, noise = operator_and_noise(theta)
        post = prior.posterior(operator, noise, y)
        return post.mean, jnp.diag(post.covariance) + post.mean**2

    log_post = np.asarray(jax.vmap(log_joint)(grid), np.float64)
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    means, second = (np.asarray(m, np.float64) for m in jax.vmap(moments)(grid))
    x_mean = weights @ means
    return {
        "name": name,
        "model": model,
        "exact_model": exact_model,
        "A": A,
        "y": y,
        "grid": np.asarray(grid),
        "cdf": np.cumsum(weights),
        "theta_mean": float(weights @ np.asarray(grid)),
        "x_mean": x_mean,
        "x_var": weights @ second - x_mean**2,
    }


def kolmogorov_distance(draws: np.ndarray, grid: np.ndarray, cdf: np.ndarray) -> float:
    draws = np.sort(np.ravel(draws))
    n = draws.size
    at_draws = np.interp(draws, grid, cdf)
    return float(
        max(np.max(np.arange(1, n + 1) / n - at_draws), np.max(at_draws - np.arange(n) / n))
    )


def timed_mcmc(kernel, args, *model_args, **model_kwargs):
    """NumPyro's MCMC of ``kernel`` with the script's sizes, run twice (seeds 1 and 2, the first
    compiling): ``(mcmc, [first seconds, second seconds])``, the second run's draws kept."""
    mcmc = numpyro.infer.MCMC(
        kernel,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    times = []
    for seed in (1, 2):
        start = time.perf_counter()
        mcmc.run(jax.random.key(seed), *model_args, **model_kwargs)
        jax.block_until_ready(mcmc.get_samples())
        times.append(time.perf_counter() - start)
    return mcmc, times


def run(kernel, problem: dict, args) -> dict:
    extra_fields = ("marginal_accept_prob",) if isinstance(kernel, dp.ParticleGibbs) else ()
    mcmc, times = timed_mcmc(kernel, args, problem["A"], y=problem["y"], extra_fields=extra_fields)
    samples = mcmc.get_samples(group_by_chain=True)
    theta = np.asarray(samples[problem["name"]])
    ess = float(effective_sample_size(theta))
    distance = kolmogorov_distance(theta, problem["grid"], problem["cdf"])
    row = {
        "ks": distance,
        "ks_scaled": distance * np.sqrt(ess),
        "ess": ess,
        "rhat": float(split_gelman_rubin(theta)),
        "theta_mean": float(theta.mean()),
        "first_s": times[0],
        "second_s": times[1],
        "ess_per_s": ess / times[1],
        "x_error": float("nan"),
        "accept": float("nan"),
    }
    if extra_fields:
        row["accept"] = float(np.mean(mcmc.get_extra_fields()["marginal_accept_prob"]))
    if "x" in samples:
        x = np.asarray(samples["x"])
        ess_x = np.asarray(effective_sample_size(x))
        errors = (x.mean(axis=(0, 1)) - problem["x_mean"]) / np.sqrt(problem["x_var"] / ess_x)
        row["x_error"] = float(np.max(np.abs(errors)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 80])
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=30)
    parser.add_argument("--problems", nargs="+", default=["noise", "gain"])
    parser.add_argument(
        "--samplers", nargs="+", default=["ParticleGibbs", "PMMH", "NUTS"], help="which to run"
    )
    parser.add_argument(
        "--marginal-moves",
        type=int,
        nargs="+",
        default=[0, 1],
        help="ParticleGibbs's marginal_moves: one row per value",
    )
    parser.add_argument("--out", default="benchmarks/results/hierarchical.md")
    args = parser.parse_args()

    def particle_gibbs(moves):
        return lambda model: dp.ParticleGibbs(
            model,
            num_particles=args.num_particles,
            num_steps=args.num_steps,
            marginal_moves=moves,
        )

    samplers = {
        **{
            f"ParticleGibbs, marginal_moves={moves}": particle_gibbs(moves)
            for moves in args.marginal_moves
        },
        "PMMH (TDS)": lambda model: dp.PMMH(
            model, "tds", num_particles=args.num_particles, num_steps=args.num_steps
        ),
        "NUTS, exact evidence": None,
    }
    lines = [
        "# Hierarchical models: a scalar theta against its exact posterior",
        "",
        "Written by `python benchmarks/hierarchical.py "
        + " ".join(
            [f"--dims {' '.join(map(str, args.dims))}"]
            + [f"--num-warmup {args.num_warmup}", f"--num-samples {args.num_samples}"]
            + [f"--num-chains {args.num_chains}", f"--num-particles {args.num_particles}"]
            + [f"--num-steps {args.num_steps}"]
            + [f"--problems {' '.join(args.problems)}", f"--samplers {' '.join(args.samplers)}"]
            + [f"--marginal-moves {' '.join(map(str, args.marginal_moves))}"]
        )
        + f"` on {platform.machine()} CPU ({jax.default_backend()}), JAX {jax.__version__}.",
        "",
        f"{args.num_chains} chains x {args.num_samples} draws after {args.num_warmup} warmup; "
        f"{OBS_DIM} observations; {args.num_particles} particles and {args.num_steps} steps per "
        "SMC run or sweep. `sqrt(ESS) D`: Kolmogorov distance to the quadrature CDF scaled by "
        "the effective sample size (a right sampler gives about 0.9, and below 1.6 in 99% of "
        "runs). `E[x] err`: the largest error of the posterior mean of x over coordinates, in "
        "Monte Carlo standard errors. `ESS/s`: effective draws of theta per second of the "
        "second run (the first compiles). `marginal acc.`: mean acceptance rate of particle "
        "Gibbs's marginal moves.",
        "",
        "| d | theta | sampler | KS D | sqrt(ESS) D | ESS | R-hat | E[x] err (SE) "
        "| 1st run s | 2nd run s | ESS/s | marginal acc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dim in args.dims:
        for kind in args.problems:
            problem = make_problem(kind, dim)
            for label, build in samplers.items():
                if label.split(" ")[0].rstrip(",") not in args.samplers:
                    continue
                kernel = (
                    numpyro.infer.NUTS(problem["exact_model"])
                    if build is None
                    else build(problem["model"])
                )
                row = run(kernel, problem, args)
                line = (
                    f"| {dim} | {problem['name']} | {label} | {row['ks']:.3f} | "
                    f"{row['ks_scaled']:.2f} | {row['ess']:.0f} | {row['rhat']:.3f} | "
                    f"{row['x_error']:.1f} | {row['first_s']:.0f} | {row['second_s']:.0f} | "
                    f"{row['ess_per_s']:.1f} | {row['accept']:.2f} |"
                )
                print(
                    f"{line}  theta mean {row['theta_mean']:.3f} (exact {problem['theta_mean']:.3f})",
                    flush=True,
                )
                lines.append(line)
                # rewritten after every row, so a long run leaves what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
