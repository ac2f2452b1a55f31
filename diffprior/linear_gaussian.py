r"""The whitened SVD of a linear Gaussian observation, the one structure that the SVD-based
samplers (PiGDM, DiffPIR, MCGdiff) read.

A model :math:`y = g A x + b + \operatorname{diag}(\sigma)\varepsilon` is whitened,
:math:`\tilde A = \operatorname{diag}(1/\sigma)\, g A`, :math:`\tilde y = (y - b)/\sigma`, and
decomposed, :math:`\tilde A = U \operatorname{diag}(s) V^T`. A :class:`WhitenedSVD` holds

- ``singular`` ``(r,)``: :math:`s`, zero for the directions of :math:`V` that are not observed;
- ``coords_y`` ``(r,)``: :math:`(U^T \tilde y)_i` paired with ``singular`` (zero where it is);
- the right basis as two functions, :meth:`WhitenedSVD.V_T` (``x`` to ``(r,)`` coordinates) and
  :meth:`WhitenedSVD.V` (coordinates to ``x``), batched over leading dimensions;
- what the evidence needs besides: :math:`\sum \log \sigma`, and the part of :math:`\tilde y`
  outside the range of :math:`\tilde A` (its squared norm and dimension).

Rows may carry weights :math:`w_j \ge 0` (``weight=``), the log-likelihood then being
:math:`\sum_j w_j \log N(y_j; (gAx + b)_j, \sigma_j^2)`: a masked observation has weight 0, a
site under ``numpyro.handlers.scale(s)`` weight ``s``. Row :math:`j` is whitened by
:math:`\sqrt{w_j} / \sigma_j` and its :math:`\log \sigma_j` becomes
:math:`w_j \log \sigma_j + \tfrac{w_j - 1}2 \log 2\pi`, so that every formula below holds as
it is: a row of weight 0 is a whitened observation 0 with no gain and density exactly 1.

Two ways to build one:

- :func:`from_operator` takes a :mod:`diffprior.operators` operator and uses its own structured
  SVD (an FFT for a circular blur, a permutation for inpainting, block Helmert bases for
  downsampling). Nothing of size :math:`d \times d` or :math:`d_y \times d` exists; ``r`` is the
  operator's ``in_dim`` and :meth:`~WhitenedSVD.V` is the full inverse of
  :meth:`~WhitenedSVD.V_T`.
- :func:`from_matrix` takes a dense ``(dy, d)`` matrix (any linear map, e.g. the Jacobian of the
  model's mean) and its thin SVD, ``r = min(dy, d)``; :meth:`~WhitenedSVD.V` then maps back the
  observed subspace only. It refuses matrices of more than :data:`MAX_DENSE_ENTRIES` entries.

Samplers only move particles inside the observed subspace, as ``x + V(delta)`` with
``delta`` zero on unobserved coordinates, so both forms give the same answers.

:meth:`diffprior.model.ObservationModel.linear_gaussian` picks the form for a model.

Examples
--------
>>> import jax.numpy as jnp
>>> from diffprior.operators import Inpaint
>>> from diffprior.linear_gaussian import from_operator
>>> A = Inpaint(jnp.array([True, False, True, True]))
>>> svd = from_operator(A, scale=jnp.array([0.5]), y=jnp.array([1.0, 2.0, 3.0]))
>>> svd.singular.tolist(), int(svd.num_observed)
([2.0, 2.0, 2.0, 0.0], 3)
>>> x = jnp.arange(4.0)
>>> bool(jnp.allclose(svd.V(svd.V_T(x)), x))
True
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from diffprior.operators import Downsample, Inpaint, LinearOperator
from diffprior.types import Array, ArrayLike

__all__ = [
    "WhitenedSVD",
    "from_operator",
    "from_matrix",
    "check_dense_size",
    "jacobian_matrix",
    "MAX_DENSE_ENTRIES",
    "RANK_RTOL",
]

#: Singular values at or below this fraction of the largest count as unobserved directions.
RANK_RTOL = 1e-6

#: The most entries a dense ``(dy, d)`` matrix may have for :func:`from_matrix` (about 134 MB
#: in float32; the thin SVD needs about three times that).
MAX_DENSE_ENTRIES = 2**25

#: Operators whose left singular basis :math:`U` is a permutation (rows of :math:`A` are
#: orthogonal): a per-observation noise scale then only rescales the singular values.
_PERMUTATION_LEFT = (Inpaint, Downsample)


class _DenseBasis(eqx.Module):
    """Orthonormal columns ``(d, r)`` as the right basis of an event of ``event_shape``."""

    columns: Array
    event_shape: tuple[int, ...] = eqx.field(static=True)

    def V_T(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        batch = x.shape[: x.ndim - len(self.event_shape)]
        return x.reshape((*batch, -1)) @ self.columns

    def V(self, z: ArrayLike) -> Array:
        z = jnp.asarray(z)
        return (z @ self.columns.T).reshape((*z.shape[:-1], *self.event_shape))


class _ReshapedBasis(eqx.Module):
    """An operator's right basis for events of another shape with as many entries (a model
    that applies ``A`` to ``x.reshape(A.in_shape)``)."""

    op: LinearOperator
    event_shape: tuple[int, ...] = eqx.field(static=True)

    def V_T(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        batch = x.shape[: x.ndim - len(self.event_shape)]
        return self.op.V_T(x.reshape((*batch, *self.op.in_shape)))

    def V(self, z: ArrayLike) -> Array:
        x = self.op.V(z)
        return x.reshape((*x.shape[: x.ndim - len(self.op.in_shape)], *self.event_shape))


class WhitenedSVD(eqx.Module):
    r"""The whitened SVD of a linear Gaussian observation (module docstring).

    Attributes
    ----------
    singular
        ``(r,)`` whitened singular values; zero on unobserved directions.
    coords_y
        ``(r,)`` :math:`(U^T \tilde y)_i`, zero where ``singular`` is.
    log_scale_sum
        :math:`\sum_j \log \sigma_j` over the ``dy`` observations.
    residual_sq
        :math:`\lVert \tilde y \rVert^2 - \lVert` ``coords_y`` :math:`\rVert^2`, the part of the
        whitened observation that no ``x`` can explain.
    num_obs
        ``dy``, the number of observations.
    basis
        The right basis: an object with ``V_T`` and ``V`` (a :mod:`diffprior.operators`
        operator, or dense columns).
    """

    singular: Array
    coords_y: Array
    log_scale_sum: Array
    residual_sq: Array
    num_obs: int = eqx.field(static=True)
    basis: Any

    @property
    def dim(self) -> int:
        """``r``, the number of right coordinates."""
        return int(self.singular.shape[0])

    @property
    def observed(self) -> Array:
        """``(r,)`` booleans: the directions that carry an observation."""
        return self.singular > 0

    @property
    def num_observed(self) -> Array:
        """The rank: how many directions are observed."""
        return jnp.sum(self.observed)

    @property
    def num_residual(self) -> Array:
        """``dy - rank``: observations (directions of :math:`\tilde y`) that no ``x`` explains."""
        return self.num_obs - self.num_observed

    def V_T(self, x: ArrayLike) -> Array:
        """Right coordinates ``(..., r)`` of ``x`` (of the event shape, with batch dims)."""
        return self.basis.V_T(x)

    def V(self, z: ArrayLike) -> Array:
        """``x`` from right coordinates ``(..., r)``; only the observed subspace for a dense
        basis, so lift differences (``x + V(delta)``)."""
        return self.basis.V(z)

    def log_residual_density(self) -> Array:
        r"""The standard normal log-density of the part of :math:`\tilde y` outside the range,
        :math:`-\tfrac12 (\text{residual\_sq} + (d_y - \text{rank}) \log 2\pi)`: the factor of
        :math:`p(y)` that no ``x`` changes."""
        return -0.5 * (self.residual_sq + self.num_residual * math.log(2 * math.pi))

    def log_likelihood(self, x: ArrayLike) -> Array:
        r""":math:`\log N(y; g A x + b, \operatorname{diag}(\sigma^2))` computed in the SVD (for
        checks: it equals the model's Normal log-likelihood)."""
        predicted = self.singular * self.V_T(x)
        inside = jnp.sum(jnp.where(self.observed, (self.coords_y - predicted) ** 2, 0.0), -1)
        return (
            -0.5 * inside
            - 0.5 * self.num_observed * math.log(2 * math.pi)
            - self.log_scale_sum
            + self.log_residual_density()
        )


def _cut(singular: Array) -> Array:
    return jnp.where(singular > RANK_RTOL * jnp.max(singular), singular, 0.0)


def _outside_range(residual_sq: Array, singular: Array, num_obs: int) -> Array:
    r"""``residual_sq``, or exactly zero when the rank is ``num_obs`` (the range is every
    :math:`\tilde y`). Computed, it is a difference of numbers of the size of
    :math:`\lVert \tilde y \rVert`, and at a small noise scale (:math:`\tilde y = y / \sigma`
    near :math:`10^6`) float32 rounding alone leaves several units in it: nats of error in
    :meth:`WhitenedSVD.log_residual_density` where there should be none."""
    return jnp.where(jnp.sum(singular > 0) == num_obs, 0.0, residual_sq)


def from_operator(
    op: LinearOperator,
    scale: ArrayLike,
    y: ArrayLike,
    offset: ArrayLike = 0.0,
    gain: ArrayLike = 1.0,
    event_shape: tuple[int, ...] | None = None,
    weight: ArrayLike | None = None,
) -> WhitenedSVD:
    r"""The :class:`WhitenedSVD` of :math:`y = g A x + b + \sigma \varepsilon` from the
    operator's own SVD.

    ``scale`` is one noise scale (size 1) or one per observation (shape ``op.out_shape`` or
    flat); per-observation scales need an operator whose left basis is a permutation
    (:class:`~diffprior.operators.Inpaint`, :class:`~diffprior.operators.Downsample`): for the
    others a ``ValueError`` says so. ``y`` and ``offset`` (:math:`b`) are the observation and
    the mean at ``x = 0``, of ``op.out_shape`` or flat; ``gain`` a scalar :math:`g`.
    ``event_shape`` (default ``op.in_shape``) is the shape of ``x`` that the basis takes, for a
    model that reshapes ``x`` before applying ``op``. ``weight`` (one per observation, default
    1; module docstring) needs a per-observation operator as a per-observation scale does.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a diffprior.operators.LinearOperator, got {type(op).__name__}")
    scale = jnp.asarray(scale, jnp.float32)
    residual = (jnp.asarray(y, jnp.float32) - jnp.asarray(offset, jnp.float32)).reshape(-1)
    if residual.shape[0] != op.out_dim:
        raise ValueError(
            f"y has {residual.shape[0]} entries but {type(op).__name__} makes {op.out_dim}"
        )
    gain = jnp.asarray(gain, jnp.float32)
    if weight is not None:
        if not isinstance(op, _PERMUTATION_LEFT):
            raise ValueError(
                f"weighted observations need an operator whose rows are orthogonal (Inpaint, "
                f"Downsample); {type(op).__name__} has one SVD for one noise scale"
            )
        sigma = jnp.broadcast_to(scale.reshape(-1), (op.out_dim,))
        weight = jnp.broadcast_to(jnp.asarray(weight, jnp.float32).reshape(-1), sigma.shape)
        factor = jnp.sqrt(weight) / sigma
        # U is a permutation: the rows' whitening factors reorder as the left coordinates do
        singular = op.singular_values * op.U_T(factor.reshape(op.out_shape)) * jnp.abs(gain)
        white = residual * factor
        log_scale_sum = _weighted_log_scale_sum(sigma, weight)
    elif scale.size == 1:
        sigma = scale.reshape(())
        singular = op.singular_values * jnp.abs(gain) / sigma
        white = residual / sigma
    elif scale.size == op.out_dim:
        if not isinstance(op, _PERMUTATION_LEFT):
            raise ValueError(
                f"one noise scale per observation needs an operator whose rows are orthogonal "
                f"(Inpaint, Downsample); {type(op).__name__} has one SVD for one noise scale. "
                "Use a single noise scale, or a dense operator (dp.operators.Linear) of modest size"
            )
        sigma = scale.reshape(-1)
        # U is a permutation: whitening the rows reorders as the left coordinates do
        sigma_left = op.U_T(sigma.reshape(op.out_shape))
        safe = jnp.where(sigma_left > 0, sigma_left, 1.0)
        singular = jnp.where(sigma_left > 0, op.singular_values / safe, 0.0) * jnp.abs(gain)
        white = residual / sigma
    else:
        raise ValueError(
            f"scale must be one number or one per observation ({op.out_dim}), got shape "
            f"{scale.shape}"
        )
    singular = _cut(singular)
    coords = jnp.sign(gain) * op.U_T(white.reshape(op.out_shape))
    coords = jnp.where(singular > 0, coords, 0.0)
    if weight is None:
        log_scale_sum = jnp.sum(jnp.broadcast_to(jnp.log(sigma), (op.out_dim,)))
    # the part of the whitened observation outside the range, directly (no cancellation)
    outside = white - jnp.ravel(op.U(jnp.sign(gain) * coords))
    residual_sq = _outside_range(jnp.sum(outside**2), singular, op.out_dim)
    basis = op
    if event_shape is not None and tuple(event_shape) != tuple(op.in_shape):
        if math.prod(event_shape) != op.in_dim:
            raise ValueError(
                f"event_shape {tuple(event_shape)} does not have the operator's {op.in_dim} entries"
            )
        basis = _ReshapedBasis(op, tuple(event_shape))
    return WhitenedSVD(singular, coords, log_scale_sum, residual_sq, op.out_dim, basis)


def from_matrix(
    matrix: ArrayLike,
    scale: ArrayLike,
    y: ArrayLike,
    offset: ArrayLike = 0.0,
    event_shape: tuple[int, ...] | None = None,
    weight: ArrayLike | None = None,
) -> WhitenedSVD:
    r"""The :class:`WhitenedSVD` of :math:`y = M x + b + \sigma \varepsilon` for a dense
    ``(dy, d)`` matrix :math:`M` (thin SVD; ``x`` of ``event_shape``, default ``(d,)``), with
    rows weighted by ``weight`` (one per observation, default 1; module docstring).

    Raises ``ValueError`` when :math:`M` has more than :data:`MAX_DENSE_ENTRIES` entries.
    """
    matrix = jnp.asarray(matrix, jnp.float32)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D (dy, d), got shape {matrix.shape}")
    num_obs, dim = matrix.shape
    check_dense_size(num_obs, dim)
    event_shape = (dim,) if event_shape is None else tuple(event_shape)
    if math.prod(event_shape) != dim:
        raise ValueError(f"event_shape {event_shape} does not have d = {dim} entries")
    sigma = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (num_obs,))
    residual = (jnp.asarray(y, jnp.float32) - jnp.asarray(offset, jnp.float32)).reshape(-1)
    if weight is None:
        white = residual / sigma
        whitened = matrix / sigma[:, None]
        log_scale_sum = jnp.sum(jnp.log(sigma))
    else:
        weight = jnp.broadcast_to(jnp.asarray(weight, jnp.float32).reshape(-1), (num_obs,))
        factor = jnp.sqrt(weight) / sigma
        white = residual * factor
        whitened = matrix * factor[:, None]
        log_scale_sum = _weighted_log_scale_sum(sigma, weight)
    u, s, vt = jnp.linalg.svd(whitened, full_matrices=False)
    singular = _cut(s)
    coords = jnp.where(singular > 0, u.T @ white, 0.0)
    residual_sq = _outside_range(jnp.sum((white - u @ coords) ** 2), singular, num_obs)
    basis = _DenseBasis(vt.T, event_shape)
    return WhitenedSVD(singular, coords, log_scale_sum, residual_sq, num_obs, basis)


def _weighted_log_scale_sum(sigma: Array, weight: Array) -> Array:
    r""":math:`\sum_j w_j \log \sigma_j + \tfrac{w_j - 1}2 \log 2\pi` (module docstring):
    :math:`\sum_j \log \sigma_j` for unit weights, and 0 for a row of weight 0 whatever its
    :math:`\sigma_j`."""
    return jnp.sum(weight * jnp.log(sigma) + 0.5 * (weight - 1.0) * math.log(2 * math.pi))


def check_dense_size(num_obs: int, dim: int, what: str = "the observation's linear map") -> None:
    """Raise a ``ValueError`` naming the structured operators when a dense ``(dy, d)`` matrix
    would exceed :data:`MAX_DENSE_ENTRIES`."""
    entries = num_obs * dim
    if entries > MAX_DENSE_ENTRIES:
        raise ValueError(
            f"{what} would need a dense ({num_obs}, {dim}) matrix ({entries:,} entries, more "
            f"than the {MAX_DENSE_ENTRIES:,} allowed) and its SVD. Write the forward map with "
            "a diffprior.operators operator (Inpaint, Blur, Downsample: structured SVDs, "
            "nothing dense), called once on x as A(x) with one noise scale, or use a method "
            "that needs no SVD (dp.TDS, dp.FK, dp.DPS)"
        )


def jacobian_matrix(fn, event_shape: tuple[int, ...], num_obs: int) -> Array:
    """The ``(dy, d)`` Jacobian of ``fn`` (``x`` of ``event_shape`` to ``(dy,)``) at zero, after
    the size check."""
    dim = math.prod(event_shape)
    check_dense_size(num_obs, dim)
    zero = jnp.zeros(event_shape, jnp.float32)
    return jax.jacfwd(fn)(zero).reshape((num_obs, dim))
