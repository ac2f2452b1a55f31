"""Weight collapse is never silent: the rule of diagnostics.weight_collapse, the warning a run
gives and the DataTree's record of it, dp.smc_health's summary, and dp.plot_smc."""

from __future__ import annotations

import re
import warnings

import arviz_base
import jax
import numpy as np
import pytest

import diffprior as dp
from diffprior import diagnostics

# -- the rule ------------------------------------------------------------------------------------


def test_a_run_of_low_steps_is_a_collapse_and_a_single_dip_is_not():
    num_particles = 500  # collapse level: 2% = 10
    ess = np.full((3, 20), 300.0)
    ess[0, 2:4] = 5.0  # two steps: a dip
    ess[1, 5:9] = 9.9  # four steps
    ess[1, 12] = 1.0  # a single dip in the same chain
    ess[2, 0:3] = 10.0  # at the level, not below it
    report = diagnostics.weight_collapse(ess, np.full(3, 400.0), num_particles, "FK")
    assert report.collapsed.shape == ess.shape
    np.testing.assert_array_equal(np.flatnonzero(report.collapsed[1]), [5, 6, 7, 8])
    assert not report.collapsed[[0, 2]].any()
    assert not report.low_final_ess.any()
    assert report.message.startswith("FK: the particle weights collapsed in chain 1 ")
    assert "ESS < 10 of 500 particles at steps 5-8" in report.message
    assert "chain 0" not in report.message and "chain 2" not in report.message
    assert "more particles" in report.message and "dp.MCGdiff" in report.message


def test_a_low_final_ess_is_reported_and_a_healthy_run_is_not():
    ess = np.full((2, 10), 100.0)
    report = diagnostics.weight_collapse(ess, np.array([9.5, 10.0]), 200, "MCGdiff")
    np.testing.assert_array_equal(report.low_final_ess, [True, False])
    assert "chain 0 (final ESS 9.5 < 10)" in report.message
    assert "dp.MCGdiff" not in report.message  # not suggested to its own users
    healthy = diagnostics.weight_collapse(ess, np.array([150.0, 180.0]), 200)
    assert healthy.message == "" and not healthy.collapsed.any()


@pytest.mark.parametrize(
    ("num_particles", "level", "final_level"),
    [(1, 0.5, 0.25), (8, 2.0, 2.0), (32, 2.0, 8.0), (100, 2.0, 10.0), (1000, 20.0, 10.0)],
)
def test_levels_scale_with_the_particles(num_particles, level, final_level):
    """2% of the particles, at least 2 but at most half of them; final: 10, at most N / 4, so
    that a run with very few particles is not always reported (an ESS is at least 1)."""
    assert diagnostics.collapse_level(num_particles) == pytest.approx(level)
    assert diagnostics.final_ess_level(num_particles) == pytest.approx(final_level)
    ones = np.ones((1, 5))
    report = diagnostics.weight_collapse(ones, np.ones(1), num_particles)
    assert bool(report.message) == (num_particles > 2)


def test_non_finite_ess_is_not_read_as_a_collapse():
    ess = np.full((1, 6), np.nan)
    report = diagnostics.weight_collapse(ess, np.array([np.nan]), 100)
    assert report.message == ""


# -- a run -----------------------------------------------------------------------------------------


def test_healthy_run_does_not_warn_and_reads_healthy(mixture_run):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sampler = mixture_run.healthy()
    tree = sampler.to_arviz()
    stats = tree["sample_stats"]
    assert tree.attrs["weight_collapse"] == ""
    assert stats["collapsed"].dims == ("chain", "step")
    assert not stats["collapsed"].values.any()

    health = dp.smc_health(sampler)
    assert health.verdict == "healthy" and health.healthy
    assert health.method == "TDS"
    assert (health.num_particles, health.num_steps) == (
        mixture_run.num_particles,
        mixture_run.num_steps,
    )
    ess = stats["ess"].values
    np.testing.assert_allclose(health.min_ess, ess.min(axis=1))
    np.testing.assert_array_equal(health.min_ess_step, ess.argmin(axis=1))
    np.testing.assert_array_equal(
        health.num_resampled, np.full(mixture_run.num_chains, mixture_run.num_steps)
    )
    np.testing.assert_allclose(health.log_evidence, np.asarray(sampler.log_evidence))
    assert health.log_evidence_sd == pytest.approx(np.std(health.log_evidence, ddof=1))
    assert health.collapsed_steps == ((),) * mixture_run.num_chains
    # the final ESS is that of the final weights: 1 / sum w^2
    weights = np.exp(stats["log_weight"].values.astype(np.float64))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(health.final_ess, 1 / (weights**2).sum(axis=1), rtol=1e-4)
    draws = tree["posterior"]["x"].values
    np.testing.assert_array_equal(
        health.num_distinct, [len(np.unique(chain, axis=0)) for chain in draws]
    )
    assert "healthy:" in str(health) and len(str(health).splitlines()) == mixture_run.num_chains + 3


def test_collapsed_run_warns_naming_chains_and_what_to_try(mixture_run):
    """A Normal likelihood with sigma 1e-4 on the mixture: the last step's weights (the exact
    likelihood) collapse onto a few particles in every chain."""
    with pytest.warns(RuntimeWarning, match="particle weights collapsed") as record:
        sampler = mixture_run.sharp()
    messages = [str(w.message) for w in record if "collapsed" in str(w.message)]
    assert len(messages) == 1
    message = messages[0]
    tree = sampler.to_arviz()
    final_ess = tree["sample_stats"]["final_ess"].values
    low = np.flatnonzero(final_ess < 10)
    assert low.size > 0
    health = dp.smc_health(tree)
    expected = [c for c in range(len(final_ess)) if c in low or health.collapsed_steps[c]]
    named = sorted(int(chain) for chain in re.findall(r"chain (\d+) \(", message))
    assert named == expected, (message, final_ess)
    for chain in low:
        assert f"chain {chain} (" in message and f"final ESS {final_ess[chain]:.3g} < 10" in message
    assert "num_particles" in message and "dp.MCGdiff" in message
    assert tree.attrs["weight_collapse"] == message
    assert tree["sample_stats"].attrs["weight_collapse"] == message

    assert health.verdict == "collapsed" and not health.healthy
    assert health.message == message
    np.testing.assert_array_less(health.num_distinct[low], mixture_run.num_particles // 4)


class _DisagreeingTDS(dp.TDS):
    """TDS whose chains' log-evidences are pushed apart by noise at every step, the weights
    and particles left as they are: what a run looks like when some chains miss the
    likelihood's region without their weights collapsing."""

    def build(self, prior, obs, timesteps):
        algorithm = super().build(prior, obs, timesteps)

        def step(rng_key, state):
            state, info = algorithm.step(rng_key, state)
            jitter = 10.0 * jax.random.normal(jax.random.fold_in(rng_key, 7))
            return state._replace(log_evidence=state.log_evidence + jitter), info

        return algorithm._replace(step=step)


def test_chains_whose_evidences_disagree_warn_without_a_collapse(mixture_run):
    problem = mixture_run.problem
    sampler = dp.Sampler(
        _DisagreeingTDS(problem.model),
        num_particles=128,
        num_steps=30,
        num_chains=4,
        progress_bar=False,
    )
    with pytest.warns(RuntimeWarning, match="the chains disagree") as record:
        sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    assert not any("particle weights collapsed" in str(w.message) for w in record)
    message = next(str(w.message) for w in record if "disagree" in str(w.message))
    log_evidence = np.asarray(sampler.log_evidence)
    assert f"spread by {np.std(log_evidence, ddof=1):.1f} nats" in message
    assert "proposal='subspace'" in message and "dp.smc_health" in message
    assert dp.smc_health(sampler).verdict == "noisy evidence"


def test_draws_of_a_collapsed_run_are_not_stored_side_by_side(mixture_run):
    """Resampling puts the copies of a particle next to each other; the stored order is a random
    permutation, so adjacent equal draws are about sum_k n_k (n_k - 1) / N of the N - 1 pairs
    (n_k the copies of draw k), far fewer than the N - distinct of the side-by-side order."""
    with pytest.warns(RuntimeWarning):
        sampler = mixture_run.sharp()
    draws = np.asarray(sampler.get_samples(group_by_chain=True)["x"])
    for chain in draws:
        _, counts = np.unique(chain, axis=0, return_counts=True)
        side_by_side = len(chain) - len(counts)
        adjacent = int(np.sum(np.all(chain[1:] == chain[:-1], axis=1)))
        expected = np.sum(counts * (counts - 1)) / len(chain)
        assert side_by_side > 20  # a collapsed chain: many copies
        assert adjacent < side_by_side / 2, (adjacent, side_by_side, expected)


def test_smc_health_reads_a_datatree_written_to_netcdf(mixture_run, tmp_path):
    import arviz

    sampler = mixture_run.healthy(key=1)
    path = tmp_path / "run.nc"
    sampler.to_arviz().to_netcdf(path)
    loaded, direct = dp.smc_health(arviz.from_netcdf(path)), dp.smc_health(sampler)
    assert loaded.verdict == direct.verdict
    np.testing.assert_allclose(loaded.final_ess, direct.final_ess)
    np.testing.assert_array_equal(loaded.min_ess_step, direct.min_ess_step)


def test_smc_health_refuses_what_is_not_an_smc_run():
    tree = arviz_base.from_dict({"posterior": {"x": np.zeros((2, 10, 3))}})
    tree.attrs["method"] = "DPS"
    with pytest.raises(ValueError, match=r"SMC run.*'DPS'.*\['ess', 'resampled', 'log_evidence'\]"):
        dp.smc_health(tree)
    with pytest.raises(TypeError, match="smc_health needs an xarray.DataTree.*got dict"):
        dp.smc_health({"x": np.zeros(3)})


# -- plot_smc ------------------------------------------------------------------------------------


@pytest.fixture
def pyplot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_plot_smc_shows_the_run(mixture_run, pyplot, tmp_path):
    tree = mixture_run.healthy().to_arviz()
    stats = tree["sample_stats"]
    fig = dp.plot_smc(tree)
    ax_ess, ax_resampled, ax_increment, ax_evidence = fig.axes
    lines = ax_ess.get_lines()
    for chain in range(mixture_run.num_chains):
        np.testing.assert_allclose(lines[chain].get_ydata(), stats["ess"].values[chain])
    # the resampling threshold (ess_threshold=1.0) and the collapse level
    levels = sorted(line.get_ydata()[0] for line in lines[mixture_run.num_chains :])
    assert levels == pytest.approx(
        [diagnostics.collapse_level(mixture_run.num_particles), mixture_run.num_particles]
    )
    events = [collection.get_positions() for collection in ax_resampled.collections]
    for chain in range(mixture_run.num_chains):
        np.testing.assert_array_equal(events[chain], np.flatnonzero(stats["resampled"][chain]))
    for chain, line in enumerate(ax_increment.get_lines()):
        np.testing.assert_allclose(
            line.get_ydata(), stats["log_evidence_increment"].values[chain], rtol=1e-6
        )
    points = ax_evidence.collections[0].get_offsets()
    np.testing.assert_allclose(points[:, 1], stats["log_evidence"].values, rtol=1e-6)
    fig.savefig(tmp_path / "smc.png")
    assert (tmp_path / "smc.png").stat().st_size > 0


def test_plot_smc_refuses_what_is_not_an_smc_run(pyplot):
    tree = arviz_base.from_dict({"posterior": {"x": np.zeros((2, 10, 3))}})
    with pytest.raises(ValueError, match="plot_smc needs the DataTree of a diffprior SMC run"):
        dp.plot_smc(tree)
