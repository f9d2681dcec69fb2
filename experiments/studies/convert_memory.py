"""Peak host memory while converting a diffusers transformer checkpoint.

Writes a synthetic sharded bf16 checkpoint (a Helios DiT of the Wan-1.3B width, enough layers to pass
the requested size; random values, diffusers' key names and layouts), then loads it with
``hj.load_transformer`` in a fresh process and reports that process's peak RSS against the size of the
weights. The promise under test: peak = one copy of the weights + one tensor (+ the runtime's baseline).

    python -m experiments.studies.convert_memory --gigabytes 2.2 [--keep DIR] [--no-append]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import tempfile
import time

import numpy as np

from experiments import processes, provenance, reporting

WIDTH = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)
SHARD_BYTES = 512 * 2**20


def write_checkpoint(folder: str, gigabytes: float) -> tuple[dict, int, int]:
    """A sharded bf16 checkpoint of at least ``gigabytes``; returns (config, total bytes, largest tensor bytes)."""
    import ml_dtypes
    from jax import tree_util
    from safetensors.numpy import save_file

    import helios_jax as hj
    from helios_jax.config import to_dict
    from helios_jax.convert.keymap import to_torch_layout
    from helios_jax.models import transformer

    per_layer = sum(math.prod(s.shape) for s in tree_util.tree_leaves(
        transformer.param_shapes(hj.TransformerConfig(**WIDTH, num_layers=1))["blocks"]))
    layers = math.ceil(gigabytes * 2**30 / (2 * per_layer))
    cfg = hj.TransformerConfig(**WIDTH, num_layers=layers)
    keymap = transformer.keymap(cfg)
    rng = np.random.default_rng(0)
    shard, shard_bytes, weight_map, names, total, largest = {}, 0, {}, [], 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"diffusion_pytorch_model-{len(names) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update({key: name for key in shard})
        names.append(name)
        shard, shard_bytes = {}, 0

    for path, spec in tree_util.tree_flatten_with_path(transformer.param_shapes(cfg))[0]:
        path = tuple(p.key for p in path)
        layers_here = [None] if keymap.layer_count(path) is None else range(spec.shape[0])
        shape = spec.shape if layers_here == [None] else spec.shape[1:]
        for layer in layers_here:
            array = rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
            array = np.ascontiguousarray(to_torch_layout(path[-1], array))
            shard[keymap.to_torch(path, layer)] = array
            shard_bytes += array.nbytes
            total += array.nbytes
            largest = max(largest, array.nbytes)
            if shard_bytes >= SHARD_BYTES:
                flush()
    if shard:
        flush()
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "HeliosTransformer3DModel", **to_dict(cfg)}, f)
    return dataclasses.asdict(cfg), total, largest


def _measure(folder: str) -> None:
    """Child process: print baseline and peak RSS (bytes) around one load_transformer."""
    import jax

    import helios_jax as hj

    jax.numpy.zeros(1).block_until_ready()  # start the runtime before taking the baseline
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    _, params = hj.load_transformer(folder)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    print(json.dumps({"baseline": baseline, "peak": peak, "held": held, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.2)
    parser.add_argument("--keep", help="write the checkpoint here instead of a temporary folder")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return _measure(args.measure)

    folder = args.keep or tempfile.mkdtemp(prefix="helios-convert-")
    os.makedirs(folder, exist_ok=True)
    config, total, largest = write_checkpoint(folder, args.gigabytes)
    run = subprocess.run(processes.command("experiments.studies.convert_memory", "--measure", folder), check=True,
                         capture_output=True, text=True, env=processes.environment())
    m = json.loads(run.stdout.strip().splitlines()[-1])
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = [
        ("checkpoint (bf16, sharded)", f"{gib(total)} in {config['num_layers']} layers"),
        ("largest tensor", gib(largest)),
        ("params held after loading", gib(m["held"])),
        ("process baseline RSS", gib(m["baseline"])),
        ("peak RSS while converting", gib(m["peak"])),
        ("peak - baseline", f"{gib(m['peak'] - m['baseline'])} = {(m['peak'] - m['baseline']) / total:.3f} x weights"),
        ("bound: weights + largest tensor", gib(total + largest)),
        ("conversion time", f"{m['seconds']:.1f} s"),
    ]
    table = reporting.markdown_table(("quantity", "value"), rows)
    env = provenance.jax_environment("flax")
    print(provenance.describe(env) + "\n" + table)
    if not args.no_append:
        reporting.append_results("convert_memory: peak host memory while converting", env, table)
    if not args.keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
