"""BlackJAX-style kernels, one module per algorithm.

Each module has a ``State`` and an ``Info`` (documented NamedTuples), ``init``,
``build_kernel`` and ``as_top_level_api``, which returns a
``blackjax.base.SamplingAlgorithm(init, step)``. :mod:`diffprior.kernels.base` holds what every
kernel shares: the kernel protocol (the State fields ``particles`` and ``step``, plus
``log_weights`` and ``log_evidence`` for SMC; the per-step Info fields ``num_nonfinite``, plus
``ess``, ``resampled``, ``log_evidence_increment`` and ``degenerate`` for SMC), the particle
state and builder of the kernels that move each particle on its own, and the one rule for
non-finite proposals. :mod:`diffprior.kernels.smc` holds the one SMC step and the
particle-wide reductions shared by the SMC kernels.
"""

from diffprior.kernels import (
    base,
    diffpir,
    dps,
    fk,
    guidance,
    mcgdiff,
    pigdm,
    resample,
    smc,
    tds,
    unguided,
)

__all__ = [
    "base",
    "diffpir",
    "dps",
    "fk",
    "guidance",
    "mcgdiff",
    "pigdm",
    "resample",
    "smc",
    "tds",
    "unguided",
]
