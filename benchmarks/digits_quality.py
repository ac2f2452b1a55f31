"""Quality of the shipped digits prior: are its unconditional samples digits, of every class, and
not copies of the training set?

    python benchmarks/digits_quality.py --out benchmarks/results/digits_quality.md

A logistic-regression classifier fitted on the training split (with labels) scores
``--num-samples`` samples of ``diffprior.pretrained.load("digits")`` (``--num-steps`` ancestral
steps) and, for reference, the 297 held-out test images:

- mean top-class probability (target >= 0.8): a sample the classifier is unsure about is not
  a clear digit;
- class frequencies (target: each class in 5-15%): no mode collapse;
- median distance to the nearest training image (Euclidean, in the [-1, 1] pixel scale),
  next to the same figure for the test images: samples must be new digits (distance well
  above 0, comparable to the test images'), not copies of training images.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import diffprior.pretrained as pretrained
from diffprior.io import write_text


def nearest_distances(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance from each row of ``points`` to its nearest row of ``reference``."""
    sq = (
        np.sum(points**2, axis=1)[:, None]
        + np.sum(reference**2, axis=1)[None, :]
        - 2.0 * points @ reference.T
    )
    return np.sqrt(np.maximum(sq.min(axis=1), 0.0))


def quality(samples: np.ndarray, train: np.ndarray, test: np.ndarray, classifier) -> dict:
    """The figures of the table, for ``samples`` and (reference) ``test``, flattened images."""
    figures = {}
    for label, images in (("samples", samples), ("test", test)):
        proba = classifier.predict_proba(images)
        counts = np.bincount(proba.argmax(axis=1), minlength=10)
        nn = nearest_distances(images, train)
        figures[label] = {
            "top_prob_mean": float(proba.max(axis=1).mean()),
            "class_freq": counts / counts.sum(),
            "nn_median": float(np.median(nn)),
            "nn_min": float(nn.min()),
            "near_copies": float(np.mean(nn < 0.5)),
            "out_of_range": float(np.mean(np.abs(images) > 1.1)),
        }
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown file to write (atomically)")
    args = parser.parse_args(argv)

    train, test = pretrained.load_digits_split()
    labels = load_digits().target
    train_flat, test_flat = train.reshape(len(train), -1), test.reshape(len(test), -1)
    classifier = LogisticRegression(max_iter=5000).fit(
        train_flat, labels[: pretrained.DIGITS_NUM_TRAIN]
    )
    test_accuracy = float(classifier.score(test_flat, labels[pretrained.DIGITS_NUM_TRAIN :]))

    prior = pretrained.load("digits", num_steps=args.num_steps)
    sample_fn = jax.jit(lambda key: prior.sample(key, (args.num_samples,)))
    sample_fn(jax.random.key(args.seed + 1)).block_until_ready()  # compile
    start = time.perf_counter()
    samples = np.asarray(sample_fn(jax.random.key(args.seed)))
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(samples)):
        raise RuntimeError("the prior produced non-finite samples")
    figures = quality(samples.reshape(len(samples), -1), train_flat, test_flat, classifier)

    s, t = figures["samples"], figures["test"]
    freq_ok = bool(np.all((s["class_freq"] >= 0.05) & (s["class_freq"] <= 0.15)))

    def freqs(f):
        return " ".join(f"{100 * v:.1f}" for v in f)

    lines = [
        "| figure | samples | test images | target |",
        "|---|---|---|---|",
        f"| mean top-class probability | {s['top_prob_mean']:.3f} | {t['top_prob_mean']:.3f} "
        f"| >= 0.8 ({'met' if s['top_prob_mean'] >= 0.8 else 'NOT met'}) |",
        f"| class frequencies 0..9, % | {freqs(s['class_freq'])} | {freqs(t['class_freq'])} "
        f"| each in 5-15 ({'met' if freq_ok else 'NOT met'}) |",
        f"| median NN distance to train | {s['nn_median']:.2f} | {t['nn_median']:.2f} "
        "| well above 0, comparable to test |",
        f"| min NN distance to train | {s['nn_min']:.2f} | {t['nn_min']:.2f} | > 0 |",
        f"| share with NN distance < 0.5 | {s['near_copies']:.3f} | {t['near_copies']:.3f} "
        "| about 0 |",
        f"| share of pixels outside [-1.1, 1.1] | {s['out_of_range']:.4f} "
        f"| {t['out_of_range']:.4f} | small |",
    ]
    meta = pretrained.metadata("digits")
    header = [
        "# Digits prior quality",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/digits_quality.py', *(argv or [])])}`",
        "",
        f'Prior: `diffprior.pretrained.load("digits")`, trained by `{meta["command"]}` '
        f"({meta['training']['num_steps']} steps, {meta['train_seconds']:.0f} s on "
        f"{meta['trained_on']}); schedule {meta['schedule']}, {meta['parameterization']} "
        "parameterization.",
        f"{args.num_samples} unconditional samples, {args.num_steps} ancestral steps (eta = 1, "
        f"uniform grid, x0_hat clipped to +-{prior.denoiser.clip_x0} as load() sets it), seed "
        f"{args.seed}: {seconds:.1f} s (compiled) on {platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}, {jax.devices()[0].platform}.",
        f"Classifier: scikit-learn LogisticRegression on the 1500 training images (labels), "
        f"test accuracy {test_accuracy:.3f}. NN distance: Euclidean in the [-1, 1] pixel scale "
        "(64 pixels) to the nearest of the 1500 training images.",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
