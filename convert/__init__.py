"""Checkpoint conversion: reading diffusers / transformers weights into flax params, and saving them.

See :mod:`helios_jax.convert.keymap` for the naming rule shared by all models.
"""

from helios_jax.convert.export import export_safetensors
from helios_jax.convert.keymap import KeyMap
from helios_jax.convert.orbax_io import is_saved_params, restore_params, save_params, saved_config, saved_shapes
from helios_jax.convert.sources import CheckpointError, TensorSource, open_source
from helios_jax.convert.strict import CheckpointMismatchError, dtype_policy, load_params, plan_conversion

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "KeyMap",
    "TensorSource",
    "dtype_policy",
    "export_safetensors",
    "is_saved_params",
    "load_params",
    "open_source",
    "plan_conversion",
    "restore_params",
    "save_params",
    "saved_config",
    "saved_shapes",
]
