"""``helios-jax generate``: a video file from a Helios checkpoint (or the embedded nano model).

The flags are those of the official ``infer_helios.py`` (plus ``--checkpoint``, ``--output`` and
``--attention``). Without ``--output`` the video goes to ``outputs/``, named from the prompt and the time
(:func:`default_output`), never over an existing file; an explicit ``--output`` that exists is replaced only with
``--overwrite``. Every input is checked before any weight is read
(:func:`prepare`): the output path, every number against the checkpoint's configs, the image or video, the
interactive prompt CSV. The mp4
is written chunk by chunk into a temporary file that is renamed into place when the video is complete,
with a contact sheet (PNG) beside it, named as the mp4 with ``.png`` (never a file given as an input).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from helios_jax import hub, parallel, step_cache
from helios_jax.checkpoint import PipelineError, read_checkpoint_configs
from helios_jax.diskspace import check_free
from helios_jax.history import num_chunks
from helios_jax.loading import DTYPES, check_quantize, weight_settings
from helios_jax.models import fp8
from helios_jax.models.attention import IMPLS
from helios_jax.nano import models as nano
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import DEFAULT_NEGATIVE_PROMPT, check_prompt_plan
from helios_jax.request import Request, check_request, check_seed, check_video_length
from helios_jax.training.completeness import lora_folder_problem
from helios_jax.video import Mp4Writer, check_writable, contact_sheet, fit_image, fit_video, write_png

logger = logging.getLogger(__name__)
# fp8: the DiT's block linears in float8_e4m3fn (helios_jax.models.fp8), everything else in bf16;
# fp8-edges: the same but the first and last blocks, kept bf16.
WEIGHT_DTYPES = (*DTYPES, *fp8.STORAGES)
DEFAULT_PROMPT = (
    "A dynamic time-lapse video showing the rapidly moving scenery from the window of a speeding train. The camera "
    "captures various elements such as lush green fields, towering trees, quaint countryside houses, and distant "
    "mountain ranges passing by quickly."
)
# Settings whose default depends on the checkpoint: (official inference default, embedded nano model's default).
CHECKPOINT_DEFAULTS = {
    "prompt": (DEFAULT_PROMPT, nano.PROMPT),
    "height": (384, nano.HEIGHT),
    "width": (640, nano.WIDTH),
    "guidance_scale": (5.0, 1.0),
    "pyramid_num_inference_steps_list": ([20, 20, 20], [2, 2, 2]),
    "weight_dtype": ("bf16", "fp32"),
}
SHEET_FRAMES = 8
MAX_FPS = 240
OUTPUTS = "outputs"  # the folder (under the working folder) of runs without --output
SLUG_WORDS, SLUG_CHARS = 6, 48


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``helios-jax generate``: the official ``infer_helios.py``'s, with its spellings and defaults;
    those whose default depends on the checkpoint say both (the embedded nano model runs at its own small size)."""
    def both(name: str, unit: str = "") -> str:
        official, embedded = CHECKPOINT_DEFAULTS[name]
        show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
        return f"default: {show(official)}{unit} with --checkpoint, {show(embedded)}{unit} for the embedded model"

    parser.add_argument("--checkpoint", help="a diffusers Helios folder or a hub id (BestWishYsh/Helios-Distilled); "
                                             "default: the embedded nano model (docs/nano.md)")
    parser.add_argument("--revision", help="the hub id's branch, tag or commit (default: main)")
    parser.add_argument("--output", help=f"the mp4 to write (a contact-sheet PNG goes beside it); default: "
                                         f"{OUTPUTS}/PROMPT-WORDS-YYYYMMDD-HHMMSS.mp4, never over an existing file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output mp4 and its PNG")
    parser.add_argument("--sample_type", choices=("t2v", "i2v", "v2v"), default="t2v",
                        help="text-, image- or video-to-video (i2v needs --image_path, v2v --video_path)")
    parser.add_argument("--prompt", help="what the video shows; default: the official example (a time-lapse from a "
                                          f"speeding train) with --checkpoint, '{nano.PROMPT}' for the embedded model")
    parser.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT,
                        help="what to steer away from (with guidance); default: the Wan negative prompt")
    parser.add_argument("--image_path", help="i2v: the image the video starts from (resized and cropped to fit)")
    parser.add_argument("--video_path", help="v2v: the video to continue (resized and cropped to fit)")
    parser.add_argument("--interactive_prompt_csv_path",
                        help="CSV with columns prompt_index, prompt (and optionally id, refined_prompt): one prompt "
                             "per segment of --interpolate_time chunks")
    parser.add_argument("--use_interpolate_prompt", action="store_true", help="blend embeddings at each switch")
    parser.add_argument("--interpolation_steps", type=int, default=3, help="chunks to blend over at each switch")
    parser.add_argument("--interpolate_time", type=int, default=7, help="chunks per interactive prompt")
    parser.add_argument("--height", type=int, help=f"in pixels, a multiple of 64; {both('height')}")
    parser.add_argument("--width", type=int, help=f"in pixels, a multiple of 64; {both('width')}")
    parser.add_argument("--num_frames", type=int, default=99,
                        help="the video's length in frames (made in whole chunks, so it may come out longer)")
    parser.add_argument("--num_inference_steps", type=int, default=50,
                        help="denoising steps per chunk (checkpoints without a pyramid)")
    parser.add_argument("--pyramid_num_inference_steps_list", type=int, nargs="+", metavar="STEPS",
                        help=f"denoising steps per pyramid stage, one number per stage; "
                             f"{both('pyramid_num_inference_steps_list')}")
    parser.add_argument("--num_latent_frames_per_chunk", type=int, default=9,
                        help="latent frames per chunk (9: 33 video frames)")
    parser.add_argument("--guidance_scale", type=float,
                        help=f"classifier-free guidance scale (1: none); {both('guidance_scale')}")
    parser.add_argument("--use_zero_init", action="store_true",
                        help="CFG-Zero*: the first --zero_steps steps predict zero")
    parser.add_argument("--zero_steps", type=int, default=1, help="steps zeroed by --use_zero_init")
    parser.add_argument("--is_amplify_first_chunk", action="store_true",
                        help="double the first chunk's DMD steps (the distilled model)")
    parser.add_argument("--is_skip_first_chunk", action="store_true",
                        help="official infer_helios.py's flag: the second chunk's first frame anchors the video")
    for name in ("image_noise_sigma_min", "video_noise_sigma_min"):
        parser.add_argument(f"--{name}", type=float, default=0.111,
                            help=f"i2v/v2v: the least noise sigma added to the conditioning "
                                 f"{name.split('_')[0]}'s latents")
    for name in ("image_noise_sigma_max", "video_noise_sigma_max"):
        parser.add_argument(f"--{name}", type=float, default=0.135,
                            help=f"i2v/v2v: the most noise sigma added to the conditioning "
                                 f"{name.split('_')[0]}'s latents")
    parser.add_argument("--seed", type=int, default=42, help="the random seed of the noise")
    parser.add_argument("--fps", type=int, default=24, help=f"frame rate of the mp4 (1 to {MAX_FPS})")
    parser.add_argument("--weight_dtype", choices=WEIGHT_DTYPES,
                        help=f"the weights' dtype; fp8: the DiT's block linears as float8 with per-channel scales "
                             f"(FP8 GEMMs), the rest bf16; fp8-edges: fp8 but the first and last blocks, kept bf16 "
                             f"(less error, 0.65 GiB more at 14B; not with --offload); {both('weight_dtype')}")
    parser.add_argument("--offload", choices=("blocks",),
                        help="blocks: keep the DiT's blocks (99%% of its weights) and the text encoder's layers and "
                             "embedding in pinned host memory and stream each layer to the device while the one before "
                             "it runs (the 14B pipeline on a 24 GB card, on 12 GB with --vae_dtype bf16; "
                             "docs/generation.md)")
    parser.add_argument("--vae_dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the VAE's dtype (the official inference's fp32); bf16 halves its decode's memory (with "
                             "--offload blocks, the 14B pipeline on a 12 GB card)")
    parser.add_argument("--attention", choices=("auto", *IMPLS), default="auto",
                        help="the DiT's attention backend; auto: cudnn on a GPU in bf16/fp16, else xla")
    parser.add_argument("--no_compilation_cache", action="store_true", help="do not use the persistent XLA cache")
    parser.add_argument("--mesh", help="run on several devices: AXIS=SIZE,... over data, fsdp, context, tensor "
                                       "(e.g. context=4,data=2), multiplying to the device count of all processes")
    parser.add_argument("--coordinator_address", help="several processes: host:port of process 0 "
                                                      "(else JAX_COORDINATOR_ADDRESS, or SLURM's)")
    parser.add_argument("--num_processes", type=int, help="several processes: how many (else JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, help="several processes: this one's index (else JAX_PROCESS_ID)")
    parser.add_argument("--lora", help="a LoRA folder (pytorch_lora_weights.safetensors, diffusers' format) to fuse")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="the LoRA's strength")
    parser.add_argument("--step_cache", metavar="FILE|calibrate",
                        help="skip denoising steps by a checkpoint's calibration (MagCache's rule; the 50-step Base "
                             "and the Mid, docs/generation.md); calibrate: compute every step and write the "
                             f"calibration beside the video (OUTPUT{step_cache.SUFFIX})")
    parser.add_argument("--cache_threshold", type=float,
                        help=f"with --step_cache FILE: the accumulated error below which a step is skipped (higher: "
                             f"fewer forwards, more error; 0: none skipped); default: the file's ({step_cache.THRESHOLD} "
                             f"as written)")
    parser.add_argument("--cache_max_skips", type=int,
                        help=f"with --step_cache FILE: the most steps skipped in a row; default: the file's "
                             f"({step_cache.MAX_SKIPS} as written)")


def read_interactive_csv(path: str, interpolate_time: int) -> list[tuple[int, str]]:
    """(start chunk, prompt) pairs of an interactive prompt CSV, as the official inference reads it:
    the rows of one video sorted by ``prompt_index``, each lasting ``interpolate_time`` chunks."""
    if interpolate_time < 1:
        raise PipelineError(f"--interpolate_time = {interpolate_time} must be at least one chunk")
    if not os.path.isfile(path):
        raise PipelineError(f"cannot read the interactive prompt CSV {path!r}: not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is no text
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise PipelineError(f"cannot read the interactive prompt CSV {path!r}: {err}") from err
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start}): "
                            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    except csv.Error as err:
        raise PipelineError(f"{path} is not a readable CSV: {err}") from None
    if not rows or not {"prompt_index", "prompt"} <= set(rows[0]):
        raise PipelineError(f"{path}: expected a header with the columns prompt_index and prompt (and optionally id)")
    ids = {row.get("id") for row in rows}
    if len(ids) > 1:
        raise PipelineError(f"{path} holds prompts for {len(ids)} videos (ids {sorted(map(str, ids))}); "
                            "give one video per CSV")
    try:
        rows.sort(key=lambda row: int(row["prompt_index"]))
        indices = [int(row["prompt_index"]) for row in rows]
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{path}: prompt_index must be an integer in every row ({err})") from err
    if indices != list(range(len(rows))):
        raise PipelineError(f"{path}: prompt_index must run 0, 1, 2, ... without gaps or repeats; got {indices}")
    texts = [(row.get("refined_prompt") or row["prompt"] or "").strip() for row in rows]
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise PipelineError(f"{path}: the prompt of prompt_index {empty} is empty")
    return [(i * interpolate_time, text) for i, text in enumerate(texts)]


def slug(text: str) -> str:
    """A short file-name part from a prompt: its first words, lower case, ASCII letters and digits only."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:SLUG_WORDS]
    return "-".join(words)[:SLUG_CHARS].strip("-") or "video"


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def default_output(prompt: str, folder: str = OUTPUTS) -> str:
    """``folder/SLUG-TIMESTAMP.mp4`` (``-2``, ``-3``, ... added if that mp4 or its PNG exists): a new name each run."""
    stem = os.path.join(folder, f"{slug(prompt)}-{_timestamp()}")
    name, n = stem, 1
    while os.path.lexists(name + ".mp4") or os.path.lexists(name + ".png"):
        n += 1
        name = f"{stem}-{n}"
    return name + ".mp4"


def _check_output_folder(folder: str) -> bool:
    """Whether the default output folder exists; if not, that it can be made."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise PipelineError(f"cannot write to {folder}/: it exists and is not a folder; give --output")
    if os.path.isdir(folder):
        return True
    parent = os.path.dirname(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot make {folder}/: the folder {parent} is not writable; give --output")
    return False


def _resolve_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Flags left unset take the embedded model's defaults without --checkpoint, the official ones with it."""
    embedded = args.checkpoint is None
    return {name: getattr(args, name) if getattr(args, name) is not None else defaults[int(embedded)]
            for name, defaults in CHECKPOINT_DEFAULTS.items()}


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything ``run`` needs, every part checked: paths, the checkpoint's kind, the pipeline's arguments."""

    output: str
    sheet: str
    checkpoint: str
    dtype: Any
    weight_dtype: str | None  # one of fp8.STORAGES, or None (weights in dtype)
    attention: str | None
    request: Request
    mesh_sizes: dict[str, int] | None
    pipeline_args: dict[str, Any]
    step_cache: step_cache.Calibration | None = None  # --step_cache FILE, read and checked
    calibration_output: str | None = None  # --step_cache calibrate: the file to write


def _check_flags(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """The flags that only the command has (the pipeline checks its own arguments)."""
    if not 1 <= args.fps <= MAX_FPS:
        raise PipelineError(f"--fps {args.fps}: give a frame rate from 1 to {MAX_FPS}")
    if args.interactive_prompt_csv_path and args.interpolation_steps < 0:
        raise PipelineError(f"--interpolation_steps {args.interpolation_steps}: give 0 or more chunks")
    check_seed(args.seed)
    if not math.isfinite(args.lora_scale):
        raise PipelineError(f"--lora_scale {args.lora_scale}: give a finite number")
    if args.lora and not os.path.exists(args.lora):
        raise PipelineError(f"--lora {args.lora}: no such file or folder")
    if args.lora and (problem := lora_folder_problem(args.lora)):
        raise PipelineError(f"--lora {problem}: give a complete checkpoint-STEP of the run")
    if args.attention == "cudnn":
        if jax.default_backend() != "gpu":
            raise PipelineError(f"--attention cudnn needs a CUDA GPU, and this run's backend is "
                                f"{jax.default_backend()!r}: use --attention auto (or xla)")
        if settings["weight_dtype"] == "fp32":
            raise PipelineError("--attention cudnn runs 16-bit attention only: add --weight_dtype bf16 (or fp16), "
                                "or use --attention xla for fp32")


def _check_sample_type(args: argparse.Namespace) -> None:
    if args.sample_type == "i2v" and not args.image_path:
        raise PipelineError("--sample_type i2v needs --image_path")
    if args.sample_type == "v2v" and not args.video_path:
        raise PipelineError("--sample_type v2v needs --video_path")
    if args.image_path and args.video_path:
        raise PipelineError("--image_path and --video_path cannot both be given")
    if args.sample_type == "t2v" and (args.image_path or args.video_path):
        raise PipelineError("--sample_type t2v takes no --image_path or --video_path (use i2v or v2v)")


def _inputs(args: argparse.Namespace, request: Request) -> dict[str, Any]:
    """The conditioning inputs, read and checked before anything is loaded: uint8 frames at the requested
    size, which the pipeline takes as they are (the one loader contract of :mod:`helios_jax.video`)."""
    inputs: dict[str, Any] = {}
    if args.image_path:
        inputs["image"] = fit_image(args.image_path, request.height, request.width)
    if args.video_path:
        inputs["video"] = fit_video(args.video_path, request.height, request.width)
        check_video_length(len(inputs["video"]), request)
    if args.interactive_prompt_csv_path:
        inputs["interactive_prompts"] = read_interactive_csv(args.interactive_prompt_csv_path, args.interpolate_time)
        inputs["interpolation_chunks"] = args.interpolation_steps if args.use_interpolate_prompt else 0
    else:
        inputs["prompt"] = args.prompt
    return inputs


def _check_collisions(args: argparse.Namespace, output: str, sheet: str) -> None:
    """Neither file this run writes may be one the user gave as an input."""
    for flag in ("image_path", "video_path", "interactive_prompt_csv_path", "checkpoint"):
        given = getattr(args, flag)
        for written, what in ((output, "--output"), (sheet, "the contact sheet")):
            if given and os.path.exists(given) and os.path.exists(written) and os.path.samefile(given, written):
                raise PipelineError(f"{what} {written} is the --{flag} {given}: writing it would destroy the input; "
                                    "choose another --output")


def _step_cache_flags(args: argparse.Namespace, output: str, request: Request,
                      pyramid: bool) -> tuple[step_cache.Calibration | None, str | None]:
    """``--step_cache``: the calibration read and checked against this run's steps, or the file to calibrate into."""
    tuning = [f"--{name}" for name in ("cache_threshold", "cache_max_skips") if getattr(args, name) is not None]
    if args.step_cache != "calibrate" and args.step_cache is not None:
        if args.cache_threshold is not None and not (math.isfinite(args.cache_threshold) and args.cache_threshold >= 0):
            raise PipelineError(f"--cache_threshold {args.cache_threshold}: give a finite number >= 0 (0: no skips)")
        if args.cache_max_skips is not None and args.cache_max_skips < 0:
            raise PipelineError(f"--cache_max_skips {args.cache_max_skips}: give 0 or more steps")
        calibration = step_cache.read_calibration(args.step_cache)
        calibration.check_steps(request.pyramid_num_inference_steps_list if pyramid
                                else (request.num_inference_steps,))
        return calibration, None
    if tuning:
        raise PipelineError(f"{' and '.join(tuning)}: these tune the skipping of --step_cache FILE; give the "
                            f"calibration file (a calibration run computes every step)")
    if args.step_cache is None:
        return None, None
    path = check_writable(os.path.splitext(output)[0] + step_cache.SUFFIX, ".json")
    if os.path.lexists(path) and not args.overwrite:
        raise PipelineError(f"{path} already exists: add --overwrite to replace it, or choose another --output")
    return None, path


def prepare(args: argparse.Namespace) -> Job:
    """Check every flag, path and input against the checkpoint's configs, reading no weight."""
    settings = _resolve_defaults(args)
    args = argparse.Namespace(**{**vars(args), "prompt": settings["prompt"]})
    if args.output is None:
        csv_path = args.interactive_prompt_csv_path
        output = os.path.abspath(default_output(os.path.splitext(os.path.basename(csv_path))[0] if csv_path
                                                else args.prompt))
        sheet = os.path.splitext(output)[0] + ".png"
        if _check_output_folder(os.path.dirname(output)):  # else it is made when the video is written
            check_writable(output, ".mp4")
            check_writable(sheet, ".png")
    else:
        output = check_writable(args.output, ".mp4")
        sheet = os.path.splitext(output)[0] + ".png"
        check_writable(sheet, ".png")
    _check_collisions(args, output, sheet)
    existing = [path for path in (output, sheet) if os.path.lexists(path)]
    if existing and not args.overwrite:  # only an explicit --output can name existing files
        raise PipelineError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                            "add --overwrite to replace, or choose another --output")
    _check_flags(args, settings)
    _check_sample_type(args)
    mesh_sizes = parallel.parse_mesh(args.mesh) if args.mesh else None
    if args.revision and not args.checkpoint:
        raise PipelineError(f"--revision {args.revision} is a revision of a --checkpoint hub id: give --checkpoint")
    checkpoint = hub.resolve(args.checkpoint, revision=args.revision) if args.checkpoint else nano.CHECKPOINT
    configs = read_checkpoint_configs(checkpoint)  # every config of the folder; no weight
    if settings["weight_dtype"] in fp8.STORAGES:
        check_quantize("transformer", settings["weight_dtype"], configs.transformer, args.offload)
    request_args = dict(
        height=settings["height"], width=settings["width"], num_frames=args.num_frames,
        num_inference_steps=args.num_inference_steps, guidance_scale=settings["guidance_scale"],
        num_latent_frames_per_chunk=args.num_latent_frames_per_chunk,
        pyramid_num_inference_steps_list=settings["pyramid_num_inference_steps_list"],
        use_zero_init=args.use_zero_init, zero_steps=args.zero_steps,
        is_amplify_first_chunk=args.is_amplify_first_chunk, is_skip_first_chunk=args.is_skip_first_chunk,
        image_noise_sigma_min=args.image_noise_sigma_min, image_noise_sigma_max=args.image_noise_sigma_max,
        video_noise_sigma_min=args.video_noise_sigma_min, video_noise_sigma_max=args.video_noise_sigma_max,
    )
    request, _ = check_request(request_args, pyramid=configs.spec.pyramid, stages=configs.scheduler.stages,
                               scheduler_type=configs.scheduler.scheduler_type)
    inputs = _inputs(args, request)
    if "interactive_prompts" in inputs:
        check_prompt_plan(inputs["interactive_prompts"], num_chunks(request.num_frames,
                                                                    request.num_latent_frames_per_chunk),
                          inputs["interpolation_chunks"])
    calibration, calibration_output = _step_cache_flags(args, output, request, configs.spec.pyramid)
    dtype, weight_dtype = weight_settings(settings["weight_dtype"])
    return Job(output=output, sheet=sheet, checkpoint=checkpoint, dtype=dtype, weight_dtype=weight_dtype,
               attention=None if args.attention == "auto" else args.attention, request=request, mesh_sizes=mesh_sizes,
               pipeline_args={**inputs, **request_args, "negative_prompt": args.negative_prompt, "seed": args.seed},
               step_cache=calibration, calibration_output=calibration_output)


def run(args: argparse.Namespace) -> int:
    """Generate and write the video; returns the exit status."""
    job = prepare(args)
    request = job.request
    # H.264 at crf 18 takes well over 1/100 of the raw frames: less room than that is refused before any weight.
    check_free(job.output, request.num_frames * request.height * request.width * 3 // 100)
    if args.checkpoint is None:
        logger.info("no --checkpoint: the embedded nano Helios, trained on a synthetic world of moving shapes "
                    "(docs/nano.md), at %s", job.checkpoint)
    parallel.initialize(args.coordinator_address, args.num_processes, args.process_id)
    mesh = parallel.make_mesh(**job.mesh_sizes) if job.mesh_sizes else None
    pipe = HeliosPipeline.from_pretrained(job.checkpoint, dtype=job.dtype, attention_impl=job.attention,
                                          compilation_cache=not args.no_compilation_cache,
                                          lora=args.lora, lora_scale=args.lora_scale, mesh=mesh,
                                          weight_dtype=job.weight_dtype, offload=args.offload,
                                          vae_dtype=DTYPES[args.vae_dtype])
    if job.step_cache is not None or job.calibration_output is not None:
        pipe.step_cache = step_cache.StepCache(job.step_cache, args.cache_threshold, args.cache_max_skips)
    total = pipe.num_output_frames(request.num_frames, request.num_latent_frames_per_chunk)
    picks = set(np.linspace(0, total - 1, min(SHEET_FRAMES, total)).round().astype(int).tolist())
    chunks = pipe.stream(**job.pipeline_args)
    if jax.process_index() != 0:  # every process computes the same frames; the first one writes them
        for _ in chunks:
            pass
        return 0
    sheet = []
    os.makedirs(os.path.dirname(job.output), exist_ok=True)  # outputs/ of a run without --output
    with Mp4Writer(job.output, args.fps) as writer:
        for frames in chunks:
            start = writer.frames_written
            writer.write(frames[0])
            sheet += [frames[0][i - start] for i in sorted(picks) if start <= i < writer.frames_written]
    write_png(job.sheet, contact_sheet(sheet))
    print(f"wrote {job.output} ({writer.frames_written} frames at {args.fps} fps, "
          f"{request.height}x{request.width}) and {job.sheet}")
    if job.calibration_output is not None:
        path = step_cache.write_calibration(job.calibration_output,
                                            pipe.step_cache.calibrated(args.checkpoint or "nano (embedded)"))
        print(f"wrote {path} (the step cache's calibration: use it with --step_cache {path})")
    elif pipe.step_cache is not None:
        print(f"step cache: {' '.join(map(str, pipe.step_cache.forwards()))} DiT forwards per chunk")
    return 0
