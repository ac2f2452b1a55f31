"""Sharded runs for tests/infer/test_sharded.py, each in a fresh process (JAX fixes its devices
when it starts). Prints one JSON line, the last of its output.

    python tests/infer/sharded_runs.py devices
        With XLA_FLAGS=--xla_force_host_platform_device_count=4: FK and MCGdiff with the
        particles split over the 4 devices and on one device, same key.
    python tests/infer/sharded_runs.py process PROCESS_ID NUM_PROCESSES PORT
        One of NUM_PROCESSES processes joined by jax.distributed on 127.0.0.1:PORT: the FK run
        of ``devices``, sharded over every process's devices.
"""

from __future__ import annotations

import json
import sys

#: One small problem and run for every check: a 25-component mixture in 8 dimensions.
DIM, OBS_DIM, NUM_PARTICLES, NUM_STEPS = 8, 2, 64, 10
#: One chain runs unbatched (lax.map) and two side by side (vmap): both paths are checked.
NUM_CHAINS = {"FK": 1, "MCGdiff": 2}


def problem():
    import jax

    import diffprior as dp

    return dp.problems.mixture_problem(jax.random.key(0), DIM, OBS_DIM)


def methods() -> dict:
    """The methods checked, by name: one per SMC kernel module (FK with the difference
    potential and the guided proposal is TDS's guided kernel)."""
    import diffprior as dp

    def fk(model):
        return dp.FK(model, potential="difference", proposal="guided")

    return {"FK": fk, "MCGdiff": dp.MCGdiff}


def run(method: str, shard_particles: bool, num_particles: int = NUM_PARTICLES) -> dict:
    """One run of ``method`` on :func:`problem` with key 1: what the test compares."""
    import jax
    import numpy as np

    import diffprior as dp

    mixture = problem()
    sampler = dp.Sampler(
        methods()[method](mixture.model),
        num_particles=num_particles,
        num_steps=NUM_STEPS,
        num_chains=NUM_CHAINS[method],
        shard_particles=shard_particles,
        progress_bar=False,
    )
    sampler.run(jax.random.key(1), *mixture.model_args, **mixture.model_kwargs)
    result = sampler._result
    particles = result["particles"]
    return {
        "samples": np.asarray(sampler.get_samples(group_by_chain=True)["x"]).tolist(),
        "particles": np.asarray(particles).tolist(),
        "log_weights": np.asarray(result["log_weights"]).tolist(),
        "log_evidence": np.asarray(sampler.log_evidence).tolist(),
        "exact_log_evidence": float(mixture.log_evidence),
        # where the particles were: how many devices, and one device's block
        "num_devices": len(particles.sharding.device_set),
        "block_shape": list(particles.addressable_shards[0].data.shape),
    }


def devices() -> dict:
    import jax

    out = {"device_count": jax.device_count()}
    for method in methods():
        out[method] = {"one_device": run(method, False), "sharded": run(method, True)}
    try:
        run("FK", True, num_particles=NUM_PARTICLES + 2)
    except ValueError as error:
        out["indivisible_error"] = str(error)
    return out


def process(process_id: int, num_processes: int, port: int) -> dict:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    out = {
        "process_index": jax.process_index(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "sharded": run("FK", True),
    }
    jax.distributed.shutdown()
    return out


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    result = devices() if mode == "devices" else process(*map(int, rest))
    print(json.dumps(result))
