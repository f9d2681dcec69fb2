"""Block offloading: the DiT's stacked block params kept in host memory and streamed to the device a layer ahead.

With ``offload="blocks"`` (``HeliosPipeline(offload=)``, ``generate --offload blocks``) every leaf under
``blocks`` (the 40 layers' stacked params: 99% of the 14B weights) lives in pinned host memory
(``memory_kind="pinned_host"``) and the layer loop is a scan whose carry holds one layer's params on the
device: while layer i computes, layer i + 1 is copied in (:func:`scan_streamed`). The two have no data
dependency, so XLA issues the copy asynchronously and the GPU's copy engine moves the weights over PCIe
while the SMs run layer i (the compiled H100 plan shows an async dynamic slice from host memory inside the
while loop's body; experiments/plans/lowmem_plan.py; the chunk program compiles with
``sampling.chunk.STREAMED_COMPILER_OPTIONS`` so that all of a layer's copies may run beside its compute). The
device then holds two layers of weights, not 40. The text encoder is offloaded the same way (its 24 layers
streamed by :func:`scan_streamed`, its token embedding read a row per token by :func:`take_rows`;
``helios_jax.models.umt5``); which leaves a model keeps on the host is its ``Hosted`` predicate.

Written by hand because flax's ``nn.scan`` slices the stacked params for the layer it runs and has no hook to
fetch the next layer ahead of it (nor does ``lax.scan``); jax gives the pieces
(memory kinds, ``jax.device_put`` to ``jax.memory.Space.Device`` inside jit) and XLA the overlap.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

BLOCKS = "blocks"
MODES = (None, BLOCKS)
HOST = "pinned_host"
Path = tuple[str, ...]


def check_mode(offload: str | None) -> str | None:
    """``offload`` is None (every weight on the device) or "blocks"."""
    if offload not in MODES:
        raise ValueError(f"offload = {offload!r}: give None (every weight on the device) or {BLOCKS!r} (the DiT's "
                         "blocks in pinned host memory, streamed to the device a layer ahead)")
    return offload


def host_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """``sharding`` in pinned host memory (same devices, same split)."""
    return sharding.with_memory_kind(HOST)


def is_block_leaf(path: Path) -> bool:
    """The DiT's hosted leaves: its stacked blocks."""
    return bool(path) and path[0] == BLOCKS


Hosted = Callable[[Path], bool]  # which leaves of a model's params tree live in host memory when offloaded


def to_host(params: Any, hosted: Hosted = is_block_leaf) -> Any:
    """``params`` with every ``hosted`` leaf (default: the DiT's blocks) moved to pinned host memory (the rest
    stays where it is)."""
    return jax.device_put(params, host_blocks(params, jax.tree.map(lambda leaf: leaf.sharding, params), hosted))


def host_blocks(shapes: Any, shardings: Any | None = None, hosted: Hosted = is_block_leaf) -> Any:
    """Where a params tree of ``shapes`` goes (to load, restore, place or lower it): ``shardings`` (default: the
    first device), with the ``hosted`` leaves (default: the DiT's blocks) in pinned host memory."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes) if shardings is None else shardings

    def place(path: tuple[Any, ...], sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
        return host_sharding(sharding) if hosted(tuple(getattr(k, "key", k) for k in path)) else sharding
    return jax.tree_util.tree_map_with_path(place, shardings)


def leaf_to_host(finish: Callable[[Path, jax.Array], dict[Path, jax.Array]] | None, hosted: Hosted = is_block_leaf
                 ) -> Callable[[Path, jax.Array], dict[Path, jax.Array]]:
    """A loader's per-leaf ``finish`` (``convert.strict.load_params``) that then moves the ``hosted`` leaves to
    pinned host memory, so the device holds one stacked leaf of them at a time while a model loads."""
    def done(path: Path, leaf: jax.Array) -> dict[Path, jax.Array]:
        out = {path: leaf} if finish is None else finish(path, leaf)
        return {p: jax.device_put(v, host_sharding(v.sharding)) if hosted(p) else v for p, v in out.items()}
    return done


def _fetch(stacked: Any, index: jax.Array) -> Any:
    """Layer ``index`` of the stacked params, copied to device memory (inside jit)."""
    return jax.tree.map(lambda a: jax.device_put(jax.lax.dynamic_index_in_dim(a, index, keepdims=False),
                                                 jax.memory.Space.Device), stacked)


def take_rows(table: Any, ids: jax.Array) -> jax.Array:
    """``table[ids]`` for a (rows, width) ``table`` in host memory, each row copied to the device alone (inside
    jit): a token embedding looked up without the table on the device. A loop of dynamic slices, because a gather
    out of host memory is not among the host-memory ops XLA:GPU lowers (a dynamic slice and a copy are)."""
    rows = jax.lax.map(lambda i: jax.device_put(jax.lax.dynamic_index_in_dim(table, i, keepdims=False),
                                                jax.memory.Space.Device), ids.reshape(-1))
    return rows.reshape(*ids.shape, table.shape[-1])


def scan_streamed(step: Callable[[Any, Any, jax.Array], Any], carry: Any, stacked: Any, length: int) -> Any:
    """``carry`` through ``step(carry, layer_params, i)`` for i in 0..length-1, the layers of ``stacked`` (host
    memory) double-buffered: layer i + 1 is fetched while layer i computes. The last step fetches the last layer
    again (length + 1 layer copies per pass, in exchange for one compiled layer body instead of two)."""
    def body(state: tuple[Any, Any], i: jax.Array) -> tuple[tuple[Any, Any], None]:
        carry, current = state
        following = _fetch(stacked, jnp.minimum(i + 1, length - 1))
        return (step(carry, current, i), following), None

    (carry, _), _ = jax.lax.scan(body, (carry, _fetch(stacked, jnp.int32(0))), jnp.arange(length))
    return carry
