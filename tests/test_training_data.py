"""Offloaded data (helios_jax.training.data / offload): sample assembly by hand, the bucketed and sharded
plan, resumable iteration, the official .pt files, the crop/resize against torch, bad input, and (slow)
`helios-jax offload` on a synthetic mp4 with the embedded demo checkpoint read back by the dataset."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helios_jax import cli
from helios_jax.training import DataError, data as D, offload as O

C, HL, WL = 4, 2, 3


def sections_valued(n):
    """(n, C, 9, HL, WL) latents whose frame t of section s holds 100 s + t + 1."""
    values = 100 * np.arange(n)[:, None] + np.arange(9)[None, :] + 1.0
    return np.broadcast_to(values[:, None, :, None, None], (n, C, 9, HL, WL)).astype(np.float32).copy()


def test_assemble_by_hand():
    lat = sections_valued(3)
    first = D.assemble(lat, 0)
    assert not np.any(first["x0"]) and not np.any(first["history"]), "first chunk: no anchor, zero history"
    np.testing.assert_array_equal(first["target"][0, :, 0, 0], np.arange(1, 10))
    last = D.assemble(lat, 2)
    np.testing.assert_array_equal(last["x0"][0, :, 0, 0], [1])
    np.testing.assert_array_equal(last["history"][0, :, 0, 0], [0] + list(range(1, 10)) + list(range(101, 110)))
    np.testing.assert_array_equal(last["target"][0, :, 0, 0], np.arange(201, 210))
    mid = D.assemble(lat, 1)
    np.testing.assert_array_equal(mid["history"][0, :, 0, 0], [0] * 10 + list(range(1, 10)))
    assert mid["history"].shape == (C, 19, HL, WL) and mid["target"].shape == (C, 9, HL, WL)
    with pytest.raises(ValueError, match="sections"):
        D.assemble(lat, 3)


def test_sample_choice_is_deterministic_and_uniform():
    draws = [D.sample_choice(43, 0, i, 3) for i in range(3000)]
    assert draws == [D.sample_choice(43, 0, i, 3) for i in range(3000)]
    assert draws != [D.sample_choice(43, 1, i, 3) for i in range(3000)]
    counts = np.bincount(draws, minlength=3) / 3000
    assert np.all(np.abs(counts - 1 / 3) < 4 * np.sqrt(2 / 9 / 3000))


def write_clips(folder, specs, seed=0):
    """specs: (uttid, frames, sections); latents of 16 x 9 x HL x WL, prompt (8, 4) bf16."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for uttid, frames, n in specs:
        D.write_offload(os.path.join(folder, D.offload_name(uttid, frames, 48, 80)),
                        rng.standard_normal((n, 16, 9, HL, WL)).astype(np.float32),
                        rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16), f"caption of {uttid}")


def test_index_filters_and_errors(tmp_path):
    write_clips(tmp_path / "a", [("v1_0-121", 121, 3), ("v2_0-81", 81, 2)])
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "weird.safetensors").write_bytes(b"")
    files = D.index_folders([str(tmp_path / "a")])
    assert [(f.uttid, f.bucket) for f in files] == [("v1_0-121", (121, 48, 80))]
    assert len(D.index_folders([str(tmp_path / "a")], min_frames=81)) == 2
    with pytest.raises(DataError, match="no usable"):
        D.index_folders([str(tmp_path / "a")], resolutions=[(384, 640)])
    with pytest.raises(DataError, match="do not exist"):
        D.index_folders([str(tmp_path / "missing")])


def test_bucketed_sharded_plan(tmp_path):
    specs = [(f"a{i}_0-121", 121, 3) for i in range(9)] + [(f"b{i}_0-161", 161, 4) for i in range(6)]
    write_clips(tmp_path / "d", specs)
    shards = [D.OffloadedDataset([str(tmp_path / "d")], batch_size=2, seed=5, process_index=r, process_count=2)
              for r in range(2)]
    assert shards[0].batches_per_epoch == 2 + 1  # 9 -> 8 usable -> 4 per rank -> 2 batches; 6 -> 3 -> 1 batch
    plans = [s.epoch_plan(0) for s in shards]
    assert [b for b, _ in plans[0]] == [b for b, _ in plans[1]], "every process takes the same bucket per step"
    seen = [i for plan in plans for _, batch in plan for i in batch]
    assert len(seen) == len(set(seen)), "shards are disjoint"
    for plan, ds in zip(plans, shards):
        for bucket, batch in plan:
            assert len(batch) == 2 and all(ds.files[i].bucket == bucket for i in batch)
    assert shards[0].epoch_plan(0) == plans[0] and shards[0].epoch_plan(1) != plans[0]


def test_iterator_batches_and_resumes(tmp_path):
    write_clips(tmp_path / "d", [(f"a{i}_0-121", 121, 3) for i in range(4)] + [("b_0-161", 161, 4), ("c_0-161", 161, 4)])
    ds = D.OffloadedDataset([str(tmp_path / "d")], batch_size=2, seed=1)
    it = ds.iterator()
    batch = next(it)
    assert batch["x0"].shape == (2, 16, 1, HL, WL) and batch["history"].shape == (2, 16, 19, HL, WL)
    assert batch["target"].shape == (2, 16, 9, HL, WL) and batch["prompt_embeds"].shape == (2, 8, 4)
    for j, index in enumerate(batch["index"]):  # each sample is the clip's assembly for its drawn section
        clip = D.read_offload(ds.files[index].path)
        want = D.assemble(clip["vae_latent"], D.sample_choice(1, int(batch["epoch"][j]), int(index), 3 if index < 4 else 4))
        for key in ("x0", "history", "target"):
            np.testing.assert_array_equal(batch[key][j], want[key])
    for _ in range(4):  # into the second epoch
        next(it)
    state = it.get_state()
    path = tmp_path / "state.json"
    D.save_iterator_state(it, str(path))
    ahead = [next(it) for _ in range(3)]
    resumed = ds.iterator()
    D.load_iterator_state(resumed, str(path))
    for a, b in zip(ahead, [next(resumed) for _ in range(3)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert state == json.loads(path.read_text())


def test_official_pt_files_read(tmp_path):
    from PIL import Image

    lat = torch.randn(3, 16, 9, HL, WL)
    emb = torch.randn(512, 8).to(torch.bfloat16)
    path = tmp_path / "clip_0-129_121_384_640.pt"
    torch.save({"vae_latent": lat, "prompt_embed": emb, "first_frames_image": Image.new("RGB", (8, 8)),
                "prompt_raw": "a cat"}, path)
    out = D.read_offload(str(path))
    np.testing.assert_array_equal(out["vae_latent"], lat.numpy())
    np.testing.assert_array_equal(out["prompt_embed"].astype(np.float32), emb.float().numpy())
    assert out["prompt_embed"].dtype == ml_dtypes.bfloat16 and out["prompt_raw"] == "a cat"
    assert D.parse_name(str(path)).bucket == (121, 384, 640)


def test_fit_frames_equals_the_official_crop_and_resize():
    frames = np.random.default_rng(0).integers(0, 256, (2, 60, 120, 3), dtype=np.uint8)
    crop = (4, 110, 2, 58)
    out = O.fit_frames(frames, crop, 48, 80)
    video = torch.from_numpy(frames).float() / 127.5 - 1
    video = video.permute(0, 3, 1, 2)[:, :, 2:58, 4:110]  # crop [x0, x1, y0, y1]
    new_w = int(56 / (48 / 80))  # aspect 56/106 < 48/80: crop the width, centred
    left = (106 - new_w) // 2
    assert (new_w, left) == (93, 6)
    ref = F.interpolate(video[..., left:left + new_w], (48, 80), mode="bilinear", antialias=True, align_corners=False)
    assert out.shape == (2, 3, 48, 80)
    assert np.abs(out - ref.numpy()).max() < 1e-5


def test_length_and_aspect_buckets():
    assert O.length_bucket(129) == 121 and O.length_bucket(200) == 193 and O.length_bucket(501) == 501
    assert O.length_bucket(15) == 15
    assert O.aspect_bucket(480, 832) == (384, 640) and O.aspect_bucket(720, 720) == (512, 512)


MOVING = 81  # frames of the synthetic clip: length bucket 81 -> two 33-frame chunks


def write_moving_shapes(folder, frames=MOVING, height=48, width=80):
    from helios_jax.video import write_mp4

    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    yy, xx = np.mgrid[:height, :width]
    video = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        video[t][(xx - 10 - t * 0.7) ** 2 + (yy - 24 - 10 * np.sin(t / 9)) ** 2 < 36] = (255, 80, 0)
        video[t][(abs(xx - 70 + t * 0.6) < 5) & (abs(yy - 30) < 5)] = (0, 200, 255)
    write_mp4(os.path.join(folder, "videos", "shapes.mp4"), video, fps=24)
    meta = [{"path": "videos/shapes.mp4", "cut": [0, frames], "crop": [0, width, 0, height], "fps": 24.0,
             "cap": ["a red ball and a blue box moving"]}]
    path = os.path.join(folder, "meta.json")
    with open(path, "w") as f:
        json.dump(meta, f)
    return path


@pytest.fixture
def fake_checkpoint(tmp_path):
    for name in ("vae", "text_encoder", "tokenizer"):
        os.makedirs(tmp_path / "ckpt" / name)
    return str(tmp_path / "ckpt")


def _offload_args(meta, ckpt, out):
    return ["offload", meta, "--checkpoint", ckpt, "--output", out, "--height", "48", "--width", "80",
            "--min-frames", "81"]


def test_offload_bad_input_is_one_error_and_writes_nothing(tmp_path, fake_checkpoint, capsys):
    meta = write_moving_shapes(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    entries = json.load(open(meta))
    cases = {
        "missing data folder": [dict(entries[0], path="nowhere/shapes.mp4")],
        "too short": [dict(entries[0], cut=[0, 50])],
        "bad metadata": [dict(entries[0], cut="0-81")],
        "off aspect": [dict(entries[0], crop=[0, 48, 0, 48])],
    }
    for name, value in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.json"
        bad.write_text(json.dumps(value))
        (tmp_path / "data" / bad.name).write_text(json.dumps(value))
        with pytest.raises(DataError, match="nothing written"):
            O.offload(str(tmp_path / "data" / bad.name), fake_checkpoint, out, height=48, width=80, min_frames=81)
        assert cli.main(_offload_args(str(tmp_path / "data" / bad.name), fake_checkpoint, out)) == 2
        assert "error" in capsys.readouterr().err
        assert not os.path.exists(out), name
    (tmp_path / "data" / "list.json").write_text(json.dumps({"path": "x"}))
    with pytest.raises(DataError, match="JSON list"):
        O.read_metadata(str(tmp_path / "data" / "list.json"), height=48, width=80)
    with pytest.raises(DataError, match="no vae/ folder"):
        O.offload(meta, str(tmp_path), out, height=48, width=80)
    json_path = tmp_path / "data" / "mixed.json"
    json_path.write_text(json.dumps([entries[0], dict(entries[0], cut=[0, 50], extra=1)]))
    with pytest.warns(UserWarning, match="skipping 1 clip"):
        clips = O.read_metadata(str(json_path), height=48, width=80, min_frames=81, skip_unfit=True)
    assert [c.uttid for c in clips] == ["shapes_0-81"] and clips[0].frames == 81


@pytest.mark.slow
def test_offload_synthetic_clip_reads_back(tmp_path):
    """`helios-jax offload` with the demo checkpoint (about a minute on a free CPU core: VAE and UMT5 compile)."""
    from helios_jax.demo import build_demo_checkpoint

    ckpt = build_demo_checkpoint(tmp_path / "ckpt")
    meta = write_moving_shapes(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    assert cli.main(_offload_args(meta, ckpt, out)) == 0
    files = os.listdir(out)
    assert files == ["shapes_0-81_81_48_80.safetensors"]
    clip = D.read_offload(os.path.join(out, files[0]))
    assert clip["vae_latent"].shape == (2, 16, 9, 6, 10) and clip["prompt_embed"].shape == (512, 64)
    assert clip["prompt_raw"] == "a red ball and a blue box moving" and clip["prompt_embed"].dtype == ml_dtypes.bfloat16
    assert np.isfinite(clip["vae_latent"]).all() and clip["vae_latent"].std() > 0.1
    # the caption embedding is the prompt encoder's
    from helios_jax.prompts import PromptEncoder

    want = PromptEncoder.from_pretrained(ckpt).encode("a red ball and a blue box moving", max_sequence_length=512)
    np.testing.assert_allclose(clip["prompt_embed"].astype(np.float32), np.asarray(want[0], np.float32), atol=1e-2, rtol=1e-2)
    mtime = os.path.getmtime(os.path.join(out, files[0]))
    assert cli.main(_offload_args(meta, ckpt, out)) == 0 and os.path.getmtime(os.path.join(out, files[0])) == mtime
    ds = D.OffloadedDataset([out], batch_size=1, seed=0, min_frames=81)
    batch = next(ds.iterator())
    assert batch["history"].shape == (1, 16, 19, 6, 10) and batch["target"].shape == (1, 16, 9, 6, 10)
    assert not [f for f in os.listdir(out) if f.endswith(".partial")]
