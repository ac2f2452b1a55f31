"""Noise schedules, also reachable as ``diffprior.schedules``."""

from diffprior.diffusion.schedules import EDM, VE, VP, Schedule

__all__ = ["Schedule", "VP", "VE", "EDM"]
