"""Particle throughput of TDS and MCGdiff on one accelerator, in particle-steps per second.

    python benchmarks/gpu.py [--tiny] [--out FILE] [--budget SECONDS] [--shard-option NAME=VALUE]
    bash benchmarks/gpu.sh [--tiny] [...]   # the same, with the machine's description first

Two problems: the d = 800 Gaussian-mixture problem of the MCGdiff paper
(:func:`diffprior.problems.mixture_problem`, ``dy = 2``, its exact denoiser) and half-image
inpainting of a held-out digit under the shipped ``"digits"`` prior (its U-Net), each sampled
by TDS and MCGdiff with all particles in one chain, at 4096, 65536 and 262144 particles (the
digits at 262144 last, as time allows) and 20 steps. Every cell is one ``dp.Sampler``: a first run (compilation included),
then timed runs of the compiled program (the Sampler's own ``seconds``: the compiled call up to
``jax.block_until_ready``); the table gives their median and particle-steps per second
(``particles * steps / seconds``). The denominator of the overhead ratio is the network's own
value-and-gradient through ``x0_hat`` on the same number of particles (as in
``benchmarks/overhead.py``): ratio = (seconds / steps) / (one value-and-gradient), so a step
that costs one network gradient and nothing else reads 1.

The sharded path (one chain's particles split over all local devices) is TDS at 65536 particles
on each problem with ``dp.Sampler(..., shard_particles=True)`` (or another option whose name says
shard, device or mesh, or the one given with ``--shard-option``); on a Sampler without such an
option its rows say "not available".

Each cell runs in its own ``try``: a failure (out of memory, say) is written into its row and
the next cell runs. The table is rewritten (atomically) after every cell, so a run stopped by a
time limit leaves the cells done so far; a cell that would not finish within ``--budget``
seconds of the start is recorded as "skipped (budget)".

``--tiny`` runs the same cells at 64 (mixture, sharded) and 128 (digits) particles and 3 steps,
for a check on a CPU (where the time is all compilation).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import diffprior as dp
from diffprior import demo
from diffprior.benchmark import mixture_model
from diffprior.io import write_text
from diffprior.problems import mixture_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import median_time  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.md"

METHODS: dict[str, Callable] = {"TDS": dp.TDS, "MCGdiff": dp.MCGdiff}
#: The Sampler's options before particle sharding; any other option whose name says shard,
#: device or mesh is taken for the sharded path.
KNOWN_SAMPLER_OPTIONS = {
    "self",
    "method",
    "num_particles",
    "num_steps",
    "num_chains",
    "chain_method",
    "progress_bar",
}
KNOWN_CHAIN_METHODS = ("vectorized", "sequential", "parallel")
PROBLEM_NAMES = {
    "mixture": "mixture d={dim}, dy={obs_dim}",
    "digits": "digits inpaint (8x8 U-Net)",
}
MIXTURE_DIM = 800
MIXTURE_OBS_DIM = 2
COLUMNS = (
    "method",
    "problem",
    "particles",
    "steps",
    "first run s (compile)",
    "seconds (median)",
    "runs",
    "particle-steps/s",
    "run() wall s",
    "value-and-grad s",
    "ratio (step / value-and-grad)",
    "notes",
)


# -- problems ---------------------------------------------------------------------------------
class Problem(NamedTuple):
    """What a cell needs: the model and its arguments, the denoiser and the log-likelihood
    of one particle (for the value-and-gradient), and the event shape."""

    model: Callable
    args: tuple
    kwargs: dict[str, Any]
    denoiser: dp.Denoiser
    log_likelihood: Callable
    event_shape: tuple[int, ...]


def mixture(dim: int, obs_dim: int) -> Problem:
    problem = mixture_problem(jax.random.key(0), dim, obs_dim)

    def log_likelihood(x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(problem.y, problem.A @ x, problem.sigma_y))

    return Problem(
        mixture_model,
        (problem.prior, problem.A, problem.sigma_y),
        {"y": problem.y},
        problem.prior.denoiser,
        log_likelihood,
        (dim,),
    )


def digits(sigma_y: float = 0.1) -> Problem:
    _, A, y, model = demo.make_problem("inpaint", "gaussian", sigma_y, digit=0, seed=0)
    prior = dp.pretrained.load("digits")

    def log_likelihood(x):
        return jnp.sum(dist.Normal(A(x), sigma_y).log_prob(y))

    return Problem(
        model,
        (),
        {"y": y},
        prior.denoiser,
        log_likelihood,
        prior.event_shape,
    )


# -- the sharded path -------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def sharding_candidates(explicit: str | None) -> tuple[list[dict[str, Any]], str]:
    """Sampler options to try for one chain sharded over all local devices, and a note on
    where they come from; no candidates when the Sampler has no such option."""
    if explicit:
        name, _, value = explicit.partition("=")
        return [{name.strip(): _parse_value(value)}], f"--shard-option {explicit}"
    parameters = inspect.signature(dp.Sampler.__init__).parameters
    if "shard_particles" in parameters:
        return [{"shard_particles": True}], "option 'shard_particles'"
    for name in parameters:
        if name in KNOWN_SAMPLER_OPTIONS:
            continue
        if any(word in name.lower() for word in ("shard", "device", "mesh")):
            values = [True, jax.local_devices(), len(jax.local_devices()), "particles"]
            return [{name: value} for value in values], f"option {name!r}"
    try:
        from diffprior.infer.sampler import CHAIN_METHODS
    except ImportError:
        CHAIN_METHODS = KNOWN_CHAIN_METHODS
    for chain_method in CHAIN_METHODS:
        if chain_method not in KNOWN_CHAIN_METHODS:
            return [{"chain_method": chain_method}], f"chain_method {chain_method!r}"
    return [], "not available (no sharding option on dp.Sampler)"


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v!r}" if not isinstance(v, list) else f"{k}=<devices>" for k, v in options.items()
    )


# -- timing -----------------------------------------------------------------------------------
def value_and_grad_seconds(problem: Problem, particles: int, steps: int, repeats: int) -> float:
    """Median seconds of the network's value-and-gradient through ``x0_hat`` (vmapped) on
    ``particles`` particles, at the middle time of the run's grid."""
    denoiser = problem.denoiser
    t = dp.diffusion.timesteps(denoiser.schedule, steps)[steps // 2]

    def one(x):
        return problem.log_likelihood(denoiser.x0(x, t))

    fn = jax.jit(jax.vmap(jax.value_and_grad(one)))
    x = jax.random.normal(jax.random.key(3), (particles, *problem.event_shape))
    seconds = median_time(fn, x, repeats=repeats)
    del fn, x
    return seconds


def time_sampler(
    sampler, problem: Problem, repeats: int, max_timed: float
) -> tuple[float, list[float], list[float], bool, list[str]]:
    """``(first run seconds, compiled seconds per timed run, wall seconds per timed run,
    finite samples, warnings)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        sampler.run(jax.random.key(0), *problem.args, **problem.kwargs)
        first = time.perf_counter() - start
        compiled, walls = [], []
        for repeat in range(repeats):
            start = time.perf_counter()
            sampler.run(jax.random.key(repeat + 1), *problem.args, **problem.kwargs)
            wall = time.perf_counter() - start
            seconds = getattr(sampler, "seconds", None)
            compiled.append(float(seconds) if isinstance(seconds, int | float) else wall)
            walls.append(wall)
            if sum(walls) > max_timed:
                break
    samples = sampler.get_samples()["x"]
    finite = bool(jnp.all(jnp.isfinite(samples)))
    messages = []
    for warning in caught:
        text = str(warning.message).split(";")[0].split(". ")[0]
        if text not in messages:
            messages.append(text)
    return first, compiled, walls, finite, messages


# -- the table --------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value >= 1e4:
            return f"{value:.4g}" if value < 1e6 else f"{value:.3e}"
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def render(rows: list[dict], header: list[str], footer: list[str]) -> str:
    lines = list(header)
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines + [""] + footer) + "\n"


def device_description() -> str:
    devices = jax.local_devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    return f"{len(devices)} x {', '.join(kinds)} ({devices[0].platform})"


# -- main -------------------------------------------------------------------------------------
#: The cells of a full run and of ``--tiny``: particles per problem, in the order they run
#: (``digits_large`` last, after the sharded cells: it is the first to go when time runs out).
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "mixture_particles": (4096, 65536, 262144),
        "digits_particles": (4096, 65536),
        "digits_large": (262144,),
        "sharded_particles": 65536,
        "steps": 20,
        "repeats": 3,
        "vg_repeats": 5,
    },
    "tiny": {
        "mixture_particles": (64,),
        "digits_particles": (128,),
        "digits_large": (),
        "sharded_particles": 64,
        "steps": 3,
        "repeats": 2,
        "vg_repeats": 3,
    },
}


def package_versions() -> str:
    from importlib import metadata

    found = []
    for name in (
        "jaxlib",
        "jax-cuda13-plugin",
        "jax-cuda12-plugin",
        "numpyro",
        "equinox",
        "blackjax",
        "numpy",
    ):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


class Benchmark:
    """The cells of one run, written to ``out`` after each."""

    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.plan = PLANS["tiny" if args.tiny else "full"]
        self.steps = args.steps or self.plan["steps"]
        self.repeats = self.plan["repeats"]
        self.out = args.out or DEFAULT_OUT
        self.started = time.perf_counter()
        self.rows: list[dict] = []
        self.footer: list[str] = []
        self.problems: dict[str, Problem | Exception] = {}
        self.value_and_grad_cache: dict[tuple[str, int], float | None] = {}
        #: per (problem, method): (compile seconds, seconds of one run, particles) of its
        #: last cell, from which the next cell's time is guessed
        self.history: dict[tuple[str, str], tuple[float, float, int]] = {}
        self.header = [
            "# Particle throughput on one accelerator",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores; devices: "
            f"{device_description()}; jax {jax.__version__} ({package_versions()}), "
            f"diffprior {dp.__version__}, Python {platform.python_version()}, float32.",
            "",
            f"One chain, {self.steps} steps; seconds = median of the timed runs of the compiled "
            "program (after a first run that compiles); particle-steps/s = particles x steps / "
            "seconds; run() wall s = the whole `Sampler.run` call (reading the model, checks, "
            "warnings); value-and-grad s = one vmapped value-and-gradient of "
            "log p(y | x0_hat(x_t)) through the network on the same number of particles (its "
            "row's particle-steps/s are particle-evaluations/s); ratio = (seconds / steps) / "
            "value-and-grad s (the run's initialisation and final resampling count in its "
            "steps).",
            "",
        ]

    # -- output -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def flush(self) -> None:
        footer = self.footer + [f"Elapsed: {self.elapsed():.0f} s."]
        write_text(self.out, render(self.rows, self.header, footer))

    def report(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()
        fields = ", ".join(f"{k}={_cell(v)}" for k, v in row.items() if v != "")
        print(f"[{self.elapsed():6.1f}s] {fields}", flush=True)

    def row(self, method: str, problem_key: str, particles: int, **fields: Any) -> dict:
        label = PROBLEM_NAMES[problem_key].format(dim=MIXTURE_DIM, obs_dim=MIXTURE_OBS_DIM)
        return {"method": method, "problem": label, "particles": particles, **fields}

    # -- cells --------------------------------------------------------------------------------
    def problem(self, problem_key: str) -> Problem:
        if problem_key not in self.problems:
            try:
                self.problems[problem_key] = (
                    mixture(MIXTURE_DIM, MIXTURE_OBS_DIM) if problem_key == "mixture" else digits()
                )
            except Exception as error:  # noqa: BLE001 - recorded in each of the problem's rows
                self.problems[problem_key] = error
        problem = self.problems[problem_key]
        if isinstance(problem, Exception):
            raise problem
        return problem

    def value_and_grad(self, problem_key: str, particles: int) -> float | None:
        """The denominator of the cells at ``particles`` (its own row the first time)."""
        key = (problem_key, particles)
        if key in self.value_and_grad_cache:
            return self.value_and_grad_cache[key]
        row = self.row("value-and-grad", problem_key, particles)
        self.value_and_grad_cache[key] = None
        try:
            repeats = self.plan["vg_repeats"]
            problem = self.problem(problem_key)
            seconds = value_and_grad_seconds(problem, particles, self.steps, repeats)
            self.value_and_grad_cache[key] = seconds
            row.update(
                {
                    "seconds (median)": seconds,
                    "runs": repeats,
                    "particle-steps/s": particles / seconds,
                }
            )
        except Exception as error:  # noqa: BLE001 - a cell's failure is recorded, not raised
            row["notes"] = f"error: {type(error).__name__}: {str(error)[:300]}"
            traceback.print_exc()
        self.report(row)
        gc.collect()
        return self.value_and_grad_cache[key]

    def estimate(self, problem_key: str, method: str, particles: int) -> float:
        """Seconds a cell is expected to take: the last like cell's compilation plus its runs
        scaled to ``particles``; for the first of its kind, the longest compilation so far."""
        if (problem_key, method) not in self.history:
            return max((compile_s for compile_s, _, _ in self.history.values()), default=0.0)
        compile_s, run_s, previous = self.history[problem_key, method]
        run_s = run_s * particles / previous
        # time_sampler stops the timed runs once they pass max_timed
        timed_runs = min(self.repeats, math.floor(self.args.max_timed / max(run_s, 1e-9)) + 1)
        return compile_s + (1 + timed_runs) * run_s

    def sampler_cell(
        self,
        problem_key: str,
        method: str,
        particles: int,
        options: dict[str, Any] | None = None,
        label: str | None = None,
    ) -> None:
        row = self.row(label or method, problem_key, particles, steps=self.steps)
        elapsed = self.elapsed()
        if elapsed + self.estimate(problem_key, method, particles) > self.args.budget:
            row["notes"] = f"skipped (budget: {elapsed:.0f} s elapsed of {self.args.budget:.0f})"
            self.report(row)
            return
        sampler = None
        try:
            problem = self.problem(problem_key)
            reference = self.value_and_grad(problem_key, particles)
            sampler = dp.Sampler(
                METHODS[method](problem.model),
                num_particles=particles,
                num_steps=self.steps,
                progress_bar=False,
                **(options or {}),
            )
            first, compiled, walls, finite, messages = time_sampler(
                sampler, problem, self.repeats, self.args.max_timed
            )
            seconds = statistics.median(compiled)
            row.update(
                {
                    "first run s (compile)": first,
                    "seconds (median)": seconds,
                    "runs": len(compiled),
                    "particle-steps/s": particles * self.steps / seconds,
                    "run() wall s": statistics.median(walls),
                }
            )
            if reference is not None:
                row["value-and-grad s"] = reference
                row["ratio (step / value-and-grad)"] = seconds / self.steps / reference
            notes = [] if finite else ["NON-FINITE samples"]
            if options:
                sharding = getattr(sampler.get_samples()["x"], "sharding", None)
                notes.append(f"{_describe(options)}; samples sharding: {sharding}")
            notes += [f"warned: {message}" for message in messages[:2]]
            row["notes"] = "; ".join(notes)
            self.history[problem_key, method] = (max(first - seconds, 0.0), seconds, particles)
        except Exception as error:  # noqa: BLE001 - a cell's failure is recorded, not raised
            row["notes"] = f"error: {type(error).__name__}: {str(error)[:300]}"
            traceback.print_exc()
        finally:
            del sampler
            gc.collect()
            jax.clear_caches()
        self.report(row)

    def sharded_cells(self) -> None:
        """TDS with one chain's particles sharded over all local devices, if the Sampler can."""
        candidates, source = sharding_candidates(self.args.shard_option)
        particles = self.plan["sharded_particles"]
        chosen, refusals = None, []
        for options in candidates:  # the first the Sampler accepts (made, not run: cheap)
            try:
                dp.Sampler(
                    dp.TDS(mixture_model),
                    num_particles=particles,
                    num_steps=self.steps,
                    progress_bar=False,
                    **options,
                )
                chosen = options
                break
            except (TypeError, ValueError) as error:
                refusals.append(f"{_describe(options)}: {type(error).__name__}: {error}"[:200])
        for problem_key in self.args.problems:
            if chosen is not None:
                self.sampler_cell(problem_key, "TDS", particles, chosen, label="TDS (sharded)")
                continue
            note = source if not refusals else f"not available ({source} refused: "
            note += " / ".join(refusals) + (")" if refusals else "")
            self.report(
                self.row("TDS (sharded)", problem_key, particles, steps=self.steps, notes=note)
            )

    def run(self) -> None:
        print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
        self.flush()
        problems = self.args.problems
        if "mixture" in problems:
            for particles in self.plan["mixture_particles"]:
                for method in METHODS:
                    self.sampler_cell("mixture", method, particles)
        if "digits" in problems:
            for particles in self.plan["digits_particles"]:
                for method in METHODS:
                    self.sampler_cell("digits", method, particles)
        if self.args.sharded:
            self.sharded_cells()
        if "digits" in problems:
            for particles in self.plan["digits_large"]:
                for method in METHODS:
                    self.sampler_cell("digits", method, particles)
        self.footer.append("Finished: every cell ran or is marked.")
        self.flush()
        print(f"wrote {self.out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="64/128 particles, 3 steps (CPU)")
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    parser.add_argument(
        "--budget",
        type=float,
        default=400.0,
        help="seconds from the start after which the remaining cells are skipped",
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=tuple(PROBLEM_NAMES),
        default=list(PROBLEM_NAMES),
        help="which problems to run (default both)",
    )
    parser.add_argument(
        "--no-sharded",
        dest="sharded",
        action="store_false",
        help="leave out the sharded cells",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the step count")
    parser.add_argument(
        "--max-timed",
        type=float,
        default=20.0,
        help="stop a cell's timed runs once they add up to this many seconds (at least one)",
    )
    parser.add_argument(
        "--shard-option",
        default=None,
        help="NAME=VALUE: the dp.Sampler option that shards one chain's particles",
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = os.environ.get("DIFFPRIOR_GPU_COMMAND") or "python benchmarks/gpu.py " + " ".join(
        shlex.quote(a) for a in argv
    )
    Benchmark(args, command.strip()).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
