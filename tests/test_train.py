"""Denoising-score-matching training on a 2-d toy set: the loss falls, checkpoints are atomic
and reloadable, and a seed fixes the result."""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprior as dp
from diffprior.nets import TimeMLP
from diffprior.train import dsm_loss, save_atomically, train


def _toy_data(n=512):
    key_c, key_n = jax.random.split(jax.random.key(0))
    centres = jnp.array([[-1.0, -1.0], [1.0, 1.0]])
    which = jax.random.bernoulli(key_c, 0.5, (n,)).astype(jnp.int32)
    return centres[which] + 0.1 * jax.random.normal(key_n, (n, 2))


def _net(seed=0):
    return TimeMLP(2, width=32, depth=2, embed_dim=8, key=jax.random.key(seed))


SETTINGS = dict(num_steps=150, batch_size=64, learning_rate=3e-3, steps_per_call=50)

held_out_loss = eqx.filter_jit(dsm_loss)


def test_training_reduces_the_loss_and_improves_the_denoiser():
    data = _toy_data()
    sched = dp.schedules.VP.linear()
    net0 = _net()
    net, losses = train(net0, data, sched, "eps", progress_bar=False, **SETTINGS)
    assert losses.shape == (SETTINGS["num_steps"],)
    assert np.all(np.isfinite(losses))
    assert losses[-50:].mean() < 0.7 * losses[:10].mean()
    # on fresh noise the trained (EMA) network beats the initial one
    x0 = _toy_data(1024)
    key = jax.random.key(7)
    before = float(held_out_loss(net0, x0, key, sched))
    after = float(held_out_loss(net, x0, key, sched))
    assert after < 0.8 * before


def test_same_seed_same_result_other_seed_differs():
    data = _toy_data()
    sched = dp.schedules.VP.linear()
    kwargs = dict(SETTINGS, progress_bar=False)  # the settings of the test above: no recompile
    net_a, losses_a = train(_net(), data, sched, seed=3, **kwargs)
    net_b, losses_b = train(_net(), data, sched, seed=3, **kwargs)
    _, losses_c = train(_net(), data, sched, seed=4, **kwargs)
    np.testing.assert_array_equal(losses_a, losses_b)
    for a, b in zip(jax.tree.leaves(net_a), jax.tree.leaves(net_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(losses_a, losses_c)


def test_checkpoint_is_written_atomically_and_reloads(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "net.eqx"
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        # the file appears only by a rename from a temporary file in the same directory
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        assert os.path.abspath(dst) == str(path)
        replaced.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    net, _ = train(
        _net(),
        _toy_data(),
        dp.schedules.VP.linear(),
        checkpoint_path=path,
        checkpoint_every=100,
        progress_bar=False,
        **SETTINGS,
    )
    assert len(replaced) == 2  # after steps 100 and 150 (the end)
    assert sorted(os.listdir(path.parent)) == ["net.eqx"]  # no temporary file left behind
    reloaded = eqx.tree_deserialise_leaves(path, _net(seed=1))
    for a, b in zip(jax.tree.leaves(net), jax.tree.leaves(reloaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_atomically_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "w.eqx"
    save_atomically(path, _net())
    before = path.read_bytes()

    def write_half_then_fail(f, tree):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_atomically(path, _net())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.eqx"]


def test_bad_arguments_fail_early():
    sched = dp.schedules.VP.linear()
    with pytest.raises(ValueError, match="parameterization"):
        train(_net(), _toy_data(), sched, "noise", num_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match="num_steps"):
        train(_net(), _toy_data(), sched, num_steps=0, progress_bar=False)
    with pytest.raises(ValueError, match="NaN"):
        train(_net(), jnp.full((4, 2), jnp.nan), sched, num_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match="shape"):
        train(_net(), jnp.zeros(4), sched, num_steps=1, progress_bar=False)
