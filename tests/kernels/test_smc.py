"""SMC bookkeeping in isolation: normalised log-weights, zero weight for non-finite increments,
the adaptive resampling decision, unbiased resampling schemes, and an unbiased evidence
estimate on a toy Feynman-Kac model whose normalising constant is known in closed form."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from diffprior.kernels import smc

SCHEMES = tuple(smc.RESAMPLING_SCHEMES)


def _normalised(log_weights):
    return log_weights - logsumexp(log_weights)


# -- reweight ---------------------------------------------------------------------------------


def test_reweight_normalises_and_returns_the_weighted_increment():
    key_w, key_g = jax.random.split(jax.random.key(0))
    log_weights = _normalised(3.0 * jax.random.normal(key_w, (50,)))
    log_increments = 5.0 * jax.random.normal(key_g, (50,)) - 20.0
    update = smc.reweight(log_weights, log_increments)
    assert float(logsumexp(update.log_weights)) == pytest.approx(0.0, abs=1e-5)
    expected = float(logsumexp(log_weights + log_increments))
    assert float(update.log_evidence_increment) == pytest.approx(expected, abs=1e-4)
    # the increment is weighted by the current weights, not by 1/N
    assert abs(expected - float(logsumexp(log_increments) - math.log(50))) > 0.1
    np.testing.assert_allclose(
        update.log_weights, log_weights + log_increments - expected, rtol=1e-5, atol=1e-4
    )
    assert not bool(update.degenerate)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_increment_gives_weight_zero_never_nan(bad):
    log_weights = jnp.full((4,), -jnp.log(4.0))
    log_increments = jnp.array([0.0, bad, 1.0, -1.0])
    update = smc.reweight(log_weights, log_increments)
    assert not np.any(np.isnan(update.log_weights))
    assert float(update.log_weights[1]) == -np.inf
    assert float(logsumexp(update.log_weights)) == pytest.approx(0.0, abs=1e-6)
    finite = jnp.array([0.0, 1.0, -1.0])
    expected = float(logsumexp(finite) - jnp.log(4.0))
    assert float(update.log_evidence_increment) == pytest.approx(expected, abs=1e-5)
    assert not bool(update.degenerate)


@pytest.mark.parametrize("fill", [-jnp.inf, jnp.nan, "mixed"])
def test_all_zero_increments_are_degenerate(fill):
    num_particles = 8
    log_weights = _normalised(jax.random.normal(jax.random.key(1), (num_particles,)))
    if fill == "mixed":
        log_increments = jnp.array([jnp.nan, jnp.inf, -jnp.inf] * 3)[:num_particles]
    else:
        log_increments = jnp.full((num_particles,), fill)
    update = smc.reweight(log_weights, log_increments)
    assert bool(update.degenerate)
    assert float(update.log_evidence_increment) == -np.inf
    np.testing.assert_allclose(update.log_weights, -np.log(num_particles), rtol=1e-6)


def test_initial_weights_from_uniform():
    log_potentials = jnp.array([0.0, jnp.log(3.0), -jnp.inf])
    update = smc.initial_weights(log_potentials)
    np.testing.assert_allclose(jnp.exp(update.log_weights), [0.25, 0.75, 0.0], atol=1e-6)
    assert float(update.log_evidence_increment) == pytest.approx(math.log(4.0 / 3.0), abs=1e-6)


def test_reweight_is_jittable_and_vmappable():
    log_weights = jnp.full((3, 5), -jnp.log(5.0))
    log_increments = jnp.array([[0.0] * 5, [jnp.nan] * 5, [1.0, jnp.nan, 0.0, 0.0, 0.0]])
    update = jax.jit(jax.vmap(smc.reweight))(log_weights, log_increments)
    np.testing.assert_array_equal(update.degenerate, [False, True, False])
    assert not np.any(np.isnan(update.log_weights))


# -- maybe_resample ---------------------------------------------------------------------------


def _log_weights_with_ess(num_particles: int, ess: int):
    """``ess`` equal weights and ``num_particles - ess`` zero weights: ESS is exactly ``ess``."""
    log_weights = jnp.where(jnp.arange(num_particles) < ess, 0.0, -jnp.inf)
    return _normalised(log_weights)


@pytest.mark.parametrize("ess_threshold", [1.0, 0.0])
def test_threshold_one_always_zero_never_resamples(ess_threshold):
    key = jax.random.key(2)
    for log_weights in (_log_weights_with_ess(10, 10), _log_weights_with_ess(10, 1)):
        result = smc.maybe_resample(key, log_weights, ess_threshold)
        assert bool(result.resampled) == (ess_threshold == 1.0)
        if ess_threshold == 0.0:
            np.testing.assert_array_equal(result.ancestors, np.arange(10))
            np.testing.assert_array_equal(result.log_weights, log_weights)


@pytest.mark.parametrize(("ess", "expected"), [(4, True), (5, False), (6, False), (10, False)])
def test_half_threshold_resamples_iff_ess_below_half(ess, expected):
    log_weights = _log_weights_with_ess(10, ess)
    result = smc.maybe_resample(jax.random.key(3), log_weights, 0.5)
    assert float(result.ess) == pytest.approx(ess, rel=1e-5)
    assert bool(result.resampled) == expected
    if not expected:
        np.testing.assert_array_equal(result.ancestors, np.arange(10))
        np.testing.assert_array_equal(result.log_weights, log_weights)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_resamples_to_uniform_weights_from_live_particles(scheme):
    num_particles = 12
    log_weights = _log_weights_with_ess(num_particles, 3)
    result = smc.maybe_resample(jax.random.key(4), log_weights, 1.0, smc.resampling_fn(scheme))
    assert bool(result.resampled)
    np.testing.assert_allclose(result.log_weights, -np.log(num_particles), rtol=1e-6)
    assert result.ancestors.shape == (num_particles,)
    assert set(np.asarray(result.ancestors).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_is_unbiased(scheme):
    """E[number of offspring of particle i] = N w_i: the mean counts over many draws are within
    5 standard errors (per-particle offspring variance is at most N w_i (1 - w_i))."""
    num_particles, num_draws = 8, 4000
    weights = jnp.array([0.3, 0.25, 0.15, 0.1, 0.1, 0.05, 0.05, 0.0])
    log_weights = jnp.log(weights)
    resample = functools.partial(
        smc.maybe_resample,
        log_weights=log_weights,
        ess_threshold=1.0,
        resample_fn=smc.resampling_fn(scheme),
    )
    keys = jax.random.split(jax.random.key(5), num_draws)
    ancestors = jax.jit(jax.vmap(lambda k: resample(k).ancestors))(keys)
    counts = np.asarray(jax.vmap(lambda a: jnp.bincount(a, length=num_particles))(ancestors))
    expected = num_particles * np.asarray(weights)
    standard_error = np.sqrt(expected * (1 - np.asarray(weights)) / num_draws)
    np.testing.assert_array_less(np.abs(counts.mean(0) - expected), 5 * standard_error + 1e-9)
    assert counts[:, -1].max() == 0  # a zero-weight particle has no offspring
    assert np.all(counts.sum(1) == num_particles)


def test_bad_scheme_name_raises_naming_the_options():
    with pytest.raises(ValueError, match="foo") as info:
        smc.resampling_fn("foo")
    for scheme in SCHEMES:
        assert scheme in str(info.value)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_bad_ess_threshold_raises(value):
    with pytest.raises(ValueError, match="ess_threshold"):
        smc.check_ess_threshold(value)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_valid_ess_threshold_passes(value):
    assert smc.check_ess_threshold(value) == value


def test_gather_selects_the_leading_axis_of_every_leaf():
    tree = {"x": jnp.arange(12.0).reshape(4, 3), "v": jnp.arange(4)}
    out = smc.gather(tree, jnp.array([3, 3, 0, 1]))
    np.testing.assert_array_equal(out["v"], [3, 3, 0, 1])
    np.testing.assert_array_equal(out["x"][0], [9.0, 10.0, 11.0])


# -- unbiased evidence on a linear-Gaussian Feynman-Kac model ---------------------------------
#
# x_0 ~ N(0, 1), x_t = x_{t-1} + N(0, Q); potentials G_t(x_t) = N(c_t; x_t, S^2), t = 0..T.
# Z = E[prod_t G_t(x_t)] = p(c_0, ..., c_T) of a linear-Gaussian state-space model, which the
# Kalman filter gives exactly. A bootstrap particle filter built from smc.* estimates it.

OBSERVATIONS = np.array([0.5, -1.0, 1.5, 0.0, 2.0, -0.5])
RANDOM_WALK_VARIANCE = 1.0
POTENTIAL_SCALE = 0.7


def _exact_log_normaliser() -> float:
    mean, variance, log_z = 0.0, 1.0, 0.0
    for step, c in enumerate(OBSERVATIONS):
        if step > 0:
            variance += RANDOM_WALK_VARIANCE
        total = variance + POTENTIAL_SCALE**2
        log_z += -0.5 * (np.log(2 * np.pi * total) + (c - mean) ** 2 / total)
        gain = variance / total
        mean += gain * (c - mean)
        variance *= 1 - gain
    return float(log_z)


def _log_potential(x, c):
    return -0.5 * (jnp.log(2 * jnp.pi * POTENTIAL_SCALE**2) + ((c - x) / POTENTIAL_SCALE) ** 2)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _particle_filter(key, num_particles, ess_threshold, scheme):
    """log Z_hat and the number of resampling steps of one bootstrap particle filter."""
    resample_fn = smc.resampling_fn(scheme)
    observations = jnp.asarray(OBSERVATIONS, jnp.float32)
    init_key, run_key = jax.random.split(key)
    x = jax.random.normal(init_key, (num_particles,))
    update = smc.initial_weights(_log_potential(x, observations[0]))

    def step(carry, inputs):
        x, log_weights, log_z, num_resampled = carry
        key, c = inputs
        resample_key, move_key = jax.random.split(key)
        decision = smc.maybe_resample(resample_key, log_weights, ess_threshold, resample_fn)
        x = smc.gather(x, decision.ancestors)
        x = x + math.sqrt(RANDOM_WALK_VARIANCE) * jax.random.normal(move_key, x.shape)
        update = smc.reweight(decision.log_weights, _log_potential(x, c))
        carry = (
            x,
            update.log_weights,
            log_z + update.log_evidence_increment,
            num_resampled + decision.resampled,
        )
        return carry, None

    keys = jax.random.split(run_key, len(OBSERVATIONS) - 1)
    init = (x, update.log_weights, update.log_evidence_increment, jnp.zeros((), jnp.int32))
    (_, _, log_z, num_resampled), _ = jax.lax.scan(step, init, (keys, observations[1:]))
    return log_z, num_resampled


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _many_filters(key, num_repeats, num_particles, ess_threshold, scheme):
    keys = jax.random.split(key, num_repeats)
    return jax.vmap(lambda k: _particle_filter(k, num_particles, ess_threshold, scheme))(keys)


EVIDENCE_CASES = [(0.0, "systematic")] + [
    (threshold, scheme) for threshold in (0.5, 1.0) for scheme in SCHEMES
]
FAST_CASES = [(0.0, "systematic"), (0.5, "systematic")]


def _ratio_statistics(ess_threshold, scheme, num_repeats=20_000, num_particles=16):
    log_z_hat, num_resampled = _many_filters(
        jax.random.key(7), num_repeats, num_particles, ess_threshold, scheme
    )
    log_z_hat = np.asarray(log_z_hat, np.float64)
    assert np.all(np.isfinite(log_z_hat))
    ratio = np.exp(log_z_hat - _exact_log_normaliser())
    return ratio, np.asarray(num_resampled)


@pytest.mark.parametrize(
    ("ess_threshold", "scheme"),
    [
        pytest.param(*case, marks=[] if case in FAST_CASES else pytest.mark.slow)
        for case in EVIDENCE_CASES
    ],
)
def test_evidence_is_unbiased(ess_threshold, scheme):
    """With 16 particles the estimator is far from exact (log Z_hat has a visible spread), yet
    the mean of Z_hat / Z over 20000 independent filters is 1 within 4 standard errors, for
    every resampling threshold and scheme."""
    ratio, num_resampled = _ratio_statistics(ess_threshold, scheme)
    num_steps = len(OBSERVATIONS) - 1
    if ess_threshold == 0.0:
        assert num_resampled.max() == 0
    elif ess_threshold == 1.0:
        assert np.all(num_resampled == num_steps)
    else:  # the adaptive case must actually be adaptive for the test to mean anything
        assert 0 < num_resampled.mean() < num_steps
    standard_error = ratio.std(ddof=1) / np.sqrt(ratio.size)
    assert ratio.std() > 0.05  # not trivially exact: the test has power to see a bias
    assert abs(ratio.mean() - 1.0) < 4 * standard_error, (
        f"mean Z_hat/Z = {ratio.mean():.4f} +- {standard_error:.4f}"
    )


def test_evidence_of_a_large_run_is_close():
    """Relative variance of Z_hat decays as 1/N; with 2^16 particles log Z_hat is within
    5 x sqrt(Var_16[Z_hat/Z] * 16 / N) of the exact value (plus 1e-3 for float32 sums)."""
    ratio, _ = _ratio_statistics(0.5, "systematic")
    num_particles = 2**16
    log_z_hat, _ = _particle_filter(jax.random.key(8), num_particles, 0.5, "systematic")
    tolerance = 5 * np.sqrt(ratio.var() * 16 / num_particles) + 1e-3
    error = float(log_z_hat) - _exact_log_normaliser()
    assert abs(error) < tolerance, f"log Z error {error:.4f}, tolerance {tolerance:.4f}"


# -- particle-wide reductions over a named axis ---------------------------------------------------
#
# The particles split into blocks along a mapped axis (here jax.vmap with an axis name, as
# shard_map would split them over devices) must give what the whole set gives.

NUM_BLOCKS, BLOCK = 2, 4


def _blocks(x):
    return x.reshape((NUM_BLOCKS, BLOCK) + x.shape[1:])


def _over_blocks(fn, *args, shared=()):
    """``fn(*blocks, *shared)`` on each block of ``args``, mapped with the axis name
    ``"particles"``; results concatenated back to the whole set where they have a block axis."""
    mapped = jax.vmap(lambda *a: fn(*a, *shared), in_axes=0, axis_name="particles")
    return mapped(*(_blocks(a) for a in args))


def _joined(x):
    return x.reshape((-1,) + x.shape[2:])


def test_reductions_over_a_named_axis_equal_the_whole_set():
    log_weights = _normalised(2.0 * jax.random.normal(jax.random.key(10), (8,)))
    log_weights = log_weights.at[3].set(-jnp.inf)
    lse = _over_blocks(lambda w: smc.log_sum_exp(w, "particles"), log_weights)
    np.testing.assert_allclose(lse, float(logsumexp(log_weights)), atol=1e-6)
    blocked_ess = _over_blocks(lambda w: smc.ess(w, "particles"), log_weights)
    np.testing.assert_allclose(blocked_ess, float(smc.ess(log_weights)), rtol=1e-5)
    empty = _over_blocks(lambda w: smc.log_sum_exp(w, "particles"), jnp.full((8,), -jnp.inf))
    assert np.all(np.asarray(empty) == -np.inf)
    increments = jnp.arange(8.0) - 4.0
    whole = smc.reweight(log_weights, increments)
    split = _over_blocks(lambda w, g: smc.reweight(w, g, "particles"), log_weights, increments)
    np.testing.assert_allclose(_joined(split.log_weights), whole.log_weights, atol=1e-5)
    np.testing.assert_allclose(
        split.log_evidence_increment, whole.log_evidence_increment, atol=1e-5
    )
    counts = _over_blocks(lambda w: smc.num_particles(w, "particles") + 0 * w[0], log_weights)
    np.testing.assert_array_equal(counts, 8)


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_resampling_and_gather_over_a_named_axis_equal_the_whole_set(scheme):
    key = jax.random.key(11)
    log_weights = _normalised(jnp.array([3.0, 0.0, -1.0, 2.5, -jnp.inf, 0.5, 1.0, -2.0]))
    particles = jnp.arange(16.0).reshape(8, 2)
    resample_fn = smc.resampling_fn(scheme)
    whole = smc.maybe_resample(key, log_weights, 1.0, resample_fn)

    def block_resample(w, x):
        decision = smc.maybe_resample(key, w, 1.0, resample_fn, axis_name="particles")
        return decision, smc.gather(x, decision.ancestors, "particles")

    split, gathered = _over_blocks(block_resample, log_weights, particles)
    np.testing.assert_array_equal(_joined(split.ancestors), whole.ancestors)
    np.testing.assert_allclose(_joined(split.log_weights), whole.log_weights, rtol=1e-6)
    np.testing.assert_array_equal(_joined(gathered), particles[whole.ancestors])
    # below the threshold nothing moves, and the ancestors are each particle's global index
    kept = _over_blocks(
        lambda w: smc.maybe_resample(key, w, 0.5, resample_fn, axis_name="particles"),
        _normalised(jnp.zeros(8)),
    )
    np.testing.assert_array_equal(_joined(kept.ancestors), np.arange(8))


def test_the_step_over_a_named_axis_equals_the_whole_set():
    log_weights = _normalised(jnp.array([2.0, 0.0, -1.0, 2.5, -3.0, 0.5, 1.0, -2.0]))
    particles = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)

    def propose(key, parents, carried):
        return 0.5 * parents + 1.0, None

    def weight(parents, carried, particles, aux):
        return -jnp.sum(particles**2, axis=1), carried

    def run(x, w, axis_name=None):
        return smc.step(
            jax.random.key(12),
            x,
            w,
            jnp.zeros(()),
            propose,
            weight,
            ess_threshold=0.9,
            axis_name=axis_name,
        )

    whole, whole_info = run(particles, log_weights)
    split, split_info = _over_blocks(lambda x, w: run(x, w, "particles"), particles, log_weights)
    assert bool(whole_info.resampled)
    np.testing.assert_array_equal(_joined(split_info.ancestors), whole_info.ancestors)
    np.testing.assert_allclose(_joined(split.particles), whole.particles, rtol=1e-6)
    np.testing.assert_allclose(_joined(split.log_weights), whole.log_weights, atol=1e-5)
    np.testing.assert_allclose(split.log_evidence, whole.log_evidence, atol=1e-5)
    np.testing.assert_allclose(split_info.ess, whole_info.ess, rtol=1e-5)


def test_particle_keys_depend_on_the_global_index_only():
    key = jax.random.key(13)
    whole = jax.random.key_data(smc.particle_keys(key, 8))
    split = _over_blocks(lambda w: smc.particle_keys(key, BLOCK, "particles"), jnp.zeros(8))
    np.testing.assert_array_equal(jax.random.key_data(_joined(split)), whole)
    assert len({tuple(row) for row in np.asarray(whole).tolist()}) == 8


def test_particle_normals_are_the_particle_keys_draws_whatever_the_blocks():
    key = jax.random.key(14)
    whole = smc.particle_normals(key, (8, 3))
    # row i is particle i's own draw, made in one batched draw for the step
    own = jax.vmap(lambda k: jax.random.normal(k, (3,)))(smc.particle_keys(key, 8))
    np.testing.assert_array_equal(whole, own)
    split = _over_blocks(lambda w: smc.particle_normals(key, (BLOCK, 3), "particles"), jnp.zeros(8))
    np.testing.assert_array_equal(_joined(split), whole)
    assert len({tuple(row) for row in np.asarray(whole).tolist()}) == 8
