"""The ``diffprior`` command: help, version, sub-command registration and exit statuses."""

import json
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
    rows_file = tmp_path / "digits.rows.jsonl"
    assert [json.loads(line)["digit"] for line in rows_file.read_text().splitlines()] == [0, 1]

    # resuming runs only what is missing (the third digit); a torn last line is dropped
    rows_file.write_text(rows_file.read_text() + '{"method": "mcg')
    argv[argv.index("--num-digits") + 1] = "3"
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    lines = rows_file.read_text().splitlines()
    assert [json.loads(line)["digit"] for line in lines] == [0, 1, 2]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| superres"))
    assert row.split("|")[3].strip() == "3"

    # rows made with other settings are not mixed in
    argv[argv.index("--num-steps") + 1] = "5"
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 2
    assert "holds rows made with" in capsys.readouterr().err

    # nor rows made with another calibration of the prior (rows from before it was recorded)
    argv[argv.index("--num-steps") + 1] = "4"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert {r["calibration_inflation"] for r in rows} == {3.0}  # the shipped digits prior's
    for r in rows:
        del r["calibration_inflation"]
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 2
    assert "another calibration of the shipped prior" in capsys.readouterr().err


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


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if a sampler is even built: bad input must be found before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a sampler was built for bad input")

    monkeypatch.setattr(diffprior, "Sampler", refuse)


def _usage_error(argv, capsys) -> str:
    """Run the command; check it fails as argparse does (status 2, one line on stderr, no
    traceback) and return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("diffprior: error: ") and err.count("\n") == 1, err
    return err


CONTENTS = "means (m, d), weights (m,), scale (), A (dy, d), sigma_y (), y (dy,)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"y": None}, "missing keys ['y']"),
        ({"A": [[1.0, 2.0, 3.0]]}, "A must have shape (dy, d) = (1, 2)"),
        ({"A": [1.0, 2.0]}, "A must have shape (dy, d) = (dy, 2)"),
        ({"means": [1.0, 2.0]}, "means must have shape (m, d), got (2,)"),
        ({"weights": [1.0]}, "weights must have shape (m,) = (2,)"),
        ({"y": [float("nan")]}, "y has NaN"),
        ({"means": [[np.inf, 0.0], [1.0, 0.0]]}, "means has NaN or inf entries (1 of 4"),
        ({"sigma_y": -0.5}, "sigma_y must be > 0, got -0.5"),
        ({"sigma_y": 0.0}, "sigma_y must be > 0, got 0.0"),
        ({"sigma_y": np.nan}, "sigma_y has NaN"),
        ({"scale": -1.0}, "scale must be > 0, got -1.0"),
        ({"weights": [0.5, -0.5]}, "weights must be >= 0, not all 0, got [0.5, -0.5]"),
        ({"weights": [0.0, 0.0]}, "weights must be >= 0, not all 0"),
        ({"sigma_y": "0.5"}, "sigma_y must hold real numbers, shape (); got an array of dtype <U3"),
        ({"y": [1j]}, "y must hold real numbers, shape (dy,); got an array of dtype complex128"),
        ({"A": [[True, False]]}, "A must hold real numbers, shape (dy, d); got an array of dtype"),
        ({"means": np.array([[1.0, "a"]], object)}, "cannot read means (ValueError: Object arrays"),
    ],
)
def test_sample_rejects_bad_problems(override, message, tmp_path, capsys, no_sampling):
    problem, out = tmp_path / "problem.npz", tmp_path / "samples.npz"
    _write_problem(problem, **override)
    argv = ["sample", "--problem", str(problem), "--method", "tds", "--out", str(out)]
    err = _usage_error(argv, capsys)
    assert f"--problem {problem}: " in err
    assert message in err
    assert not out.exists()


def _pickled(path):
    import pickle

    path.write_bytes(pickle.dumps({"means": np.zeros((1, 2))}))


def _truncated(path):
    _write_problem(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_member(path):
    _write_problem(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"\x93NUMPY")  # the first array's header, inside the zip
    data[start : start + 64] = b"x" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("means = [[0, 1]]\n"), "not an .npz archive (no zip header"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(256)), "not an .npz archive"),
        (lambda p: p.write_bytes(b""), "not an .npz archive"),
        (_pickled, "not an .npz archive (no zip header"),
        (_truncated, "not a readable .npz archive (BadZipFile"),
        (_corrupt_member, "cannot read means"),
        (lambda p: np.save(p.open("wb"), np.zeros((2, 2))), "holds a single array (a .npy file)"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: None, "no such file"),
    ],
    ids=["text", "random", "empty", "pickle", "truncated", "corrupt", "npy", "folder", "missing"],
)
def test_sample_says_what_a_problem_file_holds(make, message, tmp_path, capsys, no_sampling):
    problem, out = tmp_path / "problem.npz", tmp_path / "samples.npz"
    make(problem)
    argv = ["sample", "--problem", str(problem), "--method", "tds", "--out", str(out)]
    err = _usage_error(argv, capsys)
    assert message in err
    if message != "cannot read means":
        assert CONTENTS in err  # what the file should hold
    assert "allow_pickle=True" not in err  # never a hint to unpickle a data file
    assert not out.exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("folder", "is a directory; expected the path of a file to write"),
        ("file/samples.npz", "which is a file, not a directory"),
        ("locked/samples.npz", "no write permission in directory"),
    ],
)
def test_sample_checks_the_output_path_before_sampling(
    out, message, tmp_path, capsys, monkeypatch, no_sampling
):
    import os

    problem = tmp_path / "problem.npz"
    _write_problem(problem)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # permission bits do not bind the superuser: refuse through os.access for this folder
    monkeypatch.setattr(
        os, "access", lambda p, mode: str(p) != str(locked) and real_access(p, mode)
    )
    argv = ["sample", "--problem", str(problem), "--method", "tds", "--out", str(tmp_path / out)]
    err = _usage_error(argv, capsys)
    assert f"--out {tmp_path / out}" in err and message in err
    assert sorted(p.name for p in locked.iterdir()) == []


def test_the_command_prints_no_traceback_for_a_bad_file(tmp_path):
    problem = tmp_path / "problem.npz"
    problem.write_text("not numbers")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = ["sample", "--problem", str(problem), "--method", "tds", "--out", str(tmp_path / "o")]
    result = subprocess.run(
        [sys.executable, "-m", "diffprior", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("diffprior: error: --problem ")
    assert "Traceback" not in result.stderr
