"""Train the shipped latent digits prior: ``diffprior.pretrained.load("digits-latent")``.

Two stages on scikit-learn's 8x8 digits scaled to [-1, 1] (the first 1500 images; the last 297
are held out, ``diffprior.pretrained.load_digits_split``):

1. an MLP autoencoder (``diffprior.nets.MLPAutoencoder``) learns to reconstruct the images
   through a 16-dimensional latent (mean squared error, Gaussian noise of standard deviation
   ``--latent-noise`` added to the latent during training so that the decoder is smooth around
   the training latents, and a small penalty on the latent's size); the training latents'
   per-coordinate mean and standard deviation then standardise the latent;
2. an MLP denoiser (``diffprior.nets.TimeMLP``) learns eps of the standardised latents under
   the continuous linear VP schedule by denoising score matching (``diffprior.train.train``).

The pair ``(denoiser network, autoencoder)`` and a metadata JSON are written atomically into
``diffprior/pretrained/``. The defaults are the shipped settings, so the shipped weights came
from exactly

    python examples/train_digits_latent.py

(on CPU, about a minute on two cores; another device or JAX version gives slightly different
weights of the same quality).
"""

from __future__ import annotations

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from train_digits import SCHEDULES

import diffprior.pretrained as pretrained
from diffprior.nets import MLPAutoencoder
from diffprior.train import make_optimizer, save_pretrained, train

#: Weight of the penalty on the mean squared raw latent (keeps its scale from drifting).
LATENT_PENALTY = 1e-3


def autoencoder_loss(params, static, images, key, latent_noise):
    """Reconstruction MSE through a noisy latent, plus the latent-size penalty."""
    autoencoder = eqx.combine(params, static)
    latents = jax.vmap(autoencoder.encode_raw)(images)
    noisy = latents + latent_noise * jax.random.normal(key, latents.shape)
    reconstructions = jax.vmap(autoencoder.decode_raw)(noisy)
    return jnp.mean((reconstructions - images) ** 2) + LATENT_PENALTY * jnp.mean(latents**2)


def train_autoencoder(
    autoencoder: MLPAutoencoder,
    images: np.ndarray,
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    latent_noise: float,
    seed: int,
) -> tuple[MLPAutoencoder, np.ndarray]:
    """Train ``autoencoder`` (AdamW, warm-up and cosine decay: ``make_optimizer``); all steps
    in one compiled ``lax.scan``. Returns the trained autoencoder and the loss of each step."""
    images = jnp.asarray(images)
    params, static = eqx.partition(autoencoder, eqx.is_inexact_array)
    optimizer = make_optimizer(num_steps, learning_rate)

    @jax.jit
    def run(params, key):
        def step(carry, step_key):
            params, opt_state = carry
            batch_key, noise_key = jax.random.split(step_key)
            batch = images[jax.random.randint(batch_key, (batch_size,), 0, images.shape[0])]
            loss, grads = jax.value_and_grad(autoencoder_loss)(
                params, static, batch, noise_key, latent_noise
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        keys = jax.random.split(key, num_steps)
        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
        return params, losses

    params, losses = run(params, jax.random.key(seed))
    return eqx.combine(params, static), np.asarray(losses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="digits-latent", help="file stem of the shipped prior")
    parser.add_argument(
        "--out-dir",
        default=os.path.dirname(os.path.abspath(pretrained.__file__)),
        help="where NAME.eqx and NAME.json go (default: the diffprior.pretrained package)",
    )
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--ae-width", type=int, default=128)
    parser.add_argument("--ae-depth", type=int, default=2)
    parser.add_argument("--ae-steps", type=int, default=4000)
    parser.add_argument("--ae-learning-rate", type=float, default=2e-3)
    parser.add_argument("--latent-noise", type=float, default=0.1)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="linear")
    parser.add_argument("--width", type=int, default=256, help="width of the latent denoiser")
    parser.add_argument("--depth", type=int, default=3, help="depth of the latent denoiser")
    parser.add_argument("--num-steps", type=int, default=10000, help="denoiser training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    train_images, test_images = pretrained.load_digits_split()
    ae_key, net_key = jax.random.split(jax.random.key(args.seed))
    ae_config = {
        "class": "MLPAutoencoder",
        "kwargs": {
            "image_shape": [8, 8],
            "latent_dim": args.latent_dim,
            "width": args.ae_width,
            "depth": args.ae_depth,
        },
    }
    start = time.perf_counter()
    autoencoder, ae_losses = train_autoencoder(
        pretrained.build_net(ae_config, ae_key),
        train_images,
        num_steps=args.ae_steps,
        batch_size=128,
        learning_rate=args.ae_learning_rate,
        latent_noise=args.latent_noise,
        seed=args.seed,
    )
    raw_latents = np.asarray(jax.vmap(autoencoder.encode_raw)(jnp.asarray(train_images)))
    latent_mean = raw_latents.mean(axis=0)
    latent_scale = raw_latents.std(axis=0)
    autoencoder = autoencoder.with_standardisation(latent_mean, latent_scale)
    latents = np.asarray(jax.vmap(autoencoder.encode)(jnp.asarray(train_images)))

    def reconstruction_mse(images):
        images = jnp.asarray(images)
        rebuilt = jax.vmap(lambda x: autoencoder.decode(autoencoder.encode(x)))(images)
        return float(jnp.mean((rebuilt - images) ** 2))

    ae_seconds = time.perf_counter() - start

    schedule_config = SCHEDULES[args.schedule]
    schedule = pretrained.build_schedule(schedule_config)
    net_config = {
        "class": "TimeMLP",
        "kwargs": {
            "dim": args.latent_dim,
            "width": args.width,
            "depth": args.depth,
            "embed_dim": 32,
        },
    }
    training = {
        "num_steps": args.num_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": "AdamW (weight decay 1e-4), clip global norm 1, linear warm-up over "
        "min(500, 5%) steps then cosine decay to 1% (diffprior.train.make_optimizer)",
        "ema_decay": args.ema_decay,
        "t_min": 1e-3,
        "loss": "mean squared error to Denoiser.to_output (eps), t ~ U(t_min, 1), on the "
        "standardised training latents",
        "steps_per_call": 500,
    }
    start = time.perf_counter()
    net, losses = train(
        pretrained.build_net(net_config, net_key),
        latents,
        schedule,
        "eps",
        num_steps=args.num_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        ema_decay=args.ema_decay,
        t_min=training["t_min"],
        seed=args.seed,
        steps_per_call=training["steps_per_call"],
        progress_bar=not args.no_progress,
    )
    seconds = time.perf_counter() - start

    command = " ".join(["python", "examples/train_digits_latent.py", *(argv or [])])
    record = {
        "name": args.name,
        "description": "scikit-learn 8x8 handwritten digits, unconditional, as a latent "
        "diffusion prior (MLP autoencoder + diffusion on its standardised latent)",
        "event_shape": [8, 8],
        "latent_shape": [args.latent_dim],
        "schedule": schedule_config,
        "parameterization": "eps",
        "net": net_config,
        "autoencoder": ae_config,
        "weights_layout": "eqx.tree_serialise_leaves of the pair (net, autoencoder)",
        "latent_standardisation": {
            "mean": [float(v) for v in latent_mean],
            "scale": [float(v) for v in latent_scale],
            "note": "z = (encoder network output - mean) / scale, per coordinate, from the "
            "training images; stored in the autoencoder's latent_mean / latent_scale, and "
            "decode(z) = decoder network(mean + scale * z)",
        },
        "autoencoder_training": {
            "num_steps": args.ae_steps,
            "batch_size": 128,
            "learning_rate": args.ae_learning_rate,
            "optimizer": "as for the denoiser (diffprior.train.make_optimizer), no EMA",
            "latent_noise": args.latent_noise,
            "latent_penalty": LATENT_PENALTY,
            "loss": "mean squared reconstruction error through latent + N(0, latent_noise^2), "
            "plus latent_penalty * mean(latent^2)",
            "final_loss_mean_last_100": float(np.mean(ae_losses[-100:])),
            "reconstruction_mse_train": reconstruction_mse(train_images),
            "reconstruction_mse_test": reconstruction_mse(test_images),
            "train_seconds": round(ae_seconds, 1),
        },
        "data": pretrained.DIGITS_DATA,
        "data_variance": float(np.mean(np.var(latents, axis=0))),
        "data_variance_note": "mean over the latent coordinates of the variance of the "
        "standardised training latents (1 by construction), for DiffusionPrior(data_variance=...)",
        "clip_x0": None,
        "clip_x0_note": "the standardised latents are unbounded: no clipping of x0_hat",
        "prior_options": {"num_steps": 100},
        "training": training,
        "seed": args.seed,
        "command": command,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "train_seconds": round(seconds, 1),
    }
    weights_path, record = save_pretrained(args.out_dir, args.name, (net, autoencoder), record)
    print(
        f"wrote {weights_path} ({os.path.getsize(weights_path) / 1e6:.2f} MB) and "
        f"{args.name}.json; autoencoder {args.ae_steps} steps in {ae_seconds:.0f} s (loss "
        f"{record['autoencoder_training']['final_loss_mean_last_100']:.4f}, test "
        f"reconstruction MSE {record['autoencoder_training']['reconstruction_mse_test']:.4f}), "
        f"denoiser {args.num_steps} steps in {seconds:.0f} s (loss "
        f"{record['final_loss_mean_last_100']:.4f})"
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
