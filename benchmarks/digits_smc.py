"""TDS on the shipped digits prior, with the SMC health figures: is the particle system healthy
on a real network, and does it beat DPS?

    python benchmarks/digits_smc.py --num-digits 50 --out benchmarks/results/digits_smc.md

For each of the first ``--num-digits`` held-out test digits (the last 297 of scikit-learn's
digits, never trained on) and each task (half-image inpainting, 2x super-resolution; Gaussian
noise ``--sigma-y``, seeded by the digit's index, as ``diffprior benchmark digits``), TDS runs
``--num-chains`` chains of ``--num-particles`` particles over ``--num-steps`` steps, and DPS
``--dps-chains`` x ``--num-particles`` independent draws. Reported per task, over digits:

- the minimum per-step ESS (over steps and chains) as a fraction of the particles, median and
  lowest (target: median >= 10%);
- the between-chain standard deviation of TDS's log-evidence, median and largest (target:
  median <= 3 nats);
- the 90% pixel-wise interval coverage of the true digit (target: in [0.85, 0.95]);
- the posterior-mean PSNR (pixel range 2) of TDS and of DPS (target: TDS >= DPS + 0.5 dB);
- the share of runs that warned of a weight collapse.

Each method and task compiles once; the table is rewritten (atomically) after every digit, so
an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

import diffprior as dp
from diffprior import operators, pretrained
from diffprior.io import write_text

TASKS = {
    "inpaint": lambda: operators.Inpaint(operators.half_mask((8, 8), side="left")),
    "superres": lambda: operators.Downsample(2, (8, 8)),
}


def psnr(mean: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(4.0 / np.mean((mean - truth) ** 2)))


def coverage(samples: np.ndarray, truth: np.ndarray) -> float:
    lower, upper = np.quantile(samples, [0.05, 0.95], axis=0)
    return float(np.mean((truth >= lower) & (truth <= upper)))


def run(args) -> list[dict]:
    prior = pretrained.load("digits")
    if args.inflation is not None:
        prior.calibration = prior.calibration._replace(inflation=args.inflation)
    train, test = pretrained.load_digits_split()
    if args.split == "train":
        test = train  # held-in digits, for choosing settings without looking at the test split
    samplers = {}
    for task, make in TASKS.items():
        if task not in args.tasks:
            continue
        A = make()

        def model(y=None, A=A):
            x = numpyro.sample("x", prior)
            numpyro.sample("y", dist.Normal(A(x), args.sigma_y).to_event(1), obs=y)

        samplers["tds", task] = dp.Sampler(
            dp.TDS(model), args.num_particles, args.num_steps, args.num_chains, progress_bar=False
        )
        if args.dps_chains == 0:
            continue
        samplers["dps", task] = dp.Sampler(
            dp.DPS(model),
            args.num_particles,
            args.num_steps,
            args.dps_chains,
            progress_bar=False,
        )
    rows = []
    for digit in range(args.num_digits):
        truth = np.asarray(test[digit])
        for (method, task), sampler in samplers.items():
            A = TASKS[task]()
            clean = np.asarray(A(truth))
            noise = np.random.default_rng(digit).normal(size=clean.shape)
            y = jax.numpy.asarray(clean + args.sigma_y * noise, dtype=np.float32)
            if digit == 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sampler.run(jax.random.key(10_000), y=y)  # compile
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sampler.run(jax.random.key(digit), y=y)
            seconds = time.perf_counter() - start
            samples = np.asarray(sampler.get_samples()["x"])
            row = {
                "method": method,
                "task": task,
                "digit": digit,
                "psnr": psnr(samples.mean(axis=0), truth),
                "coverage": coverage(samples, truth),
                "seconds": seconds,
                "warned": any("collapse" in str(w.message) for w in caught),
            }
            if method == "tds":
                health = dp.smc_health(sampler)
                row["min_ess"] = float(np.min(health.min_ess)) / args.num_particles
                row["log_z_sd"] = float(health.log_evidence_sd)
                row["log_z"] = float(np.mean(health.log_evidence))
            rows.append(row)
        write_text(args.out, table(rows, args))
        print(f"digit {digit + 1}/{args.num_digits} done", flush=True)
    return rows


def prior_inflation() -> float:
    calibration = pretrained.metadata("digits").get("calibration", {})
    return float(calibration.get("inflation", 1.0))


def table(rows: list[dict], args) -> str:
    def pick(method, task, key):
        return np.array([r[key] for r in rows if r["method"] == method and r["task"] == task])

    digits = len({r["digit"] for r in rows})
    extra = f"--split {args.split} " if args.split != "test" else ""
    if args.inflation is not None:
        extra += f"--inflation {args.inflation:g} "
    split = "held-out test digits" if args.split == "test" else "training digits"
    inflation = prior_inflation() if args.inflation is None else args.inflation
    lines = [
        "# TDS on the digits prior: SMC health and quality",
        "",
        f"Command: `python benchmarks/digits_smc.py --num-digits {args.num_digits} "
        f"--num-chains {args.num_chains} --num-particles {args.num_particles} "
        f"--num-steps {args.num_steps} --dps-chains {args.dps_chains} --sigma-y {args.sigma_y} --tasks {' '.join(args.tasks)} "
        f"{extra}--out {args.out}`",
        "",
        f"Machine: {platform.machine()}, jax {jax.__version__}, devices "
        f"{[d.platform for d in jax.devices()]}. {digits} {split} (the first "
        f"{digits}), {args.num_chains} chains x {args.num_particles} particles x "
        f"{args.num_steps} steps; DPS {args.dps_chains} x {args.num_particles} draws. TDS is `dp.TDS(model)` "
        "with its defaults (for this linear Gaussian model: the subspace proposal); the "
        f"prior's calibration inflation is {inflation:g}.",
        "",
        "| task | digits | min ESS / N, median [lowest] | log Z sd between chains, median "
        "[largest] | 90% coverage, mean ± se | PSNR TDS (dB) | PSNR DPS (dB) | TDS - DPS "
        "(dB), mean ± se | runs with a collapse warning | s per digit, TDS / DPS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in args.tasks:
        ess, sd = pick("tds", task, "min_ess"), pick("tds", task, "log_z_sd")
        if ess.size == 0:
            continue
        cov = pick("tds", task, "coverage")
        p_tds, p_dps = pick("tds", task, "psnr"), pick("dps", task, "psnr")
        n = min(p_tds.size, p_dps.size)
        gain = p_tds[:n] - p_dps[:n] if n else np.full(1, np.nan)

        def se(v):
            return v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else float("nan")

        lines.append(
            f"| {task} | {ess.size} | {np.median(ess):.2f} [{ess.min():.2f}] | "
            f"{np.median(sd):.2f} [{sd.max():.2f}] | {cov.mean():.3f} ± {se(cov):.3f} | "
            f"{p_tds.mean():.2f} | {p_dps.mean() if n else float('nan'):.2f} | {gain.mean():+.2f} ± {se(gain):.2f} | "
            f"{int(pick('tds', task, 'warned').sum())} / {ess.size} | "
            f"{np.median(pick('tds', task, 'seconds')):.1f} / "
            f"{np.median(pick('dps', task, 'seconds')) if n else float('nan'):.1f} |"
        )
    lines += [
        "",
        "Targets: median min ESS / N >= 0.10; median log Z sd <= 3 nats; coverage in "
        "[0.85, 0.95]; TDS PSNR >= DPS + 0.5 dB.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-digits", type=int, default=50)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-particles", type=int, default=256)
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument(
        "--dps-chains",
        type=int,
        default=1,
        help="DPS chains of --num-particles draws (its posterior mean needs few draws)",
    )
    parser.add_argument("--sigma-y", type=float, default=0.1)
    parser.add_argument(
        "--inflation",
        type=float,
        default=None,
        help="the twist's calibration inflation (default: the shipped prior's)",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "train"],
        help="digits from the held-out test split (default) or the training split",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out", default="benchmarks/results/digits_smc.md")
    args = parser.parse_args(argv)
    if not 1 <= args.num_digits <= 297:
        parser.error("--num-digits must be in [1, 297]")
    run(args)
    print(open(args.out).read())


if __name__ == "__main__":
    main()
