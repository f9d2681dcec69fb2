"""Running Helios on many devices with ``jax.sharding``: one mesh, sharding rules per model, context parallelism.

``make_mesh(data=, fsdp=, context=, tensor=)`` builds the mesh; ``shard_params(tree, mesh, DIT_RULES)``
places a params (or LoRA, or optimizer-state) tree on it; ``HeliosPipeline.from_pretrained(folder,
mesh=mesh)`` generates on it. ``initialize()`` joins a run of several processes (hosts).
"""

from helios_jax.parallel.distributed import initialize
from helios_jax.parallel.mesh import AXES, MeshError, axis_size, check_mesh, format_mesh, make_mesh, parse_mesh
from helios_jax.parallel.rules import (
    AXIS_RULES,
    DISCRIMINATOR_RULES,
    DIT_RULES,
    LORA_RULES,
    TABLES,
    UMT5_RULES,
    VAE_RULES,
    batch_sharding,
    logical_specs,
    replicated,
    shard_params,
    shardings,
    to_mesh,
)

__all__ = [
    "AXES", "AXIS_RULES", "axis_size", "DISCRIMINATOR_RULES", "DIT_RULES", "LORA_RULES", "MeshError", "TABLES",
    "UMT5_RULES", "VAE_RULES",
    "check_mesh", "format_mesh", "logical_specs", "make_mesh", "parse_mesh", "replicated", "shard_params",
    "shardings", "batch_sharding", "initialize", "to_mesh",
]
