"""Unknown noise level on held-out digits: is the true sigma_y inside PMMH's 90% interval?

    python benchmarks/hierarchical_digits.py [--sampler pg|pmmh] [--num-digits 10]
        [--num-particles 32] [--num-steps 20] [--num-warmup 100] [--num-samples 300]
        [--num-chains 2] [--marginal-moves 0] [--first-digit 0]
        [--out benchmarks/results/hierarchical_digits.md]

Per held-out test digit i (the shipped digits prior never saw them), the whole 8 x 8 image is
observed with Gaussian noise of a known-to-us sigma_y (0.1, 0.2, 0.3 in turn), and the model
puts sigma ~ HalfNormal(0.5) on it:

    sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
    x = numpyro.sample("x", prior)
    numpyro.sample("y", dist.Normal(x, sigma).to_event(2), obs=y)

``dp.ParticleGibbs`` (``pg``: NUTS on sigma given x, a conditional SMC sweep with TDS's subspace
proposal on x given sigma) or ``dp.PMMH`` (``pmmh``: TDS's evidence for each proposed sigma)
samples (sigma, x). The table gives the posterior median and 90% interval of sigma, whether the
truth is inside, split R-hat and ESS of sigma, the mean acceptance rate (PMMH's, or of
particle Gibbs's marginal moves) and the wall time of the digit (compilation included for the
first). The target of the hierarchical-models issue is the truth inside the interval on at
least 8 of 10 digits.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import diffprior as dp

SIGMAS = (0.1, 0.2, 0.3)


def observation(test: np.ndarray, i: int) -> tuple[float, np.ndarray, jax.Array]:
    """``(true sigma, noisy image, run key)`` of test digit ``i``: sigma cycles through
    ``SIGMAS``, the noise is drawn from the digit's own key."""
    sigma_true = SIGMAS[i % len(SIGMAS)]
    key_noise, key_run = jax.random.split(jax.random.key(i))
    y = test[i] + sigma_true * np.asarray(jax.random.normal(key_noise, test[i].shape))
    return sigma_true, y, key_run


def make_model(prior):
    """The model: sigma ~ HalfNormal(0.5), x from ``prior``, y ~ Normal(x, sigma)."""

    def model(y=None):
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(x, sigma).to_event(2), obs=y)

    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler", choices=("pg", "pmmh"), default="pg")
    parser.add_argument("--num-digits", type=int, default=10)
    parser.add_argument("--num-particles", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--num-warmup", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument(
        "--marginal-moves",
        type=int,
        default=0,
        help="pg: particle marginal Metropolis-Hastings moves of (sigma, x) per iteration",
    )
    parser.add_argument("--first-digit", type=int, default=0, help="start at this test digit")
    parser.add_argument("--out", default="benchmarks/results/hierarchical_digits.md")
    args = parser.parse_args()

    prior = dp.pretrained.load("digits")
    _, test = dp.pretrained.load_digits_split()

    model = make_model(prior)
    kernel = dp.ParticleGibbs if args.sampler == "pg" else dp.PMMH
    options = {"marginal_moves": args.marginal_moves} if args.sampler == "pg" else {}
    mcmc = numpyro.infer.MCMC(
        kernel(model, num_particles=args.num_particles, num_steps=args.num_steps, **options),
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    rows, inside = [], 0
    for i in range(args.first_digit, args.first_digit + args.num_digits):
        sigma_true, y, key_run = observation(test, i)
        start = time.perf_counter()
        extra = {"pmmh": ("accept_prob",), "pg": ("marginal_accept_prob",)}[args.sampler]
        mcmc.run(
            key_run,
            y=y,
            extra_fields=extra if args.sampler == "pmmh" or args.marginal_moves else (),
        )
        sigma = np.asarray(mcmc.get_samples(group_by_chain=True)["sigma"])
        seconds = time.perf_counter() - start
        low, median, high = np.quantile(sigma.ravel(), [0.05, 0.5, 0.95])
        hit = bool(low <= sigma_true <= high)
        inside += hit
        fields = mcmc.get_extra_fields()
        accepted = fields.get("accept_prob", fields.get("marginal_accept_prob"))
        accept = float(np.mean(accepted)) if accepted is not None else float("nan")
        rhat = float(split_gelman_rubin(sigma)) if args.num_chains > 1 else float("nan")
        ess = float(effective_sample_size(sigma))
        row = (
            f"| {i} | {sigma_true:.1f} | {median:.3f} | [{low:.3f}, {high:.3f}] | "
            f"{'yes' if hit else 'no'} | {rhat:.3f} | {ess:.0f} | {accept:.2f} | {seconds:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)

    command = (
        f"python benchmarks/hierarchical_digits.py --sampler {args.sampler} "
        f"--num-digits {args.num_digits} "
        f"--num-particles {args.num_particles} --num-steps {args.num_steps} "
        f"--num-warmup {args.num_warmup} --num-samples {args.num_samples} "
        f"--num-chains {args.num_chains}"
        + (f" --marginal-moves {args.marginal_moves}" if args.marginal_moves else "")
        + (f" --first-digit {args.first_digit}" if args.first_digit else "")
    )
    text = "\n".join(
        [
            f"# Unknown noise level on held-out digits ({kernel.__name__})",
            "",
            f"Written by `{command}` on {platform.machine()} "
            f"{jax.default_backend().upper()}, JAX {jax.__version__}.",
            "",
            "The whole image observed with Gaussian noise of the given sigma_y; sigma ~ "
            f"HalfNormal(0.5); {args.num_chains} chains x {args.num_samples} draws after "
            f"{args.num_warmup} warmup; {args.num_particles} particles x {args.num_steps} steps "
            "per SMC run or sweep. Seconds per digit include compiling for the first.",
            "",
            "| digit | true sigma | median | 90% interval | inside | R-hat | ESS | accept | s |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**True sigma inside the 90% interval on {inside} of {args.num_digits} digits.**",
            "",
        ]
    )
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)


if __name__ == "__main__":
    main()
