"""Priors: :class:`DiffusionPrior` (any network) and :class:`GaussianMixture` (exact)."""

from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.priors.gaussian_mixture import GaussianMixture

__all__ = ["DiffusionPrior", "GaussianMixture"]
