"""PMMH with and without covariance adaptation on two correlated hyperparameters, against the
exact posterior and NUTS on the exact evidence, in one process.

    python benchmarks/pmmh_adaptation.py [--dim 8] [--num-warmup 300] [--num-samples 500]
        [--num-chains 4] [--num-particles 128] [--num-steps 30]
        [--out benchmarks/results/pmmh_adaptation.md]

Problem: the four-component mixture of ``benchmarks/hierarchical.py`` in ``--dim``
dimensions, 16 observations ``y = A x + B theta + 0.5 eps`` with ``theta = (a, b)``, each
N(0, 3^2), and ``B``'s two columns nearly parallel, so that a and b are strongly correlated
given y. ``p(y | theta)`` is exact (``GaussianMixture.log_evidence`` of ``y - B theta``), so
the posterior of theta is exact by quadrature on a 2-d grid. Per sampler: ESS and split R-hat
of the worse of a and b, the error of the posterior means in Monte Carlo standard errors, the
correlation of the draws (and, for PMMH, of the learned random walk) against the exact one,
and effective samples per second of the second run (the first compiles).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import diffprior as dp
from diffprior.io import write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hierarchical import grid_mixture, timed_mcmc  # noqa: E402  (benchmarks/ is not a package)

OBS_DIM = 16


def make_problem(dim: int, seed: int = 0) -> dict:
    prior = grid_mixture(dim)
    key_a, key_b, key_x, key_e = jax.random.split(jax.random.key(seed), 4)
    A = 2.0 * jax.random.normal(key_a, (OBS_DIM, dim)) / np.sqrt(dim)
    first, second = jax.random.normal(key_b, (2, OBS_DIM)) / np.sqrt(OBS_DIM)
    B = jnp.stack([first, first + 0.1 * second], axis=1)
    truth = jnp.array([1.0, -0.5])
    y = A @ prior.sample(key_x) + B @ truth + 0.5 * jax.random.normal(key_e, (OBS_DIM,))
    theta_prior = dist.Normal(0.0, 3.0)

    def model(y=None):
        a = numpyro.sample("a", theta_prior)
        b = numpyro.sample("b", theta_prior)
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(A @ x + B @ jnp.stack([a, b]), 0.5).to_event(1), obs=y)

    def log_evidence(theta):
        return prior.log_evidence(A, 0.5, y - B @ theta)

    def exact_model(y=None):
        a = numpyro.sample("a", theta_prior)
        b = numpyro.sample("b", theta_prior)
        numpyro.factor("evidence", log_evidence(jnp.stack([a, b])))

    axis = jnp.linspace(-18.0, 18.0, 721)
    grid = jnp.stack(jnp.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    log_post = jax.lax.map(log_evidence, grid, batch_size=4096) + jnp.sum(
        theta_prior.log_prob(grid), axis=-1
    )
    weights = np.exp(np.asarray(log_post, np.float64) - float(jnp.max(log_post)))
    weights /= weights.sum()
    points = np.asarray(grid, np.float64)
    mean = weights @ points
    centred = points - mean
    covariance = (weights[:, None] * centred).T @ centred
    return {"model": model, "exact_model": exact_model, "y": y, "mean": mean, "cov": covariance}


def run(kernel, problem: dict, args) -> dict:
    mcmc, times = timed_mcmc(kernel, args, y=problem["y"])
    samples = mcmc.get_samples(group_by_chain=True)
    theta = np.stack([np.asarray(samples["a"]), np.asarray(samples["b"])], axis=-1)
    ess = np.asarray(effective_sample_size(theta))
    flat = theta.reshape(-1, 2)
    errors = (flat.mean(axis=0) - problem["mean"]) / np.sqrt(np.diag(problem["cov"]) / ess)
    row = {
        "ess": float(ess.min()),
        "rhat": float(np.max(np.asarray(split_gelman_rubin(theta)))),
        "error": float(np.max(np.abs(errors))),
        "correlation": float(np.corrcoef(flat.T)[0, 1]),
        "learned": float("nan"),
        "first_s": times[0],
        "second_s": times[1],
        "ess_per_s": float(ess.min()) / times[1],
    }
    state = mcmc.last_state
    if hasattr(state, "scale_tril"):
        tril = np.asarray(state.scale_tril)
        shape = np.einsum("cij,ckj->cik", tril, tril)
        row["learned"] = float(np.mean(shape[:, 0, 1] / np.sqrt(shape[:, 0, 0] * shape[:, 1, 1])))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--num-warmup", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-particles", type=int, default=128)
    parser.add_argument("--num-steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/pmmh_adaptation.md")
    args = parser.parse_args(argv)

    problem = make_problem(args.dim)
    cov = problem["cov"]
    exact_correlation = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
    samplers = {
        "PMMH, covariance adapted (default)": dp.PMMH(
            problem["model"], "tds", num_particles=args.num_particles, num_steps=args.num_steps
        ),
        "PMMH, step size only (adapt_covariance=False)": dp.PMMH(
            problem["model"],
            "tds",
            num_particles=args.num_particles,
            num_steps=args.num_steps,
            adapt_covariance=False,
        ),
        "NUTS on theta, exact evidence": numpyro.infer.NUTS(problem["exact_model"]),
    }
    lines = [
        "# PMMH's covariance adaptation on correlated hyperparameters",
        "",
        f"Command: `python benchmarks/pmmh_adaptation.py --dim {args.dim} --num-warmup "
        f"{args.num_warmup} --num-samples {args.num_samples} --num-chains {args.num_chains} "
        f"--num-particles {args.num_particles} --num-steps {args.num_steps}`",
        "",
        f"Machine: {platform.machine()}, jax {jax.__version__}, devices "
        f"{[d.platform for d in jax.devices()]}. Exact posterior of (a, b) by quadrature: "
        f"mean ({problem['mean'][0]:.3f}, {problem['mean'][1]:.3f}), standard deviations "
        f"({np.sqrt(cov[0, 0]):.3f}, {np.sqrt(cov[1, 1]):.3f}), correlation "
        f"{exact_correlation:.3f}. PMMH uses TDS's evidence ({args.num_particles} particles x "
        f"{args.num_steps} steps, its default proposal: the subspace one here).",
        "",
        "| sampler | ESS (worse of a, b) | R-hat (max) | mean error (MC se, max) | "
        "correlation of draws | learned correlation | s (compile + run / run) | ESS / s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, kernel in samplers.items():
        row = run(kernel, problem, args)
        learned = "" if np.isnan(row["learned"]) else f"{row['learned']:.3f}"
        lines.append(
            f"| {name} | {row['ess']:.0f} | {row['rhat']:.3f} | {row['error']:.1f} | "
            f"{row['correlation']:.3f} | {learned} | {row['first_s']:.1f} / "
            f"{row['second_s']:.1f} | {row['ess_per_s']:.1f} |"
        )
        print(lines[-1], flush=True)
    write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
