"""The shipped nano model (helios_jax/nano/checkpoint, trained by `make nano`) still makes its world: a short
generation of held-out captions, scored by the world's rules, stays within the bounds measured when it was trained.
A change that degrades real output (a sampler, a scheduler, the memory, the VAE's decode) fails here even when every
random-weight parity test still passes. The checkpoint itself is checked too: the diffusers layout, at most 25 MB.
"""

from __future__ import annotations

import json
import os

import pytest

from helios_jax.checkpoint import read_checkpoint_configs
from helios_jax.nano import models, scoring

# What this test's generation (2 held-out captions x 3 chunks, seed 0) scored with the checkpoint as shipped
# (2026-12-07, the fourth `make nano` run; its README.md has the 4 x 10-chunk evaluation). A "min" bound sits halfway
# between the measurement and what a model that makes nothing of its world scores (no object: presence and
# accuracies 0; a motionless video: speed 0); a "max" bound half as much again above the measured error.
MEASURED = {"presence": 0.942, "colour_accuracy": 0.637, "shape_accuracy": 0.444, "speed": 1.685,
            "motion_error": 2.061, "background_error": 55.0, "join_ratio": 4.54}
BOUNDS = {"presence": ("min", 0.471), "colour_accuracy": ("min", 0.319), "shape_accuracy": ("min", 0.222),
          "speed": ("min", 0.84), "motion_error": ("max", 3.1), "background_error": ("max", 82.5),
          "join_ratio": ("max", 6.8)}


def test_the_checkpoint_is_a_small_distilled_diffusers_folder():
    folder = models.CHECKPOINT
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)
    assert total <= 25 * 2**20
    configs = read_checkpoint_configs(folder)
    assert configs.spec.pyramid and configs.spec.is_distilled and configs.transformer == models.TRANSFORMER
    assert configs.tokenizer.model_max_length == models.TEXT_TOKENS  # the text length it was trained at
    with open(os.path.join(folder, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "HeliosPyramidPipeline"
    assert os.path.isfile(os.path.join(folder, "README.md"))


@pytest.fixture(scope="module")
def scored():
    reports, _ = scoring.sample_and_score(scoring.load(models.CHECKPOINT), scoring.held_out_captions(2), chunks=3,
                                          **scoring.STUDENT_CALL)
    return scoring.mean_summary(reports)


@pytest.mark.parametrize("metric", sorted(BOUNDS))
def test_a_short_generation_stays_within_the_measured_bounds(scored, metric):
    side, bound = BOUNDS[metric]
    value = scored[metric]
    assert (value >= bound) if side == "min" else (value <= bound), (metric, value, MEASURED[metric])
