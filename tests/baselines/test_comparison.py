"""dp.compare and dp.plot_compare on the shared NUTS and tempered SMC runs, a dp.Sampler run and
DataTrees: the table's columns, its ranking of a right and a wrong sampler against exact draws,
the figure's panels, and clear errors on results it cannot read."""

from __future__ import annotations

import arviz_base
import jax
import numpy as np
import pytest
from baseline_setup import PRIOR, SMC_CHAINS, SMC_PARTICLES, Y, model

import diffprior as dp
from diffprior.baselines import COMPARE_COLUMNS


def test_compare_columns_and_ranking(nuts, smc, posterior):
    # a deliberately wrong sampler: 2 chains of prior draws, which ignore y
    prior_draws = PRIOR.sample(jax.random.key(5), (2, 1000))
    wrong = arviz_base.from_dict({"posterior": {"x": prior_draws}})
    table = dp.compare({"nuts": nuts, "smc": smc, "mcmc": nuts.mcmc, "prior": wrong}, posterior)

    assert list(table.columns) == list(COMPARE_COLUMNS)
    assert list(table.index) == ["nuts", "smc", "mcmc", "prior"]
    assert table.loc["smc", "sliced_wasserstein"] < table.loc["prior", "sliced_wasserstein"]
    assert table.loc["nuts", "sliced_wasserstein"] < table.loc["prior", "sliced_wasserstein"]
    # draws as good as exact ones sit near the floor (exact vs exact, as many draws), the
    # prior's far above it
    ratio = table["sliced_wasserstein"] / table["sw_floor"]
    assert ratio["smc"] < 3 and ratio["nuts"] < 3 and ratio["prior"] > 10, ratio

    assert table.loc["nuts", "seconds"] == pytest.approx(nuts.seconds)
    assert np.isnan(table.loc["mcmc", "seconds"]) and np.isnan(table.loc["prior", "seconds"])
    row = table.loc["smc"]
    assert row["ess_bulk_per_second"] == pytest.approx(row["ess_bulk"] / row["seconds"])
    assert row["num_chains"] == SMC_CHAINS and row["num_draws"] == SMC_PARTICLES
    assert row["log_evidence"] == pytest.approx(float(np.mean(np.asarray(smc.log_evidence))))
    assert np.isnan(table.loc["nuts", "log_evidence"])
    assert table.loc["nuts", "r_hat"] < 1.05
    # the same draws, one chain: no R-hat
    one_chain = arviz_base.from_dict({"posterior": {"x": np.asarray(prior_draws)[:1]}})
    assert np.isnan(dp.compare({"one": one_chain}).loc["one", "r_hat"])


def test_compare_accepts_sampler_and_array_reference(posterior):
    sampler = dp.Sampler(dp.Unguided(model), num_particles=500, num_steps=10, progress_bar=False)
    sampler.run(jax.random.key(3), y=Y)
    reference = posterior.sample(jax.random.key(4), (500,))
    row = dp.compare({"unguided": sampler}, reference).loc["unguided"]
    assert row["seconds"] == pytest.approx(sampler.seconds)
    assert row["num_chains"] == 1 and row["num_draws"] == 500
    assert np.isfinite(row["sliced_wasserstein"]) and np.isnan(row["sw_floor"])
    assert np.isnan(row["log_evidence"])  # a method without an evidence estimate


def test_plot_compare_overlays_every_source(nuts, smc, posterior):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    plot = dp.plot_compare({"nuts": nuts, "smc": smc}, posterior)
    figure = plot.viz["figure"].item()
    assert len(figure.axes) == 2  # one panel per coordinate of x
    assert all(len(axis.lines) == 3 for axis in figure.axes)  # nuts, smc, reference
    labels = {text.get_text() for legend in figure.legends for text in legend.get_texts()}
    assert labels == {"nuts", "smc", "reference"}
    matplotlib.pyplot.close(figure)


def test_compare_rejects_unknown_results_and_variables(smc):
    with pytest.raises(TypeError, match=r"results\['bad'\].*cannot compare a list"):
        dp.compare({"bad": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"no variable 'z'.*\['x'\]"):
        dp.compare({"smc": smc}, var_name="z")
    with pytest.raises(ValueError, match="event shape"):
        dp.compare({"smc": smc}, reference=np.zeros((10, 3)))
