"""BlackJAX-style kernels, one module per algorithm; :mod:`diffprior.kernels.smc` holds the
particle bookkeeping shared by the SMC kernels."""

from diffprior.kernels import dps, fk, guidance, smc, tds, unguided

__all__ = ["dps", "fk", "guidance", "smc", "tds", "unguided"]
