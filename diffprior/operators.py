r"""Forward operators :math:`A` of inverse problems :math:`y = A(x) + \text{noise}`.

An operator is an Equinox module (a plain pytree whose shapes are static fields) that maps an
``x`` of the prior's event shape ``in_shape`` (a vector ``(d,)``, an image ``(h, w)`` or a
colour image ``(c, h, w)``) to a ``y`` of shape ``out_shape``. It is a pure JAX function, so it
can be used inside a NumPyro model as ``A(x)`` and goes through ``jax.jit``, ``jax.vmap`` and
``jax.grad``. Every method also accepts leading batch dimensions (``x`` of shape
``(..., *in_shape)``). The image operators (:class:`Blur`, :class:`Downsample`) act on each
channel of a ``(c, h, w)`` image alike.

Linear operators (:class:`LinearOperator`) also carry their singular value decomposition,
computed once at construction,

.. math::  A = U \operatorname{diag}(s) V^T,

with :math:`V` an orthonormal basis of the input space (``in_dim = prod(in_shape)`` vectors) and
:math:`U` an orthonormal basis of the output space. ``singular_values`` always has length
``in_dim``: the singular values of :math:`A` in descending order, followed by zeros for the rest
of the null space, so that the first ``rank`` entries are exactly the nonzero ones. Singular values
below ``rtol * max(s)`` are set to exactly zero (``rtol = 10 * max(out_dim, in_dim) * eps`` by
default, the cut of :func:`jax.numpy.linalg.pinv`). These are the pieces that SVD-based samplers
(PiGDM, MCGdiff, DDRM-style guidance) need:

- ``V_T(x)`` (``in_dim``,): coordinates of ``x`` in the right basis; ``V(z)`` inverts it.
- ``U_T(y)`` (``in_dim``,): coordinates of ``y`` in the left basis paired with
  ``singular_values``, zero where the singular value is zero (and padded with zeros up to
  ``in_dim`` when ``out_dim < in_dim``); ``U(z)`` maps them back, so that
  ``A(x) == U(singular_values * V_T(x))`` and ``U_T(A(x)) == singular_values * V_T(x)``.
- ``pinv(y)``: the Moore-Penrose pseudo-inverse :math:`A^+ y = V \operatorname{diag}(s^+) U^T y`.

Nonlinear operators (:class:`Saturation`, or any JAX callable) need only ``__call__``.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from diffprior.operators import Inpaint, half_mask
>>> A = Inpaint(half_mask((4, 4), side="left"))
>>> A.in_shape, A.out_shape
((4, 4), (8,))
>>> x = jnp.arange(16.0).reshape(4, 4)
>>> bool(jnp.allclose(A.U(A.singular_values * A.V_T(x)), A(x)))
True
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = [
    "LinearOperator",
    "Linear",
    "Inpaint",
    "Downsample",
    "Blur",
    "Saturation",
    "gaussian_kernel",
    "random_mask",
    "half_mask",
    "box_mask",
    "record_calls",
]

_EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------
# helpers


def _shape_tuple(shape, name: str, owner: str) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints, or a ValueError naming ``owner.name``."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(
            f"{owner}: {name} must be a tuple of positive ints, got {shape!r}"
        ) from None
    if len(shape) == 0 or any(s < 1 for s in shape):
        raise ValueError(f"{owner}: {name} must be a non-empty tuple of positive ints, got {shape}")
    return shape


def _concrete(value, name: str, owner: str) -> np.ndarray:
    """A NumPy copy of ``value``; a ValueError if it is traced (its shape would depend on it)."""
    try:
        return np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            f"{owner}: {name} must be a concrete array (built outside jax.jit), got a tracer"
        ) from None


def _apply(
    fn: Callable[[Array], Array],
    x: ArrayLike,
    core_shape: tuple[int, ...],
    where: str,
    maps: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None,
):
    """``fn`` on an array of shape ``core_shape``, mapped over any leading batch dimensions.
    ``maps`` (name, in_shape, out_shape) adds what the operator maps to the shape error."""
    x = jnp.asarray(x)
    k = len(core_shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != core_shape:
        mapping = f" ({maps[0]} maps {maps[1]} to {maps[2]})" if maps else ""
        raise ValueError(
            f"{where}: expected an array of shape (..., {', '.join(map(str, core_shape))}), "
            f"got shape {tuple(x.shape)}{mapping}"
        )
    batch = x.shape[: x.ndim - k]
    if not batch:
        return fn(x)
    out = jax.vmap(fn)(x.reshape((-1, *core_shape)))
    return out.reshape(batch + out.shape[1:])


def _fit(v, n: int):
    """The first ``n`` entries of the vector ``v``, padded with zeros if it is shorter (NumPy in,
    NumPy out)."""
    xp = np if isinstance(v, np.ndarray) else jnp
    if v.shape[0] >= n:
        return v[:n]
    return xp.concatenate([v, xp.zeros((n - v.shape[0],), v.dtype)])


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _default_rtol(out_dim: int, in_dim: int) -> float:
    return 10.0 * max(out_dim, in_dim) * _EPS32


def _cut(singular_values, rtol: float):
    """Singular values at or below ``rtol * max`` set to exactly zero (numerical rank); NumPy in,
    NumPy out (construction of concrete operators compiles nothing), JAX otherwise."""
    xp = jnp if _is_traced(singular_values) else np
    return xp.where(singular_values > rtol * xp.max(singular_values), singular_values, 0.0)


#: The lists that :func:`record_calls` is filling (innermost last).
_RECORDERS: list[list] = []


@contextlib.contextmanager
def record_calls():
    """Within the block, every :class:`LinearOperator` applied (``A(x)``) is appended to the
    yielded list, in call order. Tracing a model with it shows which operator maps ``x`` to the
    observation, so its structured SVD can be used instead of a dense Jacobian
    (:meth:`diffprior.model.ObservationModel.linear_gaussian`).

    >>> from diffprior.operators import Inpaint, record_calls
    >>> A = Inpaint(jnp.array([True, False, True]))
    >>> with record_calls() as calls:
    ...     _ = A(jnp.ones(3))
    >>> len(calls), calls[0] is A
    (1, True)
    """
    calls: list = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


# --------------------------------------------------------------------------------------------
# base class


class LinearOperator(eqx.Module):
    r"""A linear map :math:`x \mapsto A x` from ``in_shape`` to ``out_shape`` with its SVD.

    Subclasses define the fields ``in_shape``, ``out_shape`` (static) and ``singular_values``
    (``(in_dim,)``, descending, zero-padded), and six methods on unbatched arrays:
    ``_forward`` (:math:`A x`), ``_transpose`` (:math:`A^T y`), ``_right_coords``
    (:math:`V^T x`, ``(in_dim,)``), ``_from_right_coords`` (its inverse), ``_left_coords``
    (:math:`U^T y` in the *full* orthonormal left basis, ``(out_dim,)``, entry ``i < min(in_dim,
    out_dim)`` paired with ``singular_values[i]``) and ``_from_left_coords`` (its inverse). The
    public methods below add shape checks, batching, the rank mask and the padding.
    """

    in_shape: eqx.AbstractVar[tuple[int, ...]]
    out_shape: eqx.AbstractVar[tuple[int, ...]]
    singular_values: eqx.AbstractVar[Array]

    # ---- to implement -----------------------------------------------------------------------
    def _forward(self, x: Array) -> Array:
        raise NotImplementedError

    def _transpose(self, y: Array) -> Array:
        raise NotImplementedError

    def _right_coords(self, x: Array) -> Array:
        raise NotImplementedError

    def _from_right_coords(self, z: Array) -> Array:
        raise NotImplementedError

    def _left_coords(self, y: Array) -> Array:
        raise NotImplementedError

    def _from_left_coords(self, z: Array) -> Array:
        raise NotImplementedError

    # ---- public API -------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        """Number of entries of ``x``: ``prod(in_shape)``."""
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        """Number of entries of ``y``: ``prod(out_shape)``."""
        return math.prod(self.out_shape)

    @property
    def rank(self) -> Array:
        """Number of nonzero singular values (a traced integer under ``jax.jit``)."""
        return jnp.sum(self.singular_values > 0)

    @property
    def T(self) -> LinearOperator:
        r"""The transpose :math:`A^T = V \operatorname{diag}(s) U^T` as a :class:`LinearOperator`
        (``in_shape`` and ``out_shape`` swapped, SVD pieces reused)."""
        return _Transposed(self)

    def _name(self) -> str:
        return type(self).__name__

    def __call__(self, x: ArrayLike) -> Array:
        """:math:`A x`, shaped ``(..., *out_shape)``."""
        for calls in _RECORDERS:
            calls.append(self)
        name = self._name()
        maps = (name, self.in_shape, self.out_shape)
        return _apply(self._forward, x, self.in_shape, f"{name}: x", maps)

    def transpose(self, y: ArrayLike) -> Array:
        """The adjoint :math:`A^T y`, shaped ``(..., *in_shape)``."""
        return _apply(self._transpose, y, self.out_shape, f"{self._name()}.transpose: y")

    def V_T(self, x: ArrayLike) -> Array:
        """Coordinates :math:`V^T x` of ``x`` in the orthonormal right basis, ``(..., in_dim)``,
        entry ``i`` paired with ``singular_values[i]``."""
        return _apply(self._right_coords, x, self.in_shape, f"{self._name()}.V_T: x")

    def V(self, z: ArrayLike) -> Array:
        """:math:`V z`, the inverse of :meth:`V_T`, shaped ``(..., *in_shape)``."""
        return _apply(self._from_right_coords, z, (self.in_dim,), f"{self._name()}.V: z")

    def U_T(self, y: ArrayLike) -> Array:
        """Left-singular coordinates :math:`(u_i^T y)_i`, ``(..., in_dim)``.

        Entry ``i`` is paired with ``singular_values[i]`` and is zero where that singular value is
        zero; when ``out_dim < in_dim`` the tail is zero padding. When ``out_dim > in_dim`` only
        the ``in_dim`` coordinates paired with singular values are kept: the part of ``y``
        orthogonal to the range of :math:`A` is dropped.
        """

        def coords(y):
            k = min(self.in_dim, self.out_dim)
            nonzero = self.singular_values[:k] > 0
            return _fit(jnp.where(nonzero, self._left_coords(y)[:k], 0.0), self.in_dim)

        return _apply(coords, y, self.out_shape, f"{self._name()}.U_T: y")

    def U(self, z: ArrayLike) -> Array:
        r""":math:`\sum_i z_i u_i` over the nonzero singular values, shaped
        ``(..., *out_shape)``; the inverse of :meth:`U_T` on the range of :math:`A`."""

        def combine(z):
            k = min(self.in_dim, self.out_dim)
            nonzero = self.singular_values[:k] > 0
            return self._from_left_coords(_fit(jnp.where(nonzero, z[:k], 0.0), self.out_dim))

        return _apply(combine, z, (self.in_dim,), f"{self._name()}.U: z")

    def pinv(self, y: ArrayLike) -> Array:
        r"""The Moore-Penrose pseudo-inverse :math:`A^+ y = V \operatorname{diag}(s^+) U^T y`,
        shaped ``(..., *in_shape)``, with :math:`s^+_i = 1/s_i` where :math:`s_i > 0`, else 0."""
        s = self.singular_values
        safe = jnp.where(s > 0, s, 1.0)
        coords = self.U_T(y)
        return self.V(jnp.where(s > 0, coords / safe, 0.0))

    def matrix(self) -> Array:
        """The dense ``(out_dim, in_dim)`` matrix of :math:`A` on flattened (row-major) arrays."""
        basis = jnp.eye(self.in_dim, dtype=jnp.float32).reshape((self.in_dim, *self.in_shape))
        columns = jax.vmap(self._forward)(basis).reshape(self.in_dim, self.out_dim)
        return columns.T


class _Transposed(LinearOperator):
    """:math:`A^T` of a :class:`LinearOperator`; built by :attr:`LinearOperator.T`."""

    op: LinearOperator
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)
    singular_values: Array

    def __init__(self, op: LinearOperator):
        self.op = op
        self.in_shape = op.out_shape
        self.out_shape = op.in_shape
        k = min(op.in_dim, op.out_dim)
        values = op.singular_values
        values = values if _is_traced(values) else np.asarray(values)
        self.singular_values = jnp.asarray(_fit(values[:k], op.out_dim))

    def _name(self) -> str:
        return f"{self.op._name()}.T"

    @property
    def T(self) -> LinearOperator:
        return self.op

    def _forward(self, x):
        return self.op._transpose(x)

    def _transpose(self, y):
        return self.op._forward(y)

    def _right_coords(self, x):
        return self.op._left_coords(x)

    def _from_right_coords(self, z):
        return self.op._from_left_coords(z)

    def _left_coords(self, y):
        return self.op._right_coords(y)

    def _from_left_coords(self, z):
        return self.op._from_right_coords(z)

    def matrix(self) -> Array:
        return self.op.matrix().T


# --------------------------------------------------------------------------------------------
# dense matrices


class Linear(LinearOperator):
    r"""A dense matrix ``(out_dim, in_dim)`` acting on flattened (row-major) ``x``.

    The SVD is computed once, ``jnp.linalg.svd(matrix, full_matrices=True)``, giving
    :math:`A = U \operatorname{diag}(s) V^T` with singular values in descending order;
    values at or below ``rtol * max(s)`` are set to zero. ``singular_values`` is ``s`` padded
    with zeros to ``in_dim``. For a tall matrix (``out_dim > in_dim``), :meth:`U_T` keeps the
    first ``in_dim`` left coordinates and drops the part of ``y`` outside the range.

    Parameters
    ----------
    matrix:
        The ``(out_dim, in_dim)`` matrix (may be traced: the SVD is JAX's).
    in_shape:
        Shape of ``x``, with ``prod(in_shape) == in_dim``; default ``(in_dim,)``.
    out_shape:
        Shape of ``y``, with ``prod(out_shape) == out_dim``; default ``(out_dim,)``.
    rtol:
        Relative cut for zero singular values; default ``10 * max(out_dim, in_dim) * eps``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = Linear(jnp.array([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    >>> A.singular_values.tolist()
    [3.0, 2.0, 0.0]
    >>> A.pinv(jnp.array([3.0, 4.0])).tolist()
    [1.0, 0.0, 2.0]
    """

    dense: Array
    left: Array  # U, (out_dim, out_dim), columns orthonormal
    right_t: Array  # V^T, (in_dim, in_dim), rows orthonormal
    singular_values: Array
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        matrix: ArrayLike,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        *,
        rtol: float | None = None,
    ):
        matrix = matrix if _is_traced(matrix) else np.asarray(matrix)
        if matrix.ndim != 2:
            raise ValueError(
                f"Linear: matrix must be 2-D (out_dim, in_dim), got shape {tuple(matrix.shape)}"
            )
        out_dim, in_dim = matrix.shape
        if out_dim < 1 or in_dim < 1:
            raise ValueError(f"Linear: matrix must be non-empty, got shape {tuple(matrix.shape)}")
        in_shape = (in_dim,) if in_shape is None else _shape_tuple(in_shape, "in_shape", "Linear")
        out_shape = (
            (out_dim,) if out_shape is None else _shape_tuple(out_shape, "out_shape", "Linear")
        )
        if math.prod(in_shape) != in_dim:
            raise ValueError(
                f"Linear: in_shape must have prod(in_shape) == in_dim == {in_dim} "
                f"(matrix shape {tuple(matrix.shape)}), got in_shape {in_shape}"
            )
        if math.prod(out_shape) != out_dim:
            raise ValueError(
                f"Linear: out_shape must have prod(out_shape) == out_dim == {out_dim} "
                f"(matrix shape {tuple(matrix.shape)}), got out_shape {out_shape}"
            )
        rtol = _default_rtol(out_dim, in_dim) if rtol is None else float(rtol)
        if not jnp.issubdtype(matrix.dtype, jnp.floating):
            matrix = matrix.astype(jnp.float32)
        if _is_traced(matrix):
            left, s, right_t = jnp.linalg.svd(matrix, full_matrices=True)
        else:  # concrete: in float64 on the host, compiling nothing
            left, s, right_t = np.linalg.svd(matrix.astype(np.float64), full_matrices=True)
        self.dense = jnp.asarray(matrix)  # float64 only where JAX has x64 enabled
        dtype = self.dense.dtype
        self.left = jnp.asarray(left, dtype)
        self.right_t = jnp.asarray(right_t, dtype)
        self.singular_values = jnp.asarray(_fit(_cut(s, rtol), in_dim), dtype)
        self.in_shape = in_shape
        self.out_shape = out_shape

    @classmethod
    def from_function(
        cls,
        fn: Callable[[Array], Array],
        in_shape: Sequence[int],
        *,
        rtol: float | None = None,
        tol: float = 1e-3,
    ) -> Linear:
        """The matrix of a *linear* JAX function ``fn`` by ``jax.jacfwd`` at zero.

        Only valid if ``fn`` is linear: it is checked at two random points ``a``, ``b`` (a fixed
        key) that ``fn(a + b) == fn(a) + fn(b)``, ``fn(2.5 a) == 2.5 fn(a)`` and that the
        matrix reproduces ``fn(a)``, each within ``tol`` relative to the norms involved; a
        ValueError is raised otherwise. ``out_shape`` is the shape ``fn`` returns (``(1,)`` for
        a scalar). Call it outside ``jax.jit``: the checks need concrete values.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> A = Linear.from_function(lambda x: x.sum(axis=0), (2, 3))
        >>> A.matrix().shape, A.out_shape
        ((3, 6), (3,))
        """
        in_shape = _shape_tuple(in_shape, "in_shape", "Linear.from_function")
        try:
            out = jax.eval_shape(fn, jax.ShapeDtypeStruct(in_shape, jnp.float32))
        except Exception as err:  # noqa: BLE001 -- report any failure with the shape tried
            raise ValueError(
                f"Linear.from_function: fn failed on an input of shape {in_shape}: {err}"
            ) from err
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError(
                f"Linear.from_function: fn must return a single array, got {type(out).__name__}"
            )
        out_shape = tuple(out.shape) if out.shape else (1,)
        in_dim, out_dim = math.prod(in_shape), math.prod(out_shape)
        rng = np.random.default_rng(0)
        a = rng.normal(size=in_shape).astype(np.float32)
        b = rng.normal(size=in_shape).astype(np.float32)

        def f(x):
            return jnp.reshape(fn(x), (out_dim,))

        @jax.jit  # one compilation for the Jacobian and all the checks
        def probe(a, b):
            matrix = jnp.reshape(jax.jacfwd(f)(jnp.zeros(in_shape)), (out_dim, in_dim))
            fa = f(a)
            return matrix, {
                "fn(a + b) == fn(a) + fn(b)": (f(a + b), fa + f(b)),
                "fn(2.5 a) == 2.5 fn(a)": (f(2.5 * a), 2.5 * fa),
                "fn(a) == J a (J the Jacobian at 0)": (fa, matrix @ a.reshape(in_dim)),
            }

        matrix, checks = probe(a, b)
        for what, (lhs, rhs) in checks.items():
            lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
            err = float(np.linalg.norm(lhs - rhs))
            scale = float(np.linalg.norm(lhs) + np.linalg.norm(rhs))
            if not err <= tol * scale + 1e-6:
                raise ValueError(
                    f"Linear.from_function: fn must be linear, but {what} fails at random "
                    f"points: |lhs - rhs| = {err:.3g}, expected <= {tol} * {scale:.3g}"
                )
        return cls(np.asarray(matrix, np.float32), in_shape, out_shape, rtol=rtol)

    def _forward(self, x):
        return (self.dense @ x.reshape(self.in_dim)).reshape(self.out_shape)

    def _transpose(self, y):
        return (self.dense.T @ y.reshape(self.out_dim)).reshape(self.in_shape)

    def _right_coords(self, x):
        return self.right_t @ x.reshape(self.in_dim)

    def _from_right_coords(self, z):
        return (self.right_t.T @ z).reshape(self.in_shape)

    def _left_coords(self, y):
        return self.left.T @ y.reshape(self.out_dim)

    def _from_left_coords(self, z):
        return (self.left @ z).reshape(self.out_shape)

    def matrix(self) -> Array:
        return self.dense


# --------------------------------------------------------------------------------------------
# inpainting


class Inpaint(LinearOperator):
    """Observe the entries of ``x`` where ``mask`` is True: ``y = x[mask]``, ``(num_observed,)``
    in row-major order.

    SVD: :math:`A` is a selection, so :math:`U = I`, the singular values are 1 on the
    ``num_observed`` observed entries and 0 on the missing ones, and :math:`V` is the
    permutation that lists the observed entries first (row-major), then the missing ones
    (row-major). Nothing dense is built (except by :meth:`matrix`).

    Parameters
    ----------
    mask:
        Boolean array of the shape of ``x``, True where observed; must be concrete (the output
        size depends on it) and observe at least one entry.
    in_shape:
        Optional; if given it must equal ``mask.shape``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = Inpaint(jnp.array([True, False, True]))
    >>> A(jnp.array([1.0, 2.0, 3.0])).tolist(), A.transpose(jnp.array([1.0, 3.0])).tolist()
    ([1.0, 3.0], [1.0, 0.0, 3.0])
    """

    mask: Array
    observed: Array  # flat indices of the observed entries, (num_observed,)
    order: Array  # V_T(x) = x.ravel()[order]: observed entries first
    inverse_order: Array
    singular_values: Array
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, mask: ArrayLike, in_shape: Sequence[int] | None = None):
        mask = _concrete(mask, "mask", "Inpaint")
        if mask.dtype != np.bool_:
            raise ValueError(
                f"Inpaint: mask must be a boolean array (True = observed), got dtype {mask.dtype}"
            )
        if mask.ndim == 0:
            raise ValueError("Inpaint: mask must have at least one dimension, got a scalar")
        if in_shape is not None:
            in_shape = _shape_tuple(in_shape, "in_shape", "Inpaint")
            if in_shape != mask.shape:
                raise ValueError(
                    f"Inpaint: mask must have shape in_shape = {in_shape}, got mask shape "
                    f"{mask.shape}"
                )
        flat = mask.reshape(-1)
        observed = np.flatnonzero(flat)
        missing = np.flatnonzero(~flat)
        if observed.size == 0:
            raise ValueError(
                f"Inpaint: mask must observe at least one entry, got an all-False mask of shape "
                f"{mask.shape}"
            )
        order = np.concatenate([observed, missing])
        self.mask = jnp.asarray(mask)
        self.observed = jnp.asarray(observed, jnp.int32)
        self.order = jnp.asarray(order, jnp.int32)
        self.inverse_order = jnp.asarray(np.argsort(order), jnp.int32)
        self.singular_values = jnp.asarray(
            np.concatenate([np.ones(observed.size), np.zeros(missing.size)]), jnp.float32
        )
        self.in_shape = tuple(mask.shape)
        self.out_shape = (int(observed.size),)

    def _forward(self, x):
        return x.reshape(-1)[self.observed]

    def _transpose(self, y):
        return jnp.zeros(self.in_dim, y.dtype).at[self.observed].set(y).reshape(self.in_shape)

    def _right_coords(self, x):
        return x.reshape(-1)[self.order]

    def _from_right_coords(self, z):
        return z[self.inverse_order].reshape(self.in_shape)

    def _left_coords(self, y):
        return y

    def _from_left_coords(self, z):
        return z

    def matrix(self) -> Array:
        return jnp.eye(self.in_dim, dtype=jnp.float32)[self.observed]


# --------------------------------------------------------------------------------------------
# image operators: one 2-D operator on every channel


def _image_shape(in_shape, owner: str) -> tuple[int, ...]:
    """``in_shape`` checked to be an image ``(h, w)`` or a colour image ``(c, h, w)``."""
    in_shape = _shape_tuple(in_shape, "in_shape", owner)
    if len(in_shape) not in (2, 3):
        raise ValueError(
            f"{owner}: in_shape must be an image shape (h, w) or (c, h, w), got {in_shape}"
        )
    return in_shape


def _repeat_channels(values, num_channels: int):
    """Each of the 2-D singular values repeated ``num_channels`` times in a row (NumPy in, NumPy
    out; JAX when traced)."""
    xp = jnp if _is_traced(values) else np
    return xp.repeat(xp.asarray(values), num_channels)


class _Channelwise(LinearOperator):
    r"""A 2-D operator on ``(h, w)`` images, applied alike to each channel of a ``(c, h, w)``
    image (``in_shape`` either; an ``(h, w)`` image is the case of one channel).

    A subclass implements the six methods of :class:`LinearOperator` on one ``(h, w)`` channel,
    named ``_plane_forward``, ``_plane_transpose``, ``_plane_right_coords``, ... ; this class
    maps them over the channels with ``jax.vmap``, so every method costs ``c`` times the 2-D one.

    The operator is block diagonal, one 2-D block per channel, so its SVD is the 2-D one per
    channel. The stacked coordinates are laid out ``(n, c)``, channel fastest: right coordinate
    ``i * c + j`` is 2-D right coordinate ``i`` of channel ``j`` (``n = h w``), and likewise on the
    left (``n`` the output pixels of a channel). The singular values are the 2-D ones, each
    repeated ``c`` times in a row: still descending and zero-padded, and with
    ``k = min(in_hw, out_hw)`` the first ``c k`` left coordinates are exactly those paired with
    them. With one channel these are the 2-D coordinates unchanged.
    """

    def _plane_forward(self, x: Array) -> Array:
        raise NotImplementedError

    def _plane_transpose(self, y: Array) -> Array:
        raise NotImplementedError

    def _plane_right_coords(self, x: Array) -> Array:
        raise NotImplementedError

    def _plane_from_right_coords(self, z: Array) -> Array:
        raise NotImplementedError

    def _plane_left_coords(self, y: Array) -> Array:
        raise NotImplementedError

    def _plane_from_left_coords(self, z: Array) -> Array:
        raise NotImplementedError

    @property
    def num_channels(self) -> int:
        """``c`` for an ``in_shape`` ``(c, h, w)``, 1 for ``(h, w)``."""
        return self.in_shape[0] if len(self.in_shape) == 3 else 1

    @property
    def _plane_in_shape(self) -> tuple[int, int]:
        return self.in_shape[-2:]

    @property
    def _plane_out_shape(self) -> tuple[int, int]:
        return self.out_shape[-2:]

    def _per_channel(self, fn, a, plane_shape):
        """``fn`` on each channel of ``a`` (``c * prod(plane_shape)`` entries), stacked."""
        return jax.vmap(fn)(a.reshape(self.num_channels, *plane_shape))

    def _to_channels(self, z):
        """Stacked coordinates ``(n c,)`` to per-channel ones ``(c, n)``."""
        return z.reshape(-1, self.num_channels).T

    def _forward(self, x):
        out = self._per_channel(self._plane_forward, x, self._plane_in_shape)
        return out.reshape(self.out_shape)

    def _transpose(self, y):
        out = self._per_channel(self._plane_transpose, y, self._plane_out_shape)
        return out.reshape(self.in_shape)

    def _right_coords(self, x):
        return self._per_channel(self._plane_right_coords, x, self._plane_in_shape).T.reshape(-1)

    def _from_right_coords(self, z):
        out = jax.vmap(self._plane_from_right_coords)(self._to_channels(z))
        return out.reshape(self.in_shape)

    def _left_coords(self, y):
        return self._per_channel(self._plane_left_coords, y, self._plane_out_shape).T.reshape(-1)

    def _from_left_coords(self, z):
        out = jax.vmap(self._plane_from_left_coords)(self._to_channels(z))
        return out.reshape(self.out_shape)


# --------------------------------------------------------------------------------------------
# downsampling


def _helmert(n: int) -> np.ndarray:
    """An orthonormal ``(n, n)`` basis (columns) whose first column is ``ones / sqrt(n)``;
    column ``k >= 1`` is ``(1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))`` (``k`` ones)."""
    basis = np.zeros((n, n))
    basis[:, 0] = 1.0 / math.sqrt(n)
    for k in range(1, n):
        basis[:k, k] = 1.0 / math.sqrt(k * (k + 1))
        basis[k, k] = -k / math.sqrt(k * (k + 1))
    return basis


class Downsample(_Channelwise):
    r"""Average pooling of an ``(h, w)`` image over ``factor x factor`` blocks, giving
    ``(h / factor, w / factor)``; of each channel of a ``(c, h, w)`` image alike, giving
    ``(c, h / factor, w / factor)``.

    SVD: block :math:`b` is the row :math:`f^{-2} 1^T` acting on the block's :math:`f^2`
    pixels, which has one singular value :math:`\|f^{-2} 1\| = 1/f` with right vector
    :math:`1/f` (the normalized all-ones direction) and left vector :math:`e_b`, and
    :math:`f^2 - 1` zeros. The per-block right basis is a Helmert matrix (first column
    :math:`1/f`, built once). ``V_T(x)`` lists first the ``num_blocks`` all-ones coordinates (in
    row-major block order, paired with singular value ``1/f``), then for each block its
    ``f^2 - 1`` remaining coordinates; :math:`U = I`. With channels these are the coordinates
    of each channel, interleaved channel fastest (see ``_Channelwise``): first the ``c *
    num_blocks`` block means, then the rest.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = Downsample(2, (2, 4))
    >>> A(jnp.arange(8.0).reshape(2, 4)).tolist()
    [[2.5, 4.5]]
    >>> A.singular_values[:3].tolist()
    [0.5, 0.5, 0.0]
    >>> Downsample(2, (3, 2, 4)).out_shape
    (3, 1, 2)
    """

    factor: int = eqx.field(static=True)
    basis: Array  # (f^2, f^2), orthonormal columns, first column ones / f
    singular_values: Array
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, factor: int, in_shape: Sequence[int]):
        if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
            raise ValueError(f"Downsample: factor must be a positive int, got {factor!r}")
        factor = int(factor)
        in_shape = _image_shape(in_shape, "Downsample")
        h, w = in_shape[-2:]
        if h % factor or w % factor:
            raise ValueError(
                f"Downsample: factor must divide both sides of in_shape, got factor {factor} "
                f"and in_shape {in_shape}"
            )
        self.factor = factor
        self.in_shape = in_shape
        self.out_shape = (*in_shape[:-2], h // factor, w // factor)
        self.basis = jnp.asarray(_helmert(factor * factor), jnp.float32)
        num_blocks = (h // factor) * (w // factor)
        values = np.zeros(num_blocks * factor * factor, np.float32)
        values[:num_blocks] = 1.0 / factor
        self.singular_values = jnp.asarray(_repeat_channels(values, self.num_channels))

    def _blocks(self, x):
        (h, w), f = self._plane_out_shape, self.factor
        return x.reshape(h, f, w, f).transpose(0, 2, 1, 3).reshape(h * w, f * f)

    def _unblocks(self, blocks):
        (h, w), f = self._plane_out_shape, self.factor
        return blocks.reshape(h, w, f, f).transpose(0, 2, 1, 3).reshape(self._plane_in_shape)

    def _plane_forward(self, x):
        return jnp.mean(self._blocks(x), axis=1).reshape(self._plane_out_shape)

    def _plane_transpose(self, y):
        blocks = jnp.broadcast_to(y.reshape(-1, 1), (y.size, self.factor**2))
        return self._unblocks(blocks / self.factor**2)

    def _plane_right_coords(self, x):
        coords = self._blocks(x) @ self.basis
        return jnp.concatenate([coords[:, 0], coords[:, 1:].reshape(-1)])

    def _plane_from_right_coords(self, z):
        num_blocks = math.prod(self._plane_out_shape)
        coords = jnp.concatenate(
            [z[:num_blocks, None], z[num_blocks:].reshape(num_blocks, -1)], axis=1
        )
        return self._unblocks(coords @ self.basis.T)

    def _plane_left_coords(self, y):
        return y.reshape(-1)

    def _plane_from_left_coords(self, z):
        return z.reshape(self._plane_out_shape)


# --------------------------------------------------------------------------------------------
# blur


class _FourierSVD(eqx.Module):
    r"""The real SVD of a circular convolution on an ``(h, w)`` torus, from its Fourier
    diagonalization :math:`A = F^* \operatorname{diag}(\lambda) F` (:math:`F` the unitary DFT,
    :math:`\lambda` the DFT of the embedded kernel).

    For a real image the unitary DFT :math:`X = F x` is Hermitian, :math:`X_{-k} = \bar X_k`, so
    its real orthonormal coordinates are :math:`X_k` at the self-conjugate frequencies
    (:math:`k = -k`) and :math:`(\sqrt 2 \operatorname{Re} X_k, \sqrt 2 \operatorname{Im} X_k)`
    for one frequency of each pair :math:`\{k, -k\}`: these are :math:`V^T x`. Since
    :math:`Y_k = \lambda_k X_k = |\lambda_k| e^{i \phi_k} X_k`, the same coordinates of
    :math:`e^{-i\phi_k} Y_k` are :math:`U^T y` (at self-conjugate frequencies :math:`\lambda_k`
    is real and :math:`e^{i\phi_k} = \operatorname{sign} \lambda_k`), and
    :math:`U^T A x = |\lambda| \odot V^T x`. The coordinates are sorted by descending
    :math:`|\lambda_k|`; both directions are then one FFT and one or two gathers.
    """

    shape: tuple[int, int] = eqx.field(static=True)
    phase: Array  # (h, w) complex: e^{i phi_k}, Hermitian, +-1 at self-conjugate frequencies
    gather: Array  # (hw,) sorted coordinate i is scale[i] * [Re X; Im X][gather[i]]
    scale: Array  # (hw,) 1 or sqrt(2)
    re_source: Array  # (hw,) Re X_k = re_weight[k] * z[re_source[k]]
    re_weight: Array
    im_source: Array  # (hw,) Im X_k = im_weight[k] * z[im_source[k]]
    im_weight: Array
    sorted_values: Array  # (hw,) |lambda| per sorted coordinate, descending

    def __init__(self, spectrum):
        # NumPy for a concrete spectrum (compiles nothing), JAX for a traced one
        xp = jnp if _is_traced(spectrum) else np

        def scatter(values_at, size, dtype):
            out = xp.zeros(size, dtype)
            for index, values in values_at:
                if xp is np:
                    out[index] = values
                else:
                    out = out.at[index].set(values)
            return out

        h, w = spectrum.shape
        size = h * w
        k1, k2 = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        flat = (k1 * w + k2).reshape(-1)
        neg = (((-k1) % h) * w + (-k2) % w).reshape(-1)
        self_idx, pair_idx, neg_idx = flat[flat == neg], flat[flat < neg], neg[flat < neg]
        num_self, num_pairs = self_idx.size, pair_idx.size
        root2 = math.sqrt(2.0)

        lam = spectrum.reshape(-1)
        magnitude = xp.abs(lam)
        pair_phase = xp.where(
            magnitude[pair_idx] > 0,
            lam[pair_idx] / xp.where(magnitude[pair_idx] > 0, magnitude[pair_idx], 1.0),
            1.0,
        )
        self_sign = xp.where(lam.real[self_idx] < 0, -1.0, 1.0)
        phase = scatter(
            [(self_idx, self_sign), (pair_idx, pair_phase), (neg_idx, xp.conj(pair_phase))],
            size,
            np.complex128 if xp is np else jnp.complex64,
        )

        # canonical coordinates: self-conjugate, then Re and Im of each pair representative
        values = xp.concatenate([magnitude[self_idx], magnitude[pair_idx], magnitude[pair_idx]])
        gather = np.concatenate([self_idx, pair_idx, size + pair_idx])
        scale = np.concatenate([np.ones(num_self), np.full(2 * num_pairs, root2)])
        order = xp.argsort(-values, stable=True)
        position = xp.argsort(order)  # canonical coordinate j is sorted coordinate position[j]
        at_self = position[:num_self]
        at_re = position[num_self : num_self + num_pairs]
        at_im = position[num_self + num_pairs :]
        index_dtype = np.int64 if xp is np else jnp.int32

        self.shape = (h, w)
        self.phase = jnp.asarray(phase.reshape(h, w), jnp.complex64)
        self.gather = jnp.asarray(xp.asarray(gather)[order], jnp.int32)
        self.scale = jnp.asarray(xp.asarray(scale)[order], jnp.float32)
        self.re_source = jnp.asarray(
            scatter([(self_idx, at_self), (pair_idx, at_re), (neg_idx, at_re)], size, index_dtype),
            jnp.int32,
        )
        self.re_weight = jnp.asarray(
            scatter(
                [(self_idx, 1.0), (pair_idx, 1 / root2), (neg_idx, 1 / root2)], size, np.float32
            )
        )
        self.im_source = jnp.asarray(
            scatter([(pair_idx, at_im), (neg_idx, at_im)], size, index_dtype), jnp.int32
        )
        self.im_weight = jnp.asarray(
            scatter([(pair_idx, 1 / root2), (neg_idx, -1 / root2)], size, np.float32)
        )
        self.sorted_values = values[order]

    def _coords(self, spectrum):
        stacked = jnp.concatenate([spectrum.real.reshape(-1), spectrum.imag.reshape(-1)])
        return stacked[self.gather] * self.scale

    def _spectrum(self, z):
        re = z[self.re_source] * self.re_weight
        im = z[self.im_source] * self.im_weight
        return jax.lax.complex(re, im).reshape(self.shape)

    def _right_coords(self, x):
        return self._coords(jnp.fft.fft2(x, norm="ortho"))

    def _from_right_coords(self, z):
        return jnp.fft.ifft2(self._spectrum(z), norm="ortho").real

    def _left_coords(self, y):
        return self._coords(jnp.fft.fft2(y, norm="ortho") * jnp.conj(self.phase))

    def _from_left_coords(self, z):
        return jnp.fft.ifft2(self._spectrum(z) * self.phase, norm="ortho").real


def _center(kernel_shape: tuple[int, ...]) -> tuple[int, int]:
    """The kernel entry aligned with the output pixel, as in ``convolve2d(mode="same")``."""
    return (kernel_shape[0] - 1) // 2, (kernel_shape[1] - 1) // 2


def _zero_boundary_matrix(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The ``(hw, hw)`` matrix of the zero-boundary "same" convolution, built on the host:
    :math:`M[(i, j), (i + c_1 - a, j + c_2 - b)] = k_{ab}` over columns inside the image."""
    h, w = shape
    c1, c2 = _center(kernel.shape)
    matrix = np.zeros((h, w, h, w))
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for a in range(kernel.shape[0]):
        for b in range(kernel.shape[1]):
            src_rows, src_cols = rows + c1 - a, cols + c2 - b
            inside = (src_rows >= 0) & (src_rows < h) & (src_cols >= 0) & (src_cols < w)
            matrix[rows[inside], cols[inside], src_rows[inside], src_cols[inside]] += kernel[a, b]
    return matrix.reshape(h * w, h * w)


class Blur(_Channelwise):
    r"""2-D convolution of an ``(h, w)`` image with a small ``(kh, kw)`` kernel, same-size output;
    of each channel of a ``(c, h, w)`` image alike.

    :math:`y_{ij} = \sum_{a,b} k_{ab}\, x_{i + c_1 - a,\, j + c_2 - b}` with the kernel centre
    :math:`c = ((k_h - 1) // 2, (k_w - 1) // 2)` (the alignment of
    ``scipy.signal.convolve2d(x, kernel, mode="same")``), where ``x`` outside the image is:

    - ``boundary="circular"``: wrapped around (periodic). Applied by FFT. The SVD is exact and
      real, from the Fourier diagonalization: the singular values are the moduli
      :math:`|\lambda_k|` of the kernel's DFT, :math:`V` the real orthonormal Fourier basis and
      :math:`U` the same basis rotated by the phases of :math:`\lambda_k` (see ``_FourierSVD``);
      every SVD method costs one FFT, ``O(hw log hw)``, and nothing dense is stored.
    - ``boundary="zero"``: zero. Applied by ``jax.scipy.signal.convolve2d``. The SVD is that of
      the dense ``(hw, hw)`` matrix (a :class:`Linear`), built once at construction:
      ``O((hw)^3)`` time and ``O((hw)^2)`` memory, fine up to a few thousand pixels.

    In both cases singular values at or below ``rtol * max`` are set to zero
    (``rtol = 10 * in_dim * eps`` by default) and they are sorted in descending order. With
    channels the SVD is that of one channel, shared (see ``_Channelwise``): each singular value
    repeated ``c`` times, coordinates interleaved channel fastest.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = Blur(jnp.full((2, 2), 0.25), (4, 4))
    >>> int(A.rank)  # the 2x2 box kills the Nyquist frequencies
    9
    >>> float(A(jnp.ones((4, 4))).mean())
    1.0
    >>> int(Blur(jnp.full((2, 2), 0.25), (3, 4, 4)).rank)
    27
    """

    kernel: Array
    spectrum: Array | None  # DFT of the embedded kernel ("circular"), else None
    svd: _FourierSVD | Linear
    singular_values: Array
    boundary: str = eqx.field(static=True)
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        kernel: ArrayLike,
        in_shape: Sequence[int],
        boundary: Literal["circular", "zero"] = "circular",
        *,
        rtol: float | None = None,
    ):
        kernel = kernel if _is_traced(kernel) else np.asarray(kernel, np.float64)
        if kernel.ndim != 2:
            raise ValueError(f"Blur: kernel must be 2-D (kh, kw), got shape {tuple(kernel.shape)}")
        in_shape = _image_shape(in_shape, "Blur")
        h, w = in_shape[-2:]
        if kernel.shape[0] > h or kernel.shape[1] > w:
            raise ValueError(
                f"Blur: kernel must be no larger than the image, got kernel shape "
                f"{tuple(kernel.shape)} and in_shape {in_shape}"
            )
        if boundary not in ("circular", "zero"):
            raise ValueError(f"Blur: boundary must be 'circular' or 'zero', got {boundary!r}")
        in_dim = math.prod(in_shape)
        rtol = _default_rtol(in_dim, in_dim) if rtol is None else float(rtol)
        self.kernel = jnp.asarray(kernel, jnp.float32)
        self.boundary = boundary
        self.in_shape = in_shape
        self.out_shape = in_shape
        (kh, kw), (c1, c2) = kernel.shape, _center(kernel.shape)
        if boundary == "circular":
            # kernel entry (a, b) goes to ((a - c1) mod h, (b - c2) mod w): y = embedded (*) x
            if _is_traced(kernel):
                xp, embedded = jnp, jnp.zeros((h, w)).at[:kh, :kw].set(kernel)
            else:
                xp, embedded = np, np.zeros((h, w))
                embedded[:kh, :kw] = kernel
            spectrum = xp.fft.fft2(xp.roll(embedded, (-c1, -c2), axis=(0, 1)))
            self.spectrum = jnp.asarray(spectrum, jnp.complex64)
            self.svd = _FourierSVD(spectrum)
            values = _cut(self.svd.sorted_values, rtol)
        else:
            self.spectrum = None
            if _is_traced(kernel):
                matrix = jax.jacfwd(self._plane_forward)(jnp.zeros((h, w), jnp.float32))
            else:
                matrix = _zero_boundary_matrix(kernel, (h, w))
            self.svd = Linear(
                matrix.reshape(h * w, h * w).astype(jnp.float32), (h, w), (h, w), rtol=rtol
            )
            values = self.svd.singular_values
            values = values if _is_traced(values) else np.asarray(values)
        self.singular_values = jnp.asarray(_repeat_channels(values, self.num_channels), jnp.float32)

    def _plane_forward(self, x):
        if self.boundary == "circular":
            return jnp.fft.ifft2(self.spectrum * jnp.fft.fft2(x)).real
        return jax.scipy.signal.convolve2d(x, self.kernel, mode="same")

    def _plane_transpose(self, y):
        if self.boundary == "circular":
            return jnp.fft.ifft2(jnp.conj(self.spectrum) * jnp.fft.fft2(y)).real
        # adjoint of the zero-padded "same" convolution: pad y the other way round, correlate
        (kh, kw), (c1, c2) = self.kernel.shape, _center(self.kernel.shape)
        padded = jnp.pad(y, ((c1, kh - 1 - c1), (c2, kw - 1 - c2)))
        return jax.scipy.signal.convolve2d(padded, self.kernel[::-1, ::-1], mode="valid")

    def _plane_right_coords(self, x):
        return self.svd._right_coords(x)

    def _plane_from_right_coords(self, z):
        return self.svd._from_right_coords(z)

    def _plane_left_coords(self, y):
        return self.svd._left_coords(y)

    def _plane_from_left_coords(self, z):
        return self.svd._from_left_coords(z)

    def matrix(self) -> Array:
        if isinstance(self.svd, Linear):  # block diagonal, one block per channel
            return jnp.kron(jnp.eye(self.num_channels, dtype=self.svd.dense.dtype), self.svd.dense)
        return super().matrix()


# --------------------------------------------------------------------------------------------
# nonlinear


class Saturation(eqx.Module):
    r"""A nonlinear sensor that saturates: :math:`y = \tanh(g\, x)` elementwise, ``g`` the gain.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = Saturation((2,), gain=2.0)
    >>> A(jnp.array([0.0, 10.0])).tolist()
    [0.0, 1.0]
    """

    gain: Array
    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, in_shape: Sequence[int], gain: ArrayLike = 1.0):
        in_shape = _shape_tuple(in_shape, "in_shape", "Saturation")
        gain = jnp.asarray(gain, jnp.float32)
        if gain.ndim != 0:
            raise ValueError(f"Saturation: gain must be a scalar, got shape {tuple(gain.shape)}")
        if not isinstance(gain, jax.core.Tracer) and not (
            np.isfinite(float(gain)) and float(gain) > 0
        ):
            raise ValueError(f"Saturation: gain must be positive and finite, got {float(gain)}")
        self.gain = gain
        self.in_shape = in_shape
        self.out_shape = in_shape

    def __call__(self, x: ArrayLike) -> Array:
        r""":math:`\tanh(g x)`, shaped like ``x`` (``(..., *in_shape)``)."""
        maps = ("Saturation", self.in_shape, self.out_shape)
        return _apply(lambda x: jnp.tanh(self.gain * x), x, self.in_shape, "Saturation: x", maps)


# --------------------------------------------------------------------------------------------
# kernels and masks


def gaussian_kernel(size: int, std: float) -> Array:
    r"""A ``(size, size)`` Gaussian kernel :math:`\propto \exp(-r^2 / (2\,\mathrm{std}^2))`
    centred at ``((size - 1) / 2, (size - 1) / 2)``, normalized to sum to 1.

    Examples
    --------
    >>> k = gaussian_kernel(3, 1.0)
    >>> k.shape, round(float(k.sum()), 6)
    ((3, 3), 1.0)
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"gaussian_kernel: size must be a positive int, got {size!r}")
    if not (np.isfinite(std) and std > 0):
        raise ValueError(f"gaussian_kernel: std must be positive and finite, got {std!r}")
    r = np.arange(size) - (size - 1) / 2.0
    profile = np.exp(-(r**2) / (2.0 * float(std) ** 2))
    kernel = np.outer(profile, profile)
    return jnp.asarray(kernel / kernel.sum(), jnp.float32)


def random_mask(key: PRNGKey, shape: Sequence[int], fraction_observed: float) -> Array:
    """A boolean mask of ``shape`` with exactly ``max(1, round(fraction_observed * n))`` True
    (observed) entries, ``n = prod(shape)``, at positions drawn uniformly without replacement.

    A colour image shape ``(c, h, w)`` gets the same pixels on every channel: the ``(h, w)``
    mask drawn with the same key (``n = h w``), repeated over the channels.

    Examples
    --------
    >>> import jax
    >>> int(random_mask(jax.random.key(0), (4, 5), 0.5).sum())
    10
    >>> int(random_mask(jax.random.key(0), (3, 4, 5), 0.5).sum())
    30
    """
    shape = _shape_tuple(shape, "shape", "random_mask")
    if not (0.0 < fraction_observed <= 1.0):
        raise ValueError(
            f"random_mask: fraction_observed must be in (0, 1], got {fraction_observed!r}"
        )
    plane = shape[-2:] if len(shape) == 3 else shape
    num_observed = max(1, round(fraction_observed * math.prod(plane)))
    return jnp.broadcast_to(_random_mask(key, plane, num_observed), shape)


@functools.partial(jax.jit, static_argnums=1)
def _random_mask(key: PRNGKey, shape: tuple[int, ...], num_observed: Array) -> Array:
    return (jax.random.permutation(key, math.prod(shape)) < num_observed).reshape(shape)


def half_mask(
    shape: Sequence[int], side: Literal["left", "right", "top", "bottom"] = "left"
) -> Array:
    """A boolean mask of ``shape`` whose ``side`` half is **observed** (True), the rest missing.

    ``"left"`` / ``"right"`` split the last axis (for a vector: its first / second half),
    ``"top"`` / ``"bottom"`` the second to last (``shape`` must have at least 2 axes). The
    observed half has ``n // 2`` lines along that axis of length ``n`` (the middle line of an
    odd ``n`` is missing). A colour image shape ``(c, h, w)`` gets the same mask on every
    channel.

    Examples
    --------
    >>> half_mask((2, 4), side="right").astype(int).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    shape = _shape_tuple(shape, "shape", "half_mask")
    if side not in ("left", "right", "top", "bottom"):
        raise ValueError(
            f"half_mask: side must be 'left', 'right', 'top' or 'bottom', got {side!r}"
        )
    axis = len(shape) - 1 if side in ("left", "right") else len(shape) - 2
    if axis < 0:
        raise ValueError(f"half_mask: side {side!r} needs a shape with 2 axes, got {shape}")
    n = shape[axis]
    if n < 2:
        raise ValueError(
            f"half_mask: the split axis must have length >= 2, got shape {shape} (side {side!r})"
        )
    index = np.arange(n)
    keep = index < n // 2 if side in ("left", "top") else index >= n - n // 2
    expand = [1] * len(shape)
    expand[axis] = n
    return jnp.asarray(np.broadcast_to(keep.reshape(expand), shape))


def box_mask(shape: Sequence[int], top: int, left: int, height: int, width: int) -> Array:
    """A boolean mask of an ``(h, w)`` image where the box ``[top, top + height) x [left, left +
    width)`` is **missing** (False) and the rest observed (True); of a ``(c, h, w)`` colour
    image, the same box missing on every channel.

    Examples
    --------
    >>> int(box_mask((4, 4), 1, 1, 2, 2).sum())
    12
    >>> int(box_mask((3, 4, 4), 1, 1, 2, 2).sum())
    36
    """
    shape = _shape_tuple(shape, "shape", "box_mask")
    if len(shape) not in (2, 3):
        raise ValueError(f"box_mask: shape must be an image shape (h, w) or (c, h, w), got {shape}")
    h, w = shape[-2:]
    for name, value in (("top", top), ("left", left), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"box_mask: {name} must be an int, got {value!r}")
    if height < 1 or width < 1:
        raise ValueError(
            f"box_mask: height and width must be >= 1, got height {height}, width {width}"
        )
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise ValueError(
            f"box_mask: the box rows [{top}, {top + height}) x columns [{left}, {left + width}) "
            f"must lie inside the image of shape {shape}"
        )
    if height == h and width == w:
        raise ValueError(
            f"box_mask: the box must leave some pixel observed, got a box covering all of {shape}"
        )
    mask = np.ones(shape, bool)
    mask[..., top : top + height, left : left + width] = False
    return jnp.asarray(mask)
