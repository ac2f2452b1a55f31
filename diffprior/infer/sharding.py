r"""One SMC chain's particles split over devices, on one host or several.

Sharded particles
-----------------
``dp.Sampler(method, num_particles, num_steps, shard_particles=True)`` splits every chain's
particles into equal blocks, one per device of :func:`particle_mesh` (all of ``jax.devices()``),
and runs the kernel's ``init`` and ``step`` on each block inside ``jax.shard_map`` with
``axis_name=PARTICLE_AXIS``. The SMC kernels (TDS, FK, MCGdiff) then compute every
particle-wide quantity over all blocks with collectives (:mod:`diffprior.kernels.smc`): the
normalisation of the weights, the ESS, the log-evidence and the resampling draw are global, and
ancestors are global indices. Each particle draws its noise from its own key, split from the
step's key over all particles (:func:`diffprior.kernels.smc.particle_keys`), so for a given key a
run on ``k`` devices gives the particles, weights and log-evidence of the run on one device, up
to the order of floating-point sums. The final equal-weight resampling runs on the whole,
sharded arrays.

The number of particles must be a multiple of the number of devices. The chains of a sharded run
go side by side on every device (``chain_method="vectorized"``) or one after another
(``"sequential"``).

The cost: a step that resamples gathers the parents of the local particles from every block (an
all-gather of the particles and of what the kernel carries for them, e.g. TDS's
:math:`\hat x_0` and twist gradient; :func:`diffprior.kernels.smc.step` skips it at a step that
keeps its particles, unless chains are batched with ``vmap``), and every device draws the global
resampling and the global keys (``N`` keys and ``N`` uniforms, small next to a network
evaluation per particle).

Several hosts
-------------
JAX's own distributed runtime makes the devices of several processes (one per host, or one per
GPU) one set of global devices; a sharded run then splits the particles over all of them.
Every process runs the same script::

    import jax

    jax.distributed.initialize(
        coordinator_address="10.0.0.1:1234",  # host:port of process 0, reachable by all
        num_processes=2,
        process_id=0,  # 0 .. num_processes - 1, one per process
    )
    import diffprior as dp

    sampler = dp.Sampler(dp.TDS(model), num_particles=65536, num_steps=100,
                         shard_particles=True, progress_bar=False)
    sampler.run(jax.random.key(0), y=y_obs)   # the same key and data in every process

On a GPU cluster under SLURM (or Open MPI, mpi4py, Kubernetes, Cloud TPU)
``jax.distributed.initialize()`` without arguments reads the coordinator, the number of
processes, the process id and, with one process per GPU, each process's GPU from the
environment; elsewhere pass them (and ``local_device_ids`` to give a process only some of its
host's GPUs). ``initialize`` must run before anything else touches JAX, and every process must
build the same sampler (same options: the processes run one compiled program together). With
more than one process the results are replicated onto every device, so each process reads the
whole run (``sampler.get_samples()``, ``sampler.log_evidence``) as on one host; the same key and
data in every process give the same run. On CPUs (to try the set-up on one machine) the
processes exchange their collectives over ``gloo``, JAX's default there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

__all__ = ["PARTICLE_AXIS", "particle_mesh", "check_divisible", "shard_over_particles"]

#: The mesh axis over which the particles are split, and the ``axis_name`` the kernels get.
PARTICLE_AXIS = "particles"


def particle_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-dimensional mesh named :data:`PARTICLE_AXIS` over ``devices`` (default all of
    ``jax.devices()``, every process's with several hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (PARTICLE_AXIS,))


def check_divisible(num_particles: int, mesh: Mesh) -> None:
    """Raise a ValueError unless ``num_particles`` splits into equal blocks over ``mesh``."""
    num_devices = mesh.shape[PARTICLE_AXIS]
    if num_particles % num_devices:
        below = num_particles - num_particles % num_devices
        raise ValueError(
            f"shard_particles=True splits the particles over {num_devices} devices, so "
            f"num_particles must be a multiple of {num_devices}; got {num_particles} (try "
            f"{below or num_devices} or {below + num_devices})"
        )


def shard_over_particles(fn: Callable[..., Any], mesh: Mesh, particle_dim: int = 0) -> Callable:
    """``fn(*args, axis_name=...)`` run on blocks of particles, one per device of ``mesh``.

    Every leaf of the arguments and of the result with more than ``particle_dim`` dimensions
    has the particles on axis ``particle_dim`` and is split along it; the others (keys, scalars
    per chain) are the same on every device. ``fn`` gets ``axis_name=PARTICLE_AXIS`` and must
    return, for such leaves, the same values on every block (what the kernels' collectives
    give). The result's layout is read from ``fn`` run with ``axis_name=None`` (traced only).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> def normalise(x, axis_name=None):
    ...     total = jnp.sum(x) if axis_name is None else jax.lax.psum(jnp.sum(x), axis_name)
    ...     return x / total, total
    >>> x, total = shard_over_particles(normalise, particle_mesh())(jnp.array([1.0, 3, 4, 8]))
    >>> x.tolist(), float(total)
    ([0.0625, 0.1875, 0.25, 0.5], 16.0)
    """

    def spec(leaf) -> PartitionSpec:
        if leaf.ndim > particle_dim:
            return PartitionSpec(*([None] * particle_dim), PARTICLE_AXIS)
        return PartitionSpec()

    def sharded(*args):
        out_shapes = jax.eval_shape(partial(fn, axis_name=None), *args)
        mapped = jax.shard_map(
            partial(fn, axis_name=PARTICLE_AXIS),
            mesh=mesh,
            in_specs=jax.tree.map(spec, args),
            out_specs=jax.tree.map(spec, out_shapes),
        )
        return mapped(*args)

    return sharded
