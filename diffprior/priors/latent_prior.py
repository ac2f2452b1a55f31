r"""A latent diffusion model as a NumPyro prior over images (Rombach et al., CVPR 2022).

A diffusion model samples a latent :math:`z` (shape ``latent_shape``) and a decoder maps it to an
image :math:`x = D(z)` (shape ``event_shape``). In a NumPyro model the site's value is the image;
:class:`diffprior.Sampler` runs every method on :math:`z` with the likelihood

.. math::
    \log p(y \mid z) = \log p(y \mid x = D(z)),

(:meth:`diffprior.model.ObservationModel.in_latent_space`) and returns decoded images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from diffprior.diffusion.denoiser import Denoiser
from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.types import Array, ArrayLike

__all__ = ["LatentDiffusionPrior"]


def _check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"{name} must be a non-empty tuple of sizes, got {shape}")
    return shape


def _check_map(name: str, fn: Callable, in_shape: tuple, out_shape: tuple, what: str) -> None:
    """``fn`` maps one ``in_shape`` array to one ``out_shape`` array (checked abstractly)."""
    if not callable(fn):
        raise TypeError(f"{name} must be a function of one {what}, got {type(fn).__name__}")
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(in_shape, jnp.float32))
    except Exception as err:
        raise ValueError(
            f"{name} could not be applied to one array of shape {in_shape}: "
            f"{type(err).__name__}: {err}"
        ) from err
    got = getattr(out, "shape", None)
    if got != out_shape:
        raise ValueError(
            f"{name} maps shape {in_shape} to {got}, but {out_shape} is expected "
            f"({what} -> {'image' if name == 'decoder' else 'latent'}, unbatched)"
        )


class LatentDiffusionPrior(DiffusionPrior):
    r"""Images :math:`x = D(z)` with :math:`z` sampled by a diffusion model.

    The diffusion (``denoiser``, its schedule, ``data_variance``, and the particles of every
    sampler) lives in the latent space, shape ``latent_shape``; samples, and the value of the
    NumPyro site, are images of shape ``event_shape``. :class:`diffprior.Sampler` samples
    :math:`p(z \mid y) \propto p(z)\, p(y \mid D(z))` with any method and decodes the result.

    :meth:`log_prob` is not defined: the decoder maps the latent space onto a low-dimensional
    set of images, which has no density on the image space. :meth:`latent_log_prob` gives the
    density of :math:`z`.

    Parameters
    ----------
    denoiser
        The latent diffusion model (its network takes one ``latent_shape`` array).
    decoder
        :math:`D`: one latent (``latent_shape``) to one image (``event_shape``), a pure JAX
        function or an Equinox module / bound method (its arrays then pass through ``jit``).
    event_shape
        Shape of one image.
    latent_shape
        Shape of one latent.
    encoder
        Optional :math:`E`: one image to one latent (:meth:`encode`).
    num_steps, eta, spacing, data_variance, ...
        As for :class:`DiffusionPrior`, for the latent diffusion (``data_variance`` is the
        latents' per-coordinate variance, 1 for standardised latents).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> den = dp.Denoiser(lambda z, t: jnp.zeros_like(z), dp.schedules.VP.linear(), "x0")
    >>> decoder = lambda z: jnp.tanh(jnp.outer(z, z))  # (2,) -> (2, 2)
    >>> prior = dp.LatentDiffusionPrior(den, decoder, (2, 2), (2,), num_steps=10)
    >>> prior.sample(jax.random.key(0), (5,)).shape, prior.latent_shape
    ((5, 2, 2), (2,))
    """

    # the decoder's and encoder's arrays are pytree leaves and the rest static (as for
    # Denoiser), so the prior passes through jax.jit whether they are modules or functions
    pytree_data_fields = ("decoder_params", "encoder_params")
    pytree_aux_fields = ("_latent_shape", "decoder_static", "encoder_static")

    def __init__(
        self,
        denoiser: Denoiser,
        decoder: Callable[[Array], Array],
        event_shape: Sequence[int],
        latent_shape: Sequence[int],
        *,
        encoder: Callable[[Array], Array] | None = None,
        **options,
    ):
        event_shape = _check_shape("event_shape", event_shape)
        latent_shape = _check_shape("latent_shape", latent_shape)
        _check_map("decoder", decoder, latent_shape, event_shape, "latent")
        if encoder is not None:
            _check_map("encoder", encoder, event_shape, latent_shape, "image")
        self.decoder_params, self.decoder_static = eqx.partition(decoder, eqx.is_array)
        self.encoder_params, self.encoder_static = eqx.partition(encoder, eqx.is_array)
        self._latent_shape = latent_shape
        super().__init__(denoiser, event_shape, **options)

    @property
    def decoder(self) -> Callable[[Array], Array]:
        """The decoder :math:`D`, reassembled from its arrays and its static part."""
        return eqx.combine(self.decoder_params, self.decoder_static)

    @property
    def encoder(self) -> Callable[[Array], Array] | None:
        """The encoder :math:`E`, or None."""
        return eqx.combine(self.encoder_params, self.encoder_static)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent :math:`z`."""
        return self._latent_shape

    def decode(self, z: ArrayLike) -> Array:
        """The image :math:`D(z)` of one latent."""
        return self.decoder(jnp.asarray(z))

    def encode(self, x: ArrayLike) -> Array:
        """The latent :math:`E(x)` of one image (needs an ``encoder``)."""
        if self.encoder is None:
            raise ValueError("this LatentDiffusionPrior has no encoder; pass encoder=E")
        return self.encoder(jnp.asarray(x))

    @property
    def latent_prior(self) -> DiffusionPrior:
        """The diffusion model of :math:`z` alone, a :class:`DiffusionPrior` of event shape
        ``latent_shape`` with the same denoiser and options."""
        return DiffusionPrior(
            self.denoiser,
            self.latent_shape,
            num_steps=self.num_steps,
            eta=self.eta,
            spacing=self.spacing,
            ode_steps=self.ode_steps,
            num_probes=self.num_probes,
            exact_trace_max_dim=self.exact_trace_max_dim,
            probe_seed=self.probe_seed,
            data_variance=self.data_variance,
        )

    def latent_log_prob(self, z: ArrayLike) -> Array:
        """Log density of latents ``z`` (``(..., *latent_shape)``) under the diffusion model
        (:meth:`DiffusionPrior.log_prob` of :attr:`latent_prior`)."""
        return self.latent_prior.log_prob(z)

    def log_prob(self, value: ArrayLike) -> Array:
        raise NotImplementedError(
            "LatentDiffusionPrior.log_prob: images x = decoder(z) have no density on the image "
            f"space (the decoder maps the {self.latent_shape} latent onto a lower-dimensional "
            f"set of {self.event_shape} images); use latent_log_prob(z) for the latent's "
            "density, and dp.Sampler, which never needs log_prob, to sample posteriors"
        )

    def ode_log_prob(self, value: ArrayLike, **kwargs) -> Array:
        return self.log_prob(value)
