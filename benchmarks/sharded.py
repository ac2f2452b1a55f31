"""One SMC chain's particles split over 4 devices against the same chain on one device, in
one process.

    python benchmarks/sharded.py [--methods tds,fk] [--num-particles 65536] [--dim 80]
                                 [--num-steps 20] [--devices 4] [--repeats 5]
                                 [--out benchmarks/results/sharded.md]

The process forces ``--devices`` host (CPU) devices (``XLA_FLAGS``, set before JAX is
imported), so both runs share one process: ``shard_particles=False`` runs the chain on one
device, ``shard_particles=True`` splits its particles over all of them. For each method (``tds``:
``dp.TDS`` with its defaults; ``fk``: ``dp.FK`` with the difference potential and the guided
proposal, the TDS paper's kernel; ``mcgdiff``) both samplers are compiled
and run once, then timed ``--repeats`` times each, alternating between the two so that a change
in the machine's load hits both (``Sampler.seconds``: the compiled run up to
``jax.block_until_ready``; keys 1, 2, ...). The medians, their ratio (target: <= 1.3 when the
forced devices share the same cores, so that no speed-up is possible) and the accuracy of both
against the exact posterior are printed and written to ``--out``. The mixture problem is that
of the MCGdiff paper (:func:`diffprior.problems.mixture_problem`), whose exact log-evidence and
posterior mean give the accuracy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

METHODS = ("tds", "fk", "mcgdiff")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="tds,fk", help=f"comma-separated, of {METHODS}")
    parser.add_argument("--num-particles", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=80)
    parser.add_argument("--obs-dim", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="markdown file for the results")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def main(argv=None):
    args = parse(argv)
    # the forced host devices must be set before JAX starts
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    import diffprior as dp

    num_devices = jax.device_count()
    problem = dp.problems.mixture_problem(jax.random.key(0), args.dim, args.obs_dim)
    exact = float(problem.log_evidence)
    exact_mean = np.asarray(problem.posterior.mean)
    data_args, data_kwargs = problem.model_args, problem.model_kwargs
    classes = {
        "tds": dp.TDS,
        "fk": lambda model: dp.FK(model, potential="difference", proposal="guided"),
        "mcgdiff": dp.MCGdiff,
    }
    labels = {False: "1 device", True: f"{num_devices} devices"}

    table, notes = [], []
    for name in args.methods:
        method = classes[name](problem.model)
        samplers, first, records = {}, {}, {}
        for sharded in labels:
            samplers[sharded] = dp.Sampler(
                method,
                num_particles=args.num_particles,
                num_steps=args.num_steps,
                shard_particles=sharded,
                progress_bar=False,
            )
            start = time.perf_counter()
            samplers[sharded].run(jax.random.key(1), *data_args, **data_kwargs)  # compiles
            first[sharded] = time.perf_counter() - start
            records[sharded] = {"seconds": [], "evidence": [], "mean": []}
        same_key = {
            sharded: (float(sampler.log_evidence[0]), np.asarray(sampler.get_samples()["x"]))
            for sharded, sampler in samplers.items()
        }
        for seed in range(1, args.repeats + 1):
            for sharded, sampler in samplers.items():  # alternate: the load hits both alike
                sampler.run(jax.random.key(seed), *data_args, **data_kwargs)
                draws = np.asarray(sampler.get_samples()["x"])
                record = records[sharded]
                record["seconds"].append(sampler.seconds)
                record["evidence"].append(float(sampler.log_evidence[0]) - exact)
                record["mean"].append(float(np.sqrt(np.mean((draws.mean(0) - exact_mean) ** 2))))
        medians = {sharded: float(np.median(r["seconds"])) for sharded, r in records.items()}
        for sharded, label in labels.items():
            record = records[sharded]
            evidence = np.asarray(record["evidence"])
            table.append(
                f"| {name} | {label} | {first[sharded]:.1f} | {medians[sharded]:.3f} "
                f"| {min(record['seconds']):.3f} | {evidence.mean():+.4f} "
                f"({evidence.std(ddof=1):.4f}) | {np.mean(record['mean']):.4f} |"
            )
        ratio = medians[True] / medians[False]
        table.append(f"| {name} | **sharded / one device** | | **{ratio:.2f}x** | | | |")
        (z_one, x_one), (z_many, x_many) = same_key[False], same_key[True]
        notes.append(
            f"- {name} (`{method!r}`), key 1 on both: log-evidence {z_one:.5f} on one device, "
            f"{z_many:.5f} sharded; the draws differ by up to "
            f"{float(np.max(np.abs(x_one - x_many))):.1e}."
        )
        print(table[-3], table[-2], table[-1], sep="\n", flush=True)

    command = [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    lines = [
        "# One SMC chain's particles sharded over forced host devices",
        "",
        "```",
        "python " + " ".join(command),
        "```",
        "",
        f"One chain of {args.num_particles} particles, {args.num_steps} steps, on the mixture "
        f"problem `mixture_problem(key(0), {args.dim}, {args.obs_dim})`. One process with "
        f"{num_devices} forced host devices on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), a machine shared with other work; "
        f"jax {jax.__version__}. Per method, each sampler's first run (key 1) compiles; then "
        f"{args.repeats} runs each with keys 1 to {args.repeats}, alternating between the two "
        "samplers, timed by `Sampler.seconds` (the compiled run to `jax.block_until_ready`).",
        "",
        "| method | run | first run (s) | median (s) | min (s) | log-evidence error, mean (sd) "
        "| posterior-mean RMSE |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
        "Target: sharded / one device <= 1.3x (the forced devices share the cores, so no "
        "speed-up is possible). Accuracy against the exact posterior over the timed runs: the "
        f"log-evidence error (estimate minus the exact {exact:.4f}) and the root mean square "
        f"error of the posterior mean over the {args.dim} coordinates (equal-weight draws "
        "against the exact mean).",
        "",
        "Same key on one device and sharded: equal up to rounding as long as no resampling "
        "ancestor moves; with many particles a rounding-level difference in the weights can "
        "move some, after which those paths differ and the two runs agree in distribution (the "
        "accuracy above) rather than draw by draw:",
        "",
        *notes,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
