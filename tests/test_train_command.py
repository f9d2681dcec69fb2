"""`helios-jax train` end to end on the official YAMLs: synthetic videos -> `helios-jax offload` with the
embedded demo checkpoint -> stage 1 (with validation videos and a resume), stage 2 packed and sequential
-> checkpoints whose LoRA the pipeline loads. Bad input to the command: one error, nothing written.

Slow (a few minutes on a free CPU: the VAE, UMT5, the pipeline and three training steps compile).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import training_fixtures as tf

from helios_jax import cli
from helios_jax.demo import TRANSFORMER, build_demo_checkpoint
from helios_jax.models import lora as lora_lib
from helios_jax.training import trainer
from helios_jax.video import write_mp4

PIXELS, FRAMES = 64, 121  # latents 8 x 8 (a three-level pyramid), the official minimum clip length

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The demo checkpoint and two offloaded synthetic clips."""
    root = tmp_path_factory.mktemp("train")
    # The official configs' model has no learned history key scale (the packed stage-2 forward refuses one).
    ckpt = build_demo_checkpoint(root / "ckpt", transformer=dataclasses.replace(TRANSFORMER, is_amplify_history=False))
    videos = tf.moving_square_videos(2, 4, seed=3, pixels=PIXELS)  # (clips, sections, 3, 33, H, W) in [-1, 1]
    meta = []
    os.makedirs(root / "videos")
    for c, clip in enumerate(videos):
        frames = np.concatenate(list(clip), axis=1)[:, :FRAMES].transpose(1, 2, 3, 0)  # (T, H, W, 3)
        write_mp4(str(root / "videos" / f"clip{c}.mp4"), ((frames + 1) * 127.5).round().astype(np.uint8), fps=24)
        meta.append({"path": f"videos/clip{c}.mp4", "cut": [0, FRAMES], "crop": [0, PIXELS, 0, PIXELS],
                     "fps": 24.0, "cap": [f"a square of colour {c} moving"]})
    with open(root / "meta.json", "w") as f:
        json.dump(meta, f)
    data = str(root / "data")
    assert cli.main(["offload", str(root / "meta.json"), "--checkpoint", ckpt, "--output", data,
                     "--height", str(PIXELS), "--width", str(PIXELS)]) == 0
    return root, ckpt, data


def overrides(root, ckpt: str, data: str, out: str, **extra: str) -> list[str]:
    """The official YAML pointed at the local checkpoint and data, tiny LoRA, a couple of steps."""
    values = {
        "output_dir": out, "data_config.instance_data_root": f"[{data}]",
        "data_config.single_height": PIXELS, "data_config.single_width": PIXELS,
        "model_config.pretrained_model_name_or_path": ckpt, "model_config.transformer_model_name_or_path": ckpt,
        "model_config.subfolder": "transformer", "model_config.lora_rank": 4, "model_config.lora_alpha": 4.0,
        "training_config.max_train_steps": 2, "training_config.checkpointing_steps": 2,
        "training_config.train_batch_size": 2, "training_config.learning_rate": 1e-3,
        "validation_config.first_step_valid": "false", "validation_config.validation_steps": 1000,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def train(yaml: str, args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["train", yaml, *args])  # a shipped config by its bare name
    return code, capsys.readouterr().err


def test_stage1_trains_validates_checkpoints_and_resumes(workspace, tmp_path, capsys):
    root, ckpt, data = workspace
    out = str(tmp_path / "stage1")
    video = {"validation_config.first_step_valid": "true", "validation_config.validation_steps": 2,
             "validation_config.validation_height": PIXELS, "validation_config.validation_width": PIXELS,
             "validation_config.validation_max_num_frames": 33, "validation_config.num_inference_steps": 2}
    code, err = train("stage_1_init.yaml", overrides(root, ckpt, data, out, **video), capsys)
    assert code == 0, err
    records = trainer.read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] == pytest.approx(1e-3) for r in records)
    assert sorted(os.listdir(os.path.join(out, "validation"))) == ["step-0-0.mp4", "step-2-0.mp4"]
    folder = os.path.join(out, "checkpoint-2")
    assert {"pytorch_lora_weights.safetensors", "transformer_partial.safetensors"} <= set(os.listdir(folder))
    loaded = lora_lib.load_lora(folder, tf_config(ckpt))
    ups = [b for _, b in lora_lib.factors(loaded.lora).values()]
    assert loaded.spec.rank == 4 and all(np.abs(np.asarray(b)).max() > 0 for b in ups)  # B starts at 0: it trained

    # Resume: two more steps continue from checkpoint-2 (the config's max_train_steps may change).
    code, err = train("stage_1_init.yaml", overrides(root, ckpt, data, out, **{
        **video, "training_config.max_train_steps": 4, "validation_config.first_step_valid": "false"}), capsys)
    assert code == 0, err
    assert [r["step"] for r in trainer.read_metrics(out)] == [1, 2, 3, 4]
    assert "checkpoint-4" in os.listdir(out)


def test_stage1_init_starts_from_a_wan_transformer_folder(workspace, tmp_path, capsys):
    """stage_1_init.yaml's transformer is Wan 2.1's WanTransformer3DModel: it trains as the Helios DiT, its
    history patch convs derived from Wan's patch embedding (then trained in full)."""
    from diffusers import WanTransformer3DModel
    from reference import randomize

    root, ckpt, data = workspace
    demo = tf_config(ckpt)
    wan = randomize(WanTransformer3DModel(
        patch_size=demo.patch_size, num_attention_heads=demo.num_attention_heads,
        attention_head_dim=demo.attention_head_dim, in_channels=demo.in_channels, out_channels=demo.out_channels,
        text_dim=demo.text_dim, freq_dim=demo.freq_dim, ffn_dim=demo.ffn_dim, num_layers=demo.num_layers), 5, 0.05)
    wan.save_pretrained(str(tmp_path / "wan" / "transformer"))
    out = str(tmp_path / "stage1-wan")
    args = overrides(root, ckpt, data, out, **{"model_config.transformer_model_name_or_path": str(tmp_path / "wan")})
    code, err = train("stage_1_init.yaml", args, capsys)
    assert code == 0, err
    assert [r["step"] for r in trainer.read_metrics(out)] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in trainer.read_metrics(out))
    assert "transformer_partial.safetensors" in os.listdir(os.path.join(out, "checkpoint-2"))


def tf_config(ckpt: str):
    from helios_jax.loading import COMPONENTS

    return COMPONENTS["transformer"].read_config(os.path.join(ckpt, "transformer"))


def test_stage2_packed(workspace, tmp_path, capsys):
    """stage_2_post.yaml as published (is_navit_pyramid true: the pyramid examples in one packed forward).
    The sequential variant runs the same pyramid_loss, one term per example, in
    tests/test_trainer.py::test_tiny_helios_stage2_learns."""
    root, ckpt, data = workspace
    out = str(tmp_path / "stage2")
    extra = {"training_config.max_train_steps": 1, "training_config.checkpointing_steps": 1,
             "training_config.train_batch_size": 1}
    code, err = train("stage_2_post.yaml", overrides(root, ckpt, data, out, **extra), capsys)
    assert code == 0, err
    (record,) = trainer.read_metrics(out)
    assert np.isfinite(record["loss"]) and record["grad_norm"] > 0 and not [k for k in record if k.startswith("loss_")]
    files = os.listdir(os.path.join(out, "checkpoint-1"))
    assert "pytorch_lora_weights.safetensors" in files
    assert "transformer_partial.safetensors" not in files  # stage 2-post gives the patch convs a LoRA


@pytest.mark.parametrize("change,message", [
    ({"data_config.instance_data_root": "[nowhere]"}, "no data folder at 'nowhere'"),
    ({"training_config.learning_rate": "[1]"}, "training_config.learning_rate = [1] (list) has the wrong type"),
    ({"model_config.subfolder": "vae"}, "_class_name 'AutoencoderKLWan' is not 'HeliosTransformer3DModel'"),
    ({"data_config.single_height": 128, "data_config.single_width": 128}, "no usable offload files"),
    ({"mesh": "context=3"}, "has 3 devices but"),
])
def test_bad_input_is_one_error_and_nothing_written(workspace, tmp_path, capsys, change, message):
    root, ckpt, data = workspace
    out = tmp_path / "run"
    code, err = train("stage_1_init.yaml", overrides(root, ckpt, data, str(out), **change), capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_resume_with_a_changed_config_is_refused_before_any_compute(workspace, tmp_path, capsys):
    root, ckpt, data = workspace
    out = tmp_path / "run"
    out.mkdir()
    saved = {"training_config": {"learning_rate": 5.0}}
    (out / trainer.CONFIG_FILE).write_text(json.dumps(saved))
    code, err = train("stage_1_init.yaml", overrides(root, ckpt, data, str(out)), capsys)
    assert code == 2 and "holds a run with another config" in err and "learning_rate" in err, err
    assert sorted(os.listdir(out)) == [trainer.CONFIG_FILE]
