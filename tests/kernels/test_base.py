"""What every kernel shares: the one-particle builder maps a step over particles with one key
each, non-finite proposals are replaced by the previous particle and counted (and weighted zero
by the SMC kernels), one SMC step matches a hand computation, every kernel keeps the protocol
the Sampler reads, and each option has one default in the kernel and the method."""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprior as dp
from diffprior.diffusion.grids import timesteps as make_timesteps
from diffprior.kernels import (
    base,
    diffpir,
    dps,
    fk,
    mcgdiff,
    pigdm,
    resample,
    smc,
    tds,
    unguided,
)

# -- the one-particle builder -------------------------------------------------------------------

TIMES = jnp.array([1.0, 0.6, 0.25, 0.0])


def _toy_step(key, x, times):
    """x_s = (s / t) x + s * noise, reporting the step index and t: checks keys and times."""
    noise = jax.random.normal(key, x.shape)
    return times.s / times.t * x + times.s * noise, (times.index, times.t, jnp.sum(x))


def _toy_info(outputs, times, num_nonfinite):
    return outputs, times, num_nonfinite


def test_builder_maps_the_particle_step_with_one_key_per_particle():
    algorithm = base.from_particle_step(_toy_step, TIMES, _toy_info)
    particles = jax.random.normal(jax.random.key(0), (5, 2, 3))
    state = algorithm.init(particles)
    assert isinstance(state, base.ParticleState) and int(state.step) == 0
    key = jax.random.key(1)
    step, one_step = jax.jit(algorithm.step), jax.jit(_toy_step)
    for expected_step in (1, 2):
        previous = state.particles
        state, (outputs, times, num_nonfinite) = step(key, state)
        assert int(state.step) == expected_step
        k = expected_step - 1
        assert int(times.index) == k
        assert float(times.t) == float(TIMES[k]) and float(times.s) == float(TIMES[k + 1])
        # particle i is moved alone, with the i-th key of the split
        keys = jax.random.split(key, 5)
        one_times = base.StepTimes(jnp.asarray(k), TIMES[k], TIMES[k + 1])
        for i in range(5):
            x_s, (index, t, total) = one_step(keys[i], previous[i], one_times)
            np.testing.assert_allclose(state.particles[i], x_s, rtol=1e-6, atol=1e-6)
            assert int(outputs[0][i]) == k and float(outputs[1][i]) == float(t)
            assert float(outputs[2][i]) == pytest.approx(float(total), rel=1e-5)
        assert int(num_nonfinite) == 0
    # distinct keys: no two particles received the same noise
    assert len({round(float(v), 6) for v in state.particles[:, 0, 0]}) == 5


def test_builder_runs_under_vmap_over_chains():
    algorithm = base.from_particle_step(_toy_step, TIMES, _toy_info)
    particles = jax.random.normal(jax.random.key(2), (3, 4, 2))
    states = jax.vmap(algorithm.init)(particles)
    keys = jax.random.split(jax.random.key(3), 3)
    states, (_, _, counts) = jax.jit(jax.vmap(algorithm.step))(keys, states)
    assert states.particles.shape == (3, 4, 2) and counts.shape == (3,)
    alone, _ = jax.jit(algorithm.step)(keys[1], algorithm.init(particles[1]))
    np.testing.assert_allclose(states.particles[1], alone.particles, rtol=1e-6, atol=1e-6)


# -- the non-finite rule ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_replace_nonfinite_replaces_whole_particles_and_counts(bad):
    previous = jnp.arange(12.0).reshape(4, 3)
    proposals = -previous
    proposals = proposals.at[1, 2].set(bad).at[3].set(bad)
    finite = base.replace_nonfinite(proposals, previous)
    np.testing.assert_array_equal(finite.is_finite, [True, False, True, False])
    assert int(finite.num_nonfinite) == 2 and finite.num_nonfinite.dtype == jnp.int32
    # the whole particle comes back, not only the bad coordinate
    np.testing.assert_array_equal(finite.particles[1], previous[1])
    np.testing.assert_array_equal(finite.particles[3], previous[3])
    kept = np.array([0, 2])
    np.testing.assert_array_equal(finite.particles[kept], proposals[kept])


def test_replace_nonfinite_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        base.replace_nonfinite(jnp.zeros((4, 3)), jnp.zeros((4, 2)))


def _poisoned_denoiser():
    """Exact for standard normal data under VP (x0_hat = alpha_t x_t), except NaN for every
    particle with a positive first coordinate: those particles' proposals are not finite."""
    schedule = dp.schedules.VP.linear()

    def net(x, t):
        return jnp.where(x[0] > 0, jnp.nan, schedule.alpha(t) * x)

    return dp.Denoiser(net, schedule=schedule, parameterization="x0")


def _poisoned_start(num_particles=12):
    denoiser = _poisoned_denoiser()
    times = make_timesteps(denoiser.schedule, 6, "uniform")
    particles = jax.random.normal(jax.random.key(4), (num_particles, 2))
    poisoned = np.asarray(particles[:, 0] > 0)
    assert 0 < poisoned.sum() < num_particles
    return denoiser, times, particles, poisoned


def _log_likelihood(x):
    return -0.5 * ((x[0] - 1.0) / 0.5) ** 2


PARTICLE_KERNELS = {
    "unguided": lambda den, times: unguided.as_top_level_api(den, times),
    "dps": lambda den, times: dps.as_top_level_api(
        den, _log_likelihood, times, scale=0.1, normalize=False
    ),
    "pigdm": lambda den, times: pigdm.as_top_level_api(
        den, lambda x0, t: _log_likelihood(x0), times
    ),
    "diffpir": lambda den, times: diffpir.as_top_level_api(
        den, lambda x0, rho: x0.at[0].set((4.0 + rho * x0[0]) / (4.0 + rho)), times
    ),
    "resample": lambda den, times: resample.as_top_level_api(
        den, _log_likelihood, times, consistency_every=1, window=(0.0, 1.0), num_grad_steps=2
    ),
}


@pytest.mark.parametrize("name", list(PARTICLE_KERNELS))
def test_particle_kernels_keep_nonfinite_proposals_in_place_and_count_them(name):
    denoiser, times, particles, poisoned = _poisoned_start()
    algorithm = PARTICLE_KERNELS[name](denoiser, times)
    state, info = algorithm.step(jax.random.key(5), algorithm.init(particles))
    assert np.all(np.isfinite(np.asarray(state.particles)))
    assert int(info.num_nonfinite) == int(poisoned.sum())
    np.testing.assert_array_equal(state.particles[poisoned], particles[poisoned])
    assert not np.any(np.asarray(state.particles[~poisoned]) == np.asarray(particles[~poisoned]))


def _flat_reward(x0_hat, t):
    # finite whatever x0_hat is: only the proposal can flag a poisoned particle
    return jnp.zeros(())


SMC_KERNELS = {
    "tds": lambda den, times: tds.as_top_level_api(
        den, lambda x: 0.0, times, twist_fn=_flat_reward, ess_threshold=0.0
    ),
    "fk-prior": lambda den, times: fk.as_top_level_api(
        den, _flat_reward, times, proposal="prior", potential="max", ess_threshold=0.0
    ),
    "mcgdiff": lambda den, times: mcgdiff.as_top_level_api(
        den,
        times,
        jnp.array([[0.0], [1.0]]),
        jnp.array([0.5]),
        jnp.array([1.0]),
        potential="gaussian",
        twisted=False,
        ess_threshold=0.0,
    ),
}


@pytest.mark.parametrize("name", list(SMC_KERNELS))
def test_smc_kernels_give_nonfinite_proposals_weight_zero(name):
    """The first weights do not see the poison (flat reward, potentials of the particles
    alone), so every poisoned particle starts with a positive weight; its first proposal is
    NaN, and it must come out finite, counted, at its parent, with weight zero."""
    denoiser, times, particles, poisoned = _poisoned_start()
    algorithm = SMC_KERNELS[name](denoiser, times)
    state = algorithm.init(particles)
    assert np.all(np.isfinite(np.asarray(state.log_weights)))
    state, info = algorithm.step(jax.random.key(6), state)
    assert int(info.num_nonfinite) == int(poisoned.sum())
    assert np.all(np.isfinite(np.asarray(state.particles)))
    np.testing.assert_array_equal(state.particles[poisoned], particles[poisoned])
    log_weights = np.asarray(state.log_weights)
    assert np.all(log_weights[poisoned] == -np.inf)
    assert np.all(np.isfinite(log_weights[~poisoned]))
    assert float(jax.scipy.special.logsumexp(state.log_weights)) == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(float(state.log_evidence)) and not bool(info.degenerate)


# -- one SMC step by hand -----------------------------------------------------------------------


def _shift_by_one(key, parents, carried):
    return parents + 1.0, carried


def _log_of_particle(parents, carried, particles, aux):
    # incremental weight x_s, and the parents' labels carried on
    return jnp.log(particles[:, 0]), carried


def test_smc_step_resamples_proposes_and_reweights_as_by_hand():
    """Weights (1/2, 1/2, 0, 0): ESS = 2 < 0.75 * 4, so the step resamples, and systematic
    resampling can only give ancestors (0, 0, 1, 1) (its positions (u + i) / 4 fall in
    [0, 1/2) twice and [1/2, 1) twice). Parents x = (1, 1, 2, 2) with uniform weights move to
    (2, 2, 3, 3); the increments x_s give weights (2, 2, 3, 3) / 10 and the log-evidence
    increment log((2 + 2 + 3 + 3) / 4)."""
    particles = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    log_weights = jnp.log(jnp.array([0.5, 0.5, 0.0, 0.0]))
    labels = jnp.array([10, 20, 30, 40])
    result, info = smc.step(
        jax.random.key(7),
        particles,
        log_weights,
        jnp.asarray(-1.0),
        _shift_by_one,
        _log_of_particle,
        carried=labels,
        ess_threshold=0.75,
        resample_fn=smc.resampling_fn("systematic"),
    )
    assert float(info.ess) == pytest.approx(2.0, rel=1e-6)
    assert bool(info.resampled)
    np.testing.assert_array_equal(info.ancestors, [0, 0, 1, 1])
    np.testing.assert_array_equal(result.particles[:, 0], [2.0, 2.0, 3.0, 3.0])
    np.testing.assert_array_equal(result.carried, [10, 10, 20, 20])
    np.testing.assert_allclose(jnp.exp(result.log_weights), [0.2, 0.2, 0.3, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(info.log_weights, result.log_weights)
    increment = math.log(10.0 / 4.0)
    assert float(info.log_evidence_increment) == pytest.approx(increment, rel=1e-6)
    assert float(result.log_evidence) == pytest.approx(-1.0 + increment, rel=1e-6)
    assert not bool(info.degenerate) and int(info.num_nonfinite) == 0


def test_smc_step_without_resampling_gives_a_nonfinite_proposal_weight_zero():
    """Weights (0.1, 0.2, 0.3, 0.4), ESS = 1 / 0.3 > 0.25 * 4: no resampling. Particle 2's
    proposal is NaN and every increment is e: it stays at its parent with weight zero, the
    others get (0.1, 0.2, 0.4) / 0.7, and the increment is 1 + log 0.7."""

    def propose(key, parents, carried):
        return parents.at[2].set(jnp.nan) + 1.0, None

    def constant(parents, carried, particles, aux):
        return jnp.ones(particles.shape[0]), carried

    particles = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    result, info = smc.step(
        jax.random.key(8),
        particles,
        jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4])),
        jnp.asarray(0.0),
        propose,
        constant,
        ess_threshold=0.25,
    )
    assert float(info.ess) == pytest.approx(1.0 / 0.3, rel=1e-5)
    assert not bool(info.resampled)
    np.testing.assert_array_equal(info.ancestors, [0, 1, 2, 3])
    np.testing.assert_array_equal(result.particles[:, 0], [2.0, 3.0, 3.0, 5.0])
    assert int(info.num_nonfinite) == 1
    np.testing.assert_allclose(
        jnp.exp(result.log_weights), [1 / 7, 2 / 7, 0.0, 4 / 7], rtol=1e-5, atol=1e-7
    )
    assert float(info.log_evidence_increment) == pytest.approx(1.0 + math.log(0.7), rel=1e-5)


def test_smc_step_resamples_only_where_allowed():
    log_weights = jnp.log(jnp.array([0.5, 0.5, 0.0, 0.0]))
    particles = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    for allowed in (True, False):
        _, info = smc.step(
            jax.random.key(9),
            particles,
            log_weights,
            jnp.asarray(0.0),
            _shift_by_one,
            _log_of_particle,
            ess_threshold=0.75,
            resample_allowed=jnp.asarray(allowed),
        )
        assert bool(info.resampled) == allowed
        expected = [0, 0, 1, 1] if allowed else [0, 1, 2, 3]
        np.testing.assert_array_equal(info.ancestors, expected)


# -- the protocol and the defaults ----------------------------------------------------------------

PARTICLE_MODULES = {
    unguided: ("UnguidedState", "UnguidedInfo"),
    dps: ("DPSState", "DPSInfo"),
    pigdm: ("PiGDMState", "PiGDMInfo"),
    diffpir: ("DiffPIRState", "DiffPIRInfo"),
    resample: ("ReSampleState", "ReSampleInfo"),
}
SMC_MODULES = {
    tds: ("TDSState", "TDSInfo"),
    fk: ("FKState", "FKInfo"),
    mcgdiff: ("MCGdiffState", "MCGdiffInfo"),
}


@pytest.mark.parametrize(
    "module", list(PARTICLE_MODULES) + list(SMC_MODULES), ids=lambda m: m.__name__
)
def test_every_kernel_keeps_the_protocol(module):
    is_smc = module in SMC_MODULES
    state_name, info_name = (SMC_MODULES if is_smc else PARTICLE_MODULES)[module]
    for name in (state_name, info_name, "init", "build_kernel", "as_top_level_api"):
        assert name in module.__all__ and hasattr(module, name)
    state_fields = getattr(module, state_name)._fields
    info_fields = getattr(module, info_name)._fields
    assert {"particles", "step"} <= set(state_fields)
    assert set(base.INFO_FIELDS) <= set(info_fields)
    if is_smc:
        assert {"log_weights", "log_evidence"} <= set(state_fields)
        assert set(base.SMC_INFO_FIELDS) <= set(info_fields)
    else:
        assert getattr(module, state_name) is base.ParticleState


METHOD_KERNELS = [
    (dp.Unguided, unguided),
    (dp.DPS, dps),
    (dp.PiGDM, pigdm),
    (dp.DiffPIR, diffpir),
    (dp.ReSample, resample),
    (dp.TDS, tds),
    (dp.FK, fk),
    (dp.MCGdiff, mcgdiff),
]


def _defaults(function):
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


#: Options whose method default is resolved from the model before the kernel is built: the
#: kernel's default is what the method passes where the model does not allow the other choice.
RESOLVED_FROM_THE_MODEL = {(dp.FK, "proposal"): ("auto", "guided")}


@pytest.mark.parametrize(("method", "module"), METHOD_KERNELS, ids=lambda v: v.__name__)
def test_an_option_has_one_default_in_the_method_and_the_kernel(method, module):
    method_defaults = _defaults(method.__init__)
    kernel_defaults = _defaults(module.as_top_level_api)
    shared = set(method_defaults) & set(kernel_defaults)
    assert shared, f"{method.__name__} shares no option with {module.__name__}"
    for name in shared:
        if (method, name) in RESOLVED_FROM_THE_MODEL:
            expected = RESOLVED_FROM_THE_MODEL[method, name]
            assert (method_defaults[name], kernel_defaults[name]) == expected
            continue
        assert method_defaults[name] == kernel_defaults[name], (
            f"{name}: {method.__name__} default {method_defaults[name]!r}, "
            f"{module.__name__}.as_top_level_api default {kernel_defaults[name]!r}"
        )
