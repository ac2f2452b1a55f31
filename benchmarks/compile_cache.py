"""Second ``diffprior sample`` / ``diffprior demo`` of the same shapes against the first.

Each run is a fresh process, as a user's is. A cold run starts from an empty compilation cache,
a warm run from the cache the cold run before it left; runs alternate cold, warm, cold, warm, ...
so that a drift in the machine's speed hits both alike, and the ratio is taken pair by pair.

    python benchmarks/compile_cache.py [--pairs 5] [--out benchmarks/results/compile_cache.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _problem(path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        means=rng.normal(size=(4, 8)) * 3.0,
        weights=np.full(4, 0.25),
        scale=np.array(1.0),
        A=rng.normal(size=(2, 8)),
        sigma_y=np.array(0.5),
        y=np.array([0.7, -0.3]),
    )


def _timed(argv: list[str], cache: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "DIFFPRIOR_NO_COMPILE_CACHE"}
    env["DIFFPRIOR_CACHE_DIR"] = str(cache)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "diffprior", *argv],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compile_cache.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    _problem(work / "problem.npz")
    commands = {
        "sample (TDS, d = 8, 4 x 512 particles, 100 steps)": (
            f"sample --problem {work / 'problem.npz'} --method tds --num-particles 512 "
            f"--num-chains 4 --num-steps 100 --out {work / 'out.npz'}"
        ).split(),
        "demo (TDS, digits, defaults)": ["demo", "--out", str(work / "results"), "--no-progress"],
    }
    rows = []
    for name, argv in commands.items():
        cold, warm = [], []
        for _ in range(args.pairs):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(_timed(argv, cache))
            warm.append(_timed(argv, cache))
        ratios = [w / c for w, c in zip(warm, cold, strict=True)]
        rows.append(
            f"| {name} | {statistics.median(cold):.1f} | {statistics.median(warm):.1f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# Compilation cache: second run of the same shapes",
            "",
            f"`python benchmarks/compile_cache.py --pairs {args.pairs}`; wall seconds of the whole "
            "process (import, model reading, compiling or loading, sampling, writing), medians over "
            "alternating cold / warm pairs; the ratio is warm / cold, taken pair by pair.",
            "",
            "| command | cold (s) | warm (s) | warm / cold (min-max) |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
