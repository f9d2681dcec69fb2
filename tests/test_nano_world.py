"""The nano world (helios_jax/nano/world.py) against hand-worked scenes, and its metrics
(helios_jax/nano/metrics.py) against the world's own videos, where the right answers are known exactly.

Expected values come from geometry worked by hand (a bounce's positions, a shape's area and centroid), not
from the implementation; the metric checks take videos whose truth is known (rendered, frozen, recoloured,
spliced from two scenes) and check the metrics name that truth.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helios_jax.nano import world as w
from helios_jax.training.ode import read_prompts
from helios_jax.training.offload import read_metadata

RED_UP_LEFT = w.Scene("circle", "red", "dark blue", 12, (10.0, 10.0), (-0.5, -0.5))


def test_captions_say_the_scene():
    assert w.caption(RED_UP_LEFT) == "a red circle moves up and left on a dark blue background"
    orange = w.Scene("triangle", "orange", "grey", 14, (3.0, 4.0), (0.0, 1.0))
    assert w.caption(orange) == "an orange triangle moves right on a grey background"
    assert w.parse_caption("An  Orange triangle moves right on a GREY background ") == \
        w.Prompted("triangle", "orange", "grey", (0, 1))


def test_every_caption_parses_back_and_uses_only_the_vocabulary():
    assert len(set(w.VOCABULARY)) == len(w.VOCABULARY) and all(v == v.lower() for v in w.VOCABULARY)
    seen = set()
    for scene in w.sample_scenes(3 * 8 * 5 * 8, seed=0):  # the first 960: every caption once
        text = w.caption(scene)
        seen.add(text)
        assert set(text.split()) <= set(w.VOCABULARY)
        assert w.parse_caption(text) == w.Prompted(scene.shape, scene.colour, scene.background, scene.direction)
    assert len(seen) == 960


@pytest.mark.parametrize("text", ["a purple circle moves up on a black background",
                                  "a red circle moves up on a dark blue",
                                  "a red circle moves sideways on a black background", ""])
def test_captions_outside_the_grammar_are_one_clear_error(text):
    with pytest.raises(ValueError, match="outside the nano world's grammar"):
        w.parse_caption(text)


def test_scenes_are_deterministic_distinct_and_within_the_world():
    scenes = w.sample_scenes(50, seed=7)
    assert scenes == w.sample_scenes(50, seed=7) and scenes != w.sample_scenes(50, seed=8)
    assert len(set(scenes)) == 50 and w.sample_scene(3) == w.sample_scene(3)
    for s in scenes:
        assert 12 <= s.size <= 18
        assert 0 <= s.position[0] <= 64 - s.size and 0 <= s.position[1] <= 64 - s.size
        speed = np.hypot(*s.velocity)
        assert 0.6 <= speed <= 1.4
        for v, sign in zip(s.velocity, s.direction):  # an axis the caption names moves at >= 0.6 / sqrt(2)
            assert v == 0.0 if sign == 0 else abs(v) > 0.42
        start = np.array(s.position) + np.arange(9)[:, None] * np.array(s.velocity)  # 8 steps, no bounce yet:
        np.testing.assert_allclose(w.trajectory(s, 9), start)  # the captioned direction is what they show
    assert w.render(scenes[0], 5).tobytes() == w.render(w.sample_scenes(50, seed=7)[0], 5).tobytes()


def test_trajectory_bounces_elastically_inside_the_frame():
    scene = w.Scene("square", "white", "black", 14, (1.0, 48.0), (-0.75, 1.0))  # x limit 64 - 14 = 50
    track = w.trajectory(scene, 6)
    np.testing.assert_allclose(track[:, 1], [48, 49, 50, 49, 48, 47])
    np.testing.assert_allclose(track[:, 0], [1, 0.25, 0.5, 1.25, 2, 2.75])
    long = w.trajectory(w.sample_scene(1), 500)
    assert long.min() >= 0 and long.max() <= 64 - w.sample_scene(1).size


@pytest.mark.parametrize("shape, area, centroid", [("square", 1.0, (0.5, 0.5)), ("circle", np.pi / 4, (0.5, 0.5)),
                                                   ("triangle", 0.5, (2 / 3, 0.5))])
def test_render_draws_the_shape_where_the_trajectory_puts_it(shape, area, centroid):
    size = 16
    scene = w.Scene(shape, "green", "dark red", size, (20.3, 7.6), (0.45, 0.8))
    video = w.render(scene, 4)
    bg, fg = np.array(w.BACKGROUNDS["dark red"]), np.array(w.COLOURS["green"])
    cover = (video[..., 1].astype(float) - bg[1]) / (fg[1] - bg[1])  # the object's share of each pixel
    rows, cols = np.mgrid[0:64, 0:64] + 0.5
    for frame, (y, x) in zip(cover, w.trajectory(scene, 4)):
        assert frame.sum() == pytest.approx(area * size**2, rel=0.02)
        cy, cx = (frame * rows).sum() / frame.sum(), (frame * cols).sum() / frame.sum()
        assert (cy, cx) == pytest.approx((y + centroid[0] * size, x + centroid[1] * size), abs=0.07)  # supersampling: 1/16 px
    square = w.render(w.Scene("square", "blue", "black", 12, (5.0, 9.0), (0.0, 1.0)), 1)[0]  # on the pixel grid
    assert (square == w.COLOURS["blue"]).all(-1).sum() == 144 and (square == 0).all(-1).sum() == 64 * 64 - 144


def test_write_dataset_is_what_offload_reads_and_refuses_a_used_folder(tmp_path):
    scenes = w.sample_scenes(2, seed=5)
    meta = w.write_dataset(str(tmp_path / "data"), scenes, frames=9)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # the staging folder is gone
    clips = read_metadata(meta, height=64, width=64, min_frames=9)
    assert [c.caption for c in clips] == [w.caption(s) for s in scenes]
    assert [os.path.basename(c.video) for c in clips] == ["clip0000.mp4", "clip0001.mp4"]
    assert w.read_truth(str(tmp_path / "data" / "truth.json")) == scenes
    with pytest.raises(FileExistsError, match="not an empty folder"):
        w.write_dataset(str(tmp_path / "data"), scenes, frames=9)
    assert sorted(os.listdir(tmp_path)) == ["data"]
    with open(meta) as f:
        assert json.load(f)[1] == {"path": "videos/clip0001.mp4", "cut": [0, 9], "crop": [0, 64, 0, 64],
                                   "fps": 24.0, "cap": [w.caption(scenes[1])]}
    prompts = w.write_prompts(str(tmp_path / "prompts.txt"), scenes)
    assert read_prompts(prompts) == [(0, w.caption(scenes[0])), (1, w.caption(scenes[1]))]
