"""The ``diffprior`` command.

One function per sub-command, ``cmd_<name>(args) -> int``, and one ``add_<name>_parser`` that
declares its options; :func:`main` only wires them together. Sub-commands that this version does
not implement yet say so on stderr and return :data:`EXIT_NOT_AVAILABLE`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import diffprior

__all__ = ["METHODS", "EXIT_NOT_AVAILABLE", "build_parser", "main"]

EXIT_NOT_AVAILABLE = 2
"""Exit status of a sub-command that this version does not provide (also argparse's usage
error status)."""

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
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="output folder (default: results/)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    return _not_available("demo")


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


def cmd_sample(args: argparse.Namespace) -> int:
    return _not_available("sample")


# -- benchmark -----------------------------------------------------------------------------------
def add_benchmark_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "benchmark",
        help="reproduce the tables in benchmarks/",
        description="Run the samplers on the benchmark problems and write the tables.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="output folder (default: benchmarks/results/)",
    )
    return parser


def cmd_benchmark(args: argparse.Namespace) -> int:
    return _not_available("benchmark")


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
        add_parser(subparsers).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffprior`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status. ``--help`` and ``--version`` exit through ``SystemExit(0)`` as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)
