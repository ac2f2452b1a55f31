"""benchmarks/gpu.sh, the GPU throughput script, run on the CPU with ``--tiny``: the table it
writes has a row per cell with finite timings, skipped cells and a stopped run are marked."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    """benchmarks/gpu.py, imported from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


COLUMNS = _gpu_module().COLUMNS
MIXTURE = "mixture d=800, dy=2"
DIGITS = "digits inpaint (8x8 U-Net)"


def run_script(out: Path, *options: str, timeout: float = 600, **env: str):
    """``bash benchmarks/gpu.sh --tiny OPTIONS`` with ``OUT=out`` on the CPU: the completed
    process and the table's rows as dicts keyed by column."""
    environment = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # a tiny run's time is all compilation: the timings are not what is tested
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        **env,
    }
    process = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", *options],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    table = out / "gpu.md"
    text = table.read_text() if table.exists() else ""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| method "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), line
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return process, text, rows


def find(rows, method, problem):
    matches = [row for row in rows if row["method"] == method and row["problem"] == problem]
    assert len(matches) == 1, (method, problem, rows)
    return matches[0]


def check_timed(row, particles, steps=3):
    """A sampler cell that ran: positive finite timings, consistent throughput."""
    assert "error" not in row["notes"] and "NON-FINITE" not in row["notes"], row
    assert int(row["particles"]) == particles and int(row["steps"]) == steps
    numbers = {
        name: float(row[name])
        for name in (
            "first run s (compile)",
            "seconds (median)",
            "particle-steps/s",
            "run() wall s",
            "value-and-grad s",
            "ratio (step / value-and-grad)",
        )
    }
    assert all(math.isfinite(v) and v > 0 for v in numbers.values()), row
    assert int(row["runs"]) >= 1
    seconds = numbers["seconds (median)"]
    assert numbers["particle-steps/s"] == pytest.approx(particles * steps / seconds, rel=2e-3)
    ratio = seconds / steps / numbers["value-and-grad s"]
    assert numbers["ratio (step / value-and-grad)"] == pytest.approx(ratio, rel=2e-3)
    # the compiled run is part of the whole run() call, which is part of nothing faster
    assert seconds <= numbers["run() wall s"] * 1.001


def test_tiny_mixture_run_writes_a_timed_row_per_cell(tmp_path):
    process, text, rows = run_script(tmp_path, "--problems", "mixture", "--no-sharded")
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert [(row["method"], row["problem"]) for row in rows] == [
        ("value-and-grad", MIXTURE),
        ("TDS", MIXTURE),
        ("MCGdiff", MIXTURE),
    ]
    reference = float(find(rows, "value-and-grad", MIXTURE)["seconds (median)"])
    assert math.isfinite(reference) and reference > 0
    for method in ("TDS", "MCGdiff"):
        row = find(rows, method, MIXTURE)
        check_timed(row, particles=64)
        assert float(row["value-and-grad s"]) == pytest.approx(reference, rel=2e-3)
    assert "Finished: every cell ran or is marked." in text
    assert "Command: `bash benchmarks/gpu.sh --tiny --problems mixture --no-sharded`" in text
    log = (tmp_path / "gpu.log").read_text()
    assert "devices" in log and "TDS" in log


def test_cells_past_the_budget_are_marked_skipped(tmp_path):
    process, text, rows = run_script(tmp_path, "--budget", "0", timeout=120)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    for problem, particles in ((MIXTURE, "64"), (DIGITS, "128")):
        for method in ("TDS", "MCGdiff"):
            row = find(rows, method, problem)
            assert row["particles"] == particles
            assert row["notes"].startswith("skipped (budget"), row
            assert row["seconds (median)"] == ""
    sharded = [row for row in rows if row["method"] == "TDS (sharded)"]
    assert {row["problem"] for row in sharded} == {MIXTURE, DIGITS}
    assert all(row["notes"].startswith(("skipped (budget", "not available")) for row in sharded), (
        sharded
    )
    assert not any(row["method"] == "value-and-grad" for row in rows)  # nothing was computed
    assert "Finished" in text


def test_a_run_stopped_by_the_time_limit_says_so(tmp_path):
    process, text, _ = run_script(tmp_path, timeout=120, GPU_TIME_LIMIT="1")
    assert process.returncode == 124
    assert "Stopped after 1 s (GPU_TIME_LIMIT)" in text
    assert "Finished" not in text
