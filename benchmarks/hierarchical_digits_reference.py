"""The posterior of an unknown noise level on held-out digits, by quadrature over the SMC
evidence: where the truth lies under the shipped prior, whatever sampler is used.

    python benchmarks/hierarchical_digits_reference.py --num-digits 10 --num-particles 1024 \\
        --num-chains 4 --num-steps 20 --num-grid 16

The problem is that of ``benchmarks/hierarchical_digits.py`` (the whole 8 x 8 test digit ``i``
observed with Gaussian noise of sigma 0.1, 0.2, 0.3 in turn, the same noise draw; sigma ~
HalfNormal(0.5); the shipped digits prior at ``--num-steps`` steps, the prior that PMMH and
particle Gibbs sample at that setting). For each digit, TDS estimates the log-evidence
:math:`\\log p(y \\mid \\sigma)` on a grid of ``--num-grid`` values of sigma, log-spaced
over a factor of 1.8 either side of the peak of a coarse pass (12 values in [0.03, 0.6], 4
runs of 256 particles), with ``--num-chains`` independent runs of ``--num-particles``
particles at each (combined as the log of the mean evidence). The log-posterior on the grid
is smoothed by a quartic in log sigma fitted where it is within 25 nats of its peak, and
integrated on a fine grid. An interval that reaches an end of the grid is marked in the table
("grid end"): it may be too narrow there.

Reported per digit: the true sigma, the posterior median and 90% interval, whether the truth is
inside, the same median and interval from each half of the chains (their gap is the Monte Carlo
error of the reference), and the spread of the log-evidence between chains at the grid point
nearest the median and at the smallest sigma in the interval.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.special import logsumexp

import diffprior as dp
from diffprior.io import write_text

SIGMAS = (0.1, 0.2, 0.3)
PRIOR_SCALE = 0.5


def observation(test: np.ndarray, i: int) -> tuple[float, np.ndarray]:
    """The true sigma and the noisy image of test digit ``i`` (as the sampler benchmark)."""
    truth = test[i]
    sigma_true = SIGMAS[i % len(SIGMAS)]
    key_noise, _ = jax.random.split(jax.random.key(i))
    return sigma_true, truth + sigma_true * np.asarray(jax.random.normal(key_noise, truth.shape))


def log_posterior(grid: np.ndarray, log_evidence: np.ndarray) -> np.ndarray:
    """The unnormalised log-density of log sigma on ``grid``: the log-evidence plus the
    HalfNormal prior and the Jacobian of log sigma."""
    prior = np.asarray(dist.HalfNormal(PRIOR_SCALE).log_prob(jnp.asarray(grid)))
    return log_evidence + prior + np.log(grid)


def posterior_quantiles(
    grid: np.ndarray, log_evidence: np.ndarray, probs=(0.05, 0.5, 0.95)
) -> tuple[float, ...]:
    """Quantiles of sigma from the log-evidence on a log-spaced ``grid``: times the
    HalfNormal prior density and the Jacobian of log sigma, smoothed by a quartic."""
    log_grid = np.log(grid)
    log_post = log_posterior(grid, log_evidence)
    keep = log_post > log_post.max() - 25.0
    coefficients = np.polyfit(log_grid[keep], log_post[keep], 4)
    fine = np.linspace(log_grid[keep].min(), log_grid[keep].max(), 4000)
    values = np.polyval(coefficients, fine)
    weights = np.exp(values - values.max())
    cdf = np.cumsum(weights) / weights.sum()
    return tuple(float(np.exp(np.interp(p, cdf, fine))) for p in probs)


def evidences(sampler, grid: np.ndarray, key, y: np.ndarray) -> np.ndarray:
    """TDS's log-evidence ``(grid, chains)`` at each sigma of ``grid``."""
    chains = np.empty((grid.size, sampler.num_chains))
    for j, sigma in enumerate(grid):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # collapse warnings: the spread is reported
            sampler.run(
                jax.random.fold_in(key, j), jnp.float32(sigma), y=jnp.asarray(y, jnp.float32)
            )
        chains[j] = np.asarray(sampler.log_evidence, np.float64)
    return chains


def combined(columns: np.ndarray) -> np.ndarray:
    """The log of the mean evidence over chains (the last axis)."""
    return logsumexp(columns, axis=1) - np.log(columns.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-digits", type=int, default=10)
    parser.add_argument("--num-particles", type=int, default=1024)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--num-grid", type=int, default=16)
    parser.add_argument("--first-digit", type=int, default=0, help="start at this test digit")
    parser.add_argument("--out", default="benchmarks/results/hierarchical_digits_reference.md")
    args = parser.parse_args()
    if args.num_chains < 2 or args.num_chains % 2:
        parser.error("--num-chains must be even (the reference is also computed per half)")

    prior = dp.pretrained.load("digits")
    _, test = dp.pretrained.load_digits_split()

    def model(sigma, y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, sigma).to_event(2), obs=y)

    sampler = dp.Sampler(
        dp.TDS(model), args.num_particles, args.num_steps, args.num_chains, progress_bar=False
    )
    coarse_sampler = dp.Sampler(dp.TDS(model), 256, args.num_steps, 4, progress_bar=False)
    coarse_grid = np.exp(np.linspace(np.log(0.03), np.log(0.6), 12))
    half = args.num_chains // 2
    rows, inside = [], 0
    for i in range(args.first_digit, args.first_digit + args.num_digits):
        sigma_true, y = observation(test, i)
        key = jax.random.split(jax.random.key(i))[1]
        start = time.perf_counter()

        key_coarse, key = jax.random.split(key)
        coarse = combined(evidences(coarse_sampler, coarse_grid, key_coarse, y))
        peak = coarse_grid[np.argmax(log_posterior(coarse_grid, coarse))]
        grid = np.exp(np.linspace(np.log(peak / 1.8), np.log(peak * 1.8), args.num_grid))
        chains = evidences(sampler, grid, key, y)

        low, median, high = posterior_quantiles(grid, combined(chains))
        halves = [
            posterior_quantiles(grid, combined(c)) for c in (chains[:, :half], chains[:, half:])
        ]
        hit = low <= sigma_true <= high
        at_end = low < grid[0] * 1.05 or high > grid[-1] / 1.05
        inside += hit
        spread = chains.std(axis=1)
        at_median = spread[np.argmin(np.abs(grid - median))]
        at_low = spread[np.argmin(np.abs(grid - low))]
        seconds = time.perf_counter() - start
        row = (
            f"| {i} | {sigma_true:.1f} | {median:.3f} | [{low:.3f}, {high:.3f}] | "
            f"{'yes' if hit else 'no'}{' (grid end)' if at_end else ''} | "
            + " / ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for lo, m, hi in halves)
            + f" | {at_median:.2f} / {at_low:.2f} | {seconds:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)
    command = (
        "python benchmarks/hierarchical_digits_reference.py "
        f"--num-digits {args.num_digits} --num-particles {args.num_particles} "
        f"--num-chains {args.num_chains} --num-steps {args.num_steps} --num-grid {args.num_grid}"
    )
    text = "\n".join(
        [
            "# Unknown noise level on held-out digits: the reference posterior",
            "",
            f"Written by `{command}` on {platform.machine()} "
            f"{jax.default_backend().upper()}, JAX {jax.__version__}.",
            "",
            "sigma's posterior by quadrature over TDS's log-evidence on a grid of "
            f"{args.num_grid} values around the peak of a coarse pass ({args.num_chains} x "
            f"{args.num_particles} particles, {args.num_steps} steps per grid point); the "
            "problem of `benchmarks/hierarchical_digits.py`. Halves: the same from chains "
            f"1-{half} and {half + 1}-{args.num_chains}. log Z sd: between chains at the "
            "grid point nearest the median and nearest the interval's lower end.",
            "",
            "| digit | true sigma | median | 90% interval | inside | halves | log Z sd | s |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**True sigma inside the reference 90% interval on {inside} of "
            f"{args.num_digits} digits.**",
            "",
        ]
    )
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
