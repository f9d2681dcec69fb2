"""The ``helios-jax`` command: ``generate``, ``download``, ``convert``, ``verify``, ``offload``, ``bench``, ``train``,
``train-vae``, ``eval`` and ``serve``.

Errors a user can cause (a bad flag value, a missing file, a checkpoint that does not fit) print one
line and exit with status 2, before any weight is read where the error is in the arguments. Ctrl-C,
SIGTERM and SIGHUP exit with 128 + the signal's number (130, 143, 129) after removing every partial
output, and say truly what is left. Anything else is a bug: its traceback is shown, with a line that says so.
``--log-level`` (before or after the command) sets which of the ``helios_jax`` loggers' messages reach standard
error; a command's result (``wrote ...``, verify's table) goes to standard output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import Iterator

import jax.numpy as jnp

from helios_jax import generate, hub, parallel, progress
from helios_jax.checkpoint import PipelineError
from helios_jax.config import ConfigError
from helios_jax.conversion import convert_checkpoint
from helios_jax.convert import CheckpointError
from helios_jax.nano import evaluate as nano_eval
from helios_jax.nano.world import CaptionError
from helios_jax.parallel import MeshError
from helios_jax.serve import command as serve_command
from helios_jax.training import DataError, NonFiniteError
from helios_jax.video import PARTIALS_MADE, MediaError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help with its default (unless the help names it), and one spelling of each flag: the other
    spelling (``--num-frames`` for ``--num_frames``) is accepted, not listed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        aliases = getattr(action, "aliases", ())
        if aliases:
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in aliases]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose multi-word flags take both spellings (``--a_b`` and ``--a-b``; help and usage
    show the first one given), that lists defaults, takes no abbreviated flags, and reports an unknown flag
    with the usage of the subcommand it follows."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # both spellings would make every abbreviation ambiguous
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        spellings = list(names)
        for name in names:
            if name.startswith("--"):
                for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                    if other not in spellings:
                        spellings.append(other)
        action = super().add_argument(*spellings, **kwargs)
        action.aliases = tuple(spellings[len(names):])
        return action

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            self.subcommand(namespace).error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace

    def subcommand(self, namespace: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the subcommand that ``namespace`` was parsed by (this parser if it has none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(namespace, action.dest, None):
                return action.choices[getattr(namespace, action.dest)].subcommand(namespace)
        return self


class Choices(tuple):
    """Choices for a ``nargs="*"`` positional: argparse checks its empty default against them too."""

    def __contains__(self, item) -> bool:
        return item == [] or tuple.__contains__(self, item)


# OSError: a missing file, a full disk, no permission: the environment, not the code.
USER_ERRORS = (PipelineError, MediaError, ConfigError, CheckpointError, MeshError, DataError, NonFiniteError, OSError,
               CaptionError)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BUG_REPORTS = "the helios-jax issue tracker"  # the project publishes no URL yet
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BENCHMARKS = {  # name: the module of the source checkout's experiments package that it runs
    "attention": "experiments.benchmarks.bench_attention",
    "dit": "experiments.benchmarks.bench_dit",
    "reference": "experiments.benchmarks.bench_reference",
    "vae": "experiments.benchmarks.bench_vae",
    "compile": "experiments.studies.compile_study",
    "convert": "experiments.studies.convert_memory",
}


def convert(source: str, destination: str, to: str, dtype: str | None, merge_lora: str | None = None,
            revision: str | None = None) -> int:
    """``helios-jax convert``: :func:`helios_jax.conversion.convert_checkpoint`, and a line saying what it wrote."""
    print(f"wrote {convert_checkpoint(source, destination, to, dtype, merge_lora, revision)}")
    return 0


def bench(which: list[str], extra: list[str]) -> int:
    """Run benchmarks of the source checkout's experiments package, each as ``python -P -m experiments...``: -P
    keeps the current folder off the child's path, the checkout's root goes last on its PYTHONPATH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "experiments", "__init__.py")):
        raise FileNotFoundError(f"no experiments package in {root}: `bench` runs from a source checkout")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.environ.get("PYTHONPATH"), root] if p))
    status = 0
    for name in which or list(BENCHMARKS):
        print(f"== {name}: python -m {BENCHMARKS[name]} {' '.join(extra)}", flush=True)
        status |= subprocess.call([sys.executable, "-P", "-m", BENCHMARKS[name], *extra], env=env)
    return status


def train(arguments: list[str]) -> int:
    """Run an official training config (YAML files merged in order, then ``section.key=value``
    overrides); the config, its folders, the resume and the data are checked before any compute."""
    from helios_jax.training import recipes, stages

    parallel.initialize()  # several processes: from JAX_COORDINATOR_ADDRESS etc. or SLURM; else nothing
    files = [a for a in arguments if "=" not in a]
    if not files:
        raise ConfigError("helios-jax train needs a training YAML, e.g. stage_1_init "
                          "data_config.instance_data_root=[data/]")
    recipe = recipes.load(files, [a for a in arguments if "=" in a])
    prepared = stages.prepare(recipe)
    run = prepared.run
    print(f"{' + '.join(files)}: {recipe.stage}, {run.max_train_steps} steps into {run.output_dir}", flush=True)
    state = prepared.train()
    print(f"trained to step {int(state.step)}; checkpoints and metrics.jsonl in {run.output_dir}")
    return 0


def version() -> str:
    try:
        return importlib.metadata.version("helios-jax")
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not installed
        from helios_jax import __version__

        return __version__


def parser() -> Parser:
    from helios_jax.training import configs
    from helios_jax.verify import CHECKS

    root = Parser(prog="helios-jax", description="Helios video generation in JAX. `helios-jax COMMAND --help` "
                                                 "explains each command's flags (both --a_b and --a-b are accepted).")
    root.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    root.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                      help="the least severe messages shown (progress lines and notes are INFO)")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, description: str | None = None) -> Parser:
        sub = commands.add_parser(name, help=text, description=description or text)
        # also after the command; SUPPRESS keeps the root's value when it is not given here
        sub.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                         help="as before the command")
        return sub

    generate.add_arguments(command("generate", "generate a video (mp4 + contact sheet)",
                                   "Generate a video (an mp4 and a contact-sheet PNG beside it). The flags are those "
                                   "of the official infer_helios.py, plus --checkpoint, --output and --attention."))
    dow = command("download", "fetch a checkpoint's files from the Hugging Face hub into its cache",
                  "Fetch the files of a hub checkpoint that helios-jax reads (configs, safetensors, tokenizer) into "
                  "the Hugging Face cache (HF_HOME) and print its folder; every command then finds it by its id.")
    dow.add_argument("id", help="the hub id, e.g. BestWishYsh/Helios-Distilled")
    dow.add_argument("--revision", help="a branch, tag or commit (default: main)")
    dow.add_argument("--local_dir", help="a folder to put the files in instead of the cache")
    conv = command("convert", "diffusers folder -> orbax params, or back to safetensors")
    conv.add_argument("source", help="a component folder (transformer/, vae/, text_encoder/), a whole checkpoint "
                                     "or a hub id")
    conv.add_argument("--revision", help="the hub id's branch, tag or commit (default: main)")
    conv.add_argument("destination", help="a new folder")
    conv.add_argument("--to", choices=("orbax", "safetensors"), default="orbax", help="the format to write")
    conv.add_argument("--dtype", choices=generate.WEIGHT_DTYPES,
                      help="cast the weights (default: keep); fp8: the transformer's block linears as float8 with "
                           "per-channel scales, the rest bf16; fp8-edges: fp8 but the first and last blocks, kept "
                           "bf16 (both orbax only, loaded back in their layout)")
    conv.add_argument("--merge_lora", metavar="LORA_DIR",
                      help="fuse this LoRA (diffusers' pytorch_lora_weights.safetensors) into the transformer")
    ver = command("verify", "parity of every component against the installed PyTorch reference")
    ver.add_argument("--only", nargs="+", default=[], choices=tuple(CHECKS), metavar="COMPONENT",
                     help=f"check only these components, of {', '.join(CHECKS)} (default: all)")
    ver.add_argument("--checkpoint", metavar="DIR",
                     help="verify this diffusers Helios checkpoint instead of tiny random models: every tensor is "
                          "scanned, then its transformer, vae and text_encoder run in the files' dtype against "
                          "diffusers/transformers loading the same files (--only picks among those three)")
    ver.add_argument("--blocks", type=int, nargs="+", metavar="I",
                     help="with --checkpoint: the DiT blocks to compare (negative counts from the end; default: 0 1 -1)")
    off = command("offload", "videos + metadata JSON -> per-clip training latents (safetensors)",
                  "Videos + metadata JSON -> per-clip training latents (safetensors). `helios-jax offload ode-pairs "
                  "--help`: stage 3a's ODE pairs.")
    off.add_argument("metadata", help="the official metadata JSON (path, cut, crop, cap; paths relative to it)")
    off.add_argument("--checkpoint", required=True, help="a diffusers Helios checkpoint (its vae/, text_encoder/) "
                                                         "or a hub id")
    off.add_argument("--revision", help="the hub id's branch, tag or commit (default: main)")
    off.add_argument("--output", required=True, help="the folder for the latent files")
    off.add_argument("--height", type=int, default=384, help="the clips' height in pixels")
    off.add_argument("--width", type=int, default=640, help="the clips' width in pixels")
    off.add_argument("--seed", type=int, default=42, help="clip start frames and posterior samples")
    off.add_argument("--min_frames", type=int, default=121, help="shortest clip (the official loaders' 121)")
    off.add_argument("--skip_unfit", action="store_true", help="skip short or off-aspect clips instead of failing")
    # `helios-jax offload ode-pairs ...` (main routes it here): stage-3a ODE pairs from a pyramid teacher.
    ode = command(ODE_PAIRS, "offload ode-pairs TEACHER PROMPTS.txt OUT_DIR: a pyramid teacher's ODE states at the "
                             "student's timesteps, one file per prompt (stage 3a data)")
    ode.add_argument("teacher", help="a diffusers pyramid checkpoint folder or hub id (e.g. BestWishYsh/Helios-Mid)")
    ode.add_argument("--revision", help="the hub id's branch, tag or commit (default: main)")
    ode.add_argument("prompts", help="a text file, one prompt per line")
    ode.add_argument("output", help="the folder for the ODE-pair files")
    ode.add_argument("--sections", type=int, default=None, help="chunks per prompt (default: 5, the official)")
    ode.add_argument("--num_frames", type=int, default=None, help="or the video length: a multiple of 33 frames")
    ode.add_argument("--height", type=int, default=384, help="the video's height in pixels")
    ode.add_argument("--width", type=int, default=640, help="the video's width in pixels")
    ode.add_argument("--steps", type=int, default=20, help="teacher UniPC steps per pyramid stage")
    ode.add_argument("--cfg", type=float, default=5.0, help="the teacher's CFG scale")
    ode.add_argument("--seed", type=int, default=42, help="the noise of each prompt's trajectory")
    ode.add_argument("--negative_prompt", default=None, help="default: the Wan negative prompt")
    ode.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the teacher's weights")
    ben = command("bench", "run the benchmarks in experiments/ (needs a source checkout)")
    ben.add_argument("which", nargs="*", choices=Choices(BENCHMARKS), metavar="BENCHMARK",
                     help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)")
    ben.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="passed to each benchmark (the rest of the "
                                                                          "line)")
    tra = command("train", "train from the official training YAMLs (stages 1, 2, 3a and 3b)",
                  "Train from the official training YAMLs (stages 1, 2, 3a and 3b). A config is a YAML path or the "
                  f"name of a shipped official one: {', '.join(configs.names())}.")
    tra.add_argument("config", nargs="+", help="YAML files or shipped names (merged in order) and section.key=value "
                                               "overrides, e.g. stage_1_init data_config.instance_data_root=[data/]")
    vae = command("train-vae", "train a Wan VAE on videos + metadata JSON (the nano world's VAE)",
                  "Train a Wan VAE on random windows of the clips of a metadata JSON (the file `offload` reads) and "
                  "write OUTPUT/vae/, a diffusers AutoencoderKLWan folder with the trained encoder's latents_mean / "
                  "latents_std. A rerun resumes from the newest checkpoint in OUTPUT.")
    vae.add_argument("metadata", help="the official metadata JSON (path, cut, crop, cap; paths relative to it)")
    vae.add_argument("--output", required=True, help="the run's folder: checkpoints, metrics.jsonl, vae/")
    vae.add_argument("--config", help="a diffusers VAE folder (its weights are the start) or a config.json (random "
                                      "start); default: the nano VAE of helios_jax.demo, from random weights")
    vae.add_argument("--steps", type=int, default=2000, help="training steps in all (a rerun with more continues)")
    vae.add_argument("--batch", type=int, default=8, help="windows per step")
    vae.add_argument("--frames", type=int, default=9, help="frames per window: 1 + 4k (the VAE's causal chunks)")
    vae.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW's rate")
    vae.add_argument("--seed", type=int, default=0, help="initial weights, window order and posterior noise")
    vae.add_argument("--height", type=int, default=64, help="the clips' height in pixels")
    vae.add_argument("--width", type=int, default=64, help="the clips' width in pixels")
    vae.add_argument("--checkpointing_steps", type=int, default=500, help="steps between checkpoints")
    vae.add_argument("--decoder_only", action="store_true", help="fine-tune the decoder of the --config VAE folder, "
                     "its encoder frozen: the latents it gives (and data offloaded with it) stay valid")
    vae.add_argument("--skip_unfit", action="store_true", help="skip clips shorter than --frames or off the aspect "
                                                               "instead of failing")
    nano_eval.add_arguments(command("eval", "score a video of the nano world against its prompts (a table; --json)",
                                    "Score a 64x64 video of the nano world (docs/nano.md) chunk by chunk against the "
                                    "prompts it was generated from, by the world's rules: presence, colour, shape, "
                                    "background, motion, drift, seams at the chunk joins."))
    serve_command.add_arguments(command("serve", "stream generation to a browser, steerable while it runs",
                                        "Serve the model: a page at /, the WebSocket stream /v1/stream, POST "
                                        "/v1/videos and GET /health (docs/serving.md)."))
    return root


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise once in the main thread; later ones are held off until the cleanup
    that the first one started has finished (a second Ctrl-C must not leave a half-removed folder)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def interrupt(signum: int):
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            interrupt(signum)
        print(f"helios-jax: {signal.Signals(signum).name} received; still cleaning up", file=sys.stderr)

    def unraisable(info) -> None:
        """A handler that runs inside a garbage-collection callback (jax has one) raises where Python ignores
        exceptions: raise it again from a timer 10 ms later, in ordinary code."""
        if isinstance(info.exc_value, KeyboardInterrupt) and raised:
            signal.setitimer(signal.ITIMER_REAL, 0.01)
        else:
            previous_hook(info)

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, lambda signum, frame: interrupt(raised[0]))
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


def _leftovers(args: argparse.Namespace) -> list[str]:
    """What an interrupted command might have left: staging folders and partial files it names."""
    if args.command == "convert":
        return [p for p in (args.destination.rstrip("/") + ".partial",) if os.path.exists(p)]
    return sorted(p for p in PARTIALS_MADE if os.path.exists(p))


def _user_error(err: BaseException) -> bool:
    """Errors of input or environment (not bugs): ours, file system ones, and the device running out of memory."""
    if isinstance(err, USER_ERRORS):
        return True
    return type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(err)


ODE_PAIRS = "offload-ode-pairs"


def configure_logging(level: str) -> None:
    """The ``helios_jax`` loggers' messages at ``level`` and above to standard error (a bar there is redrawn
    below them); called once per command, so a second ``main`` in one process replaces the handler."""
    library = logging.getLogger("helios_jax")
    for handler in [h for h in library.handlers if isinstance(h, progress.LogHandler)]:
        library.removeHandler(handler)
    library.addHandler(progress.LogHandler())
    library.setLevel(level)
    library.propagate = False  # its messages are this handler's alone: importing orbax gives the root one too


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # the helios-jax program itself, not a caller in the same process
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["offload", "ode-pairs"]:
        argv = [ODE_PAIRS, *argv[2:]]
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    status = _main(args)
    if program and status in {128 + sig for sig in HANDLED_SIGNALS}:
        _exit_at_next_signal()
    return status


def _exit_at_next_signal() -> None:
    """After an interrupt's cleanup and its one line, the process still shuts down (jax's and orbax's exit
    handlers, their threads): another Ctrl-C there would print a traceback from inside them. It exits at once
    instead, quietly; the partial outputs are already gone."""
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, lambda signum, frame: os._exit(128 + signum))


def _main(args: argparse.Namespace) -> int:
    with _signals_interrupt():  # also around the handlers below: a second signal must not cut the report short
        try:
            return _run(args)
        except KeyboardInterrupt as err:
            left = _leftovers(args)
            what = f"left {left}: remove it by hand" if left else "nothing was left half-written"
            if args.command == "download":  # snapshot_download's partial files are the cache's, resumed next time
                what = "the Hugging Face cache keeps the files fetched so far, and the next download resumes them"
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            print(f"helios-jax {args.command}: interrupted ({signal.Signals(signum).name}); {what}", file=sys.stderr)
            return 128 + signum
        except Exception as err:  # noqa: BLE001 - the one place that tells a user error from a bug
            if _user_error(err):
                print(f"helios-jax {args.command}: error: {err}", file=sys.stderr)
                return 2
            traceback.print_exc()
            print(f"helios-jax {args.command}: this is a bug in helios-jax, not a problem with your input: please "
                  f"report it at {BUG_REPORTS} with the command line and the traceback above", file=sys.stderr)
            return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return generate.run(args)
    if args.command == "download":
        print(hub.download(args.id, revision=args.revision, local_dir=args.local_dir))
        return 0
    if args.command == "convert":
        return convert(args.source, args.destination, args.to, args.dtype, args.merge_lora, args.revision)
    if args.command == "offload":
        from helios_jax.training.offload import offload

        files = offload(args.metadata, args.checkpoint, args.output, height=args.height, width=args.width,
                        seed=args.seed, min_frames=args.min_frames, skip_unfit=args.skip_unfit,
                        revision=args.revision)
        print(f"wrote {len(files)} clip file(s) to {args.output}")
        return 0
    if args.command == ODE_PAIRS:
        from helios_jax.training.ode import offload_ode_pairs

        files = offload_ode_pairs(args.teacher, args.prompts, args.output, sections=args.sections,
                                  num_frames=args.num_frames, height=args.height, width=args.width, steps=args.steps,
                                  guidance_scale=args.cfg, seed=args.seed, negative_prompt=args.negative_prompt,
                                  dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32, revision=args.revision)
        print(f"wrote {len(files)} ODE-pair file(s) to {args.output}")
        return 0
    if args.command == "verify":
        from helios_jax import verify, verify_checkpoint

        if args.checkpoint is not None:
            return verify_checkpoint.run(args.checkpoint, tuple(args.only),
                                         tuple(args.blocks or verify_checkpoint.DEFAULT_BLOCKS))
        if args.blocks:
            raise PipelineError("--blocks picks the DiT blocks of a --checkpoint; give --checkpoint DIR with it")
        return verify.run(tuple(args.only))
    if args.command == "train":
        return train(args.config)
    if args.command == "train-vae":
        from helios_jax.training.autoencoder import train_vae

        folder = train_vae(args.metadata, args.output, config=args.config, steps=args.steps, batch=args.batch,
                           frames=args.frames, learning_rate=args.learning_rate, seed=args.seed, height=args.height,
                           width=args.width, checkpointing_steps=args.checkpointing_steps,
                           skip_unfit=args.skip_unfit, decoder_only=args.decoder_only)
        print(f"wrote {folder}")
        return 0
    if args.command == "eval":
        return nano_eval.run(args)
    if args.command == "serve":
        return serve_command.run(args)
    return bench(args.which, args.args)


if __name__ == "__main__":
    sys.exit(main())
