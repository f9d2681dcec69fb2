"""The ``helios-jax`` command: ``generate``, ``convert``, ``verify`` and ``bench``.

Errors a user can cause (a bad flag value, a missing file, a checkpoint that does not fit) print one
line and exit with status 2; Ctrl-C exits with 130 and leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from helios_jax import generate
from helios_jax.config import ConfigError
from helios_jax.convert import CheckpointError, export_safetensors, save_params
from helios_jax.loading import COMPONENTS, component_of
from helios_jax.models.lora import apply_loaded, load_lora
from helios_jax.pipeline import COMPONENTS as PIPELINE_FOLDERS, PipelineError
from helios_jax.video import MediaError

USER_ERRORS = (PipelineError, MediaError, ConfigError, CheckpointError, FileNotFoundError, FileExistsError,
               PermissionError)
BENCHMARKS = {
    "attention": "bench_attention.py",
    "dit": "bench_dit.py",
    "reference": "bench_reference.py",
    "vae": "bench_vae.py",
    "compile": "compile_study.py",
    "convert": "convert_memory.py",
}


def convert(source: str, destination: str, to: str, dtype: str | None, merge_lora: str | None = None) -> int:
    """A component folder, or a whole pipeline folder, to orbax params or back to diffusers safetensors;
    ``merge_lora`` fuses a LoRA folder into the transformer (as the official merge tool does)."""
    jax_dtype = generate.DTYPES[dtype] if dtype else None
    pipeline = os.path.isfile(os.path.join(source, "model_index.json"))
    lora = _read_lora(os.path.join(source, "transformer") if pipeline else source, merge_lora) if merge_lora else None
    if pipeline:
        if os.path.exists(destination):
            raise FileExistsError(f"{destination} already exists; choose a new folder")
        staging = destination.rstrip("/") + ".partial"
        os.makedirs(staging)
        try:
            for name in PIPELINE_FOLDERS:
                src = os.path.join(source, name)
                if name in COMPONENTS:
                    _convert_component(src, os.path.join(staging, name), to, jax_dtype, lora)
                else:
                    shutil.copytree(src, os.path.join(staging, name))
            shutil.copy(os.path.join(source, "model_index.json"), staging)
            os.rename(staging, destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    else:
        _convert_component(source, destination, to, jax_dtype, lora)
    print(f"wrote {destination} ({to}{', LoRA fused' if lora else ''})")
    return 0


def _read_lora(transformer_folder: str, path: str):
    """The LoRA checked against the transformer's config, before any weight is read."""
    if component_of(transformer_folder).folder != "transformer":
        raise PipelineError(f"--merge-lora needs a transformer (or whole checkpoint) folder; {transformer_folder} is not one")
    return load_lora(path, COMPONENTS["transformer"].read_config(transformer_folder))


def _convert_component(source: str, destination: str, to: str, dtype, lora=None) -> None:
    component = component_of(source)
    config, params = component.load(source, dtype)
    if lora is not None and component.folder == "transformer":
        params = apply_loaded(params, lora)
    if to == "orbax":
        save_params(destination, params, config=component.config_json(config))
    else:
        export_safetensors(destination, params, component.module.keymap(config), component.config_json(config),
                           weights_name=component.weights_name)


def bench(which: list[str], extra: list[str]) -> int:
    """Run benchmark scripts from the source checkout's experiments/ folder."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no experiments/ folder at {folder}: `bench` runs from a source checkout")
    status = 0
    for name in which or list(BENCHMARKS):
        script = os.path.join(folder, BENCHMARKS[name])
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        status |= subprocess.call([sys.executable, script, *extra])
    return status


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="helios-jax", description="Helios video generation in JAX")
    commands = root.add_subparsers(dest="command", required=True)
    generate.add_arguments(commands.add_parser("generate", help="generate a video (mp4 + contact sheet)"))
    conv = commands.add_parser("convert", help="diffusers folder -> orbax params, or back to safetensors")
    conv.add_argument("source", help="a component folder (transformer/, vae/, text_encoder/) or a whole checkpoint")
    conv.add_argument("destination", help="a new folder")
    conv.add_argument("--to", choices=("orbax", "safetensors"), default="orbax")
    conv.add_argument("--dtype", choices=tuple(generate.DTYPES), help="cast the weights (default: keep)")
    conv.add_argument("--merge-lora", dest="merge_lora", metavar="LORA_DIR",
                      help="fuse this LoRA (diffusers' pytorch_lora_weights.safetensors) into the transformer")
    ver = commands.add_parser("verify", help="parity of every component against the installed PyTorch reference")
    ver.add_argument("--only", nargs="+", default=[], help="check only these components")
    ben = commands.add_parser("bench", help="run the benchmarks in experiments/ (needs a source checkout)")
    ben.add_argument("which", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    ben.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="passed to each script")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate.run(args)
        if args.command == "convert":
            return convert(args.source, args.destination, args.to, args.dtype, args.merge_lora)
        if args.command == "verify":
            from helios_jax import verify

            return verify.run(tuple(args.only))
        return bench(args.which, args.args)
    except USER_ERRORS as err:
        print(f"helios-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"helios-jax {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
