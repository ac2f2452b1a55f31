"""The main job: restore a held-out digit under the shipped digits diffusion prior.

A test digit (never trained on) is degraded by a forward operator and noise, the degradation is
written as an ordinary NumPyro model, its posterior is sampled, and the result is summarised,
saved as an ArviZ DataTree and drawn. ``diffprior demo`` runs it from the command line.

Two shipped priors can be chosen (:data:`PRIORS`): the pixel-space ``"digits"`` prior and the
``"digits-latent"`` :class:`~diffprior.LatentDiffusionPrior`; both were trained on the same images
and return 8 x 8 images. Without a choice a method runs on ``"digits"``, except ReSample, a
latent-diffusion method, which runs on ``"digits-latent"`` (:data:`DEFAULT_PRIORS`). MCGdiff
needs a linear Gaussian model, so it runs with Gaussian noise on the pixel prior only
(:func:`check_options` says so before anything is loaded).

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

__all__ = [
    "TASKS",
    "METHODS",
    "NOISES",
    "PRIORS",
    "DEFAULT_PRIORS",
    "check_options",
    "make_problem",
    "observation_image",
    "run_demo",
]

TASKS = ("inpaint", "deblur", "superres")
METHODS = ("tds", "dps", "pigdm", "diffpir", "fk", "mcgdiff", "resample")
NOISES = ("gaussian", "student-t")
#: The shipped priors the demo can run on.
PRIORS = ("digits", "digits-latent")
#: The prior a method runs on when none is chosen (``"digits"`` for the others).
DEFAULT_PRIORS = {"resample": "digits-latent"}
_STUDENT_DF = 4.0


def _operator(task: str):
    shape = (8, 8)
    if task == "inpaint":
        return operators.Inpaint(operators.half_mask(shape, side="left"))
    if task == "deblur":
        return operators.Blur(operators.gaussian_kernel(3, 1.0), shape)
    return operators.Downsample(2, shape)


def check_options(task: str, method: str, noise: str, prior: str) -> None:
    """Refuse, with a one-line ``ValueError``, a demo that cannot run, before anything is loaded
    or compiled.

    MCGdiff samples linear models with Gaussian noise through the operator's SVD: it needs
    ``noise="gaussian"``, and the pixel prior (the latent prior's images pass through a
    nonlinear decoder).

    Examples
    --------
    >>> check_options("inpaint", "mcgdiff", "gaussian", "digits")  # runs
    >>> try:
    ...     check_options("inpaint", "mcgdiff", "student-t", "digits")
    ... except ValueError as err:
    ...     print(str(err).split(";")[0])
    method 'mcgdiff' needs Gaussian noise (a linear Gaussian model), got noise 'student-t'
    """
    for name, value, choices in (
        ("task", task, TASKS),
        ("method", method, METHODS),
        ("noise", noise, NOISES),
        ("prior", prior, PRIORS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if method == "mcgdiff" and noise != "gaussian":
        raise ValueError(
            "method 'mcgdiff' needs Gaussian noise (a linear Gaussian model), got noise "
            f"{noise!r}; choose noise 'gaussian', or method 'tds' or 'fk' for Student-t noise"
        )
    if method == "mcgdiff" and prior != "digits":
        raise ValueError(
            f"method 'mcgdiff' needs a linear model of the diffused variable, got prior {prior!r} "
            "(its images pass through a nonlinear decoder); choose prior 'digits', or method "
            "'resample', 'tds' or 'dps' for the latent prior"
        )


def make_problem(
    task: str, noise: str, sigma_y: float, digit: int, seed: int, prior: str = "digits"
):
    """The degraded observation of test digit ``digit``: ``(truth, A, y, model)``, with the
    shipped prior named ``prior`` at the model's site ``"x"``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
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
        "mcgdiff": dp.MCGdiff,
        "resample": dp.ReSample,
    }[name](model)


#: The grey scale of every pixel-valued panel: the digits are scaled to [-1, 1] (white paper,
#: black ink), so values outside it (noise, a sampler's overshoot) show at the ends.
_PIXEL_RANGE = {"cmap": "gray_r", "vmin": -1.0, "vmax": 1.0}
#: Hidden pixels are hatched on a colour outside the grey scale, so they cannot be read as
#: white paper.
_HIDDEN_STYLE = {"facecolor": "mistyrose", "edgecolor": "tab:red", "hatch": "///"}
_NUM_DRAWS = 4


def observation_image(task: str, A, y) -> tuple[np.ndarray, str]:
    """The observation ``y`` as an image and its panel label.

    Inpainting gives the 8 x 8 image as a masked array whose hidden pixels (``A.mask`` False)
    are masked; deblurring the blurred 8 x 8 image; super-resolution the low-resolution image
    at its own resolution (4 x 4).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from diffprior import operators
    >>> A = operators.Inpaint(operators.half_mask((8, 8), side="left"))
    >>> image, label = observation_image("inpaint", A, A(jnp.zeros((8, 8))))
    >>> int(image.mask.sum()), label
    (32, 'observation (noisy)')
    """
    if task == "inpaint":
        observed = np.asarray(A.mask)
        values = np.zeros(observed.shape)
        values[observed] = np.asarray(y)
        return np.ma.masked_array(values, mask=~observed), "observation (noisy)"
    image = np.asarray(y)
    if task == "superres":
        return image, f"observation ({image.shape[0]}x{image.shape[1]}, noisy)"
    return image, "observation (blurred, noisy)"


def _figure(path: Path, truth, observation, observation_label: str, samples, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    height, width = truth.shape
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # a low-resolution image fills the panel
    mean, std = samples.mean(axis=0), samples.std(axis=0)
    fig = plt.figure(figsize=(9.0, 5.2))
    # four image columns, the sd bar, a gap, the pixel-value bar shared by both rows
    grid = fig.add_gridspec(
        2, 7, width_ratios=[1, 1, 1, 1, 0.07, 0.3, 0.07], wspace=0.15, hspace=0.35
    )
    top = [fig.add_subplot(grid[0, column]) for column in range(4)]
    bottom = [fig.add_subplot(grid[1, column]) for column in range(_NUM_DRAWS)]

    pixels = top[0].imshow(truth, **_PIXEL_RANGE)
    top[0].set_title("truth", fontsize=9)
    hidden = np.ma.getmaskarray(observation)
    if hidden.any():
        # masked pixels are left transparent over a hatched background
        cmap = matplotlib.colormaps["gray_r"].with_extremes(bad=(0, 0, 0, 0))
        top[1].add_patch(
            Rectangle((-0.5, -0.5), width, height, zorder=0, linewidth=0, **_HIDDEN_STYLE)
        )
        top[1].imshow(observation, **{**_PIXEL_RANGE, "cmap": cmap}, extent=extent, zorder=1)
        top[1].legend(
            handles=[Patch(label="not observed", **_HIDDEN_STYLE)],
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            fontsize=8,
            frameon=False,
            handlelength=1.5,
        )
    else:
        top[1].imshow(observation, **_PIXEL_RANGE, extent=extent)
    top[1].set_title(observation_label, fontsize=9)
    top[2].imshow(mean, **_PIXEL_RANGE)
    top[2].set_title("posterior mean", fontsize=9)
    spread = top[3].imshow(std, cmap="magma", vmin=0)
    top[3].set_title("posterior sd", fontsize=9)
    for index, ax in enumerate(bottom):
        ax.imshow(samples[index % samples.shape[0]], **_PIXEL_RANGE)
        ax.set_title(f"posterior draw {index + 1}", fontsize=9)
    for ax in top + bottom:
        ax.set_xticks([])
        ax.set_yticks([])

    spread_bar = fig.colorbar(spread, cax=fig.add_subplot(grid[0, 4]))
    spread_bar.set_label("posterior sd", fontsize=8)
    pixel_bar = fig.colorbar(pixels, cax=fig.add_subplot(grid[:, 6]), extend="both")
    pixel_bar.set_label("pixel value (-1 paper, +1 ink)", fontsize=8)
    for bar in (spread_bar, pixel_bar):
        bar.ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    write_atomically(
        path, lambda name: fig.savefig(name, format="png", dpi=100, bbox_inches="tight")
    )
    plt.close(fig)


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
    prior: str | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Run the demo and return its summary; writes ``out/posterior.nc`` and
    ``out/posterior.png`` (each atomically). ``prior`` is one of :data:`PRIORS`; by default
    ``DEFAULT_PRIORS.get(method, "digits")``. A combination the method cannot run raises a
    ``ValueError`` (:func:`check_options`) before anything is loaded."""
    if prior is None:
        prior = DEFAULT_PRIORS.get(method, "digits")
    check_options(task, method, noise, prior)
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
    observation, observation_label = observation_image(task, A, y)
    _figure(out / "posterior.png", truth_np, observation, observation_label, samples, title)
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
