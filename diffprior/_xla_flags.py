"""A guard against wrong results from XLA's YNNPACK dot fusions on CPU.

With jaxlib 0.12, XLA on CPU hands some dot fusions to YNNPACK. Those programs return wrong
values now and then, from one call to the next of the same compiled program on the same
inputs: the exact Gaussian-mixture denoiser, jitted over 512 particles with its arrays closed
over, disagreed with a float64 reference by up to 15 (on values of order 10) in 1 to 7 of 30
calls, and ``calibrate`` gave a different residual variance on every call. Nothing raised and
nothing was NaN. With these fusions turned off (``--xla_cpu_experimental_ynn_fusion_type=``,
an empty list of fusion kinds) the same programs agreed with the reference in every call
(``tests/test_xla_flags.py``).

XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU backend (at the first computation, not at
``import jax``), so :func:`apply` adds the flag to the environment when diffprior is imported,
unless the user's ``XLA_FLAGS`` already sets it, the installed jaxlib does not know it (XLA
stops the process on an unknown flag), or ``DIFFPRIOR_KEEP_XLA_FLAGS`` is set. When the CPU
backend was started before diffprior was imported, the flag can no longer take effect and
:func:`apply` warns instead.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

__all__ = ["APPLIED", "FLAG", "apply", "flag_known", "in_effect"]

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_NAME = FLAG.lstrip("-").rstrip("=")


def flag_known() -> bool:
    """Whether the installed jaxlib's XLA defines the flag (its name is in the library)."""
    try:
        import jaxlib
    except ImportError:
        return False
    for path in Path(jaxlib.__file__).parent.glob("*.so"):
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(_NAME.encode()) >= 0:
                    return True
        except (OSError, ValueError):  # unreadable, or empty (mmap of 0 bytes)
            continue
    return False


def in_effect(flags: str | None = None) -> bool:
    """Whether ``flags`` (default: ``$XLA_FLAGS``) already set the YNNPACK fusion kinds."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    return _NAME in flags


def _cpu_backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a jax without the module: assume not started
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def apply() -> bool:
    """Add :data:`FLAG` to ``XLA_FLAGS`` where it can take effect; return whether it is set.

    Warns (``RuntimeWarning``) when JAX's backends were started before this call with the
    YNNPACK fusions on, since compiled programs on CPU may then return wrong values.
    """
    if os.environ.get("DIFFPRIOR_KEEP_XLA_FLAGS", "") not in ("", "0"):
        return in_effect()
    if in_effect():
        return True
    if not flag_known():
        return False
    if _cpu_backend_started():
        warnings.warn(
            "diffprior was imported after JAX started its backends, so it could not turn off "
            "XLA's YNNPACK dot fusions on CPU, which return wrong values intermittently in "
            "this jaxlib. Import diffprior before running any JAX computation, or start Python "
            f"with XLA_FLAGS={FLAG}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), FLAG]))
    return True


APPLIED = apply()
