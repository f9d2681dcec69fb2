"""`helios-jax train` of the official stage-3b YAMLs end to end (stage_3_post.yaml and its GAN version) on the
embedded demo checkpoint and synthetic offloaded latents: the generator/critic schedule in metrics.jsonl,
every checkpoint's generator LoRA and EMA LoRA as diffusers-format files, the EMA LoRA merged into the
student by `helios-jax convert --merge-lora`, and a resumed run bit-identical to an uninterrupted one.

Slow: four DMD step programs (generator+critic and critic-only of stage_3_post.yaml; phase 0 and phase 1
of the GAN version), each some twenty DiT calls, compiled on the CPU; XLA's compile is most of the time.
What keeps it down, and what each choice costs:
* the programs are compiled once per process: `duel.compiled_duel_step` keeps them per (players, optimizer,
  kind), so the two resumed runs of the GAN test reuse the uninterrupted run's programs (no trace, no
  compile); no persistent XLA cache (writing the DMD executables to it aborted the process in a CI rehearsal);
* random draws of 5-D shapes are drawn flat (`training.samples.normal`/`uniform`, same values): threefry
  over a (1, 16, 9, 16, 16) shape alone took ~17x longer to compile than the flat draw;
* a demo DiT of 2 blocks (the blocks run under `nn.scan`: compile time does not depend on their number,
  run time does) and one GAN hook (block 1: the hooked path and its head, one head fewer to compile;
  the hook slots and the heads of several hooks are checked in tests/test_distill.py);
* 16 x 16 latents are kept: the half crop's hooked token grid (4 x 4) must survive the heads' strides.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from helios_jax import cli
from helios_jax.demo import TRANSFORMER, build_demo_checkpoint
from helios_jax.loading import load_transformer
from helios_jax.models import lora as lora_lib
from helios_jax.training import configs, data, trainer
from helios_jax.training.ema import EMA_FOLDER

CONFIGS = configs.FOLDER  # the shipped official YAMLs
PIXELS = 128  # latents 16 x 16: the half crop's hooked token grid (4 x 4) survives the heads' strides
TOKENS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The demo checkpoint with 2 blocks and two clips of three offloaded sections each (random latents)."""
    root = tmp_path_factory.mktemp("dmd")
    transformer = dataclasses.replace(TRANSFORMER, is_amplify_history=False, num_layers=2)
    ckpt = build_demo_checkpoint(root / "ckpt", transformer=transformer)
    rng = np.random.default_rng(0)
    folder = root / "data"
    folder.mkdir()
    for c in range(2):
        latents = rng.normal(size=(3, 16, 9, PIXELS // 8, PIXELS // 8)).astype(np.float32)
        embeds = rng.normal(size=(TOKENS, TRANSFORMER.text_dim)).astype(np.float32)
        data.write_offload(str(folder / data.offload_name(f"clip{c}_0-121", 121, PIXELS, PIXELS)), latents, embeds,
                           f"clip {c}")
    yield root, ckpt, str(folder)


def overrides(ckpt: str, data_root: str, out: str, **extra) -> list[str]:
    values = {
        "output_dir": out, "data_config.gan_data_root": f"[{data_root}]",
        "data_config.single_height": PIXELS, "data_config.single_width": PIXELS,
        "model_config.pretrained_model_name_or_path": ckpt, "model_config.transformer_model_name_or_path": ckpt,
        "model_config.subfolder": "transformer", "model_config.real_score_model_name_or_path": ckpt,
        "model_config.lora_rank": 4, "model_config.lora_alpha": 4.0,
        "model_config.critic_lora_rank": 4, "model_config.critic_lora_alpha": 4.0,
        "training_config.max_train_steps": 3, "training_config.checkpointing_steps": 3,
        "training_config.learning_rate": 1e-3, "training_config.critic_learning_rate": 1e-3,
        "training_config.dfake_gen_update_ratio": 2, "training_config.ema_start_step": 0,
        "training_config.gradient_checkpointing": "false", "training_config.gan_hooks": "[1]",
        "training_config.gan_cond_map_dim": 32, "training_config.gan_start_step": 1,
        "validation_config.validation_prompts": "[]",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def train(yaml: str, args: list[str], capsys) -> str:
    code = cli.main(["train", os.path.join(CONFIGS, yaml), *args])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def test_stage_3_post_schedule_exports_and_merge(workspace, tmp_path, capsys):
    root, ckpt, data_root = workspace
    out = str(tmp_path / "post")
    train("stage_3_post.yaml", overrides(ckpt, data_root, out), capsys)
    records = trainer.read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert ["generator_loss" in r for r in records] == [True, False, True]  # steps 0 and 2 (ratio 2)
    assert all(np.isfinite(r["critic_loss"]) and r["critic_grad_norm"] > 0 for r in records)
    assert all(np.isfinite(r["generator_loss"]) and r["generator_grad_norm"] > 0 for r in records[::2])
    assert [r["ema_decay"] for r in records] == [0.0, -1.0, pytest.approx(2 / 11)]  # EMA calls 1 and 2
    assert not any("gan" in k for r in records for k in r)  # no GAN in stage_3_post.yaml

    folder = os.path.join(out, "checkpoint-3")
    assert {"pytorch_lora_weights.safetensors", EMA_FOLDER, "generator", "critic", "ema", "data"} <= set(os.listdir(folder))
    config, base = load_transformer(os.path.join(ckpt, "transformer"))
    generator = lora_lib.load_lora(folder, config)
    ema = lora_lib.load_lora(os.path.join(folder, EMA_FOLDER), config)
    assert generator.spec.rank == 4 and generator.spec.history_patches  # the 3b trainable set: + patch-conv LoRA
    g_ups = [np.asarray(b) for _, b in lora_lib.factors(generator.lora).values()]
    e_ups = [np.asarray(b) for _, b in lora_lib.factors(ema.lora).values()]
    assert all(np.abs(b).max() > 0 for b in g_ups)  # B starts at 0: it trained
    assert any(not np.allclose(g, e) for g, e in zip(g_ups, e_ups))  # the EMA lags (decay 2/11 at its 2nd call)

    # The released student: the EMA LoRA fused into the transformer.
    merged = str(tmp_path / "student")
    assert cli.main(["convert", ckpt, merged, "--merge-lora", os.path.join(folder, EMA_FOLDER)]) == 0
    _, student = load_transformer(os.path.join(merged, "transformer"))
    expected = lora_lib.apply_loaded(base, ema)
    for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)


def test_stage_3_post_gan_version_and_bit_identical_resume(workspace, tmp_path, capsys):
    root, ckpt, data_root = workspace
    """Generator every step (ratio 1), the GAN from step 1: two programs, phase 0 and phase 1; then the
    same two steps as one step + a resume from checkpoint-1 (the process's compiled programs serve it)."""
    straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
    gan = {"training_config.dfake_gen_update_ratio": 1, "training_config.max_train_steps": 2}
    train("stage_3_post_gan_version.yaml", overrides(ckpt, data_root, straight, **gan), capsys)
    records = trainer.read_metrics(straight)
    assert "generator/gan_g_loss" not in records[0] and "critic/gan_d_loss" not in records[0]  # before gan_start_step
    assert np.isfinite(records[1]["generator/gan_g_loss"])  # the Cache-Grad generator term from step 1
    assert np.isfinite(records[1]["critic/gan_d_loss"]) and np.isfinite(records[1]["critic/r1_loss"])
    assert all(np.isfinite(r["generator_loss"]) and np.isfinite(r["critic_loss"]) for r in records)
    train("stage_3_post_gan_version.yaml", overrides(ckpt, data_root, parts, **{
        **gan, "training_config.max_train_steps": 1, "training_config.checkpointing_steps": 1}), capsys)
    train("stage_3_post_gan_version.yaml", overrides(ckpt, data_root, parts, **{
        **gan, "training_config.checkpointing_steps": 1}), capsys)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(trainer.read_metrics(parts)) == strip(records)
    for name in ("pytorch_lora_weights.safetensors", os.path.join(EMA_FOLDER, "pytorch_lora_weights.safetensors")):
        a = safetensors.numpy.load_file(os.path.join(straight, "checkpoint-2", name))
        b = safetensors.numpy.load_file(os.path.join(parts, "checkpoint-2", name))
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), name  # every bit of every tensor
