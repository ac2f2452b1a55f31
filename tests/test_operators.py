"""Forward operators: shapes, adjoints, the SVD identities against dense linear algebra, the
masks, validation, and jit / vmap / grad."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from diffprior.operators import (
    Blur,
    Downsample,
    Inpaint,
    Linear,
    LinearOperator,
    Saturation,
    box_mask,
    gaussian_kernel,
    half_mask,
    random_mask,
)

RTOL = 1e-4  # float32
# XLA's backend optimizations take most of the compile time and are not under test here
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
# (2, 3) kernels, centre entry (0, 1): diagonally dominant, so the blur is well conditioned
ASYM_KERNEL = np.array([[0.2, 1.0, 0.1], [0.1, 0.3, 0.05]])
# dominant entry off the centre: a shifted blur, with negative eigenvalues at the circular
# Nyquist frequencies (where the real SVD needs a sign)
SHIFTED_KERNEL = np.array([[0.2, 0.3, 0.1], [0.1, 1.0, 0.05]])


def _normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _vector_mask():
    return np.array([True, False, True, True, False, True])


#: Every kind of operator: vectors and images, full rank and rank deficient, wide and tall,
#: even and odd image sides and kernels, both blur boundaries, and transposes.
OPERATORS = {
    "linear_wide": lambda: Linear(_normal(0, (3, 5))),
    "linear_tall": lambda: Linear(_normal(1, (6, 4))),
    "linear_rank_deficient": lambda: Linear(_normal(2, (4, 2)) @ _normal(3, (2, 6))),
    "linear_image": lambda: Linear(_normal(4, (4, 6)), in_shape=(2, 3), out_shape=(2, 2)),
    "inpaint_vector": lambda: Inpaint(_vector_mask()),
    "inpaint_image": lambda: Inpaint(random_mask(jax.random.key(0), (4, 5), 0.6)),
    "downsample": lambda: Downsample(2, (4, 6)),
    "blur_circular_box": lambda: Blur(np.full((2, 2), 0.25), (4, 4)),  # rank 9 of 16
    "blur_circular_shifted": lambda: Blur(SHIFTED_KERNEL, (4, 6)),
    "blur_zero_asym": lambda: Blur(ASYM_KERNEL, (5, 4), boundary="zero"),
    "linear_tall_T": lambda: Linear(_normal(1, (6, 4))).T,
    "inpaint_image_T": lambda: Inpaint(random_mask(jax.random.key(0), (4, 5), 0.6)).T,
    "downsample_T": lambda: Downsample(3, (3, 6)).T,
    # colour images (c, h, w): the 2-D operator on each channel
    "inpaint_colour": lambda: Inpaint(random_mask(jax.random.key(0), (2, 4, 5), 0.6)),
    "downsample_colour": lambda: Downsample(2, (2, 6, 8)),
    "blur_circular_colour": lambda: Blur(SHIFTED_KERNEL, (2, 6, 8)),
    "blur_circular_box_colour": lambda: Blur(np.full((2, 2), 0.25), (3, 4, 4)),  # rank 27 of 48
    "blur_zero_colour": lambda: Blur(ASYM_KERNEL, (2, 5, 4), boundary="zero"),
    "downsample_colour_T": lambda: Downsample(2, (3, 4, 6)).T,
}
NUM_BATCH = 3


@functools.cache
def _operator(name: str) -> LinearOperator:
    return OPERATORS[name]()


@functools.cache
def _results(name: str) -> dict[str, np.ndarray]:
    """Everything the tests below check, computed in one compiled call per operator (the
    operator itself is a pytree argument of the jitted function)."""
    A = _operator(name)
    x = _normal(10, A.in_shape).astype(np.float32)
    y = _normal(11, A.out_shape).astype(np.float32)
    z = _normal(12, (A.in_dim,)).astype(np.float32)
    xs = _normal(13, (NUM_BATCH, *A.in_shape)).astype(np.float32)
    xs[0] = x

    @_jit
    def compute(A, x, y, z, xs):
        s = A.singular_values
        vmapped = jax.vmap(lambda x: (A(x), A.V_T(x), A.pinv(A(x))))(xs)
        return {
            "x": x,
            "y": y,
            "z": z,
            "Ax": A(x),
            "ATy": A.transpose(y),
            "V_T_x": A.V_T(x),
            "V_V_T_x": A.V(A.V_T(x)),
            "V_z": A.V(z),
            "U_s_V_T_x": A.U(s * A.V_T(x)),
            "U_T_Ax": A.U_T(A(x)),
            "U_T_y": A.U_T(y),
            "U_z": A.U(z),
            "U_T_U_z": A.U_T(A.U(z)),
            "pinv_y": A.pinv(y),
            "singular_values": s,
            "matrix": A.matrix(),
            "grad_half_norm2_Ax": jax.grad(lambda x: 0.5 * jnp.sum(A(x) ** 2))(x),
            "ATAx": A.transpose(A(x)),
            "xs": xs,
            "vmap": list(vmapped),
            "batched_call": A(xs.reshape(1, *xs.shape)),
            "batched_transpose": A.transpose(vmapped[0][None]),
        }

    return jax.tree.map(lambda v: np.asarray(v, np.float64), compute(A, x, y, z, xs))


def _close(actual, expected, rtol: float = RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _dense_pinv(matrix: np.ndarray) -> np.ndarray:
    """``jnp.linalg.pinv`` of the float32 matrix (same cut of small singular values:
    ``10 * max(shape) * eps32`` relative), in float64 on the host."""
    return np.linalg.pinv(matrix, rcond=10 * max(matrix.shape) * np.finfo(np.float32).eps)


operator_names = pytest.mark.parametrize("name", list(OPERATORS))


# ---- every linear operator ------------------------------------------------------------------


@operator_names
def test_shapes(name):
    A, r = _operator(name), _results(name)
    assert r["Ax"].shape == A.out_shape
    assert r["ATy"].shape == A.in_shape
    for key in ("V_T_x", "U_T_y", "singular_values"):
        assert r[key].shape == (A.in_dim,), key
    assert r["V_z"].shape == A.in_shape and r["pinv_y"].shape == A.in_shape
    assert r["U_z"].shape == A.out_shape
    assert r["matrix"].shape == (A.out_dim, A.in_dim)


@operator_names
def test_leading_batch_dimensions(name):
    A, r = _operator(name), _results(name)
    assert r["batched_call"].shape == (1, NUM_BATCH, *A.out_shape)
    _close(r["batched_call"][0], r["vmap"][0])
    assert r["batched_transpose"].shape == (1, NUM_BATCH, *A.in_shape)


@operator_names
def test_adjoint_identity(name):
    r = _results(name)
    lhs = np.sum(r["Ax"] * r["y"])
    rhs = np.sum(r["x"] * r["ATy"])
    scale = np.linalg.norm(r["Ax"]) * np.linalg.norm(r["y"])
    assert abs(lhs - rhs) <= RTOL * scale


@operator_names
def test_matrix_matches_call(name):
    r = _results(name)
    _close(r["Ax"].ravel(), r["matrix"] @ r["x"].ravel())
    _close(r["ATy"].ravel(), r["matrix"].T @ r["y"].ravel())


@operator_names
def test_svd_reconstructs_the_operator(name):
    r = _results(name)
    _close(r["U_s_V_T_x"], r["Ax"])
    _close(r["U_T_Ax"], r["singular_values"] * r["V_T_x"])


@operator_names
def test_right_basis_is_orthonormal(name):
    r = _results(name)
    _close(r["V_V_T_x"], r["x"])
    np.testing.assert_allclose(np.linalg.norm(r["V_T_x"]), np.linalg.norm(r["x"]), rtol=RTOL)
    np.testing.assert_allclose(np.linalg.norm(r["V_z"]), np.linalg.norm(r["z"]), rtol=RTOL)


@operator_names
def test_left_coordinates(name):
    r = _results(name)
    nonzero = r["singular_values"] > 0
    # zero where the singular value is zero (this also covers the padding past out_dim)
    assert np.all(r["U_T_y"][~nonzero] == 0.0)
    # U inverts U_T on the coordinates paired with nonzero singular values
    _close(r["U_T_U_z"], np.where(nonzero, r["z"], 0.0))
    # U is an isometry on those coordinates
    np.testing.assert_allclose(np.linalg.norm(r["U_z"]), np.linalg.norm(r["z"][nonzero]), rtol=RTOL)


@operator_names
def test_singular_values_match_dense_svd(name):
    r = _results(name)
    values = r["singular_values"]
    dense = np.linalg.svd(r["matrix"], compute_uv=False)  # descending, length min(out, in)
    assert np.all(np.diff(values) <= 0), "singular values must be descending"
    assert np.all(values[dense.size :] == 0.0)
    rank = int(np.sum(values > 0))
    # numerical rank in float32, with the cut of jnp.linalg.pinv
    cut = 10 * max(r["matrix"].shape) * np.finfo(np.float32).eps * dense[0]
    assert rank == np.sum(dense > cut)
    _close(values[: dense.size], np.where(np.arange(dense.size) < rank, dense, 0.0))


@operator_names
def test_pinv_matches_dense_pinv(name):
    r = _results(name)
    _close(r["pinv_y"].ravel(), _dense_pinv(r["matrix"]) @ r["y"].ravel(), rtol=5 * RTOL)


@operator_names
def test_vmap_over_x(name):
    r = _results(name)
    calls, coords, pinvs = r["vmap"]
    # xs[0] is x: the first entries are the unbatched results
    _close(calls[0], r["Ax"])
    _close(coords[0], r["V_T_x"])
    # the others against dense linear algebra
    flat = r["xs"].reshape(NUM_BATCH, -1)
    _close(calls.reshape(NUM_BATCH, -1), flat @ r["matrix"].T)
    np.testing.assert_allclose(
        np.linalg.norm(coords, axis=1), np.linalg.norm(flat, axis=1), rtol=RTOL
    )
    projection = _dense_pinv(r["matrix"]) @ r["matrix"]
    _close(pinvs.reshape(NUM_BATCH, -1), flat @ projection.T, rtol=5 * RTOL)


@operator_names
def test_gradient_of_the_squared_residual_is_the_adjoint(name):
    r = _results(name)  # computed by jax.jit with the operator as a pytree argument
    # grad of |A x|^2 / 2 is A^T A x
    _close(r["grad_half_norm2_Ax"], r["ATAx"])


def test_transpose_property_swaps_shapes_and_round_trips():
    A = Linear(_normal(1, (6, 4)))
    assert A.T.in_shape == (6,) and A.T.out_shape == (4,)
    assert A.T.T is A
    _close(A.T.matrix(), A.matrix().T)
    assert A.T.singular_values.shape == (6,)


def test_matrix_and_rank_for_a_rank_deficient_operator():
    A = _operator("linear_rank_deficient")
    assert int(A.rank) == 2
    A = _operator("blur_circular_box")
    assert int(A.rank) == 9  # (4 - 1)^2 frequencies survive the 2x2 box


# ---- Linear ----------------------------------------------------------------------------------


def test_linear_from_function_recovers_a_known_matrix():
    matrix = _normal(20, (3, 4)).astype(np.float32)
    A = Linear.from_function(lambda x: jnp.asarray(matrix) @ x, (4,))
    _close(A.matrix(), matrix)
    assert A.in_shape == (4,) and A.out_shape == (3,)


def test_linear_from_function_keeps_image_shapes():
    A = Linear.from_function(lambda x: x.T[:, ::-1], (2, 3))
    x = jnp.arange(6.0).reshape(2, 3)
    assert A.out_shape == (3, 2)
    _close(A(x), x.T[:, ::-1])


@pytest.mark.parametrize(
    "fn", [jnp.tanh, lambda x: x + 1.0, lambda x: x**2], ids=["tanh", "affine", "square"]
)
def test_linear_from_function_rejects_nonlinear_functions(fn):
    with pytest.raises(ValueError, match="must be linear"):
        Linear.from_function(fn, (3,))


def test_linear_can_be_built_inside_jit():
    matrix = _normal(21, (3, 5)).astype(np.float32)
    y = _normal(22, (3,)).astype(np.float32)
    traced, concrete = _jit(lambda m, y: (Linear(m).pinv(y), Linear(matrix).pinv(y)))(matrix, y)
    _close(traced, concrete)
    _close(concrete, np.linalg.pinv(matrix) @ y)


def test_linear_validation():
    with pytest.raises(ValueError, match=r"matrix must be 2-D.*\(5,\)"):
        Linear(np.ones(5))
    with pytest.raises(ValueError, match=r"in_shape.*in_dim == 6.*\(2, 2\)"):
        Linear(np.ones((3, 6)), in_shape=(2, 2))
    with pytest.raises(ValueError, match=r"out_shape.*out_dim == 3.*\(2, 2\)"):
        Linear(np.ones((3, 6)), out_shape=(2, 2))


# ---- Inpaint ---------------------------------------------------------------------------------


def test_inpaint_selects_the_observed_entries_in_row_major_order():
    mask = np.asarray(random_mask(jax.random.key(3), (4, 5), 0.5))
    A = Inpaint(mask)
    x = _normal(23, (4, 5)).astype(np.float32)
    y, coords = map(np.asarray, _jit(lambda A, x: (A(x), A.V_T(x)))(A, x))
    np.testing.assert_array_equal(y, x[mask])
    # V is a permutation listing the observed entries first; singular values 1 there, else 0
    np.testing.assert_array_equal(coords[: mask.sum()], x[mask])
    np.testing.assert_array_equal(np.sort(coords), np.sort(x.ravel()))
    np.testing.assert_array_equal(A.singular_values, np.sort(mask.ravel())[::-1])


def test_inpaint_validation():
    with pytest.raises(ValueError, match="boolean.*float"):
        Inpaint(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"in_shape = \(3, 3\).*\(2, 2\)"):
        Inpaint(np.ones((2, 2), bool), in_shape=(3, 3))
    with pytest.raises(ValueError, match="at least one"):
        Inpaint(np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda m: Inpaint(m)(jnp.ones(3)))(jnp.ones(3, bool))


def test_operators_reject_x_of_the_wrong_shape():
    A = Inpaint(_vector_mask())
    with pytest.raises(ValueError, match=r"Inpaint: x.*\(\.\.\., 6\).*\(5,\)"):
        A(jnp.ones(5))
    with pytest.raises(ValueError, match=r"Downsample.transpose: y"):
        Downsample(2, (4, 4)).transpose(jnp.ones((3, 3)))


# ---- Downsample ------------------------------------------------------------------------------


def test_downsample_averages_blocks():
    x = _normal(24, (6, 6)).astype(np.float32)
    A2, A3 = Downsample(2, (6, 6)), Downsample(np.int64(3), (6, 6))
    assert A2.out_shape == (3, 3) and A3.out_shape == (2, 2)
    y2, y3 = _jit(lambda A2, A3, x: (A2(x), A3(x)))(A2, A3, x)
    _close(y2, x.reshape(3, 2, 3, 2).mean(axis=(1, 3)))
    _close(y3, x.reshape(2, 3, 2, 3).mean(axis=(1, 3)))


def test_downsample_singular_values():
    A = Downsample(3, (6, 6))
    values = np.asarray(A.singular_values)
    assert values.shape == (36,)
    np.testing.assert_allclose(values[:4], 1.0 / 3.0, rtol=RTOL)
    assert np.all(values[4:] == 0.0)


def test_downsample_validation():
    with pytest.raises(ValueError, match=r"factor must divide.*3.*\(4, 6\)"):
        Downsample(3, (4, 6))
    with pytest.raises(ValueError, match="factor must be a positive int, got 1.5"):
        Downsample(1.5, (4, 4))
    with pytest.raises(ValueError, match=r"image shape \(h, w\) or \(c, h, w\), got \(16,\)"):
        Downsample(2, (16,))
    with pytest.raises(ValueError, match=r"\(c, h, w\), got \(1, 2, 4, 4\)"):
        Downsample(2, (1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"factor must divide.*\(3, 4, 6\)"):
        Downsample(4, (3, 4, 6))


# ---- Blur ------------------------------------------------------------------------------------


def _explicit_convolution(x, kernel, circular: bool):
    """y[i, j] = sum_ab k[a, b] x[i + c1 - a, j + c2 - b], straight from the definition."""
    (h, w), (kh, kw) = x.shape, kernel.shape
    c1, c2 = (kh - 1) // 2, (kw - 1) // 2
    y = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    r, c = i + c1 - a, j + c2 - b
                    if circular:
                        y[i, j] += kernel[a, b] * x[r % h, c % w]
                    elif 0 <= r < h and 0 <= c < w:
                        y[i, j] += kernel[a, b] * x[r, c]
    return y


@pytest.mark.parametrize("boundary", ["circular", "zero"])
@pytest.mark.parametrize("kernel_shape", [(3, 3), (2, 3)])
def test_blur_matches_the_definition(boundary, kernel_shape):
    kernel = np.abs(_normal(25, kernel_shape))
    x = _normal(26, (5, 4))
    A = Blur(kernel, (5, 4), boundary=boundary)
    expected = _explicit_convolution(x, kernel, circular=boundary == "circular")
    _close(_jit(lambda A, x: A(x))(A, x.astype(np.float32)), expected)
    if boundary == "zero":  # same alignment as scipy's "same" mode
        _close(expected, scipy.signal.convolve2d(x, kernel, mode="same"))


def test_blur_can_be_built_inside_jit():
    kernel = ASYM_KERNEL.astype(np.float32)
    y = _normal(27, (4, 5)).astype(np.float32)

    @_jit
    def pinvs(kernel, y):
        return {
            b: (Blur(kernel, (4, 5), b).pinv(y), Blur(ASYM_KERNEL, (4, 5), b).pinv(y))
            for b in ("circular", "zero")
        }

    for traced, concrete in pinvs(kernel, y).values():
        _close(traced, concrete)


def test_blur_validation():
    with pytest.raises(ValueError, match=r"kernel must be 2-D.*\(3,\)"):
        Blur(np.ones(3), (4, 4))
    with pytest.raises(ValueError, match=r"no larger than the image.*\(5, 5\).*\(4, 4\)"):
        Blur(np.ones((5, 5)), (4, 4))
    with pytest.raises(ValueError, match="boundary must be 'circular' or 'zero', got 'reflect'"):
        Blur(np.ones((3, 3)), (4, 4), boundary="reflect")
    with pytest.raises(ValueError, match=r"image shape \(h, w\) or \(c, h, w\), got \(16,\)"):
        Blur(np.ones((3, 3)), (16,))
    with pytest.raises(ValueError, match=r"no larger than the image.*\(3, 2, 5\)"):
        Blur(np.ones((3, 3)), (3, 2, 5))


# ---- colour images ---------------------------------------------------------------------------

#: (colour operator, the 2-D operator it applies to each channel)
CHANNEL_OPERATORS = {
    "downsample": lambda c: (Downsample(2, (c, 6, 8)), Downsample(2, (6, 8))),
    "blur_circular": lambda c: (Blur(SHIFTED_KERNEL, (c, 6, 8)), Blur(SHIFTED_KERNEL, (6, 8))),
    "blur_zero": lambda c: (
        Blur(ASYM_KERNEL, (c, 5, 4), boundary="zero"),
        Blur(ASYM_KERNEL, (5, 4), boundary="zero"),
    ),
}


@pytest.mark.parametrize("name", list(CHANNEL_OPERATORS))
def test_colour_operator_is_the_2d_operator_on_each_channel(name):
    """On (c, h, w) the operator, its adjoint and its SVD coordinates are those of the 2-D one
    on each channel, coordinates interleaved channel fastest; singular values repeated c times."""
    c = 2
    A, plane = CHANNEL_OPERATORS[name](c)
    x = _normal(40, A.in_shape).astype(np.float32)
    y = _normal(41, A.out_shape).astype(np.float32)

    @_jit
    def compute(A, plane, x, y):
        per_channel = jax.vmap(lambda x, y: (plane(x), plane.transpose(y), plane.V_T(x)))
        return (A(x), A.transpose(y), A.V_T(x), A.U_T(y)), per_channel(x, y), plane.U_T(y)

    (Ax, ATy, coords, left), (Ax_2d, ATy_2d, coords_2d), left_2d = compute(A, plane, x, y)
    assert A.out_shape == (c, *plane.out_shape) and A.num_channels == c
    _close(Ax, Ax_2d)
    _close(ATy, ATy_2d)
    _close(np.asarray(coords).reshape(plane.in_dim, c), np.asarray(coords_2d).T)
    np.testing.assert_array_equal(
        A.singular_values, np.repeat(np.asarray(plane.singular_values), c)
    )
    # the left coordinates of every channel, against the 2-D ones (paired block first)
    paired = min(plane.in_dim, plane.out_dim)
    left_2d = np.asarray(left_2d)  # (c, in_hw), one row per channel
    _close(np.asarray(left)[: c * paired].reshape(paired, c), left_2d[:, :paired].T)
    _close(A.matrix(), np.kron(np.eye(c), np.asarray(plane.matrix())))


@pytest.mark.parametrize("name", list(CHANNEL_OPERATORS))
def test_colour_operator_svd_against_dense_linear_algebra(name):
    """The dense V (from V on the unit vectors) is orthogonal, U diag(s) V^T is the matrix, and
    the singular values are numpy's."""
    A, _ = CHANNEL_OPERATORS[name](3)
    eye = np.eye(A.in_dim, dtype=np.float32)
    right, left = _jit(lambda A, eye: (A.V(eye), A.U(eye)))(A, eye)
    right = np.asarray(right, np.float64).reshape(A.in_dim, A.in_dim).T  # column i: v_i
    left = np.asarray(left, np.float64).reshape(A.in_dim, A.out_dim).T  # column i: u_i (or 0)
    s = np.asarray(A.singular_values, np.float64)
    matrix = np.asarray(A.matrix(), np.float64)
    _close(right.T @ right, np.eye(A.in_dim))
    _close(left @ np.diag(s) @ right.T, matrix)
    dense = np.linalg.svd(matrix, compute_uv=False)
    _close(np.sort(s)[::-1][: dense.size], dense)


def _sharpened_gaussian() -> np.ndarray:
    """Half identity, half Gaussian blur: every DFT modulus is at least about 1/2, so no
    singular value falls under the default cut and the SVD reproduces A exactly."""
    kernel = 0.5 * np.asarray(gaussian_kernel(5, 1.5), np.float64)
    kernel[2, 2] += 0.5
    return kernel


@pytest.mark.parametrize(
    "make",
    [
        lambda shape: Blur(_sharpened_gaussian(), shape),
        lambda shape: Downsample(4, shape),
    ],
    ids=["blur_circular", "downsample"],
)
def test_colour_svd_at_full_image_size(make):
    """At d = 3 x 128 x 128 (nothing dense): V inverts V_T and A(x) == U(s * V_T(x))."""
    A = make((3, 128, 128))
    assert A.singular_values.shape == (A.in_dim,)
    x = _normal(42, (2, *A.in_shape)).astype(np.float32)

    @_jit
    def compute(A, x):
        coords = A.V_T(x)
        return A(x), A.V(coords), A.U(A.singular_values * coords), A.U_T(A(x)), coords

    Ax, round_trip, reconstructed, left, coords = compute(A, x)
    _close(round_trip, x)
    _close(reconstructed, Ax)
    _close(left, np.asarray(A.singular_values) * np.asarray(coords))


def test_inpaint_and_masks_on_colour_images():
    """Mask helpers give the same spatial mask on every channel, and Inpaint selects it."""
    key = jax.random.key(7)
    shape = (3, 4, 6)
    masks = {
        "random": (random_mask(key, shape, 0.5), random_mask(key, shape[1:], 0.5)),
        "half": (half_mask(shape, "top"), half_mask(shape[1:], "top")),
        "box": (box_mask(shape, 1, 2, 2, 3), box_mask(shape[1:], 1, 2, 2, 3)),
    }
    for name, (mask, plane) in masks.items():
        assert mask.shape == shape, name
        np.testing.assert_array_equal(mask, np.broadcast_to(plane, shape), err_msg=name)
    mask = np.asarray(masks["random"][0])
    assert mask.sum() == 3 * 12
    A = Inpaint(mask)
    x = _normal(43, shape).astype(np.float32)
    np.testing.assert_array_equal(_jit(lambda A, x: A(x))(A, x), x[mask])
    assert A.in_shape == shape and A.out_shape == (36,)


def test_gaussian_kernel():
    kernel = np.asarray(gaussian_kernel(5, 1.5))
    assert kernel.shape == (5, 5)
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernel, kernel.T)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1])
    assert kernel.argmax() == 12  # the centre
    np.testing.assert_allclose(kernel[2, 3] / kernel[2, 2], np.exp(-1 / (2 * 1.5**2)), rtol=1e-5)
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        gaussian_kernel(0, 1.0)
    with pytest.raises(ValueError, match="std must be positive"):
        gaussian_kernel(3, -1.0)


# ---- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_random_mask_observes_the_requested_fraction(fraction):
    mask = random_mask(jax.random.key(4), (8, 10), fraction)
    assert mask.shape == (8, 10) and mask.dtype == jnp.bool_
    assert int(mask.sum()) == round(fraction * 80)


def test_random_mask_depends_on_the_key_only():
    a = np.asarray(random_mask(jax.random.key(5), (30,), 0.5))
    np.testing.assert_array_equal(a, random_mask(jax.random.key(5), (30,), 0.5))
    assert np.any(a != np.asarray(random_mask(jax.random.key(6), (30,), 0.5)))
    assert int(random_mask(jax.random.key(5), (30,), 0.001).sum()) == 1  # never empty
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"fraction_observed must be in \\(0, 1\\], got {bad}"):
            random_mask(jax.random.key(5), (30,), bad)


@pytest.mark.parametrize(
    "side, observed",
    [
        ("left", (slice(None), slice(0, 2))),
        ("right", (slice(None), slice(3, 5))),
        ("top", (slice(0, 2), slice(None))),
        ("bottom", (slice(2, 4), slice(None))),
    ],
)
def test_half_mask_observes_the_named_half(side, observed):
    mask = np.asarray(half_mask((4, 5), side=side))
    expected = np.zeros((4, 5), bool)
    expected[observed] = True
    np.testing.assert_array_equal(mask, expected)


def test_half_mask_on_vectors_and_validation():
    np.testing.assert_array_equal(half_mask((4,), "left"), [True, True, False, False])
    np.testing.assert_array_equal(half_mask((5,), "right"), [False, False, False, True, True])
    with pytest.raises(ValueError, match="side must be .*got 'middle'"):
        half_mask((4, 4), side="middle")
    with pytest.raises(ValueError, match=r"needs a shape with 2 axes, got \(4,\)"):
        half_mask((4,), side="top")
    with pytest.raises(ValueError, match="length >= 2"):
        half_mask((4, 1), side="left")


def test_box_mask_hides_the_box():
    mask = np.asarray(box_mask((6, 7), top=1, left=2, height=3, width=4))
    assert mask.sum() == 42 - 12
    assert not mask[1:4, 2:6].any()
    assert mask[0].all() and mask[:, :2].all() and mask[4:].all() and mask[:, 6].all()
    assert Inpaint(mask).out_shape == (30,)


def test_box_mask_validation():
    with pytest.raises(ValueError, match="inside the image"):
        box_mask((4, 4), top=2, left=0, height=3, width=1)
    with pytest.raises(ValueError, match="inside the image"):
        box_mask((4, 4), top=-1, left=0, height=1, width=1)
    with pytest.raises(ValueError, match="height and width must be >= 1"):
        box_mask((4, 4), top=0, left=0, height=0, width=1)
    with pytest.raises(ValueError, match="leave some pixel observed"):
        box_mask((4, 4), top=0, left=0, height=4, width=4)
    with pytest.raises(ValueError, match=r"image shape \(h, w\) or \(c, h, w\), got \(4,\)"):
        box_mask((4,), top=0, left=0, height=1, width=1)


# ---- Saturation ------------------------------------------------------------------------------


def test_saturation_values_shape_and_gradient():
    A = Saturation((2, 3), gain=2.0)
    x = _normal(28, (2, 3)).astype(np.float32)
    assert A.in_shape == A.out_shape == (2, 3)

    @_jit
    def compute(A, x):
        return {
            "y": A(x),
            "grad_x": jax.grad(lambda x: jnp.sum(A(x)))(x),
            "grad_gain": jax.grad(lambda op: jnp.sum(op(x)))(A).gain,  # the gain is a leaf
            "vmap": jax.vmap(A)(jnp.stack([x, -x])),
        }

    r = compute(A, x)
    tanh = np.tanh(2.0 * x)
    _close(r["y"], tanh)
    _close(r["grad_x"], 2.0 * (1.0 - tanh**2))
    _close(r["grad_gain"], np.sum(x * (1.0 - tanh**2)))
    _close(r["vmap"], np.stack([tanh, -tanh]))


def test_saturation_validation():
    with pytest.raises(ValueError, match="gain must be positive and finite, got -1.0"):
        Saturation((3,), gain=-1.0)
    with pytest.raises(ValueError, match="in_shape must be a tuple of positive ints"):
        Saturation(2.0)
    with pytest.raises(ValueError, match=r"Saturation: x.*\(\.\.\., 3\).*\(4,\)"):
        Saturation((3,))(jnp.ones(4))
