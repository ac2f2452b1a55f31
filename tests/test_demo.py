"""The main job end to end with tiny settings: files written, re-readable, summary sane."""

from __future__ import annotations

import arviz as az
import matplotlib.image
import numpy as np
import pytest

from diffprior import cli
from diffprior.demo import run_demo


@pytest.mark.slow
def test_demo_writes_a_datatree_and_a_figure(tmp_path):
    summary = run_demo(
        "inpaint", "tds", "gaussian", tmp_path, num_particles=8, num_steps=5, progress_bar=False
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["posterior.nc", "posterior.png"]
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata["posterior"]["x"].shape == (1, 8, 8, 8)
    assert "log_evidence" in idata["sample_stats"]
    image = matplotlib.image.imread(tmp_path / "posterior.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert np.isfinite(summary["psnr"]) and 0 <= summary["coverage_90"] <= 1
    assert summary["mean_pixel_std"] >= 0


@pytest.mark.slow
def test_demo_resample_runs_on_the_latent_prior(tmp_path, capsys):
    """``diffprior demo --method resample``: ReSample on the shipped latent digits prior."""
    argv = ["demo", "--method", "resample", "--num-particles", "8", "--num-steps", "5"]
    assert cli.main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "method resample (prior digits-latent)" in printed and "PSNR" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["posterior.nc", "posterior.png"]
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata["posterior"]["x"].shape == (1, 8, 8, 8)
    assert idata["posterior"].attrs["method"] == "ReSample"
    assert np.all(np.isfinite(idata["posterior"]["x"].values))
    assert matplotlib.image.imread(tmp_path / "posterior.png").ndim == 3


def test_demo_rejects_bad_options(tmp_path, capsys):
    assert cli.main(["demo", "--sigma-y", "0", "--out", str(tmp_path)]) == 2
    assert "sigma-y" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
