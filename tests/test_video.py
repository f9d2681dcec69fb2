"""Video and image I/O: inputs prepared exactly as diffusers' VideoProcessor prepares them, outputs
written atomically and readable back."""

from __future__ import annotations

import os

import numpy as np
import pytest
from diffusers.video_processor import VideoProcessor
from PIL import Image
from reference import to_numpy

from helios_jax.video import (
    MediaError,
    Mp4Writer,
    contact_sheet,
    load_image,
    load_video,
    read_mp4,
    write_mp4,
    write_png,
)


def _picture(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth random picture (codec-friendly), uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phases = rng.uniform(0, 6, size=(3, 3))
    channels = [np.sin(6 * x + p[0]) * np.cos(5 * y + p[1]) + p[2] / 6 for p in phases]
    return (np.clip(np.stack(channels, -1) * 0.4 + 0.5, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(48, 80), (37, 53)])  # same size as the target, and a resize
def test_image_preprocessing_matches_video_processor(size):
    picture = Image.fromarray(_picture(0, *size))
    expected = to_numpy(VideoProcessor(vae_scale_factor=8).preprocess(picture, height=32, width=48))[0]
    ours = load_image(picture, height=32, width=48)
    np.testing.assert_allclose(ours, expected.transpose(1, 2, 0), atol=1e-6)


def test_video_preprocessing_matches_video_processor():
    frames = [Image.fromarray(_picture(i, 40, 56)) for i in range(5)]
    expected = to_numpy(VideoProcessor(vae_scale_factor=8).preprocess_video(frames, height=32, width=48))[0]
    ours = load_video(frames, height=32, width=48)
    np.testing.assert_allclose(ours, expected.transpose(1, 2, 3, 0), atol=1e-6)


def test_mp4_round_trip_and_stream_writing(tmp_path):
    video = np.stack([_picture(i, 64, 96) for i in range(33)])
    path = tmp_path / "out.mp4"
    with Mp4Writer(path, fps=24) as out:
        out.write(video[:20])
        out.write(video[20:])
    back = read_mp4(path)
    assert back.shape == video.shape
    assert np.abs(back.astype(float) - video).mean() < 4  # lossy H.264 at crf 18
    assert os.listdir(tmp_path) == ["out.mp4"]
    assert load_video(path, 64, 96).shape == (33, 64, 96, 3)


def test_interrupted_write_leaves_nothing(tmp_path):
    video = np.stack([_picture(i, 32, 32) for i in range(4)])
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(tmp_path / "out.mp4", fps=24) as out:
            out.write(video)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_bad_paths_and_inputs(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        write_mp4(tmp_path / "absent" / "out.mp4", np.zeros((1, 16, 16, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MediaError, match="cannot read the image"):
        load_image(tmp_path / "broken.png", 16, 16)
    with pytest.raises(MediaError, match="cannot read the video"):
        load_video(tmp_path / "broken.png", 16, 16)
    with pytest.raises(MediaError, match="uint8"):
        write_mp4(tmp_path / "x.mp4", np.zeros((1, 16, 16, 3), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["broken.png"]


def test_contact_sheet(tmp_path):
    frames = [_picture(i, 10, 20) for i in range(5)]
    sheet = contact_sheet(frames, columns=3, gap=2)
    assert sheet.shape == (2 * 10 + 3 * 2, 3 * 20 + 4 * 2, 3)
    np.testing.assert_array_equal(sheet[2:12, 2:22], frames[0])
    np.testing.assert_array_equal(sheet[14:24, 24:44], frames[4])
    path = write_png(tmp_path / "sheet.png", sheet)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), sheet)
