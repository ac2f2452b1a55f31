r"""The Gaussian-mixture benchmark: every method on the MCGdiff paper's problem
(:func:`diffprior.problems.mixture_problem`), scored against exact posterior samples.

For each method and cell :math:`(d, d_y)` and each seed (one problem per seed), the table
reports the sliced Wasserstein distance (1000 projections) between ``num_samples`` equal-weight
draws and as many exact posterior draws, divided by the same distance between two exact sets
(the *floor*); the log-evidence error for the methods that estimate it; and seconds of an
already compiled run. All particles form one chain (for SMC, one particle system). One compiled program per method and cell serves every
seed (the problem enters as data), so each seed's time is a clean run.

Run it as ``diffprior benchmark gmm`` or ``python benchmarks/gmm.py`` (same options).
``diffprior benchmark digits`` (:func:`digits_rows`) scores the methods on held-out digits.

Examples
--------
>>> from diffprior.benchmark import gmm_rows
>>> rows = gmm_rows(["mcgdiff"], [(8, 1)], seeds=1, num_steps=10, particles=64, num_samples=64)
>>> sorted(rows[0])
['cell', 'evidence_error', 'method', 'seconds', 'seed', 'steps', 'sw_ratio']
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Collection, Iterable, Sequence

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

from diffprior.diagnostics import sliced_wasserstein
from diffprior.infer import DPS, FK, TDS, DiffPIR, MCGdiff, PiGDM, ReSample, Sampler, Unguided
from diffprior.problems import mixture_problem
from diffprior.types import Array, PRNGKey

__all__ = [
    "METHODS",
    "DEFAULT_CELLS",
    "DIGIT_METHODS",
    "DIGIT_DEFAULT_METHODS",
    "exact_reference",
    "gmm_rows",
    "gmm_table",
    "digits_rows",
    "digits_table",
]


def mixture_model(prior, A, sigma_y, y=None):
    """``x ~ prior``, ``y ~ Normal(A x, sigma_y)``: the prior is an argument, so one compiled
    program serves every problem of a cell."""
    x = numpyro.sample("x", prior)
    numpyro.sample("y", dist.Normal(A @ x, sigma_y).to_event(1), obs=y)


#: Each method with the benchmark's options (the library defaults unless stated). ``"exact"``
#: is a control: a third set of exact posterior draws, scored like a method, which shows what a
#: perfect sampler gets under this metric (the floor is itself one noisy distance).
METHODS: dict[str, Callable | None] = {
    "exact": None,
    "unguided": lambda model: Unguided(model),
    "dps": lambda model: DPS(model),
    "pigdm": lambda model: PiGDM(model),
    "diffpir": lambda model: DiffPIR(model),
    "tds": lambda model: TDS(model),
    "tds-guided": lambda model: TDS(model, proposal="guided"),
    "fk": lambda model: FK(model),
    "fk-max": lambda model: FK(model, potential="max"),
    "mcgdiff": lambda model: MCGdiff(model),
    "mcgdiff-gaussian": lambda model: MCGdiff(model, potential="gaussian"),
    "mcgdiff-paper": lambda model: MCGdiff(model, potential="pinned", twisted=False),
}
DEFAULT_CELLS = tuple((d, dy) for d in (8, 80, 800) for dy in (1, 2, 4))


def exact_reference(problem, seed: int, num_samples: int) -> tuple[Array, PRNGKey, float]:
    """Exact posterior draws of a benchmark problem, the projection key every score of it
    uses, and the floor (the sliced Wasserstein distance between two exact sets), all from
    ``seed``."""
    post = problem.posterior
    key_a, key_b, key_p = jax.random.split(jax.random.key(10_000 + seed), 3)
    exact = post.sample(key_a, (num_samples,))
    floor = float(sliced_wasserstein(key_p, exact, post.sample(key_b, (num_samples,))))
    return exact, key_p, floor


def gmm_rows(
    methods: Sequence[str],
    cells: Iterable[tuple[int, int]],
    *,
    seeds: int = 10,
    num_steps: int | Sequence[int] = 100,
    particles: int = 2048,
    num_samples: int = 2000,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One dict per (method, cell, steps, seed): ``sw_ratio``, ``evidence_error`` (NaN where
    the method has none), ``seconds``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    if num_samples > particles:
        raise ValueError(f"num_samples ({num_samples}) must be <= particles ({particles})")
    step_counts = [num_steps] if isinstance(num_steps, int) else list(num_steps)
    cells = list(cells)
    problems = {
        (dim, obs_dim, seed): mixture_problem(jax.random.key(seed), dim, obs_dim)
        for dim, obs_dim in cells
        for seed in range(seeds)
    }
    floors, exacts = {}, {}
    for key, problem in problems.items():
        exact, key_p, floors[key] = exact_reference(problem, key[2], num_samples)
        exacts[key] = (exact, key_p)

    rows = []
    for method in methods:
        if method == "exact":
            for steps in step_counts:
                for dim, obs_dim in cells:
                    for seed in range(seeds):
                        post = problems[dim, obs_dim, seed].posterior
                        samples = post.sample(jax.random.key(20_000 + seed), (num_samples,))
                        exact, key_p = exacts[dim, obs_dim, seed]
                        distance = float(sliced_wasserstein(key_p, samples, exact))
                        row = {
                            "method": method,
                            "cell": (dim, obs_dim),
                            "steps": steps,
                            "seed": seed,
                            "sw_ratio": distance / floors[dim, obs_dim, seed],
                            "evidence_error": np.nan,
                            "seconds": 0.0,
                        }
                        rows.append(row)
                        if progress is not None:
                            progress(row)
            continue
        for steps in step_counts:
            for dim, obs_dim in cells:
                sampler = Sampler(
                    METHODS[method](mixture_model),
                    num_particles=particles,
                    num_steps=steps,
                    progress_bar=False,
                )
                for seed in range(seeds):
                    problem = problems[dim, obs_dim, seed]
                    args = (problem.prior, problem.A, problem.sigma_y)
                    if seed == 0:  # compile once per method and cell
                        sampler.run(jax.random.key(1000), *args, y=problem.y)
                    start = time.perf_counter()
                    sampler.run(jax.random.key(seed), *args, y=problem.y)
                    seconds = time.perf_counter() - start
                    exact, key_p = exacts[dim, obs_dim, seed]
                    samples = sampler.get_samples()["x"][:num_samples]
                    finite = bool(np.all(np.isfinite(np.asarray(samples))))
                    distance = (
                        float(sliced_wasserstein(key_p, samples, exact)) if finite else np.nan
                    )
                    evidence = sampler.log_evidence
                    error = (
                        float(np.asarray(evidence)[0] - problem.log_evidence)
                        if evidence is not None
                        else np.nan
                    )
                    row = {
                        "method": method,
                        "cell": (dim, obs_dim),
                        "steps": steps,
                        "seed": seed,
                        "sw_ratio": distance / floors[dim, obs_dim, seed],
                        "evidence_error": error,
                        "seconds": seconds,
                    }
                    rows.append(row)
                    if progress is not None:
                        progress(row)
                # one compiled program per method and cell: free it before the next, or a
                # full table's hundred-odd programs exhaust the host's memory
                del sampler
                jax.clear_caches()
    return rows


def _interval(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=float)
    if np.all(np.isnan(values)):
        return "n/a"
    if np.any(np.isnan(values)):
        return f"NaN in {int(np.sum(np.isnan(values)))} runs"
    low, high = np.percentile(values, [2.5, 97.5])
    return f"{np.mean(values):.2f} [{low:.2f}, {high:.2f}]"


def gmm_table(rows: list[dict], *, command: str, particles: int, num_samples: int) -> str:
    """The markdown table of :func:`gmm_rows` (mean and central 95% interval over seeds, and
    the median), with the command and the machine."""
    lines = [
        "| method | steps | (d, dy) | SW / floor: median | mean [95% interval] | "
        "log-evidence error: median | mean [95% interval] | seconds (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["steps"], row["cell"]), []).append(row)
    for (method, steps, cell), group in groups.items():
        ratio = np.array([r["sw_ratio"] for r in group])
        error = np.array([r["evidence_error"] for r in group])
        seconds = np.array([r["seconds"] for r in group])
        error_median = "n/a" if np.all(np.isnan(error)) else f"{np.nanmedian(error):+.2f}"
        lines.append(
            f"| {method} | {steps} | {cell} | {np.nanmedian(ratio):.2f} | {_interval(ratio)} | "
            f"{error_median} | {_interval(error)} | {np.median(seconds):.2f} |"
        )
    seeds = sorted({r["seed"] for r in rows})
    header = [
        "# Gaussian-mixture benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"devices {[d.platform for d in jax.devices()]}, float32.",
        f"{len(seeds)} problems per cell (seeds {seeds[0]}..{seeds[-1]}), {particles} particles "
        "in one chain (one particle system for the SMC methods), SW with 1000 projections on "
        f"{num_samples} samples; floor = SW between two exact sample sets; seconds of a compiled "
        "run.",
        "",
    ]
    return "\n".join(header + lines) + "\n"


# -- digits ----------------------------------------------------------------------------------
#: Methods of the digits benchmark and the shipped prior each runs on.
DIGIT_METHODS: dict[str, tuple[Callable, str]] = {
    "tds": (lambda model: TDS(model), "digits"),
    "dps": (lambda model: DPS(model), "digits"),
    "pigdm": (lambda model: PiGDM(model), "digits"),
    "diffpir": (lambda model: DiffPIR(model), "digits"),
    "mcgdiff": (lambda model: MCGdiff(model), "digits"),
    "resample": (lambda model: ReSample(model), "digits-latent"),
    "mcgdiff-gaussian": (lambda model: MCGdiff(model, potential="gaussian"), "digits"),
}
#: What ``diffprior benchmark digits`` runs by default: one row per method (the variants on
#: request).
DIGIT_DEFAULT_METHODS = ("tds", "dps", "pigdm", "diffpir", "mcgdiff", "resample")
DIGIT_TASKS = ("inpaint", "superres")
#: The Gaussian noise level of the digits benchmark's observations.
DIGIT_SIGMA_Y = 0.1


def digit_calibration_inflation(method: str) -> float | None:
    """The calibration inflation of the shipped prior that ``method`` runs on in the digits
    benchmark (``None`` if that prior ships uncalibrated): a saved row counts only for the
    same calibration, since the twists of TDS and MCGdiff depend on it."""
    from diffprior import pretrained

    calibration = pretrained.metadata(DIGIT_METHODS[method][1]).get("calibration")
    return None if calibration is None else float(calibration.get("inflation", 1.0))


def digits_rows(
    methods: Sequence[str],
    tasks: Sequence[str] = DIGIT_TASKS,
    *,
    num_digits: int = 297,
    num_particles: int = 256,
    num_steps: int = 100,
    sigma_y: float = DIGIT_SIGMA_Y,
    progress: Callable[[dict], None] | None = None,
    skip: Collection[tuple[str, str, int]] = (),
) -> list[dict]:
    """One dict per (method, task, test digit): posterior-mean ``psnr`` (dB, pixel range 2),
    ``coverage`` of the true pixels by the 90% pixel-wise credible interval,
    ``mean_std`` and ``seconds`` of a compiled run. Half-image inpainting (left half observed)
    or 2x downsampling of held-out digits, Gaussian noise ``sigma_y`` drawn with the digit's
    index as seed; one compiled program per method and task. The runs named in ``skip``
    (``(method, task, digit)``, e.g. those of an interrupted table) are left out; a method and
    task with nothing left to run is not compiled. Each row also records the settings
    (``num_particles``, ``num_steps``, ``sigma_y`` and the prior's
    ``calibration_inflation``), so that saved rows can be checked before they are reused."""
    from diffprior import operators, pretrained

    unknown = [m for m in methods if m not in DIGIT_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(DIGIT_METHODS)}")
    _, test = pretrained.load_digits_split()
    if not 1 <= num_digits <= test.shape[0]:
        raise ValueError(f"num_digits must be in [1, {test.shape[0]}], got {num_digits}")
    forward = {
        "inpaint": operators.Inpaint(operators.half_mask((8, 8), side="left")),
        "superres": operators.Downsample(2, (8, 8)),
    }
    skip = set(skip)
    samplers = {}
    for method in methods:
        make_method, prior_name = DIGIT_METHODS[method]
        prior = pretrained.load(prior_name)
        for task in tasks:
            if all((method, task, digit) in skip for digit in range(num_digits)):
                continue

            def model(y=None, A=forward[task], prior=prior):
                x = numpyro.sample("x", prior)
                numpyro.sample("y", dist.Normal(A(x), sigma_y).to_event(1), obs=y)

            samplers[method, task] = Sampler(
                make_method(model), num_particles, num_steps, progress_bar=False
            )
    # digits outermost, so that a partial table compares every method on the same digits
    rows, compiled = [], {}
    for digit in range(num_digits):
        truth = np.asarray(test[digit])
        for task in tasks:
            clean = np.asarray(forward[task](truth))
            noise = np.random.default_rng(digit).normal(size=clean.shape)
            y = jax.numpy.asarray(clean + sigma_y * noise, dtype=np.float32)
            for method in methods:
                if (method, task, digit) in skip:
                    continue
                sampler = samplers[method, task]
                if not compiled.get((method, task)):  # compile once per method and task
                    sampler.run(jax.random.key(10_000), y=y)
                    compiled[method, task] = True
                start = time.perf_counter()
                sampler.run(jax.random.key(digit), y=y)
                seconds = time.perf_counter() - start
                samples = np.asarray(sampler.get_samples()["x"])
                mean = samples.mean(axis=0)
                lower, upper = np.quantile(samples, [0.05, 0.95], axis=0)
                row = {
                    "method": method,
                    "task": task,
                    "digit": digit,
                    "psnr": float(10 * np.log10(4.0 / np.mean((mean - truth) ** 2))),
                    "coverage": float(np.mean((truth >= lower) & (truth <= upper))),
                    "mean_std": float(samples.std(axis=0).mean()),
                    "finite": bool(np.all(np.isfinite(samples))),
                    "seconds": seconds,
                    "num_particles": num_particles,
                    "num_steps": num_steps,
                    "sigma_y": sigma_y,
                    "calibration_inflation": digit_calibration_inflation(method),
                }
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def digits_table(rows: list[dict], *, command: str, num_particles: int, num_steps: int) -> str:
    """Markdown table of :func:`digits_rows`: mean (and standard error) over digits."""
    lines = [
        "| task | method | digits | PSNR (dB) | 90% coverage | mean pixel std | NaN runs | "
        "seconds per digit (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)

    def mean_se(values):
        values = np.asarray(values, dtype=float)
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
        return f"{values.mean():.2f} ± {se:.2f}"

    for (task, method), group in sorted(groups.items()):
        lines.append(
            f"| {task} | {method} | {len(group)} | {mean_se([r['psnr'] for r in group])} | "
            f"{mean_se([r['coverage'] for r in group])} | "
            f"{np.mean([r['mean_std'] for r in group]):.3f} | "
            f"{sum(not r['finite'] for r in group)} | "
            f"{np.median([r['seconds'] for r in group]):.1f} |"
        )
    header = [
        "# Digits benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"devices {[d.platform for d in jax.devices()]}, float32.",
        f"Held-out test digits (the last 297 of scikit-learn's digits, never trained on), "
        f"sigma_y = {DIGIT_SIGMA_Y} Gaussian noise, {num_particles} particles, {num_steps} steps, one chain; "
        "mean ± standard error over digits. ReSample runs on the latent prior (digits-latent), "
        "the others on the pixel prior (digits).",
        "",
    ]
    if {"tds", "mcgdiff"} <= {row["method"] for row in rows}:
        header[-1:-1] = [
            "TDS's default proposal on these linear Gaussian models is MCGdiff's twisted step "
            "(docs/methods/tds.md) and both draw from the same keys, so their rows agree.",
        ]
    return "\n".join(header + lines) + "\n"
