"""``helios-jax generate``: a video file from a Helios checkpoint (or the embedded random one).

The flags are those of the official ``infer_helios.py`` (plus ``--checkpoint``, ``--output`` and
``--attention``). Every input is checked before any model is loaded: the output path, the image or
video, the interactive prompt CSV. The mp4 is written chunk by chunk into a temporary file that is
renamed into place when the video is complete, with a contact sheet (PNG) beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from helios_jax import demo
from helios_jax.models.attention import IMPLS
from helios_jax.pipeline import HeliosPipeline, PipelineError
from helios_jax.video import Mp4Writer, MediaError, check_writable, contact_sheet, load_image, load_video, write_png

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
DEFAULT_PROMPT = (
    "A dynamic time-lapse video showing the rapidly moving scenery from the window of a speeding train. The camera "
    "captures various elements such as lush green fields, towering trees, quaint countryside houses, and distant "
    "mountain ranges passing by quickly."
)
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)
# Settings whose default depends on the checkpoint: (official inference default, embedded demo default).
CHECKPOINT_DEFAULTS = {
    "height": (384, demo.HEIGHT),
    "width": (640, demo.WIDTH),
    "guidance_scale": (5.0, 1.0),
    "pyramid_num_inference_steps_list": ([20, 20, 20], [2, 2, 2]),
    "weight_dtype": ("bf16", "fp32"),
}
SHEET_FRAMES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a diffusers Helios folder; default: the embedded random-weight model")
    parser.add_argument("--output", default="helios.mp4", help="the mp4 to write (a contact-sheet PNG goes beside it)")
    parser.add_argument("--sample_type", choices=("t2v", "i2v", "v2v"), default="t2v")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT)
    parser.add_argument("--image_path")
    parser.add_argument("--video_path")
    parser.add_argument("--interactive_prompt_csv_path",
                        help="CSV with columns prompt_index, prompt (and optionally id, refined_prompt): one prompt "
                             "per segment of --interpolate_time chunks")
    parser.add_argument("--use_interpolate_prompt", action="store_true", help="blend embeddings at each switch")
    parser.add_argument("--interpolation_steps", type=int, default=3, help="chunks to blend over at each switch")
    parser.add_argument("--interpolate_time", type=int, default=7, help="chunks per interactive prompt")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num_frames", type=int, default=99)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--pyramid_num_inference_steps_list", type=int, nargs="+")
    parser.add_argument("--num_latent_frames_per_chunk", type=int, default=9)
    parser.add_argument("--guidance_scale", type=float)
    parser.add_argument("--use_zero_init", action="store_true")
    parser.add_argument("--zero_steps", type=int, default=1)
    parser.add_argument("--is_amplify_first_chunk", action="store_true")
    parser.add_argument("--is_skip_first_chunk", action="store_true")
    for name in ("image_noise_sigma_min", "video_noise_sigma_min"):
        parser.add_argument(f"--{name}", type=float, default=0.111)
    for name in ("image_noise_sigma_max", "video_noise_sigma_max"):
        parser.add_argument(f"--{name}", type=float, default=0.135)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--weight_dtype", choices=tuple(DTYPES))
    parser.add_argument("--attention", choices=("auto", *IMPLS), default="auto",
                        help="the DiT's attention backend; auto: cudnn on a GPU in bf16/fp16, else xla")
    parser.add_argument("--no_compilation_cache", action="store_true", help="do not use the persistent XLA cache")
    parser.add_argument("--lora", help="a LoRA folder (pytorch_lora_weights.safetensors, diffusers' format) to fuse")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="the LoRA's strength")


def read_interactive_csv(path: str, interpolate_time: int) -> list[tuple[int, str]]:
    """(start chunk, prompt) pairs of an interactive prompt CSV, as the official inference reads it:
    the rows of one video sorted by ``prompt_index``, each lasting ``interpolate_time`` chunks."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise PipelineError(f"cannot read the interactive prompt CSV {path!r}: {err}") from err
    if not rows or not {"prompt_index", "prompt"} <= set(rows[0]):
        raise PipelineError(f"{path}: expected a header with the columns prompt_index and prompt (and optionally id)")
    ids = {row.get("id") for row in rows}
    if len(ids) > 1:
        raise PipelineError(f"{path} holds prompts for {len(ids)} videos (ids {sorted(map(str, ids))}); give one video per CSV")
    try:
        rows.sort(key=lambda row: int(row["prompt_index"]))
        indices = [int(row["prompt_index"]) for row in rows]
    except ValueError as err:
        raise PipelineError(f"{path}: prompt_index must be an integer in every row ({err})") from err
    if indices != list(range(len(rows))):
        raise PipelineError(f"{path}: prompt_index must run 0, 1, 2, ... without gaps or repeats; got {indices}")
    if interpolate_time < 1:
        raise PipelineError(f"--interpolate_time = {interpolate_time} must be at least one chunk")
    texts = [(row.get("refined_prompt") or row["prompt"] or "").strip() for row in rows]
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise PipelineError(f"{path}: the prompt of prompt_index {empty} is empty")
    return [(i * interpolate_time, text) for i, text in enumerate(texts)]


def _resolve_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Flags left unset take the embedded model's defaults without --checkpoint, the official ones with it."""
    embedded = args.checkpoint is None
    return {name: getattr(args, name) if getattr(args, name) is not None else defaults[int(embedded)]
            for name, defaults in CHECKPOINT_DEFAULTS.items()}


def _inputs(args: argparse.Namespace, height: int, width: int) -> dict[str, Any]:
    """The conditioning inputs, read and checked before anything is loaded."""
    if args.sample_type == "i2v" and not args.image_path:
        raise PipelineError("--sample_type i2v needs --image_path")
    if args.sample_type == "v2v" and not args.video_path:
        raise PipelineError("--sample_type v2v needs --video_path")
    if args.image_path and args.video_path:
        raise PipelineError("--image_path and --video_path cannot both be given")
    if args.sample_type == "t2v" and (args.image_path or args.video_path):
        raise PipelineError("--sample_type t2v takes no --image_path or --video_path (use i2v or v2v)")
    inputs: dict[str, Any] = {}
    if args.image_path:
        inputs["image"] = load_image(args.image_path, height, width)
    if args.video_path:
        inputs["video"] = load_video(args.video_path, height, width)
    if args.interactive_prompt_csv_path:
        inputs["interactive_prompts"] = read_interactive_csv(args.interactive_prompt_csv_path, args.interpolate_time)
        inputs["interpolation_chunks"] = args.interpolation_steps if args.use_interpolate_prompt else 0
    else:
        inputs["prompt"] = args.prompt
    return inputs


def run(args: argparse.Namespace) -> int:
    """Generate and write the video; returns the exit status."""
    settings = _resolve_defaults(args)
    output = check_writable(args.output)
    sheet_path = os.path.splitext(output)[0] + ".png"
    check_writable(sheet_path)
    inputs = _inputs(args, settings["height"], settings["width"])
    checkpoint = args.checkpoint or demo.demo_checkpoint()
    if args.checkpoint is None:
        print(f"No --checkpoint: using the embedded random-weight Helios at {checkpoint} (its video is noise).")
    pipe = HeliosPipeline.from_pretrained(checkpoint, dtype=DTYPES[settings["weight_dtype"]],
                                          attention_impl=None if args.attention == "auto" else args.attention,
                                          compilation_cache=not args.no_compilation_cache,
                                          lora=args.lora, lora_scale=args.lora_scale)
    total = pipe.num_output_frames(args.num_frames, args.num_latent_frames_per_chunk)
    picks = set(np.linspace(0, total - 1, min(SHEET_FRAMES, total)).round().astype(int).tolist())
    chunks = pipe.stream(
        **inputs, negative_prompt=args.negative_prompt, height=settings["height"], width=settings["width"],
        num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
        guidance_scale=settings["guidance_scale"], num_latent_frames_per_chunk=args.num_latent_frames_per_chunk,
        pyramid_num_inference_steps_list=settings["pyramid_num_inference_steps_list"],
        use_zero_init=args.use_zero_init, zero_steps=args.zero_steps,
        is_amplify_first_chunk=args.is_amplify_first_chunk, is_skip_first_chunk=args.is_skip_first_chunk,
        image_noise_sigma_min=args.image_noise_sigma_min, image_noise_sigma_max=args.image_noise_sigma_max,
        video_noise_sigma_min=args.video_noise_sigma_min, video_noise_sigma_max=args.video_noise_sigma_max,
        seed=args.seed,
    )
    sheet = []
    with Mp4Writer(output, args.fps) as writer:
        for frames in chunks:
            start = writer.frames_written
            writer.write(frames[0])
            sheet += [frames[0][i - start] for i in sorted(picks) if start <= i < writer.frames_written]
    write_png(sheet_path, contact_sheet(sheet))
    print(f"wrote {output} ({writer.frames_written} frames at {args.fps} fps, "
          f"{settings['height']}x{settings['width']}) and {sheet_path}")
    return 0

