"""A compiled TDS run on a two-mode mixture problem, shared by the tests that read SMC results
(summary, health, plots, ArviZ), so that they compile one program between them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import diffprior as dp

#: Settings of the shared run: resampling at every step, so the particles' order follows their
#: genealogy (what a random order of the draws must undo).
SMC_CHAINS, SMC_PARTICLES, SMC_STEPS = 4, 128, 30
#: A noise scale so small that the final weights of this problem collapse (the last step's
#: weights are the exact likelihood of a one-dimensional observation).
SHARP_SIGMA = 1e-4


class MixtureRun:
    """One compiled sampler; ``healthy()`` and ``sharp()`` rerun it (same program, new noise
    scale), so a test must call the one it needs rather than assume the last run."""

    num_chains, num_particles, num_steps = SMC_CHAINS, SMC_PARTICLES, SMC_STEPS

    def __init__(self):
        self.problem = dp.problems.mixture_problem(jax.random.key(0), 2, 1)
        self.sampler = dp.Sampler(
            # the guided proposal: the subspace one stays healthy at the sharp noise scale
            dp.TDS(self.problem.model, ess_threshold=1.0, proposal="guided"),
            num_particles=SMC_PARTICLES,
            num_steps=SMC_STEPS,
            num_chains=SMC_CHAINS,
            progress_bar=False,
        )

    def healthy(self, key: int = 0) -> dp.Sampler:
        problem = self.problem
        self.sampler.run(jax.random.key(key), *problem.model_args, **problem.model_kwargs)
        return self.sampler

    def sharp(self, key: int = 0) -> dp.Sampler:
        problem = self.problem
        self.sampler.run(jax.random.key(key), problem.A, jnp.float32(SHARP_SIGMA), y=problem.y)
        return self.sampler


@pytest.fixture(scope="session")
def mixture_run() -> MixtureRun:
    return MixtureRun()
