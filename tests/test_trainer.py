"""The generic training step and loop: optimizer parity with torch, schedules, sequential terms, one
compile per shape, orbax checkpoints and resume, config-mismatch refusal, and a tiny Helios that learns."""

import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import training_fixtures as tf

from helios_jax import demo
from helios_jax.config import ConfigError
from helios_jax.loading import load_vae
from helios_jax.training import trainer as T

LOSS = tf.make_stage1_loss()  # one object, so every run in this module reuses the compiled step
STAGE2_LOSSES = tf.make_stage2_losses()


def toy_loss(trainable, frozen, batch, key):
    pred = batch["x"] @ trainable["w"] + frozen["b"]
    noise = 0.01 * jax.random.normal(key, pred.shape)
    return jnp.mean((pred + noise - batch["y"]) ** 2), {"pred": jnp.mean(pred)}


def toy_data(rows: int = 64, features: int = 4, batch: int = 8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = x @ np.arange(features, dtype=np.float32)[:, None]
    return grain.MapDataset.source([{"x": x[i], "y": y[i]} for i in range(rows)]).shuffle(seed=0).repeat().batch(batch)


def toy_start():
    return {"w": jnp.zeros((4, 1))}, {"b": jnp.zeros(())}


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


class Interrupt(Exception):
    pass


def interrupt_at(step_to_stop: int):
    def hook(trainable, frozen, step, folder):
        if step == step_to_stop:
            raise Interrupt
    return hook


def test_optimizer_matches_torch_adamw_with_clipping():
    """Three steps of clip-by-global-norm + AdamW against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW
    (the official optimizer) on the same gradients; float32, max-abs <= 1e-6."""
    cfg = T.OptimizerConfig(learning_rate=1e-2, adam_weight_decay=1e-2, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    grads = [{k: (3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    opt = T.make_optimizer(cfg)
    ours, state = jax.tree.map(jnp.asarray, params), opt.init(jax.tree.map(jnp.asarray, params))
    theirs = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(theirs.values(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    for g in grads:
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)
        for k, t in theirs.items():
            t.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(theirs.values(), 1.0)
        torch_opt.step()
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), theirs[k].detach().numpy(), atol=1e-6, rtol=0)


def test_learning_rate_schedules():
    """"constant" ignores the warmup; "constant_with_warmup" is step / warmup * lr below the warmup
    (diffusers' get_constant_schedule_with_warmup): exact values."""
    constant = T.learning_rate(T.OptimizerConfig(learning_rate=5e-5, lr_warmup_steps=500))
    assert [float(constant(s)) for s in (0, 250, 10_000)] == [np.float32(5e-5)] * 3
    warm = T.learning_rate(T.OptimizerConfig(learning_rate=1e-4, lr_scheduler="constant_with_warmup",
                                             lr_warmup_steps=1000))
    np.testing.assert_allclose([float(warm(s)) for s in (0, 1, 500, 999, 1000, 5000)],
                               [0.0, 1e-7, 5e-5, 9.99e-5, 1e-4, 1e-4], rtol=1e-5)  # float32 schedule
    with pytest.raises(ConfigError, match="lr_scheduler = 'cosine'"):
        T.OptimizerConfig(lr_scheduler="cosine")


def test_sequential_terms_sum_their_gradients_in_one_update():
    """Stage 2's sequential variant: one backward per term, gradients summed, ONE optimizer step: the same
    update as one loss that is the sum of the terms."""
    def term(scale):
        return lambda tr, fr, batch, key: (scale * toy_loss(tr, fr, batch, key)[0], {})
    cfg = T.OptimizerConfig(learning_rate=1e-1)
    opt, sched = T.make_optimizer(cfg), T.learning_rate(cfg)
    batch = next(iter(toy_data().to_iter_dataset()))
    trainable, frozen = toy_start()
    seq, m = T.make_step([term(1.0), term(2.0)], opt, sched)(T.init_state(trainable, opt), frozen, batch,
                                                            jax.random.key(0))
    one, _ = T.make_step(term(3.0), opt, sched)(T.init_state(trainable, opt), frozen, batch, jax.random.key(0))
    assert int(seq.step) == 1 and int(seq.opt_state[1][0].count) == 1
    np.testing.assert_allclose(seq.trainable["w"], one.trainable["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m["loss"], (m["loss_0"] + m["loss_1"]) / 2, rtol=1e-6)


def test_step_compiles_once_per_batch_shape():
    cfg = T.OptimizerConfig(learning_rate=1e-2)
    opt = T.make_optimizer(cfg)
    step = T.make_step(toy_loss, opt, T.learning_rate(cfg))
    trainable, frozen = toy_start()
    state = T.init_state(trainable, opt)
    small, large = (next(iter(toy_data(batch=b).to_iter_dataset())) for b in (4, 8))
    for i, batch in enumerate([small, large, small, large, small]):
        state, _ = step(state, frozen, batch, T.step_key(0, i))
    assert step._cache_size() == 2


def test_checkpoints_resume_and_config_mismatch(tmp_path):
    """Toy model: checkpoint-STEP folders with the orbax state and the data position; a run interrupted after
    its step-4 checkpoint and resumed ends bit-identical (params and metrics) to one run straight through; a
    resume with a changed config is one error and writes nothing."""
    stage = T.Stage(toy_loss, T.OptimizerConfig(learning_rate=1e-1))
    straight = T.RunConfig(output_dir=str(tmp_path / "a"), max_train_steps=10, checkpointing_steps=4,
                           config={"training_config": {"learning_rate": 0.1, "max_train_steps": 10}})
    final = T.train(straight, stage, *toy_start(), iter(toy_data().to_iter_dataset()))
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-10", "checkpoint-4", "checkpoint-8", "config.json",
                                                  "metrics.jsonl"]
    broken = dataclasses.replace(straight, output_dir=str(tmp_path / "b"), validation_steps=6)
    with pytest.raises(Interrupt):
        T.train(broken, dataclasses.replace(stage, validate=interrupt_at(6)), *toy_start(),
                iter(toy_data().to_iter_dataset()))
    assert len(T.read_metrics(broken.output_dir)) == 6
    resumed = T.train(dataclasses.replace(broken, validation_steps=None), stage, *toy_start(),
                      iter(toy_data().to_iter_dataset()))
    assert tree_equal(final, resumed)
    assert without_seconds(T.read_metrics(straight.output_dir)) == without_seconds(T.read_metrics(broken.output_dir))

    before = {p: os.path.getmtime(os.path.join(broken.output_dir, p)) for p in os.listdir(broken.output_dir)}
    changed = dataclasses.replace(broken, config={"training_config": {"learning_rate": 0.2, "max_train_steps": 20}})
    with pytest.raises(ConfigError, match=r"changed: training_config.learning_rate: 0.1 -> 0.2"):
        T.train(changed, stage, *toy_start(), iter(toy_data().to_iter_dataset()))
    after = {p: os.path.getmtime(os.path.join(broken.output_dir, p)) for p in os.listdir(broken.output_dir)}
    assert before == after
    with pytest.raises(ConfigError, match="no such checkpoint"):
        T.train(dataclasses.replace(broken, resume_from_checkpoint="checkpoint-5"), stage, *toy_start(),
                iter(toy_data().to_iter_dataset()))


def test_ema_every_step_its_closed_form_export_and_resume(tmp_path):
    """Stage(ema=...), stage 3a's EMA: one call per step, the official warm-up (EMAModel_Zero3: n-th call,
    s = n - start - 1, d = 0 while s <= 0 else min((1 + s) / (10 + s), decay)) against a float64 replay of
    the exported trainables; each checkpoint exports the EMA into model_ema/; a resumed run is bit-identical."""
    from helios_jax.training.ema import EMA_FOLDER, EmaConfig
    start, decay, steps = 3, 0.8, 8
    exported = {"trained": [], "ema": []}

    def export(trainable, folder):
        exported["ema" if os.path.basename(folder) == EMA_FOLDER else "trained"].append(np.asarray(trainable["w"]))

    stage = T.Stage(toy_loss, T.OptimizerConfig(learning_rate=1e-1), export=export, ema=EmaConfig(decay, start))
    run = T.RunConfig(output_dir=str(tmp_path / "a"), max_train_steps=steps, checkpointing_steps=1, progress=False)
    final = T.train(run, stage, *toy_start(), iter(toy_data().to_iter_dataset()))
    assert isinstance(final, T.EmaTrainState) and int(final.ema.count) == steps
    ema = np.zeros((4, 1))  # the start value (w = 0)
    for n, w in enumerate(exported["trained"], start=1):
        s = n - start - 1
        d = 0.0 if s <= 0 else min((1 + s) / (10 + s), decay)
        ema = d * ema + (1 - d) * w.astype(np.float64)
        np.testing.assert_allclose(exported["ema"][n - 1], ema, rtol=1e-5, atol=1e-7)
    records = T.read_metrics(run.output_dir)
    assert [r["ema_decay"] for r in records][:start + 2] == [0.0] * (start + 1) + [pytest.approx(2 / 11)]
    assert not np.allclose(exported["ema"][-1], exported["trained"][-1])  # it lags after the warm-up

    parts = dataclasses.replace(run, output_dir=str(tmp_path / "b"), max_train_steps=3)
    T.train(parts, dataclasses.replace(stage, export=None), *toy_start(), iter(toy_data().to_iter_dataset()))
    resumed = T.train(dataclasses.replace(parts, max_train_steps=steps), dataclasses.replace(stage, export=None),
                      *toy_start(), iter(toy_data().to_iter_dataset()))
    assert tree_equal(final, resumed)


@pytest.fixture(scope="module")
def demo_vae(tmp_path_factory):
    folder = demo.build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    return load_vae(os.path.join(folder, "vae"), jnp.float32)


def encoded_shapes(vae, pixels: int):
    """4 clips of 2 sections (66 frames of pixels x pixels), encoded by the demo checkpoint's VAE; per-clip prompts."""
    latents = tf.encode_sections(*vae, tf.moving_square_videos(4, 2, pixels=pixels))
    embeds = np.random.default_rng(1).normal(size=(4, tf.TEXT_TOKENS, tf.CONFIG.text_dim)).astype(np.float32)
    return latents, embeds


@pytest.fixture(scope="module")
def moving_shapes(demo_vae):
    return encoded_shapes(demo_vae, tf.PIXELS)


@pytest.mark.slow
def test_tiny_helios_stage1_learns_and_resumes_bit_identically(moving_shapes, tmp_path):
    """Stage 1 on moving squares (LoRA r16 + full history patches, bf16 frozen base, remat): the mean loss
    of the last 40 of 240 steps is below 0.8 x the mean of the first 10 (measured: see the assertion's
    message); every checkpoint holds the diffusers LoRA file; interrupted at step 200 and resumed from
    checkpoint-160, the run ends bit-identical to the straight one."""
    latents, embeds = moving_shapes
    data = lambda: iter(tf.dataset(latents, embeds, batch=2).to_iter_dataset())  # noqa: E731
    stage = T.Stage(LOSS, T.OptimizerConfig(learning_rate=5e-3), export=tf.export)
    run = T.RunConfig(output_dir=str(tmp_path / "straight"), max_train_steps=240, checkpointing_steps=80, seed=43,
                      config={"seed": 43})
    final = T.train(run, stage, *tf.stage1_variables(), data())
    losses = [r["loss"] for r in T.read_metrics(run.output_dir)]
    start, end = np.mean(losses[:10]), np.mean(losses[-40:])
    assert end < 0.8 * start, f"loss {start:.3f} (first 10 steps) -> {end:.3f} (last 40)"
    for step in (80, 160, 240):
        files = os.listdir(tmp_path / "straight" / f"checkpoint-{step}")
        assert {"pytorch_lora_weights.safetensors", "transformer_partial.safetensors", "state", "data"} <= set(files)
    assert json.load(open(tmp_path / "straight" / "config.json")) == {"seed": 43}

    broken = dataclasses.replace(run, output_dir=str(tmp_path / "broken"), validation_steps=200)
    with pytest.raises(Interrupt):
        T.train(broken, dataclasses.replace(stage, validate=interrupt_at(200)), *tf.stage1_variables(), data())
    resumed = T.train(dataclasses.replace(broken, validation_steps=None), stage, *tf.stage1_variables(), data())
    assert tree_equal(final, resumed)
    assert without_seconds(T.read_metrics(run.output_dir)) == without_seconds(T.read_metrics(broken.output_dir))


@pytest.mark.slow
def test_tiny_helios_stage2_learns(demo_vae, tmp_path):
    """Stage 2-post on 64 x 64 moving squares (latents 8 x 8: pyramid levels 2 x 2, 4 x 4, 8 x 8), one term per
    level (one forward and backward each, gradients summed): the summed loss of the last 30 of 150 steps is
    below 0.8 x the first 10's, and so is every level's own."""
    latents, embeds = encoded_shapes(demo_vae, 64)
    data = iter(tf.dataset(latents, embeds, batch=2).to_iter_dataset())
    stage = T.Stage(STAGE2_LOSSES, T.OptimizerConfig(learning_rate=5e-3), export=tf.export)
    run = T.RunConfig(output_dir=str(tmp_path / "stage2"), max_train_steps=150, checkpointing_steps=150, seed=44)
    T.train(run, stage, *tf.stage1_variables(), data)
    records = T.read_metrics(run.output_dir)
    for name in ("loss", "loss_0", "loss_1", "loss_2"):
        values = [r[name] for r in records]
        start, end = np.mean(values[:10]), np.mean(values[-30:])
        assert end < 0.8 * start, f"{name} {start:.3f} (first 10 steps) -> {end:.3f} (last 30)"
    assert [records[0][f"{i}/stage"] for i in range(3)] == [0, 1, 2]


@pytest.mark.slow
def test_validation_videos_through_the_pipeline(tmp_path):
    """Validator: the LoRA merged into the base, one HeliosPipeline built from in-memory components, one mp4
    per prompt at each validation step (a tiny 1-chunk, 2-step T2V run of the demo's VAE and text encoder)."""
    from helios_jax.models import lora as lora_lib
    from helios_jax.pipeline import HeliosPipeline, PipelineSpec
    from helios_jax.prompts import PromptEncoder
    from helios_jax.training.validation import Validator
    from helios_jax.video import read_mp4

    folder = demo.build_demo_checkpoint(tmp_path / "ckpt")
    trainable, frozen = tf.stage1_variables(dtype=jnp.float32)
    scheduler = {"_class_name": "HeliosScheduler", "stages": 1, "stage_range": [0, 1], "scheduler_type": "unipc"}

    def merge(trainable, frozen):
        variables = T.combine(trainable, frozen)
        return lora_lib.merge_lora(variables["params"], variables["lora"], tf.SPEC.scale)

    pipe = HeliosPipeline((tf.CONFIG, merge(trainable, frozen)), load_vae(os.path.join(folder, "vae"), jnp.float32),
                          PromptEncoder.from_pretrained(folder, jnp.float32), scheduler, PipelineSpec(pyramid=False))
    validate = Validator(pipe, merge, ["a train on the river", "the sky"],
                         dict(height=32, width=32, num_frames=33, num_inference_steps=2, guidance_scale=1.0))
    written = validate(trainable, frozen, 7, str(tmp_path / "out"))
    assert [os.path.basename(p) for p in written] == ["step-7-0.mp4", "step-7-1.mp4"]
    assert read_mp4(written[0]).shape == (33, 32, 32, 3)
