"""One chain's particles split over devices (``Sampler(..., shard_particles=True)``): the same
key gives the run of one device, on 4 forced host devices in one process and on two processes
joined by ``jax.distributed``. JAX fixes its devices when it starts, so the sharded runs are
fresh processes (tests/infer/sharded_runs.py); each prints its results as JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import diffprior as dp
from diffprior.infer import sharding

SCRIPT = Path(__file__).with_name("sharded_runs.py")
ROOT = Path(__file__).resolve().parents[2]
#: Float tolerance: the blocks sum the weights in another order than the whole set does, and
#: XLA compiles the two programs differently; ten steps amplify the rounding to ~1e-5.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


#: The runs are only compared with each other: XLA's cheapest code generation halves their
#: compile time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _environment(num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["DIFFPRIOR_NO_COMPILE_CACHE"] = "1"
    return env


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _assert_same_run(one_device: dict, sharded: dict) -> None:
    for name in ("samples", "particles", "log_weights", "log_evidence"):
        np.testing.assert_allclose(
            np.asarray(sharded[name]), np.asarray(one_device[name]), err_msg=name, **TOLERANCE
        )


@pytest.fixture(scope="module")
def four_devices() -> dict:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "devices"],
        env=_environment(4),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return _last_json(completed.stdout)


@pytest.mark.parametrize("method", ["FK", "MCGdiff"])
def test_sharded_particles_give_the_one_device_run(four_devices, method):
    assert four_devices["device_count"] == 4
    runs = four_devices[method]
    sharded = runs["sharded"]
    # the particles were split: 4 devices, each holding a quarter of every chain's particles
    assert sharded["num_devices"] == 4
    num_chains, num_particles, dim = np.asarray(sharded["particles"]).shape
    assert sharded["block_shape"] == [num_chains, num_particles // 4, dim]
    assert runs["one_device"]["num_devices"] == 1
    _assert_same_run(runs["one_device"], sharded)
    assert np.all(np.isfinite(sharded["log_evidence"]))


def test_indivisible_particles_raise_on_four_devices(four_devices):
    message = four_devices["indivisible_error"]
    assert "multiple of 4" in message and "66" in message


def test_check_divisible_names_the_numbers():
    mesh = jax.sharding.AbstractMesh((4,), (sharding.PARTICLE_AXIS,))
    sharding.check_divisible(64, mesh)
    with pytest.raises(ValueError, match="multiple of 4; got 66 .try 64 or 68"):
        sharding.check_divisible(66, mesh)


def _model():
    """A stand-in: the Sampler reads the model only when it runs."""


def test_shard_particles_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="moves its particles independently"):
        dp.Sampler(dp.DPS(_model), 8, 2, shard_particles=True)
    with pytest.raises(ValueError, match="chain_method='vectorized' or 'sequential'"):
        dp.Sampler(dp.TDS(_model), 8, 2, chain_method="parallel", shard_particles=True)
    with pytest.raises(TypeError, match="shard_particles must be True or False"):
        dp.Sampler(dp.TDS(_model), 8, 2, shard_particles=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_run_one_sharded_chain(four_devices):
    port, num_processes = _free_port(), 2
    workers = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "process", str(index), str(num_processes), str(port)],
            env=_environment(2),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(num_processes)
    ]
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=600)
            assert worker.returncode == 0, stderr[-3000:]
            outputs.append(_last_json(stdout))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    first, second = outputs
    assert [first["process_index"], second["process_index"]] == [0, 1]
    assert first["device_count"] == 4 and first["local_device_count"] == 2
    # one chain over both processes' devices, and each process reads the whole run: the run
    # of one device in one process
    assert first["sharded"]["num_devices"] == 4
    _assert_same_run(first["sharded"], second["sharded"])
    _assert_same_run(four_devices["FK"]["one_device"], first["sharded"])
