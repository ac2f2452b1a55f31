"""Priors: :class:`DiffusionPrior` (any network), :class:`LatentDiffusionPrior` (a diffusion
model on a decoder's latent) and :class:`GaussianMixture` (exact)."""

from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.priors.gaussian_mixture import GaussianMixture
from diffprior.priors.latent_prior import LatentDiffusionPrior

__all__ = ["DiffusionPrior", "LatentDiffusionPrior", "GaussianMixture"]
