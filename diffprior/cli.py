"""The ``diffprior`` command.

One function per sub-command, ``cmd_<name>(args) -> int``, and one ``add_<name>_parser`` that
declares its options; :func:`main` only wires them together. Sub-commands that this version does
not implement yet say so on stderr and return :data:`EXIT_NOT_AVAILABLE`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import diffprior
from diffprior.compilation_cache import compilation_cache_disabled, enable_compilation_cache

__all__ = ["METHODS", "EXIT_NOT_AVAILABLE", "EXIT_USAGE", "UsageError", "build_parser", "main"]

EXIT_NOT_AVAILABLE = 2
"""Exit status of a sub-command that this version does not provide (also argparse's usage
error status)."""

EXIT_USAGE = 2
"""Exit status of a user error (a bad argument or input file), as argparse's."""


class UsageError(ValueError):
    """A user error that a sub-command finds after parsing (an unreadable input file, an
    output path that cannot be written): :func:`main` prints it as one line,
    ``diffprior: error: ...``, without a traceback, and returns :data:`EXIT_USAGE`."""


METHODS = ("Unguided", "DPS", "PiGDM", "DiffPIR", "ReSample", "TDS", "FK", "MCGdiff")
"""Posterior samplers by their papers' names; ``--method`` takes any of them, in any case."""

_DESCRIPTION = (
    "Pretrained diffusion models as NumPyro priors: sample posteriors of inverse problems with "
    "guided diffusion and twisted sequential Monte Carlo, and read them with ArviZ."
)


def _method_name(value: str) -> str:
    by_lower = {name.lower(): name for name in METHODS}
    try:
        return by_lower[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown method {value!r}; choose one of {', '.join(METHODS)}"
        ) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _not_available(command: str) -> int:
    print(
        f"diffprior {command}: not available in diffprior {diffprior.__version__} yet; "
        "run 'diffprior --help' to see what this version provides.",
        file=sys.stderr,
    )
    return EXIT_NOT_AVAILABLE


# -- demo ----------------------------------------------------------------------------------------
def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: posterior of a masked, noisy digit under the shipped digits prior",
        description=(
            "Mask and add noise to a held-out digit, sample the posterior under the shipped "
            "digits diffusion prior, print a summary and write a DataTree (.nc) and a figure "
            "(.png) to the output folder."
        ),
    )
    from diffprior.demo import METHODS as DEMO_METHODS
    from diffprior.demo import NOISES, PRIORS, TASKS

    parser.add_argument("--task", choices=TASKS, default="inpaint", help="default: inpaint")
    parser.add_argument("--method", choices=DEMO_METHODS, default="tds", help="default: tds")
    parser.add_argument(
        "--noise", choices=NOISES, default="gaussian", help="noise model (default: gaussian)"
    )
    parser.add_argument(
        "--prior",
        choices=PRIORS,
        default=None,
        help="shipped prior (default: digits; digits-latent for --method resample); mcgdiff "
        "needs digits and gaussian noise",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="output folder (default: results/)"
    )
    parser.add_argument(
        "--num-particles", type=_positive_int, default=256, help="particles (default: 256)"
    )
    parser.add_argument(
        "--num-steps", type=_positive_int, default=100, help="diffusion steps (default: 100)"
    )
    parser.add_argument("--sigma-y", type=float, default=0.1, help="noise scale (default: 0.1)")
    parser.add_argument(
        "--digit", type=int, default=0, help="index of the held-out test digit (default: 0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from diffprior.demo import format_summary, run_demo

    if not args.sigma_y > 0:
        print(f"diffprior demo: --sigma-y must be > 0, got {args.sigma_y}", file=sys.stderr)
        return 2
    try:
        summary = run_demo(
            args.task,
            args.method,
            args.noise,
            args.out,
            num_particles=args.num_particles,
            num_steps=args.num_steps,
            sigma_y=args.sigma_y,
            digit=args.digit,
            seed=args.seed,
            prior=args.prior,
            progress_bar=not args.no_progress,
        )
    except (ValueError, NotImplementedError) as err:
        print(f"diffprior demo: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


# -- sample --------------------------------------------------------------------------------------
def add_sample_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample",
        help="sample a linear-Gaussian problem with a Gaussian-mixture prior (.npz in and out)",
        description=(
            "Sample the posterior of y = A x + N(0, sigma_y^2 I) under a Gaussian-mixture prior. "
            "Input keys: means (m, d), weights (m,), scale (), A (dy, d), sigma_y (), y (dy,). "
            "Output keys: x (n, d), log_evidence (num_chains,) (NaN where the method has none), "
            "seconds ()."
        ),
    )
    parser.add_argument("--problem", type=Path, required=True, help="input problem, .npz")
    parser.add_argument(
        "--method",
        type=_method_name,
        required=True,
        metavar="NAME",
        help=f"sampler, one of {', '.join(METHODS)} (any case)",
    )
    parser.add_argument(
        "--num-particles",
        type=_positive_int,
        default=512,
        metavar="K",
        help="particles per chain (default: 512)",
    )
    parser.add_argument(
        "--num-steps",
        type=_positive_int,
        default=100,
        metavar="T",
        help="diffusion steps (default: 100)",
    )
    parser.add_argument(
        "--num-chains", type=_positive_int, default=1, metavar="C", help="chains (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="output samples, .npz")
    return parser


_PROBLEM_KEYS = {
    "means": "(m, d)",
    "weights": "(m,)",
    "scale": "()",
    "A": "(dy, d)",
    "sigma_y": "()",
    "y": "(dy,)",
}
_PROBLEM_ARRAYS = ", ".join(f"{key} {shape}" for key, shape in _PROBLEM_KEYS.items())
_PROBLEM_CONTENTS = f"a NumPy .npz archive (numpy.savez) of real-number arrays {_PROBLEM_ARRAYS}"


def _reason(err: BaseException) -> str:
    """``Type: first line`` of an error, for one-line messages."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _read_problem_arrays(path: Path) -> dict:
    """The six arrays of a problem file, as float32, with a :class:`UsageError` that says what
    the file should hold when it is not such an archive (never unpickles anything)."""
    import zipfile

    import numpy as np

    where = f"--problem {path}"
    if path.is_dir():
        raise UsageError(f"{where}: is a directory; expected {_PROBLEM_CONTENTS}")
    if not path.is_file():
        raise UsageError(f"{where}: no such file; expected {_PROBLEM_CONTENTS}")
    with open(path, "rb") as handle:
        header = handle.read(6)
    if not header.startswith((b"PK", b"\x93NUMPY")):
        # NumPy would try to unpickle it and suggest allow_pickle=True: never for a data file
        raise UsageError(
            f"{where}: not an .npz archive (no zip header: text, pickled or other data); "
            f"expected {_PROBLEM_CONTENTS}"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(
            f"{where}: not a readable .npz archive ({_reason(err)}); expected {_PROBLEM_CONTENTS}"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UsageError(
            f"{where}: holds a single array (a .npy file), not an .npz archive; "
            f"expected {_PROBLEM_CONTENTS}"
        )
    arrays = {}
    with archive as data:
        missing = [key for key in _PROBLEM_KEYS if key not in data.files]
        if missing:
            raise UsageError(
                f"{where}: missing keys {missing} (found {sorted(data.files)}); "
                f"expected {_PROBLEM_CONTENTS}"
            )
        for key, shape in _PROBLEM_KEYS.items():
            try:
                value = data[key]
            except Exception as err:  # noqa: BLE001 -- any unreadable member: say which and why
                raise UsageError(
                    f"{where}: cannot read {key} ({_reason(err)}); expected {key} {shape} as an "
                    "array of real numbers saved with numpy.savez (no pickled objects)"
                ) from None
            if value.dtype.kind not in "iuf":
                raise UsageError(
                    f"{where}: {key} must hold real numbers, shape {shape}; got an array of "
                    f"dtype {value.dtype} and shape {value.shape}"
                )
            arrays[key] = value.astype(np.float32)
    return arrays


def _load_problem(path: Path):
    """Read and check a problem file; return the prior, A, sigma_y and y."""
    import jax.numpy as jnp
    import numpy as np

    where = f"--problem {path}"
    arrays = _read_problem_arrays(path)
    means, A, y = arrays["means"], arrays["A"], arrays["y"]
    if means.ndim != 2:
        raise UsageError(f"{where}: means must have shape (m, d), got {means.shape}")
    m, d = means.shape
    dy = A.shape[0] if A.ndim == 2 else "dy"
    expected = {"weights": (m,), "scale": (), "A": (dy, d), "sigma_y": (), "y": (dy,)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            described = _PROBLEM_KEYS[key]
            raise UsageError(
                f"{where}: {key} must have shape {described} = {shape} (means is {means.shape}), "
                f"got {arrays[key].shape}".replace("'dy'", "dy")
            )
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            bad = int((~np.isfinite(value)).sum())
            raise UsageError(
                f"{where}: {key} has NaN or inf entries ({bad} of {value.size}, as float32); "
                "every entry must be finite"
            )
    weights = arrays["weights"]
    for key, ok, allowed in (
        ("weights", np.all(weights >= 0) and weights.sum() > 0, ">= 0, not all 0"),
        ("scale", arrays["scale"] > 0, "> 0"),
        ("sigma_y", arrays["sigma_y"] > 0, "> 0"),
    ):
        if not ok:
            raise UsageError(f"{where}: {key} must be {allowed}, got {arrays[key].tolist()}")
    try:
        prior = diffprior.GaussianMixture(means, arrays["weights"], float(arrays["scale"]))
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from None
    return prior, jnp.asarray(A), jnp.asarray(arrays["sigma_y"]), jnp.asarray(y)


def _atomic_savez(path: Path, **arrays) -> None:
    import numpy as np

    from diffprior.io import write_atomically

    def write(name):
        with open(name, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(path, write)


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from diffprior.io import check_writable
    from diffprior.model import ModelError

    method_cls = getattr(diffprior, args.method, None)
    if method_cls is None:
        return _not_available(f"sample --method {args.method}")
    # every input is checked before anything is compiled or sampled
    prior, A, sigma_y, y = _load_problem(args.problem)
    try:
        check_writable(args.out)
    except ValueError as err:
        raise UsageError(f"--out {err}") from None

    def model(A, sigma_y, y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", dist.Normal(A @ x, sigma_y).to_event(1), obs=y)

    sampler = diffprior.Sampler(
        method_cls(model),
        num_particles=args.num_particles,
        num_steps=args.num_steps,
        num_chains=args.num_chains,
        progress_bar=sys.stderr.isatty(),
    )
    start = time.perf_counter()
    try:
        sampler.run(jax.random.key(args.seed), A, sigma_y, y=y)
    except ModelError as err:  # raised while the model is read, before compiling
        raise UsageError(f"--problem {args.problem}: {err}") from None
    seconds = time.perf_counter() - start
    log_evidence = sampler.log_evidence
    if log_evidence is None:
        log_evidence = np.full((args.num_chains,), np.nan, dtype=np.float32)
    _atomic_savez(
        args.out,
        x=np.asarray(sampler.get_samples()["x"]),
        log_evidence=np.asarray(log_evidence),
        seconds=np.asarray(seconds),
    )
    print(
        f"diffprior sample: {args.method}, {args.num_chains} x {args.num_particles} particles, "
        f"{args.num_steps} steps, {seconds:.2f} s (compilation included) -> {args.out}"
    )
    return 0


# -- benchmark -----------------------------------------------------------------------------------
def _cell(value: str) -> tuple[int, int]:
    try:
        dim, obs_dim = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a cell is DxDY (dimension x observations), e.g. 8x1; got {value!r}"
        ) from None
    if dim < 2 or dim % 2 or obs_dim < 1:
        raise argparse.ArgumentTypeError(
            f"a cell needs an even dimension >= 2 and >= 1 observation, got {value!r}"
        )
    return dim, obs_dim


def add_benchmark_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from diffprior.benchmark import (
        DEFAULT_CELLS,
        DIGIT_DEFAULT_METHODS,
        DIGIT_METHODS,
        DIGIT_TASKS,
        METHODS,
    )

    parser = subparsers.add_parser(
        "benchmark",
        help="reproduce the tables in benchmarks/",
        description="Run the samplers on a benchmark problem and write its table.",
    )
    problems = parser.add_subparsers(dest="problem", metavar="PROBLEM", required=True)
    gmm = problems.add_parser(
        "gmm",
        help="the Gaussian-mixture problem with exact posteriors",
        description=(
            "The Gaussian-mixture problem of the MCGdiff paper: sliced Wasserstein to exact "
            "posterior samples over the exact-sample floor, log-evidence error, seconds."
        ),
    )
    gmm.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods (default: all of {', '.join(METHODS)})",
    )
    gmm.add_argument(
        "--cells",
        nargs="+",
        type=_cell,
        default=list(DEFAULT_CELLS),
        metavar="DxDY",
        help="problem sizes (default: 8, 80, 800 by 1, 2, 4)",
    )
    gmm.add_argument("--seeds", type=_positive_int, default=10, help="problems per cell")
    gmm.add_argument(
        "--num-steps", nargs="+", type=_positive_int, default=[20, 100], help="step counts"
    )
    gmm.add_argument(
        "--particles", type=_positive_int, default=2048, help="particles in total per run"
    )
    gmm.add_argument(
        "--num-samples", type=_positive_int, default=2000, help="samples scored per run"
    )
    gmm.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/gmm.md"),
        help="markdown table to write atomically (default: benchmarks/results/gmm.md)",
    )
    digits = problems.add_parser(
        "digits",
        help="half-image inpainting and 2x super-resolution of held-out digits",
        description=(
            "Held-out digits under half-image inpainting and 2x super-resolution with "
            "sigma_y = 0.1: posterior-mean PSNR, 90% coverage of the true pixels, seconds."
        ),
    )
    digits.add_argument(
        "--methods",
        nargs="+",
        default=list(DIGIT_DEFAULT_METHODS),
        choices=list(DIGIT_METHODS),
        metavar="METHOD",
        help=f"methods (default: {', '.join(DIGIT_DEFAULT_METHODS)})",
    )
    digits.add_argument("--tasks", nargs="+", default=list(DIGIT_TASKS), choices=list(DIGIT_TASKS))
    digits.add_argument(
        "--num-digits", type=_positive_int, default=297, help="first N test digits (max 297)"
    )
    digits.add_argument("--num-particles", type=_positive_int, default=256)
    digits.add_argument("--num-steps", type=_positive_int, default=100)
    digits.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/digits.md"),
        help="markdown table to write atomically (default: benchmarks/results/digits.md); "
        "each run's row is also appended to OUT with the suffix .rows.jsonl",
    )
    digits.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in OUT's .rows.jsonl (same settings) and run only the "
        "missing ones, so that a long table can be built over several sittings; without it "
        "the rows file starts afresh",
    )
    return parser


def _load_rows(path: Path) -> list[dict]:
    """The rows of a ``.rows.jsonl`` file; a last line cut short by an interrupted write is
    dropped (its run is simply done again)."""
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON row") from None
    return rows


def _command_line(args: argparse.Namespace) -> str:
    if sys.argv[1:2] == ["benchmark"]:
        return " ".join(["diffprior", *sys.argv[1:]])
    if args.problem == "gmm":
        cells = " ".join(f"{d}x{dy}" for d, dy in args.cells)
        return (
            f"diffprior benchmark gmm --methods {' '.join(args.methods)} --cells {cells} "
            f"--seeds {args.seeds} --num-steps {' '.join(map(str, args.num_steps))} "
            f"--particles {args.particles} --num-samples {args.num_samples} --out {args.out}"
        )
    return (
        f"diffprior benchmark digits --methods {' '.join(args.methods)} --tasks "
        f"{' '.join(args.tasks)} --num-digits {args.num_digits} --num-particles "
        f"{args.num_particles} --num-steps {args.num_steps} --out {args.out}"
    )


def cmd_benchmark(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from diffprior import benchmark
    from diffprior.io import write_text

    command = _command_line(args)
    if args.problem == "gmm":
        if args.num_samples > args.particles:
            print(
                f"diffprior benchmark: --num-samples ({args.num_samples}) must be <= "
                f"--particles ({args.particles})",
                file=sys.stderr,
            )
            return 2
        total = len(args.methods) * len(args.cells) * len(args.num_steps) * args.seeds

        def table(rows):
            return benchmark.gmm_table(
                rows, command=command, particles=args.particles, num_samples=args.num_samples
            )

        def run(progress):
            return benchmark.gmm_rows(
                args.methods,
                args.cells,
                seeds=args.seeds,
                num_steps=args.num_steps,
                particles=args.particles,
                num_samples=args.num_samples,
                progress=progress,
            )

        def describe(row):
            return f"{row['method']} {row['cell']} SW/floor {row['sw_ratio']:.2f}"
    else:
        if args.num_digits > 297:
            print("diffprior benchmark: --num-digits must be <= 297", file=sys.stderr)
            return 2
        total = len(args.methods) * len(args.tasks) * args.num_digits
        rows_path = args.out.with_name(args.out.stem + ".rows.jsonl")
        settings = {
            "num_particles": args.num_particles,
            "num_steps": args.num_steps,
            "sigma_y": benchmark.DIGIT_SIGMA_Y,
        }
        if args.resume and rows_path.exists():
            try:
                saved = _load_rows(rows_path)
            except ValueError as error:
                print(f"diffprior benchmark: {error}", file=sys.stderr)
                return 2
            # rewritten without a torn last line, so that new rows start on a line of their own
            write_text(rows_path, "".join(json.dumps(r) + "\n" for r in saved))
            other = [r for r in saved if any(r.get(k) != v for k, v in settings.items())]
            if other:
                found = {k: other[0].get(k) for k in settings}
                print(
                    f"diffprior benchmark: {rows_path} holds rows made with {found}, not "
                    f"{settings}; run with those settings, or without --resume to start afresh",
                    file=sys.stderr,
                )
                return 2
            recalibrated = [
                r
                for r in saved
                if r.get("method") in benchmark.DIGIT_METHODS
                and r.get("calibration_inflation")
                != benchmark.digit_calibration_inflation(r["method"])
            ]
            if recalibrated:
                row = recalibrated[0]
                print(
                    f"diffprior benchmark: {rows_path} holds rows made with another calibration "
                    f"of the shipped prior (e.g. {row['method']}, digit {row['digit']}: "
                    f"calibration_inflation {row.get('calibration_inflation')}, now "
                    f"{benchmark.digit_calibration_inflation(row['method'])}); run without "
                    "--resume to start afresh",
                    file=sys.stderr,
                )
                return 2
            saved = [
                r
                for r in saved
                if r["method"] in args.methods
                and r["task"] in args.tasks
                and r["digit"] < args.num_digits
            ]
        else:
            saved = []
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(rows_path, "")

        def record(row):
            with open(rows_path, "a") as file:
                file.write(json.dumps(row) + "\n")
                file.flush()
                os.fsync(file.fileno())

        def table(rows):
            return benchmark.digits_table(
                rows,
                command=command,
                num_particles=args.num_particles,
                num_steps=args.num_steps,
            )

        def run(progress):
            return saved + benchmark.digits_rows(
                args.methods,
                args.tasks,
                num_digits=args.num_digits,
                num_particles=args.num_particles,
                num_steps=args.num_steps,
                progress=progress,
                skip={(r["method"], r["task"], r["digit"]) for r in saved},
            )

        def describe(row):
            return f"{row['method']} {row['task']} PSNR {row['psnr']:.1f}"

    if args.problem == "gmm":
        saved, record = [], None
    done: list[dict] = list(saved)

    def text_of(rows):
        text = table(rows)
        if len(rows) < total:
            text += f"\n(partial: {len(rows)} of {total} runs so far)\n"
        return text

    with tqdm(
        total=total, initial=len(saved), desc=f"benchmark {args.problem}", file=sys.stderr
    ) as bar:

        def progress(row):
            done.append(row)
            if record is not None:
                record(row)
            # the table so far, so that an interrupted run loses nothing
            write_text(args.out, text_of(done))
            bar.set_postfix_str(describe(row))
            bar.update()

        rows = run(progress)
    text = text_of(rows)
    write_text(args.out, text)
    print(text)
    print(f"wrote {args.out}")
    return 0


# -- wiring --------------------------------------------------------------------------------------
# (declare the sub-command's parser, run it): a new sub-command is one more pair here.
_COMMANDS: tuple[tuple[Callable, Callable[[argparse.Namespace], int]], ...] = (
    (add_demo_parser, cmd_demo),
    (add_sample_parser, cmd_sample),
    (add_benchmark_parser, cmd_benchmark),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``diffprior`` argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="diffprior", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {diffprior.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser, run in _COMMANDS:
        sub = add_parser(subparsers)
        sub.add_argument(
            "--no-compile-cache",
            action="store_true",
            help="do not keep compiled programs on disk (by default they are kept in "
            "$DIFFPRIOR_CACHE_DIR or ~/.cache/diffprior/jax, so a second run with the same "
            "shapes skips compiling; DIFFPRIOR_NO_COMPILE_CACHE=1 does the same)",
        )
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffprior`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status. ``--help`` and ``--version`` exit through ``SystemExit(0)`` as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if not args.no_compile_cache and not compilation_cache_disabled():
        enable_compilation_cache()
    try:
        return args.run(args)
    except UsageError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
