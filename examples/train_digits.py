"""Train the shipped digits prior: ``diffprior.pretrained.load("digits")``.

scikit-learn's 8x8 digits, scaled from [0, 16] to [-1, 1]; the first 1500 images train, the last
297 are held out (``diffprior.pretrained.load_digits_split``). A small U-Net
(``diffprior.nets.UNet``) learns eps under the continuous linear VP schedule by denoising score
matching (``diffprior.train.train``), and the EMA weights plus a metadata JSON are written
atomically into ``diffprior/pretrained/``.

The defaults are the shipped settings, so the shipped weights came from exactly

    python examples/train_digits.py

(on CPU; another device or JAX version gives slightly different weights of the same quality).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import diffprior.pretrained as pretrained
from diffprior.train import save_pretrained, train

SCHEDULES = {
    "linear": {"kind": "VP.linear", "beta_min": 0.1, "beta_max": 20.0},
    "cosine": {"kind": "VP.cosine", "s": 0.008, "t_max": 0.999},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="digits", help="file stem of the shipped prior")
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(pretrained.__file__)),
        help="where NAME.eqx and NAME.json go (default: the diffprior.pretrained package)",
    )
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="linear")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 48])
    parser.add_argument("--blocks-per-level", type=int, default=1)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="optional checkpoint file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    train_images, _ = pretrained.load_digits_split()
    schedule_config = SCHEDULES[args.schedule]
    schedule = pretrained.build_schedule(schedule_config)
    net_config = {
        "class": "UNet",
        "kwargs": {
            "channels": args.channels,
            "blocks_per_level": args.blocks_per_level,
            "embed_dim": 32,
            "time_dim": 128,
            "groups": 8,
        },
    }
    init_key = jax.random.key(args.seed)
    net = pretrained.build_net(net_config, init_key)
    training = {
        "num_steps": args.num_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": "AdamW (weight decay 1e-4), clip global norm 1, linear warm-up over "
        "min(500, 5%) steps then cosine decay to 1% (diffprior.train.make_optimizer)",
        "ema_decay": args.ema_decay,
        "t_min": 1e-3,
        "loss": "mean squared error to Denoiser.to_output (eps), t ~ U(t_min, 1)",
    }

    start = time.perf_counter()
    net, losses = train(
        net,
        train_images,
        schedule,
        "eps",
        num_steps=args.num_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        ema_decay=args.ema_decay,
        t_min=training["t_min"],
        seed=args.seed,
        checkpoint_path=args.checkpoint,
        progress_bar=not args.no_progress,
    )
    seconds = time.perf_counter() - start

    command = " ".join(["python", "examples/train_digits.py", *(argv or [])])
    record = {
        "name": args.name,
        "description": "scikit-learn 8x8 handwritten digits, unconditional",
        "event_shape": [8, 8],
        "schedule": schedule_config,
        "parameterization": "eps",
        "net": net_config,
        "data": pretrained.DIGITS_DATA,
        "data_variance": float(np.mean(np.var(train_images, axis=0))),
        "data_variance_note": "mean over the 64 pixels of the per-pixel variance of the "
        "training images (scaled), for DiffusionPrior(data_variance=...)",
        "clip_x0": 1.0,
        "clip_x0_note": "the data lie in [-1, 1]: load() builds Denoiser(..., clip_x0=1.0)",
        "prior_options": {"num_steps": 100},
        "training": training,
        "seed": args.seed,
        "command": command,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "train_seconds": round(seconds, 1),
    }
    weights_path, record = save_pretrained(args.out_dir, args.name, net, record)
    print(
        f"wrote {weights_path} ({os.path.getsize(weights_path) / 1e6:.2f} MB) and "
        f"{args.name}.json; {args.num_steps} steps in {seconds:.0f} s, final loss "
        f"{record['final_loss_mean_last_100']:.4f}"
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
