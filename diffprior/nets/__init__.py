"""Small Equinox networks for diffusion models: plain pytrees called as ``net(x, t)`` on one
unbatched ``x`` and a scalar time ``t`` in ``[0, 1]``, returning an array shaped like ``x``.

- :class:`UNet`: a small convolutional U-Net for single-channel images (the digits prior);
- :class:`TimeMLP`: an MLP on ``[x, embed(t)]`` for vectors.

Both plug straight into :class:`diffprior.Denoiser` and :func:`diffprior.train.train`.
"""

from diffprior.nets.embeddings import sinusoidal_embedding
from diffprior.nets.mlp import TimeMLP
from diffprior.nets.unet import UNet

__all__ = ["UNet", "TimeMLP", "sinusoidal_embedding"]
