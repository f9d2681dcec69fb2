"""Deprecated name of :mod:`helios_jax.training.samples` (training-sample assembly and anti-drifting),
renamed so that it is not confused with :mod:`helios_jax.history` (inference bookkeeping)."""

import warnings

from helios_jax.training.samples import *  # noqa: F401,F403

warnings.warn("helios_jax.training.history is now helios_jax.training.samples", DeprecationWarning, stacklevel=2)
