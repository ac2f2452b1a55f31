"""Reading a run the NumPyro/ArviZ way: Sampler.print_summary, dp.to_arviz and the error of
arviz.from_numpyro, and what ArviZ's ESS means for the stored (shuffled) equal-weight draws."""

from __future__ import annotations

import re

import arviz
import arviz_base
import numpy as np
import pytest
from numpyro.diagnostics import gelman_rubin

import diffprior as dp

NUMBER = r"(-?\d+\.\d+|nan)"


def _rows(text: str, name: str) -> dict[str, list[float]]:
    """Rows ``name[...]`` of a printed site table, as floats."""
    pattern = re.compile(rf"^\s*({re.escape(name)}\[[\d,]*\])((?:\s+{NUMBER})+)\s*$", re.M)
    return {m.group(1): [float(v) for v in m.group(2).split()] for m in pattern.finditer(text)}


def test_print_summary_chain_table_and_site_table(mixture_run, capsys):
    sampler = mixture_run.healthy()
    sampler.print_summary(prob=0.8)
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(
        f"TDS: {mixture_run.num_chains} chains x {mixture_run.num_particles} particles, 30 steps"
    )

    # one line per chain: final ESS, min ESS, its step, resampled, distinct, log Z
    health = dp.smc_health(sampler)
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["chain", "final", "ESS"]
    )
    for chain in range(mixture_run.num_chains):
        values = lines[header + 1 + chain].split()
        assert int(values[0]) == chain
        assert float(values[1]) == pytest.approx(health.final_ess[chain], abs=0.05)
        assert float(values[2]) == pytest.approx(health.min_ess[chain], abs=0.05)
        assert int(values[3]) == health.min_ess_step[chain]
        assert int(values[4]) == health.num_resampled[chain]
        assert int(values[5]) == health.num_distinct[chain]
        log_evidence = float(np.asarray(sampler.log_evidence)[chain])
        assert float(values[6]) == pytest.approx(log_evidence, abs=5e-4)
    log_evidence = np.asarray(sampler.log_evidence, np.float64)
    spread = re.search(rf"log Z: mean {NUMBER}, sd {NUMBER} across 4 chains", text)
    assert float(spread.group(1)) == pytest.approx(log_evidence.mean(), abs=5e-4)
    assert float(spread.group(2)) == pytest.approx(log_evidence.std(ddof=1), abs=5e-4)

    # per site: mean, std, median, 10% and 90% quantiles, r_hat across chains
    assert re.search(r"mean\s+std\s+median\s+10\.0%\s+90\.0%\s+r_hat", text)
    draws = np.asarray(sampler.get_samples(group_by_chain=True)["x"], np.float64)
    flat = draws.reshape(-1, 2)
    expected = np.stack(
        [
            flat.mean(0),
            flat.std(0, ddof=1),
            np.median(flat, 0),
            np.quantile(flat, 0.1, axis=0),
            np.quantile(flat, 0.9, axis=0),
            gelman_rubin(draws),
        ],
        axis=1,
    )
    rows = _rows(text, "x")
    assert list(rows) == ["x[0]", "x[1]"]
    np.testing.assert_allclose([rows["x[0]"], rows["x[1]"]], expected, atol=5e-3)
    assert lines[-1].startswith("healthy: ")


def test_print_summary_of_a_large_site_is_compact(capsys):
    """A (8, 8) site with one element whose chains disagree: max_rows rows, that element among
    them, and a line over all 64 elements naming it."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 200, 8, 8))
    image[0, :, 5, 2] += 3.0  # chain 0 elsewhere: large r_hat
    tree = arviz_base.from_dict({"posterior": {"x": image}})
    dp.diagnostics.print_summary(tree, max_rows=6)
    text = capsys.readouterr().out
    rows = _rows(text, "x")
    assert len(rows) == 6
    assert "x[5,2]" in rows
    r_hat = gelman_rubin(image)
    worst = np.argsort(-r_hat.ravel())[:6]
    assert sorted(rows) == sorted(f"x[{i // 8},{i % 8}]" for i in worst)
    note = re.search(r"x: 64 elements, rows above: the 6 with the largest r_hat; all: .*", text)
    assert note, text
    assert f"r_hat max {r_hat.max():.2f} at x[5,2]" in note.group(0)
    assert "no per-step SMC statistics" in text  # not an SMC run of dp.Sampler
    tree.attrs["method"] = "DPS"
    dp.diagnostics.print_summary(tree, max_rows=6)
    assert "DPS: independent particles (no weights, no evidence)" in capsys.readouterr().out


def test_print_summary_rejects_bad_arguments(mixture_run):
    sampler = mixture_run.healthy()
    with pytest.raises(ValueError, match=r"prob must be in \(0, 1\), got 1.5"):
        sampler.print_summary(prob=1.5)
    with pytest.raises(ValueError, match="max_rows must be a positive integer, got 0"):
        sampler.print_summary(max_rows=0)


def test_dp_to_arviz_and_the_from_numpyro_error(mixture_run):
    sampler = mixture_run.healthy()
    tree = dp.to_arviz(sampler)
    np.testing.assert_array_equal(
        tree["posterior"]["x"].values, sampler.to_arviz()["posterior"]["x"].values
    )
    assert dp.to_arviz(tree) is tree
    with pytest.raises(TypeError, match="to_arviz takes .* got dict"):
        dp.to_arviz({"x": np.zeros(3)})
    # arviz.from_numpyro reads `sample_dims` from what is not a numpyro MCMC object
    with pytest.raises(AttributeError, match=r"use sampler.to_arviz\(\) or dp.to_arviz\(sampler\)"):
        arviz.from_numpyro(sampler)
    assert not hasattr(sampler, "sample_dims")
    assert hasattr(sampler, "num_chains") and hasattr(sampler, "log_evidence")


def test_arviz_ess_counts_the_distinct_draws(mixture_run):
    """The draws are stored in a random order: with healthy weights and chains that agree,
    ArviZ's ess_bulk is within a factor 2 of the number of distinct draws (summed over chains),
    as documented in diagnostics.to_datatree. In the order resampling leaves them (copies side
    by side, neighbours sharing ancestors) it reads them as a stuck chain, far below."""
    sampler = mixture_run.healthy()
    tree = sampler.to_arviz()
    distinct = int(tree["sample_stats"]["num_distinct"].sum())
    assert (
        distinct > mixture_run.num_chains * mixture_run.num_particles / 2
    )  # healthy: most draws are distinct
    ess = arviz.ess(tree, var_names=["x"], method="bulk")["x"].values
    assert np.all((ess > distinct / 2) & (ess < 2 * distinct)), (ess, distinct)


def test_same_key_same_draws_in_the_same_order(mixture_run):
    first = np.asarray(mixture_run.healthy(key=3).get_samples()["x"])
    second = np.asarray(mixture_run.healthy(key=3).get_samples()["x"])
    np.testing.assert_array_equal(first, second)
    other = np.asarray(mixture_run.healthy(key=4).get_samples()["x"])
    assert not np.array_equal(first, other)
