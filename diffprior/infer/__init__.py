"""The sampler driver and its methods."""

from diffprior.infer.methods import (
    DPS,
    FK,
    TDS,
    DiffPIR,
    MCGdiff,
    Method,
    PiGDM,
    ReSample,
    Unguided,
)
from diffprior.infer.sampler import CHAIN_METHODS, Sampler

__all__ = [
    "Sampler",
    "CHAIN_METHODS",
    "Method",
    "Unguided",
    "DPS",
    "TDS",
    "FK",
    "PiGDM",
    "DiffPIR",
    "MCGdiff",
    "ReSample",
]
