"""The posterior of an unknown noise level on held-out digits, by quadrature over the SMC
evidence: where the truth lies under the shipped prior, whatever sampler is used.

    python benchmarks/hierarchical_digits_reference.py --num-digits 10 --num-particles 1024 \\
        --num-chains 4 --num-steps 20 --num-grid 16 --factor 2.5

The problem is that of ``benchmarks/hierarchical_digits.py`` (the whole 8 x 8 test digit ``i``
observed with Gaussian noise of sigma 0.1, 0.2, 0.3 in turn, the same noise draw; sigma ~
HalfNormal(0.5); the shipped digits prior at ``--num-steps`` steps, the prior that PMMH and
particle Gibbs sample at that setting), and the method is ``dp.EvidenceGrid``: for each digit,
TDS estimates the log-evidence :math:`\\log p(y \\mid \\sigma)` on a grid of ``--num-grid``
values of sigma, log-spaced over a factor ``--factor`` either side of the peak of a coarse
pass (12 values in [0.03, 0.6], 4 runs of 256 particles), with ``--num-chains`` independent
runs of ``--num-particles`` particles at each (combined as the log of the mean evidence). The
quantiles come from ``GridPosterior.quantiles(smooth=4)``: a quartic in log sigma fitted
where the log-posterior is within 25 nats of its peak. An interval that reaches an end of the
grid is marked in the table ("grid end"): it may be too narrow there.

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
import numpy as np
from hierarchical_digits import make_model, observation

import diffprior as dp
from diffprior.io import write_text

PROBS = (0.05, 0.5, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-digits", type=int, default=10)
    parser.add_argument("--num-particles", type=int, default=1024)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--num-grid", type=int, default=16)
    parser.add_argument("--factor", type=float, default=2.5, help="the fine grid's half-width")
    parser.add_argument("--first-digit", type=int, default=0, help="start at this test digit")
    parser.add_argument("--out", default="benchmarks/results/hierarchical_digits_reference.md")
    args = parser.parse_args()
    if args.num_chains < 2 or args.num_chains % 2:
        parser.error("--num-chains must be even (the reference is also computed per half)")

    prior = dp.pretrained.load("digits")
    _, test = dp.pretrained.load_digits_split()
    model = make_model(prior)
    fine = dp.EvidenceGrid(
        model, num_particles=args.num_particles, num_steps=args.num_steps, num_runs=args.num_chains
    )
    coarse = dp.EvidenceGrid(model, num_particles=256, num_steps=args.num_steps, num_runs=4)
    coarse_grid = np.geomspace(0.03, 0.6, 12)
    half = args.num_chains // 2
    rows, inside = [], 0
    for i in range(args.first_digit, args.first_digit + args.num_digits):
        sigma_true, y, key = observation(test, i)
        start = time.perf_counter()
        key_coarse, key = jax.random.split(key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the coarse pass only finds the peak
            first = coarse.run(key_coarse, coarse_grid, y=y)
        peak = coarse_grid[np.argmax(first.log_posterior)]
        grid = np.geomspace(peak / args.factor, peak * args.factor, args.num_grid)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fine.run(key, grid, y=y)
        low, median, high = result.quantiles(PROBS, smooth=4)
        halves = [
            result._replace(log_evidence=columns).quantiles(PROBS, smooth=4)
            for columns in (result.log_evidence[:, :half], result.log_evidence[:, half:])
        ]
        hit = low <= sigma_true <= high
        at_end = low < grid[0] * 1.05 or high > grid[-1] / 1.05
        inside += hit
        spread = result.log_evidence_sd
        at_median = spread[np.argmin(np.abs(grid - median))]
        at_low = spread[np.argmin(np.abs(grid - low))]
        warned = "; ".join(str(w.message).split(":")[1].strip() for w in caught) or ""
        seconds = time.perf_counter() - start
        row = (
            f"| {i} | {sigma_true:.1f} | {median:.3f} | [{low:.3f}, {high:.3f}] | "
            f"{'yes' if hit else 'no'}{' (grid end)' if at_end else ''} | "
            + " / ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for lo, m, hi in halves)
            + f" | {at_median:.2f} / {at_low:.2f} | {warned or 'none'} | {seconds:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)
    command = (
        "python benchmarks/hierarchical_digits_reference.py "
        f"--num-digits {args.num_digits} --num-particles {args.num_particles} "
        f"--num-chains {args.num_chains} --num-steps {args.num_steps} --num-grid {args.num_grid} "
        f"--factor {args.factor:g}"
    )
    calibration = prior.calibration
    text = "\n".join(
        [
            "# Unknown noise level on held-out digits: the posterior by quadrature",
            "",
            f"Written by `{command}` on {platform.machine()} "
            f"{jax.default_backend().upper()}, JAX {jax.__version__}, the shipped digits prior "
            f"(calibration inflation {calibration.inflation:g}).",
            "",
            "sigma's posterior by `dp.EvidenceGrid`: quadrature over TDS's log-evidence on a "
            f"grid of {args.num_grid} values over a factor {args.factor:g} either side of the "
            f"peak of a coarse pass ({args.num_chains} x {args.num_particles} particles, "
            f"{args.num_steps} steps per grid value); the problem of "
            "`benchmarks/hierarchical_digits.py`. Halves: the same from runs "
            f"1-{half} and {half + 1}-{args.num_chains}. log Z sd: between runs at the "
            "grid value nearest the median and nearest the interval's lower end. Warnings: "
            "those of `EvidenceGrid.run`.",
            "",
            "| digit | true sigma | median | 90% interval | inside | halves | log Z sd | "
            "warnings | s |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**True sigma inside the 90% interval on {inside} of {args.num_digits} digits.**",
            "",
        ]
    )
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
