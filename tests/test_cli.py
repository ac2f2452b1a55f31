"""The ``diffprior`` command: help, version, sub-command registration and exit statuses."""

import os
import subprocess
import sys

import numpy as np
import pytest

import diffprior
from diffprior import cli

SUBCOMMANDS = ("demo", "sample", "benchmark")


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diffprior")
    for name in SUBCOMMANDS:
        assert name in out


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffprior {diffprior.__version__}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: diffprior {name}")


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: diffprior" in capsys.readouterr().err


def test_benchmark_writes_the_table(capsys, tmp_path):
    out = tmp_path / "gmm.md"
    argv = ["benchmark", "gmm", "--methods", "mcgdiff", "unguided", "exact", "--cells", "8x1"]
    argv += ["--seeds", "1", "--num-steps", "5", "--particles", "64", "--num-samples", "64"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert "| mcgdiff | 5 | (8, 1) |" in text
    assert "| unguided | 5 | (8, 1) |" in text
    assert "Command: `" in text
    row = next(line for line in text.splitlines() if line.startswith("| mcgdiff"))
    ratio = float(row.split("|")[4])
    assert np.isfinite(ratio) and ratio > 0
    assert "n/a" in next(line for line in text.splitlines() if line.startswith("| unguided"))
    exact_row = next(line for line in text.splitlines() if line.startswith("| exact"))
    assert 0 < float(exact_row.split("|")[4]) < 10


@pytest.mark.slow
def test_benchmark_digits_writes_the_table(capsys, tmp_path):
    out = tmp_path / "digits.md"
    argv = ["benchmark", "digits", "--methods", "mcgdiff", "--tasks", "superres"]
    argv += ["--num-digits", "2", "--num-particles", "8", "--num-steps", "4"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| superres"))
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[2] == "mcgdiff" and cells[3] == "2"
    psnr = float(cells[4].split("±")[0])
    assert 0 < psnr < 60
    assert cells[7] == "0"  # no NaN runs


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["benchmark", "gmm", "--cells", "7x1"], "even dimension"),
        (["benchmark", "gmm", "--cells", "8by1"], "a cell is DxDY"),
        (["benchmark", "gmm", "--methods", "nuts"], "invalid choice"),
        (["benchmark", "mnist"], "invalid choice"),
        (["benchmark", "digits", "--num-digits", "0"], "positive integer"),
        (["benchmark", "digits", "--tasks", "deblur"], "invalid choice"),
    ],
)
def test_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--problem", "p.npz", "--method", "nope", "--out", "o.npz"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err
    assert "TDS" in err


def test_sample_rejects_non_positive_particles(capsys):
    argv = ["sample", "--problem", "p.npz", "--method", "DPS", "--out", "o.npz"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--num-particles", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_python_dash_m_diffprior_help():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "diffprior", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: diffprior")
    for name in SUBCOMMANDS:
        assert name in result.stdout


def _write_problem(path, **overrides):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "means": np.array([[-2.0, 0.0], [2.0, 0.0]]),
        "weights": np.array([0.3, 0.7]),
        "scale": np.array(1.0),
        "A": rng.normal(size=(1, 2)),
        "sigma_y": np.array(0.5),
        "y": np.array([0.7]),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(("method", "has_evidence"), [("tds", True), ("DPS", False)])
def test_sample_writes_the_documented_file(method, has_evidence, tmp_path, capsys):
    import numpy as np

    problem, out = tmp_path / "problem.npz", tmp_path / "out" / "samples.npz"
    _write_problem(problem)
    argv = ["sample", "--problem", str(problem), "--method", method, "--num-particles", "32"]
    argv += ["--num-steps", "10", "--num-chains", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    with np.load(out) as result:
        assert sorted(result.files) == ["log_evidence", "seconds", "x"]
        assert result["x"].shape == (64, 2)
        assert result["log_evidence"].shape == (2,)
        assert np.all(np.isfinite(result["log_evidence"])) == has_evidence
        assert result["seconds"].shape == () and float(result["seconds"]) > 0
    assert [p.name for p in out.parent.iterdir()] == ["samples.npz"]  # no temporary left


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"y": None}, "missing keys ['y']"),
        ({"A": [[1.0, 2.0, 3.0]]}, "A must have shape"),
        ({"y": [float("nan")]}, "y has NaN"),
    ],
)
def test_sample_rejects_bad_problems(override, message, tmp_path, capsys):
    problem, out = tmp_path / "problem.npz", tmp_path / "samples.npz"
    _write_problem(problem, **override)
    argv = ["sample", "--problem", str(problem), "--method", "tds", "--out", str(out)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
