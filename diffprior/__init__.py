"""diffprior: pretrained diffusion models as NumPyro priors, sampled by guided diffusion and
twisted sequential Monte Carlo."""

from importlib.metadata import PackageNotFoundError, version

# first, before any JAX computation: turns off XLA CPU fusions that return wrong values
from diffprior import _xla_flags  # noqa: F401

# isort: split
from diffprior import diagnostics, diffusion, kernels, operators, pretrained, problems, schedules
from diffprior.baselines import compare, plot_compare  # also binds dp.baselines
from diffprior.calibration import calibrate
from diffprior.diagnostics import plot_smc, smc_health, to_arviz
from diffprior.diffusion import Denoiser
from diffprior.infer import DPS, FK, TDS, DiffPIR, MCGdiff, PiGDM, ReSample, Sampler, Unguided
from diffprior.infer.grid import EvidenceGrid, GridPosterior
from diffprior.infer.hierarchical import PMMH, ParticleGibbs
from diffprior.priors import DiffusionPrior, GaussianMixture, LatentDiffusionPrior

try:
    __version__ = version("diffprior")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "diagnostics",
    "diffusion",
    "kernels",
    "operators",
    "pretrained",
    "problems",
    "schedules",
    "Sampler",
    "Unguided",
    "DPS",
    "TDS",
    "FK",
    "PiGDM",
    "DiffPIR",
    "MCGdiff",
    "ReSample",
    "ParticleGibbs",
    "PMMH",
    "EvidenceGrid",
    "GridPosterior",
    "Denoiser",
    "DiffusionPrior",
    "LatentDiffusionPrior",
    "GaussianMixture",
    "baselines",
    "compare",
    "plot_compare",
    "calibrate",
    "to_arviz",
    "smc_health",
    "plot_smc",
]
