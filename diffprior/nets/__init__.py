"""Small Equinox networks for diffusion models: plain pytrees called as ``net(x, t)`` on one
unbatched ``x`` and a scalar time ``t`` in ``[0, 1]``, returning an array shaped like ``x``.

- :class:`UNet`: a small convolutional U-Net for single-channel images (the digits prior);
- :class:`TimeMLP`: an MLP on ``[x, embed(t)]`` for vectors;
- :class:`MLPAutoencoder`: an image autoencoder, the first stage of a latent diffusion prior
  (not a denoiser: it maps images to latents and back).

The first two plug straight into :class:`diffprior.Denoiser` and :func:`diffprior.train.train`.
"""

from diffprior.nets.autoencoder import MLPAutoencoder
from diffprior.nets.embeddings import sinusoidal_embedding
from diffprior.nets.mlp import TimeMLP
from diffprior.nets.unet import UNet

__all__ = ["UNet", "TimeMLP", "MLPAutoencoder", "sinusoidal_embedding"]
