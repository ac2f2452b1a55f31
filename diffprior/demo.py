"""The main job: restore a held-out digit under the shipped digits diffusion prior.

A test digit (never trained on) is degraded by a forward operator and noise, the degradation is
written as an ordinary NumPyro model, its posterior is sampled, and the result is summarised,
saved as an ArviZ DataTree and drawn. ``diffprior demo`` runs it from the command line.

The prior is the pixel-space ``"digits"`` prior, except for ReSample, a latent-diffusion method,
which runs on the ``"digits-latent"`` prior (:data:`PRIORS`); both were trained on the same
images and return 8 x 8 images.

Examples
--------
>>> from diffprior.demo import run_demo
>>> summary = run_demo(out="results", num_particles=16, num_steps=10,
...                    progress_bar=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import diffprior as dp
from diffprior import operators
from diffprior.io import write_atomically

__all__ = ["TASKS", "METHODS", "NOISES", "PRIORS", "make_problem", "run_demo"]

TASKS = ("inpaint", "deblur", "superres")
METHODS = ("tds", "dps", "pigdm", "diffpir", "fk", "resample")
NOISES = ("gaussian", "student-t")
#: The shipped prior each method runs on (``"digits"`` for the others).
PRIORS = {"resample": "digits-latent"}
_STUDENT_DF = 4.0


def _operator(task: str):
    shape = (8, 8)
    if task == "inpaint":
        return operators.Inpaint(operators.half_mask(shape, side="left"))
    if task == "deblur":
        return operators.Blur(operators.gaussian_kernel(3, 1.0), shape)
    return operators.Downsample(2, shape)


def make_problem(
    task: str, noise: str, sigma_y: float, digit: int, seed: int, prior: str = "digits"
):
    """The degraded observation of test digit ``digit``: ``(truth, A, y, model)``, with the
    shipped prior named ``prior`` at the model's site ``"x"``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    _, test = dp.pretrained.load_digits_split()
    if not 0 <= digit < test.shape[0]:
        raise ValueError(f"digit must be in [0, {test.shape[0]}), got {digit}")
    truth = jnp.asarray(test[digit])
    A = _operator(task)
    clean = A(truth)
    key = jax.random.key(seed)
    if noise == "gaussian":
        y = clean + sigma_y * jax.random.normal(key, clean.shape)
    else:
        y = clean + sigma_y * jax.random.t(key, _STUDENT_DF, clean.shape)
    prior = dp.pretrained.load(prior)
    event_dims = len(clean.shape)

    def model(y=None):
        x = numpyro.sample("x", prior)
        if noise == "gaussian":
            likelihood = dist.Normal(A(x), sigma_y)
        else:
            likelihood = dist.StudentT(_STUDENT_DF, A(x), sigma_y)
        numpyro.sample("y", likelihood.to_event(event_dims), obs=y)

    return truth, A, y, model


def _method(name: str, model):
    return {
        "tds": dp.TDS,
        "dps": dp.DPS,
        "pigdm": dp.PiGDM,
        "diffpir": dp.DiffPIR,
        "fk": dp.FK,
        "resample": dp.ReSample,
    }[name](model)


def _figure(path: Path, truth, observation_image, samples, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = samples.mean(axis=0), samples.std(axis=0)
    panels = [("truth", truth), ("observation", observation_image), ("posterior mean", mean)]
    fig, axes = plt.subplots(2, 6, figsize=(12, 4.4))
    for ax, (label, image) in zip(axes[0, :3], panels, strict=True):
        ax.imshow(image, cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(label, fontsize=9)
    shown = axes[0, 3].imshow(std, cmap="magma", vmin=0)
    axes[0, 3].set_title("pixel std", fontsize=9)
    fig.colorbar(shown, ax=axes[0, 3], fraction=0.046)
    for index, ax in enumerate(list(axes[0, 4:]) + list(axes[1, :])):
        ax.imshow(samples[index % samples.shape[0]], cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"sample {index + 1}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda name: fig.savefig(name, format="png", dpi=100))
    plt.close(fig)


def _observation_image(task: str, A, y) -> np.ndarray:
    """The observation drawn on the 8 x 8 grid (unobserved pixels as NaN)."""
    if task == "inpaint":
        image = np.full((8, 8), np.nan)
        image[np.asarray(A.mask)] = np.asarray(y)
        return image
    if task == "superres":
        return np.kron(np.asarray(y), np.ones((2, 2)))
    return np.asarray(y)


def run_demo(
    task: str = "inpaint",
    method: str = "tds",
    noise: str = "gaussian",
    out: str | os.PathLike = "results",
    *,
    num_particles: int = 256,
    num_steps: int = 100,
    num_chains: int = 1,
    sigma_y: float = 0.1,
    digit: int = 0,
    seed: int = 0,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its summary; writes ``out/posterior.nc`` and
    ``out/posterior.png`` (each atomically). The prior is ``PRIORS.get(method, "digits")``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prior = PRIORS.get(method, "digits")
    truth, A, y, model = make_problem(task, noise, sigma_y, digit, seed, prior)
    sampler = dp.Sampler(
        _method(method, model),
        num_particles=num_particles,
        num_steps=num_steps,
        num_chains=num_chains,
        progress_bar=progress_bar,
    )
    start = time.perf_counter()
    sampler.run(jax.random.key(seed + 1), y=y)
    seconds = time.perf_counter() - start
    samples = np.asarray(sampler.get_samples()["x"])
    truth_np = np.asarray(truth)
    mean = samples.mean(axis=0)
    lower, upper = np.quantile(samples, [0.05, 0.95], axis=0)
    summary: dict[str, Any] = {
        "task": task,
        "method": method,
        "prior": prior,
        "noise": noise,
        "digit": digit,
        "psnr": float(10 * np.log10(4.0 / np.mean((mean - truth_np) ** 2))),
        "mean_pixel_std": float(samples.std(axis=0).mean()),
        "coverage_90": float(np.mean((truth_np >= lower) & (truth_np <= upper))),
        "seconds": seconds,
    }
    idata = sampler.to_arviz()
    if sampler.log_evidence is not None:
        log_weights = np.asarray(idata["sample_stats"]["log_weight"])
        summary["ess"] = float(np.mean(1.0 / np.sum(np.exp(log_weights) ** 2, axis=-1)))
        summary["log_evidence"] = float(np.mean(np.asarray(sampler.log_evidence)))
    out = Path(out)
    write_atomically(out / "posterior.nc", lambda name: idata.to_netcdf(name, engine="h5netcdf"))
    title = (
        f"{task}, {noise} noise (sigma_y={sigma_y}), {method} on {prior}: "
        f"PSNR {summary['psnr']:.1f} dB"
    )
    _figure(out / "posterior.png", truth_np, _observation_image(task, A, y), samples, title)
    summary["files"] = [str(out / "posterior.nc"), str(out / "posterior.png")]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the lines ``diffprior demo`` prints."""
    lines = [
        f"task {summary['task']}, method {summary['method']} (prior {summary['prior']}), "
        f"noise {summary['noise']}, test digit {summary['digit']}",
        f"posterior-mean PSNR     {summary['psnr']:.2f} dB",
        f"mean pixel std          {summary['mean_pixel_std']:.3f}",
        f"90% interval coverage   {summary['coverage_90']:.3f}",
    ]
    if "ess" in summary:
        lines.append(f"ESS (final weights)     {summary['ess']:.1f}")
        lines.append(f"log-evidence            {summary['log_evidence']:.2f}")
    lines.append(f"seconds                 {summary['seconds']:.1f}")
    lines.append("wrote " + ", ".join(summary["files"]))
    return "\n".join(lines)
