"""BlackJAX-style kernels, one module per algorithm; :mod:`diffprior.kernels.smc` holds the
particle bookkeeping shared by the SMC kernels."""

from diffprior.kernels import (
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
