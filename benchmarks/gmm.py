"""The Gaussian-mixture benchmark (the MCGdiff paper's problem): every method's sliced
Wasserstein to exact posterior samples over the exact-sample floor, log-evidence error and
seconds. Same as ``diffprior benchmark gmm``; see :mod:`diffprior.benchmark`.

    python benchmarks/gmm.py --methods tds mcgdiff --cells 8x1 80x2 --seeds 3 \
        --num-steps 100 --out benchmarks/results/gmm.md
"""

from __future__ import annotations

import sys

from diffprior import cli

if __name__ == "__main__":
    sys.exit(cli.main(["benchmark", "gmm", *sys.argv[1:]]))
