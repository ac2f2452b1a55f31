"""Calibrate the shipped digits prior: measure, on its training images, how far the network's
``x0_hat`` can be trusted at each noise level (``diffprior.calibrate``), and store the result
in ``diffprior/pretrained/digits.json``, so that ``diffprior.pretrained.load("digits")`` comes
calibrated; ``--name digits-latent`` does the same for the latent prior, in its latent space
(the training images go through its encoder).

    python examples/calibrate_digits.py [--name digits|digits-latent] [--inflation C]

The shipped calibration came from exactly this command (24 times, 2 noise draws per training
image, seed 0; the command is stored with it). ``--inflation`` widens the twists' spread by
``C`` (``diffprior.calibrate``); the pixel prior's value was chosen on training digits with
``benchmarks/digits_smc.py --split train --inflation C``
(``benchmarks/results/twist_inflation.md``). It must be rerun after
``examples/train_digits.py`` retrains the network.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import diffprior as dp
import diffprior.pretrained as pretrained
from diffprior.io import write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--name",
        default="digits",
        help="shipped prior: digits, or digits-latent (calibrated in its latent space on the "
        "encoded training images)",
    )
    parser.add_argument("--num-times", type=int, default=24)
    parser.add_argument("--num-noise", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--inflation", type=float, default=1.0, help="the twists' spread factor, >= 1"
    )
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(pretrained.__file__)),
        help="where NAME.json is (default: the diffprior.pretrained package)",
    )
    args = parser.parse_args(argv)
    prior = pretrained.load(args.name, calibrated=False)
    train, _ = pretrained.load_digits_split()
    start = time.perf_counter()
    calibration = dp.calibrate(
        prior,
        train,
        num_times=args.num_times,
        num_noise=args.num_noise,
        rng_key=args.seed,
        inflation=args.inflation,
    ).calibration
    seconds = time.perf_counter() - start
    path = os.path.join(args.out_dir, f"{args.name}.json")
    meta = pretrained.metadata(args.name)
    meta["calibration"] = calibration.to_dict()
    meta["calibration"]["command"] = (
        f"python examples/calibrate_digits.py --name {args.name} --num-times {args.num_times} "
        f"--num-noise {args.num_noise} --seed {args.seed} --inflation {args.inflation:g}"
    )
    write_json(path, meta)
    residual = np.asarray(calibration.residual_variance).reshape(args.num_times, -1).mean(axis=1)
    print(f"calibrated {args.name} on {train.shape[0]} training images in {seconds:.0f} s")
    print("t      mean r_t^2  shrinkage")
    for t, r2, a in zip(
        np.asarray(calibration.times), residual, np.asarray(calibration.shrinkage), strict=True
    ):
        print(f"{t:.3f}  {r2:.4f}      {a:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
