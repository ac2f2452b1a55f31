"""The ``diffprior`` command: help, version, sub-command registration and exit statuses."""

import os
import subprocess
import sys

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


# A sub-command that gets implemented moves from here to its own test module.
@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["sample", "--problem", "problem.npz", "--method", "tds", "--out", "samples.npz"],
        ["benchmark"],
    ],
)
def test_unavailable_subcommand_says_so(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == cli.EXIT_NOT_AVAILABLE
    err = capsys.readouterr().err
    assert f"diffprior {argv[0]}: not available" in err
    assert list(tmp_path.iterdir()) == []  # wrote nothing


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
