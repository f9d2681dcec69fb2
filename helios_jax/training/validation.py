"""Validation videos during training, through the inference pipeline itself.

One :class:`~helios_jax.pipeline.HeliosPipeline` is built once from in-memory components; each call
puts the current transformer params (``merge(trainable, frozen)``, e.g. the LoRA fused into the base)
into it and writes ``output_dir/validation/step-STEP-I.mp4`` per prompt and video. The params are an
argument of the pipeline's compiled chunk, so after the first validation nothing compiles again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from helios_jax.pipeline import HeliosPipeline
from helios_jax.video import write_mp4

Params = Any


@dataclasses.dataclass
class Validator:
    """``Stage.validate``: ``settings`` are the pipeline's call arguments (height, width, num_frames,
    num_inference_steps, guidance_scale, ...); video ``i`` of each prompt uses seed ``seed + i``."""

    pipeline: HeliosPipeline
    merge: Callable[[Params, Params], Params]
    prompts: Sequence[str]
    settings: dict[str, Any]
    num_videos: int = 1
    seed: int = 0
    fps: int = 24

    def __call__(self, trainable: Params, frozen: Params, step: int, output_dir: str) -> list[str]:
        folder = os.path.join(output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        self.pipeline.transformer_params = self.merge(trainable, frozen)
        written = []
        for p, prompt in enumerate(self.prompts):
            for i in range(self.num_videos):
                video = self.pipeline(prompt, seed=self.seed + i, progress=False, **self.settings)
                name = f"step-{step}-{p * self.num_videos + i}.mp4"
                written.append(write_mp4(os.path.join(folder, name), video, fps=self.fps))
        return written
