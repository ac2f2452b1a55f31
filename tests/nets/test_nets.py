"""The networks: shapes, batching by vmap, jit, derivatives, and that the output depends on
time."""

from __future__ import annotations

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffprior.nets import TimeMLP, UNet, sinusoidal_embedding
from diffprior.nets.unet import conv2d


@eqx.filter_jit
def batched(net, x, t):
    return jax.vmap(net)(x, t)


@eqx.filter_jit
def _perturbed(net, key):
    """The network with every weight jittered, so zero-initialised layers do something (one
    random draw for all leaves: each distinct random call costs a compilation)."""
    params, static = eqx.partition(net, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    noise = 0.1 * jax.random.normal(key, (sum(p.size for p in leaves),))
    offsets = np.cumsum([0] + [p.size for p in leaves])
    leaves = [
        p + noise[a:b].reshape(p.shape)
        for p, a, b in zip(leaves, offsets, offsets[1:], strict=False)
    ]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@pytest.fixture(scope="module")
def plain_unet():
    return UNet(channels=(8, 16), key=jax.random.key(0))


@pytest.fixture(scope="module")
def unet(plain_unet):
    return _perturbed(plain_unet, jax.random.key(1))


@pytest.fixture(scope="module")
def mlp():
    return TimeMLP(3, width=16, depth=2, key=jax.random.key(0))


def test_sinusoidal_embedding_is_bounded_and_varies_with_t():
    emb = jax.vmap(lambda t: sinusoidal_embedding(t, 16))(jnp.linspace(0.0, 1.0, 5))
    assert emb.shape == (5, 16)
    assert bool(jnp.all(jnp.abs(emb) <= 1.0))
    assert float(jnp.min(jnp.linalg.norm(emb[1:] - emb[:-1], axis=1))) > 0.1
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(0.5, 7)


def test_untrained_unet_predicts_zero(plain_unet):
    x = jax.random.normal(jax.random.key(2), (2, 8, 8))
    out = batched(plain_unet, x, jnp.array([0.3, 0.7]))
    assert out.shape == (2, 8, 8)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_shapes_vmap_jit_and_time_dependence(name, request):
    net = request.getfixturevalue(name)
    shape = (8, 8) if name == "unet" else (3,)
    x = jax.random.normal(jax.random.key(3), (4, *shape))
    t = jnp.array([0.05, 0.3, 0.6, 0.95])
    out = batched(net, x, t)
    assert out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    # each example is processed on its own: reordering the batch reorders the output
    # (same shapes, so no second compilation)
    reordered = batched(net, x[::-1], t[::-1])
    np.testing.assert_allclose(np.asarray(reordered[::-1]), np.asarray(out), atol=1e-5)
    # the same x at different times gives different outputs
    same_x = batched(net, jnp.broadcast_to(x[0], x.shape), t)
    assert float(jnp.min(jnp.max(jnp.abs(same_x[1:] - same_x[:-1]), axis=-1))) > 1e-3


@pytest.mark.parametrize(("stride", "kernel", "size"), [(1, 3, 4), (2, 3, 5), (2, 1, 4)])
def test_conv2d_derivatives_match_xla_convolution(stride, kernel, size):
    x = jax.random.normal(jax.random.key(0), (size, size, 3))
    weight = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5))
    pad = kernel // 2

    def reference(x, weight):
        out = jax.lax.conv_general_dilated(
            x[None],
            weight,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return jnp.sum(jnp.sin(out[0]))

    def ours(x, weight):
        return jnp.sum(jnp.sin(conv2d(x, weight, stride)))

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(fn):
        xs, weights = jnp.stack([x, -2 * x]), jnp.stack([weight, 0.5 * weight])
        return (
            fn(x, weight),
            jax.grad(fn, (0, 1))(x, weight),
            jax.jacfwd(fn)(x, weight),
            jax.hessian(fn)(x, weight),  # forward over reverse: the adjoint's own derivative
            jax.jacrev(jax.grad(fn, 1))(x, weight),  # reverse over reverse
            jax.vmap(jax.grad(fn, (0, 1)), (0, None))(xs, weight),  # particles
            jax.vmap(jax.grad(fn, (0, 1)))(xs, weights),  # kernels batched too
        )

    for got, want in zip(
        jax.tree.leaves(derivatives(ours)), jax.tree.leaves(derivatives(reference)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_unet_gradient_in_a_loop_uses_only_fast_convolutions():
    # every sampler differentiates the denoiser inside lax.scan; there XLA's CPU backend runs a
    # convolution whose kernel is read (k, k, c_out, c_in) as a plain loop, many times slower
    net = UNet(channels=(4, 8), embed_dim=8, time_dim=8, groups=2, key=jax.random.key(0))

    def steps(x):
        def body(x, t):
            return x - 0.1 * jax.grad(lambda z: jnp.sum(net(z, t) ** 2))(x), None

        return jax.lax.scan(body, x, jnp.linspace(0.9, 0.1, 3))[0]

    hlo = jax.jit(steps).lower(jnp.ones((8, 8))).compile().as_text()
    labels = re.findall(r"convolution\([^\n]*?dim_labels=(\S+?)[,\s]", hlo)
    assert labels, "no convolution in the compiled program"
    if jax.default_backend() == "cpu":
        slow = [label for label in labels if "_01oi" in label]
        assert not slow, f"convolutions with the kernel read (k, k, out, in): {slow}"


def _skeleton(**kwargs):
    # shapes only: building real weights costs a compilation per distinct shape
    return eqx.filter_eval_shape(lambda: UNet(**kwargs, key=jax.random.key(0)))


def test_unet_handles_three_levels_and_rejects_bad_shapes():
    net = _skeleton(channels=(4, 8, 8), groups=4)
    out = eqx.filter_eval_shape(net, jnp.zeros((8, 4)), 0.5)
    assert out.shape == (8, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        eqx.filter_eval_shape(net, jnp.zeros((6, 8)), 0.5)
    with pytest.raises(ValueError, match=r"shape \(h, w\)"):
        eqx.filter_eval_shape(net, jnp.zeros((1, 8, 8)), 0.5)


def test_mlp_rejects_wrong_shape(mlp):
    with pytest.raises(ValueError, match=r"\(3,\)"):
        mlp(jnp.zeros(4), 0.5)


def test_digits_sized_unet_is_small():
    net = _skeleton()
    num_params = sum(a.size for a in jax.tree.leaves(net) if hasattr(a, "shape"))
    assert num_params * 4 < 2_000_000  # float32 bytes


def test_unet_gradient_runs_with_particles_split_over_devices():
    # under shard_map the particles vary over the mesh axis; conv2d's rules must keep that
    from diffprior.infer.sharding import particle_mesh, shard_over_particles

    net = UNet(channels=(4, 8), embed_dim=8, time_dim=8, groups=2, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8))

    def gradients(x, axis_name=None):
        return jax.vmap(jax.grad(lambda z: jnp.sum(net(z, 0.3) ** 2)))(x)

    sharded = jax.jit(shard_over_particles(gradients, particle_mesh()))
    np.testing.assert_allclose(
        np.asarray(sharded(x)), np.asarray(jax.jit(gradients)(x)), rtol=1e-5, atol=1e-6
    )
