"""The networks: shapes, batching by vmap, jit, and that the output depends on time."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffprior.nets import TimeMLP, UNet, sinusoidal_embedding


def _perturbed(net, key):
    """The network with every weight jittered, so zero-initialised layers do something."""
    params, static = eqx.partition(net, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


@pytest.fixture(scope="module")
def unet():
    return _perturbed(UNet(channels=(8, 16), key=jax.random.key(0)), jax.random.key(1))


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


def test_unet_starts_at_zero_output():
    net = UNet(channels=(8, 16), key=jax.random.key(0))
    out = net(jax.random.normal(jax.random.key(2), (8, 8)), 0.3)
    assert out.shape == (8, 8)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_shapes_vmap_jit_and_time_dependence(name, request):
    net = request.getfixturevalue(name)
    shape = (8, 8) if name == "unet" else (3,)
    x = jax.random.normal(jax.random.key(3), (4, *shape))
    t = jnp.array([0.05, 0.3, 0.6, 0.95])
    out = jax.vmap(net)(x, t)
    assert out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    jitted = eqx.filter_jit(jax.vmap(net))(x, t)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(out), rtol=1e-4, atol=1e-5)
    # same x at two times gives different outputs
    early, late = net(x[0], 0.1), net(x[0], 0.9)
    assert float(jnp.max(jnp.abs(early - late))) > 1e-3


def test_unet_handles_three_levels_and_rejects_bad_shapes():
    net = UNet(channels=(4, 8, 8), key=jax.random.key(0))
    assert net(jnp.zeros((8, 4)), 0.5).shape == (8, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(jnp.zeros((6, 8)), 0.5)
    with pytest.raises(ValueError, match=r"shape \(h, w\)"):
        net(jnp.zeros((1, 8, 8)), 0.5)


def test_mlp_rejects_wrong_shape(mlp):
    with pytest.raises(ValueError, match=r"\(3,\)"):
        mlp(jnp.zeros(4), 0.5)


def test_digits_sized_unet_is_small():
    net = UNet(key=jax.random.key(0))
    num_params = sum(a.size for a in jax.tree.leaves(eqx.filter(net, eqx.is_array)))
    assert num_params * 4 < 2_000_000  # float32 bytes
