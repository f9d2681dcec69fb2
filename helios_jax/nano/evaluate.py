"""``helios-jax eval``: a video of the nano world scored against what it was prompted with.

It takes the prompts as ``helios-jax generate`` does: one ``--prompt``, or the interactive prompt CSV with
``--interpolate_time`` (read by generate's own reader), so a generated prompt-switch video is scored with the
file that made it. Every input is checked before the video is scored: the captions against the world's grammar,
the report's path, the video's size, its chunks against the prompts. The report is printed as a markdown
table and, with ``--json``, written atomically.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from helios_jax.nano.world import CHUNK_FRAMES, CaptionError, parse_caption
from helios_jax.video import check_writable, read_mp4, write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="an mp4 of the nano world (64 x 64), e.g. one `helios-jax generate` wrote")
    parser.add_argument("--prompt", help="the caption the whole video was generated from")
    parser.add_argument("--interactive_prompt_csv_path",
                        help="or the interactive prompt CSV it was generated from (generate's format): each prompt "
                             "holds for --interpolate_time chunks")
    parser.add_argument("--interpolate_time", type=int, default=7, help="chunks per interactive prompt")
    parser.add_argument("--json", help="also write the report to this .json file")


def chunk_captions(starts: Sequence[tuple[int, str]], chunks: int) -> list[str]:
    """The caption of each of ``chunks`` chunks from (start chunk, caption) pairs: the last one started."""
    late = [(start, text) for start, text in starts if start >= chunks]
    if late:
        raise CaptionError(f"the prompt {late[0][1]!r} starts at chunk {late[0][0]}, but the video has only "
                           f"{chunks} chunks of {CHUNK_FRAMES} frames")
    return [next(text for start, text in reversed(starts) if start <= k) for k in range(chunks)]


def run(args: argparse.Namespace) -> int:
    from helios_jax.nano.metrics import evaluate

    if (args.prompt is None) == (args.interactive_prompt_csv_path is None):
        raise CaptionError("give the video's prompt: --prompt CAPTION or --interactive_prompt_csv_path CSV (one)")
    if args.prompt is not None:
        starts = [(0, args.prompt)]
    else:
        from helios_jax.generate import read_interactive_csv

        starts = read_interactive_csv(args.interactive_prompt_csv_path, args.interpolate_time)
    for _, text in starts:
        parse_caption(text)
    output = check_writable(args.json, ".json") if args.json else None
    video = read_mp4(args.video)
    report = evaluate(video, chunk_captions(starts, -(-len(video) // CHUNK_FRAMES)), chunk_frames=CHUNK_FRAMES)
    print(report.table())
    if output:
        write_text(output, json.dumps({"video": args.video, "chunks": report.chunks, "summary": report.summary},
                                      indent=1) + "\n", ".json")
        print(f"wrote {output}")
    return 0
