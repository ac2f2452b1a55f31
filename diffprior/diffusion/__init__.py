"""The diffusion layer: schedules, the denoiser (Tweedie), timestep grids and the reverse
transition every sampler uses."""

from diffprior.diffusion.denoiser import PARAMETERIZATIONS, Denoiser
from diffprior.diffusion.grids import SPACINGS, timesteps
from diffprior.diffusion.schedules import EDM, VE, VP, Schedule
from diffprior.diffusion.transitions import (
    Transition,
    guided_x0,
    reverse_transition,
    sample_transition,
    transition_log_prob,
    tweedie_variance,
)

__all__ = [
    "Denoiser",
    "PARAMETERIZATIONS",
    "SPACINGS",
    "timesteps",
    "Schedule",
    "VP",
    "VE",
    "EDM",
    "Transition",
    "reverse_transition",
    "guided_x0",
    "sample_transition",
    "transition_log_prob",
    "tweedie_variance",
]
