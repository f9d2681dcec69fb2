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

from helios_jax import cli
from helios_jax.nano import metrics as m, world as w
from helios_jax.training.ode import read_prompts
from helios_jax.training.offload import read_metadata
from helios_jax.video import read_mp4, write_mp4

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
        assert w.SIZES[0] <= s.size <= w.SIZES[1] and w.SIZES == (20, 28)
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


# Three scenes, one per shape, that bounce within 99 frames (3 chunks) but not at the joins (frames 32 -> 33, 65 -> 66).
SCENES = (w.Scene("circle", "yellow", "dark blue", 14, (20.0, 6.0), (0.9, 0.9)),
          w.Scene("triangle", "magenta", "grey", 16, (40.0, 30.0), (-1.2, 0.0)),
          w.Scene("square", "orange", "dark green", 12, (10.0, 45.0), (0.0, -0.7)))
FRAMES = 99


@pytest.fixture(scope="module")
def rendered():
    return [w.render(scene, FRAMES) for scene in SCENES]


@pytest.fixture(scope="module")
def round_tripped(rendered, tmp_path_factory):
    """The rendered clips through h264 and back, as a generated video comes back (and the first one's mp4)."""
    folder = tmp_path_factory.mktemp("mp4")
    paths = [write_mp4(str(folder / f"clip{i}.mp4"), video) for i, video in enumerate(rendered)]
    return [read_mp4(p) for p in paths], paths[0]


def _check_right(report: m.Report, scene: w.Scene, motion_bound: float) -> None:
    s = report.summary
    for key in ("presence", "colour_accuracy", "shape_accuracy", "background_accuracy", "direction_correct"):
        assert s[key] == 1.0, key
    assert s["motion_error"] < motion_bound
    assert s["speed"] == pytest.approx(np.hypot(*scene.velocity), abs=0.05)
    assert max(abs(s[k]) for k in ("drift_r", "drift_g", "drift_b", "drift_brightness")) < 0.25
    assert s["background_error"] < 4.0
    assert all(0.75 < row["join_ratio"] < 1.33 for row in report.chunks[1:])
    assert report.chunks[0]["join_ratio"] is None and len(report.chunks) == 3


def test_the_worlds_own_clips_score_right(rendered):
    # Motion: each pixel's share is sampled at 8 x 8 points and rounded to uint8, so a centroid is within ~1/16 px
    # and the rule's prediction from two frames (a second difference) within ~4/16 px per axis; a frame just after
    # a bounce is predicted from a velocity measured across it (up to 2 |v| off, a few frames per chunk).
    for scene, video in zip(SCENES, rendered):
        _check_right(m.evaluate(video, w.caption(scene)), scene, motion_bound=0.3)


def test_the_scores_survive_h264(round_tripped):
    # h264 at crf 18 adds ~0.05-0.1 px of noise to each centroid: the motion bound is looser.
    for scene, video in zip(SCENES, round_tripped[0]):
        _check_right(m.evaluate(video, w.caption(scene)), scene, motion_bound=0.5)


def test_a_frozen_video_obeys_the_rule_but_does_not_move(rendered):
    frozen = np.repeat(rendered[0][:1], FRAMES, axis=0)
    report = m.evaluate(frozen, w.caption(SCENES[0]))
    assert report.summary["speed"] == 0.0 and report.summary["motion_error"] == 0.0
    assert report.summary["direction_correct"] == 0.0 and report.summary["presence"] == 1.0
    assert report.summary["join_ratio"] is None  # no change anywhere: nothing to compare a join with


def test_a_colour_shift_is_drift_of_its_size_and_a_seam(rendered):
    shifted = rendered[2].astype(np.int16)
    shifted[66:, ..., 2] += 30  # the last chunk bluer by 30 (orange 0, dark green 15: nothing clips)
    report = m.evaluate(shifted.astype(np.uint8), w.caption(SCENES[2]))
    last = report.chunks[2]
    assert last["drift_b"] == pytest.approx(30, abs=0.25) and abs(last["drift_r"]) < 0.25
    assert last["drift_brightness"] == pytest.approx(0.114 * 30, abs=0.25)
    assert report.summary["drift_b"] == last["drift_b"]  # the summary's drift is the last chunk's
    assert last["background_error"] == pytest.approx(30, abs=0.5)
    assert last["join_ratio"] > 5 and report.chunks[1]["join_ratio"] < 1.33


def test_a_prompt_switch_is_scored_per_chunk(rendered):
    switched = np.concatenate([rendered[0][:33], rendered[1][:66]])  # scene 0's first chunk, then scene 1 from its start
    captions = [w.caption(SCENES[0]), w.caption(SCENES[1]), w.caption(SCENES[1])]
    report = m.evaluate(switched, captions)
    assert [r["colour_accuracy"] for r in report.chunks] == [1.0, 1.0, 1.0]
    assert [r["shape_accuracy"] for r in report.chunks] == [1.0, 1.0, 1.0]
    assert [r["background_accuracy"] for r in report.chunks] == [1.0, 1.0, 1.0]
    held = m.evaluate(switched, w.caption(SCENES[0]))  # the first prompt all along: wrong after the switch
    assert [r["colour_accuracy"] for r in held.chunks] == [1.0, 0.0, 0.0]
    assert [r["prompt"] for r in report.chunks] == captions
    table = report.table()
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("|")]
    assert rows == ["| chunk", "| ---", "| 0", "| 1", "| 2", "| summary"]
    assert [r["direction_correct"] for r in report.chunks] == [1.0, 1.0, None]  # each prompt's first chunk


def test_evaluate_refuses_what_it_cannot_score(rendered):
    with pytest.raises(ValueError, match="2 prompts for a video of 3 chunks"):
        m.evaluate(rendered[0], [w.caption(SCENES[0])] * 2)
    with pytest.raises(ValueError, match="not the nano world's 64x64"):
        m.evaluate(rendered[0][:, :32], w.caption(SCENES[0]))
    with pytest.raises(ValueError, match="outside the nano world's grammar"):
        m.evaluate(rendered[0], "a red dragon flies")


def test_eval_command(round_tripped, tmp_path, capsys):
    _, path = round_tripped
    out = tmp_path / "report.json"
    assert cli.main(["eval", path, "--prompt", w.caption(SCENES[0]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["summary"]["colour_accuracy"] == 1.0 and len(report["chunks"]) == 3
    assert f"| summary | {report['summary']['presence']:.3f} |" in printed
    csv = tmp_path / "switch.csv"  # generate's interactive CSV: prompt 1 from chunk 2 on (--interpolate_time 2)
    csv.write_text(f"id,prompt_index,prompt\n0,0,{w.caption(SCENES[0])}\n0,1,{w.caption(SCENES[1])}\n")
    assert cli.main(["eval", path, "--interactive_prompt_csv_path", str(csv), "--interpolate_time", "2"]) == 0
    assert "| 2 | 1.000 | 0.000 | 0.000 | 0.000 |" in capsys.readouterr().out  # colour, shape, background wrong
    bad = tmp_path / "bad.json"
    assert cli.main(["eval", path, "--prompt", "a red dragon flies", "--json", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("helios-jax eval: error: the caption 'a red dragon flies' is outside")
    assert not bad.exists()
    assert cli.main(["eval", str(tmp_path / "missing.mp4"), "--prompt", w.caption(SCENES[0])]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["eval", path]) == 2
    assert "--prompt CAPTION or --interactive_prompt_csv_path CSV" in capsys.readouterr().err
