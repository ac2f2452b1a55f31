"""Pretrained diffusion priors shipped with the package: no download, nothing leaves the machine.

Each prior ``NAME`` is two package files: ``NAME.eqx`` (the network's weights, written by
:func:`equinox.tree_serialise_leaves`) and ``NAME.json`` (how to rebuild it: schedule,
parameterization, network class and constructor arguments, data split and scaling, training
settings, the exact command that trained it, and the training data's variance).

- ``"digits"``: scikit-learn's 8x8 handwritten digits scaled to ``[-1, 1]``, trained on the first
  1500 images by ``python examples/train_digits.py``; the last 297 (:func:`load_digits_split`)
  are held out for demos and benchmarks.
- ``"digits-latent"``: the same images as a :class:`~diffprior.LatentDiffusionPrior`: an MLP
  autoencoder (:class:`~diffprior.nets.MLPAutoencoder`) with a 16-dimensional standardised
  latent, and a diffusion model (:class:`~diffprior.nets.TimeMLP`) on that latent, trained on
  the same 1500 images by ``python examples/train_digits_latent.py``. A latent prior's
  ``NAME.eqx`` holds the pair ``(denoiser network, autoencoder)`` and its metadata the
  ``autoencoder`` record and the ``latent_shape``.

Examples
--------
>>> import jax
>>> import diffprior.pretrained
>>> "digits" in diffprior.pretrained.available()
True
>>> prior = diffprior.pretrained.load("digits", num_steps=20)
>>> prior.sample(jax.random.key(0), (2,)).shape
(2, 8, 8)
>>> latent = diffprior.pretrained.load("digits-latent", num_steps=20)
>>> latent.latent_shape, latent.sample(jax.random.key(0), (2,)).shape
((16,), (2, 8, 8))
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import json
from typing import Any

import equinox as eqx
import jax
import numpy as np

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.schedules import EDM, VE, VP, Schedule
from diffprior.nets import MLPAutoencoder, TimeMLP, UNet
from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.priors.latent_prior import LatentDiffusionPrior

__all__ = [
    "available",
    "load",
    "metadata",
    "load_digits_split",
    "build_schedule",
    "build_net",
    "DIGITS_NUM_TRAIN",
    "DIGITS_NUM_TEST",
]

#: The digits split: the first 1500 of scikit-learn's 1797 images train, the last 297 test.
DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_TEST = 297

#: Schedule constructors by the ``kind`` recorded in the metadata.
_SCHEDULES = {
    "VP.linear": VP.linear,
    "VP.cosine": VP.cosine,
    "VE": VE,
    "EDM": EDM,
}

#: Network classes by the ``class`` recorded in the metadata.
_NETS = {"UNet": UNet, "TimeMLP": TimeMLP, "MLPAutoencoder": MLPAutoencoder}


def _files():
    return importlib.resources.files(__name__)


def available() -> list[str]:
    """Names of the shipped priors (those with both a ``.eqx`` and a ``.json`` file)."""
    names = {entry.name for entry in _files().iterdir()}
    return sorted(
        name[: -len(".json")]
        for name in names
        if name.endswith(".json") and name[: -len(".json")] + ".eqx" in names
    )


def _check_name(name: str) -> None:
    if name not in available():
        raise ValueError(f"unknown pretrained prior {name!r}; available: {available()}")


def metadata(name: str) -> dict[str, Any]:
    """The metadata recorded with prior ``name`` (a fresh copy of its JSON file)."""
    _check_name(name)
    return json.loads(_files().joinpath(f"{name}.json").read_text(encoding="utf-8"))


def build_schedule(config: dict[str, Any]) -> Schedule:
    """A schedule from its metadata record ``{"kind": ..., **constructor_kwargs}``, e.g.
    ``{"kind": "VP.linear", "beta_min": 0.1, "beta_max": 20.0}``."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; known: {sorted(_SCHEDULES)}")
    return _SCHEDULES[kind](**config)


def build_net(config: dict[str, Any], key: jax.Array | None = None) -> eqx.Module:
    """The network of a metadata record ``{"class": ..., "kwargs": {...}}``, initialised from
    ``key``; without a key, a skeleton whose arrays are :class:`jax.ShapeDtypeStruct` (no
    computation; :func:`equinox.tree_deserialise_leaves` fills it)."""
    cls = config.get("class")
    if cls not in _NETS:
        raise ValueError(f"unknown network class {cls!r}; known: {sorted(_NETS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config["kwargs"].items()}
    if key is None:
        return eqx.filter_eval_shape(lambda: _NETS[cls](**kwargs, key=jax.random.key(0)))
    return _NETS[cls](**kwargs, key=key)


@functools.lru_cache(maxsize=8)
def _load_denoiser(name: str) -> tuple[Denoiser, MLPAutoencoder | None, str]:
    """``(denoiser, autoencoder or None, metadata as JSON)`` of prior ``name``."""
    meta = metadata(name)
    raw = _files().joinpath(meta.get("weights_file", f"{name}.eqx")).read_bytes()
    expected = meta.get("weights_sha256")
    if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
        raise ValueError(
            f"pretrained prior {name!r}: the weights file does not match the sha256 recorded in "
            f"{name}.json (a partial or mismatched install); retrain or reinstall it"
        )
    autoencoder = None
    if "autoencoder" in meta:  # a latent prior: the file holds (network, autoencoder)
        skeleton = (build_net(meta["net"]), build_net(meta["autoencoder"]))
        net, autoencoder = eqx.tree_deserialise_leaves(io.BytesIO(raw), skeleton)
    else:
        net = eqx.tree_deserialise_leaves(io.BytesIO(raw), build_net(meta["net"]))
    denoiser = Denoiser(
        net,
        build_schedule(meta["schedule"]),
        meta["parameterization"],
        clip_x0=meta.get("clip_x0", 1.0),  # the shipped images are scaled to [-1, 1]
    )
    return denoiser, autoencoder, json.dumps(meta)


def load(name: str, *, calibrated: bool = True, **prior_options: Any) -> DiffusionPrior:
    r"""The shipped prior ``name`` as a :class:`diffprior.DiffusionPrior` (a
    :class:`diffprior.LatentDiffusionPrior`, with the autoencoder's decoder and encoder, for a
    latent prior such as ``"digits-latent"``).

    The networks are rebuilt from the metadata and their weights read from the package (no
    download). ``data_variance`` and the recorded sampling defaults come from the metadata;
    ``prior_options`` (``num_steps``, ``eta``, ``spacing``, ...) override them.

    A prior whose metadata holds a calibration (:func:`diffprior.calibrate` on its training
    data; ``python examples/calibrate_digits.py [--name digits-latent]`` writes the shipped
    priors', the latent one's in its latent space) comes with it as ``prior.calibration``,
    which TDS, FK and MCGdiff use to judge how far to trust the network's :math:`\hat x_0` at
    each noise level; ``calibrated=False`` leaves it out.

    Raises
    ------
    ValueError
        For an unknown ``name``, listing the available ones.
    """
    _check_name(name)
    if not isinstance(calibrated, bool):
        raise TypeError(f"calibrated must be True or False, got {calibrated!r}")
    denoiser, autoencoder, meta_json = _load_denoiser(name)
    meta = json.loads(meta_json)
    options = {"data_variance": meta["data_variance"], **meta.get("prior_options", {})}
    options.update(prior_options)
    event_shape = tuple(meta["event_shape"])
    if autoencoder is not None:
        prior = LatentDiffusionPrior(
            denoiser,
            autoencoder.decode,
            event_shape,
            tuple(meta["latent_shape"]),
            encoder=autoencoder.encode,
            **options,
        )
    else:
        prior = DiffusionPrior(denoiser, event_shape=event_shape, **options)
    if calibrated and "calibration" in meta:
        from diffprior.calibration import Calibration

        prior.calibration = Calibration.from_dict(meta["calibration"])
    return prior


#: The data block of the digits priors' metadata: where the images come from and the split.
DIGITS_DATA = {
    "source": "sklearn.datasets.load_digits().images (1797 images, 8x8, values 0..16)",
    "scaling": "x / 8 - 1: [0, 16] -> [-1, 1]",
    "train": "first 1500 images (indices 0..1499)",
    "test": "last 297 images (indices 1500..1796), never trained on",
    "loader": "diffprior.pretrained.load_digits_split",
}


def load_digits_split() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits scaled from ``[0, 16]`` to ``[-1, 1]`` (``x / 8 - 1``), split
    into ``(train, test)``: the first 1500 images, shape ``(1500, 8, 8)``, and the last 297,
    shape ``(297, 8, 8)``, float32. The digits prior never saw the test images.

    Labels: ``sklearn.datasets.load_digits().target[:1500]`` and ``[1500:]``.
    Needs scikit-learn (a ``dev`` extra); its copy of the data ships with it, nothing is
    downloaded.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dev dependency
        raise ImportError(
            "load_digits_split needs scikit-learn: pip install 'diffprior[dev]'"
        ) from err
    images = load_digits().images.astype(np.float32) / 8.0 - 1.0
    if images.shape[0] != DIGITS_NUM_TRAIN + DIGITS_NUM_TEST:
        raise RuntimeError(f"expected 1797 digits from scikit-learn, got {images.shape[0]}")
    return images[:DIGITS_NUM_TRAIN], images[DIGITS_NUM_TRAIN:]
