"""Array-typing aliases used across diffprior, documented once."""

from typing import Any, TypeAlias

import jax
import numpy as np

#: A JAX array.
Array: TypeAlias = jax.Array
#: Anything :func:`jax.numpy.asarray` accepts: JAX or NumPy arrays and Python scalars.
ArrayLike: TypeAlias = jax.Array | np.ndarray | np.generic | float | int
#: A JAX PRNG key (new-style ``jax.random.key`` or legacy ``PRNGKey``).
PRNGKey: TypeAlias = jax.Array
#: A pytree of arrays.
ArrayTree: TypeAlias = Any
