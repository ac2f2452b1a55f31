"""The main job end to end with tiny settings: files written, re-readable, summary sane."""

from __future__ import annotations

import arviz as az
import matplotlib.image
import numpy as np
import pytest

import diffprior
from diffprior import cli, demo
from diffprior.demo import run_demo

#: The smallest run that still exercises every step (the existing demo tests use the same).
_TINY = ["--num-particles", "8", "--num-steps", "5", "--no-progress"]


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


@pytest.mark.slow
def test_demo_mcgdiff_runs_and_writes_a_datatree(tmp_path, capsys):
    """``diffprior demo --method mcgdiff``: SMC in the inpainting operator's SVD, with an
    evidence."""
    argv = ["demo", "--method", "mcgdiff", *_TINY, "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "method mcgdiff (prior digits)" in printed and "log-evidence" in printed
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata["posterior"].attrs["method"] == "MCGdiff"
    assert idata["posterior"]["x"].shape == (1, 8, 8, 8)
    assert np.all(np.isfinite(idata["posterior"]["x"].values))
    assert np.isfinite(idata["sample_stats"]["log_evidence"].values).all()
    assert matplotlib.image.imread(tmp_path / "posterior.png").ndim == 3


@pytest.mark.slow
# eight particles on the latent prior collapse TDS's weights; the warning is not the point here
@pytest.mark.filterwarnings("ignore:TDS. the particle weights collapsed:RuntimeWarning")
def test_demo_runs_tds_on_the_latent_prior(tmp_path, capsys):
    """``diffprior demo --prior digits-latent``: the default method on the latent prior, whose
    draws are decoded images."""
    assert cli.main(["demo", "--prior", "digits-latent", *_TINY, "--out", str(tmp_path)]) == 0
    assert "method tds (prior digits-latent)" in capsys.readouterr().out
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata["posterior"].attrs["method"] == "TDS"
    assert idata["posterior"]["x"].shape == (1, 8, 8, 8)
    assert np.all(np.isfinite(idata["posterior"]["x"].values))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--noise", "student-t"], ["mcgdiff", "Gaussian noise", "'student-t'"]),
        (["--prior", "digits-latent"], ["mcgdiff", "linear", "'digits-latent'"]),
    ],
)
def test_demo_mcgdiff_refuses_a_model_it_cannot_sample(
    tmp_path, capsys, monkeypatch, options, expected
):
    """MCGdiff needs a linear Gaussian model: one line on stderr and exit status 2, before any
    prior is loaded or anything compiled."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo went on to load a prior or build a sampler")

    monkeypatch.setattr(diffprior.pretrained, "load", must_not_run)
    monkeypatch.setattr(diffprior, "Sampler", must_not_run)
    argv = ["demo", "--method", "mcgdiff", *options, *_TINY, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error = captured.err.strip()
    assert error.startswith("diffprior demo: ") and "\n" not in error
    assert all(part in error for part in expected), error
    assert list(tmp_path.iterdir()) == []


def test_inpainting_observation_masks_the_hidden_pixels():
    A = demo._operator("inpaint")
    truth = np.arange(64.0).reshape(8, 8) / 64
    image, label = demo.observation_image("inpaint", A, A(truth))
    assert isinstance(image, np.ma.MaskedArray) and image.shape == (8, 8)
    np.testing.assert_array_equal(image.mask, ~np.asarray(A.mask))
    np.testing.assert_allclose(image.compressed(), truth[np.asarray(A.mask)], rtol=1e-6)
    assert "observation" in label


def test_superresolution_observation_keeps_its_own_resolution():
    A = demo._operator("superres")
    image, label = demo.observation_image("superres", A, A(np.ones((8, 8))))
    assert image.shape == (4, 4) and not np.ma.is_masked(image)
    assert "4x4" in label


def _red_pixels(path) -> int:
    """Pixels of the figure near the hidden pixels' hatch colour (tab:red), outside any grey."""
    rgb = matplotlib.image.imread(path)[..., :3]
    tab_red = np.array([0.839, 0.153, 0.157])
    return int(np.sum(np.all(np.abs(rgb - tab_red) < 0.1, axis=-1)))


@pytest.mark.parametrize("task", ["inpaint", "deblur"])
def test_figure_marks_only_hidden_pixels(tmp_path, task):
    """The inpainting figure hatches the hidden half in a colour outside the grey scale (hidden
    pixels must not read as white paper); a fully observed task has none of it."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(-1, 1, (8, 8))
    A = demo._operator(task)
    observation, label = demo.observation_image(task, A, A(truth))
    samples = rng.uniform(-1, 1, (6, 8, 8))
    demo._figure(tmp_path / "posterior.png", truth, observation, label, samples, task)
    red = _red_pixels(tmp_path / "posterior.png")
    if task == "inpaint":
        assert red > 100
    else:
        assert red == 0
