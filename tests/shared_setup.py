"""Plain helpers shared by tests in several folders (imported by name: ``from shared_setup
import SCHEDULES``); fixtures stay in ``conftest.py``. Not a conftest so that the name is unique:
each folder's ``conftest.py`` is imported as the module ``conftest``, and the last one wins."""

from __future__ import annotations

import warnings

import numpy as np

import diffprior as dp


def _discrete_vp():
    # the DDPM table is built in float64 where JAX allows it; without x64 JAX warns and uses
    # float32, which the tolerances below allow for
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dp.schedules.VP.linear(discrete=True)


#: Every schedule the package ships, with the settings of the papers that introduced them.
SCHEDULES = {
    "vp_linear": lambda: dp.schedules.VP.linear(),
    "vp_discrete": _discrete_vp,
    "vp_cosine": lambda: dp.schedules.VP.cosine(),
    "ve": lambda: dp.schedules.VE(0.01, 50.0),
    "edm": lambda: dp.schedules.EDM(0.002, 80.0, 7.0),
}
VP_SCHEDULES = ("vp_linear", "vp_discrete", "vp_cosine")


def grid_mixture_params(dim: int):
    """Four well separated components on a 2-d grid (means 4 apart, scales <= 0.8) embedded in
    ``dim`` dimensions, with unequal weights and unequal scales."""
    means = np.zeros((4, dim), np.float32)
    means[:, 0] = [-2.0, 2.0, -2.0, 2.0]
    means[:, 1] = [-2.0, -2.0, 2.0, 2.0]
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    scales = np.array([0.5, 0.7, 0.6, 0.8], np.float32)
    return means, weights, scales


def run_whole_and_split(algorithm, particles, rng_key, num_steps: int, num_blocks: int = 2):
    """Final states of an SMC kernel run ``num_steps`` steps on all ``particles``, and on
    ``num_blocks`` blocks of them mapped with the axis name ``"particles"`` (``jax.vmap``, as
    ``shard_map`` maps them over devices), every block given the same keys. The split state's
    per-particle fields are joined back to ``(N, ...)``."""
    import jax

    def run(x, axis_name=None):
        def step(state, key):
            return algorithm.step(key, state, axis_name=axis_name)[0], None

        state = algorithm.init(x, axis_name=axis_name)
        return jax.lax.scan(step, state, jax.random.split(rng_key, num_steps))[0]

    whole = jax.jit(run)(particles)
    blocks = particles.reshape((num_blocks, -1) + particles.shape[1:])
    split = jax.jit(jax.vmap(lambda x: run(x, "particles"), axis_name="particles"))(blocks)

    def join(leaf):
        # per-particle fields come back (blocks, N / blocks, ...); per-chain ones (blocks,)
        return leaf.reshape((-1,) + leaf.shape[2:]) if leaf.ndim > 1 else leaf[0]

    return whole, jax.tree.map(join, split)
