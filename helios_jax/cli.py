"""The ``helios-jax`` command: ``generate``, ``convert``, ``verify``, ``offload``, ``bench`` and ``train``.

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
from helios_jax.checkpoint import COMPONENTS as PIPELINE_FOLDERS, PipelineError
from helios_jax.config import ConfigError
from helios_jax.convert import CheckpointError, export_safetensors, save_params
from helios_jax.loading import COMPONENTS, component_of
from helios_jax.models.lora import apply_loaded, load_lora
from helios_jax.training import DataError
from helios_jax.video import MediaError

USER_ERRORS = (PipelineError, MediaError, ConfigError, CheckpointError, FileNotFoundError, FileExistsError,
               PermissionError, DataError)
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


def train(arguments: list[str]) -> int:
    """Check an official training config (YAML files merged in order, then ``section.key=value``
    overrides) and the folders it names, before any compute."""
    from helios_jax.training import recipes

    files = [a for a in arguments if "=" not in a]
    if not files:
        raise ConfigError("helios-jax train needs a training YAML, e.g. stage_1_init.yaml "
                          "data_config.instance_data_root=[data/]")
    recipe = recipes.load(files, [a for a in arguments if "=" in a])
    recipes.check_paths(recipe)
    run = recipe.run()
    print(f"{' + '.join(files)}: {recipe.stage}, {run.max_train_steps} steps into {run.output_dir}")
    # Wiring the stage's grain dataset (training.data) and loss (training.losses) into trainer.train is next.
    raise ConfigError(f"{recipe.stage}: the config and its folders are valid, but running it from the command "
                      f"line is not wired yet; use helios_jax.training.trainer.train from Python")


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
    off = commands.add_parser("offload", help="videos + metadata JSON -> per-clip training latents (safetensors)")
    off.add_argument("metadata", help="the official metadata JSON (path, cut, crop, cap; paths relative to it)")
    off.add_argument("--checkpoint", required=True, help="a diffusers Helios checkpoint (its vae/, text_encoder/)")
    off.add_argument("--output", required=True, help="the folder for the latent files")
    off.add_argument("--height", type=int, default=384)
    off.add_argument("--width", type=int, default=640)
    off.add_argument("--seed", type=int, default=42, help="clip start frames and posterior samples")
    off.add_argument("--min-frames", type=int, default=121, help="shortest clip (the official loaders' 121)")
    off.add_argument("--skip-unfit", action="store_true", help="skip short or off-aspect clips instead of failing")
    ben = commands.add_parser("bench", help="run the benchmarks in experiments/ (needs a source checkout)")
    ben.add_argument("which", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    ben.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="passed to each script")
    tra = commands.add_parser("train", help="train from the official training YAMLs (stages 1 and 2)")
    tra.add_argument("config", nargs="+", help="YAML files (merged in order) and section.key=value overrides")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate.run(args)
        if args.command == "convert":
            return convert(args.source, args.destination, args.to, args.dtype, args.merge_lora)
        if args.command == "offload":
            from helios_jax.training.offload import offload

            files = offload(args.metadata, args.checkpoint, args.output, height=args.height, width=args.width,
                            seed=args.seed, min_frames=args.min_frames, skip_unfit=args.skip_unfit)
            print(f"wrote {len(files)} clip file(s) to {args.output}")
            return 0
        if args.command == "verify":
            from helios_jax import verify

            return verify.run(tuple(args.only))
        if args.command == "train":
            return train(args.config)
        return bench(args.which, args.args)
    except USER_ERRORS as err:
        print(f"helios-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"helios-jax {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
