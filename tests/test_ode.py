"""Stage 3a: the student's timesteps, ODE pairs from a tiny pyramid teacher, the ODE-regression and fake-score
losses against diffusers + PEFT autograd, and `helios-jax train stage_3_ode.yaml` end to end.

Tolerances (float32): loss relative error <= 1e-5, every LoRA gradient relative L2 <= 1e-5; recorded states
against the plain sampling program <= 1e-6 max-abs relative to the largest value.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import HeliosPipeline as TorchHeliosPipeline, HeliosScheduler, HeliosTransformer3DModel
from reference import rel_err, to_numpy
from safetensors import safe_open
from test_lora import peft_model, save_peft
from test_transformer import TINY

import helios_jax as hj
from helios_jax import cli
from helios_jax.convert import lora_format
from helios_jax.demo import MODEL_INDEX, TRANSFORMER, build_demo_checkpoint
from helios_jax.models import transformer as T
from helios_jax.noise import KeyNoise
from helios_jax.pipeline import HeliosPipeline
from helios_jax.sampling.pyramid import downsample_to_first_stage
from helios_jax.sampling.schedule import HeliosSchedulerConfig
from helios_jax.training import DataError, configs, distill, ode, recipes, stages, trainer
from helios_jax.training.ema import EMA_FOLDER, EmaConfig

CONFIGS = configs.FOLDER  # the shipped official YAMLs
PIXELS, SECTIONS, STEPS = 64, 2, 20  # latents 8 x 8: a three-level pyramid of 2x2, 4x4, 8x8

# docs/training.md §3.3 (two decimals) and the official get_ode-pairs targets (four): the student's shifted
# timesteps at 384 x 640 per stage, 2 steps per stage and 4 for the amplified first section.
SPEC_4 = ([998.5342, 902.2183, 833.9636, 783.0660], [742.8216, 640.0038, 547.1926, 462.9951],
          [385.4137, 328.6249, 253.9905, 151.5308])
SPEC_2 = ([998.53, 833.96], [742.82, 547.19], [385.41, 253.99])
FULL_SIZES = ((12, 20), (24, 40), (48, 80))


def test_student_timesteps_are_the_spec_list_and_the_ode_schedule_keeps_exactly_them():
    for amplify, spec, tol in ((True, SPEC_4, 1e-3), (False, SPEC_2, 6e-3)):
        plan = distill.rollout_plan((1, 16, 9, 48, 80), (2, 2, 2), amplify_first_chunk=amplify)
        config = HeliosSchedulerConfig()
        for s, ((h, w), want) in enumerate(zip(FULL_SIZES, spec)):
            np.testing.assert_allclose(plan.stages[s].timesteps, want, atol=tol)
            schedule, keep = ode.ode_schedule(config, 20, s, ode.student_schedule(config, s, amplify),
                                              (1, 16, 9, h, w))
            np.testing.assert_allclose(schedule.timesteps[keep], want, atol=tol)
            # The student's steps are inserted into the 20-step schedule (999 / 743.256 / 385.614 are already in it).
            assert len(schedule.timesteps) == 20 + len(want) - 1
            assert np.all(np.diff(schedule.timesteps) < 0) and schedule.sigmas[-1] == 0


def _stub_model(args, x, t, context):
    return jnp.tanh(x * args) + t[:, None, None, None, None] * 1e-3 + context.mean()


def test_trajectory_is_the_samplers_own_states():
    """``denoise_chunk_trajectory``: its output is ``denoise_chunk``'s; per stage the states before each step
    then the stage output, each stage starting from the previous output renoised as the sampler does."""
    from helios_jax import sampling
    from helios_jax.sampling import pyramid

    plan = sampling.plan_pyramid_chunk({"_class_name": "HeliosScheduler", "gamma": 0.25}, (3, 2, 2), (1, 4, 9, 8, 8),
                                       guidance="cfg")
    noise = sampling.draw_chunk_noise(jax.random.key(0), plan)
    ctx, neg = jnp.ones((1, 3, 8)), jnp.zeros((1, 3, 8))
    out, trajectory = sampling.denoise_chunk_trajectory(_stub_model, jnp.float32(0.7), plan, noise, ctx, neg, 5.0)
    np.testing.assert_array_equal(out, sampling.denoise_chunk(_stub_model, jnp.float32(0.7), plan, noise, ctx, neg, 5.0))
    assert [t.shape for t in trajectory] == [(4, 1, 4, 9, 2, 2), (3, 1, 4, 9, 4, 4), (3, 1, 4, 9, 8, 8)]
    np.testing.assert_array_equal(trajectory[-1][-1], out)
    np.testing.assert_allclose(trajectory[0][0], pyramid.downsample_to_first_stage(noise.initial, 3), atol=1e-6)
    for s in (1, 2):
        block = pyramid.block_noise(noise.block[s - 1], plan.block_factor, plan.layout.patch)
        start = pyramid.renoise(pyramid.upsample_nearest(trajectory[s - 1][-1]), block, *plan.stages[s].renoise)
        np.testing.assert_allclose(trajectory[s][0], start, atol=1e-6)
        assert np.abs(trajectory[s][1] - trajectory[s][0]).max() > 0


TEACHER = dataclasses.replace(TRANSFORMER, num_attention_heads=2, num_layers=2, ffn_dim=64, is_amplify_history=False)


def teacher_checkpoint(folder) -> str:
    """A tiny random pyramid (UniPC, not distilled) teacher: 2 layers, 2 heads x 32."""
    transformer = TEACHER
    scheduler = {"_class_name": "HeliosScheduler", "stages": 3, "stage_range": [0, 1 / 3, 2 / 3, 1], "gamma": 1 / 3,
                 "scheduler_type": "unipc", "use_dynamic_shifting": False, "time_shift_type": "linear"}
    index = {**MODEL_INDEX, "is_distilled": False, "scheduler": ["diffusers", "HeliosScheduler"]}
    return build_demo_checkpoint(folder, transformer=transformer, scheduler=scheduler, model_index=index)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ode")
    ckpt = teacher_checkpoint(root / "teacher")
    prompts = root / "prompts.txt"
    prompts.write_text("a train speeding through green fields\n\nthe city light on the river\n")
    out = root / "pairs"
    with pytest.MonkeyPatch.context() as patch:  # the command's compilation-cache folder: here, not in ~/.cache
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        assert cli.main(["offload", "ode-pairs", ckpt, str(prompts), str(out), "--sections", str(SECTIONS),
                         "--height", str(PIXELS), "--width", str(PIXELS), "--steps", str(STEPS), "--dtype", "fp32"]) == 0
    return root, ckpt, str(prompts), str(out)


def test_ode_pair_files_hold_the_students_timesteps_and_the_spec_layout(pairs):
    _, _, _, out = pairs
    assert sorted(os.listdir(out)) == ["prompts_00000.safetensors", "prompts_00002.safetensors"]
    data = ode.read_ode_pairs(os.path.join(out, "prompts_00002.safetensors"))
    assert data["prompt_raw"] == "the city light on the river" and data["prompt_embed"].shape == (512, 64)
    assert len(data["sections"]) == SECTIONS and all(len(section) == 3 for section in data["sections"])
    for k, section in enumerate(data["sections"]):
        n = 4 if k == 0 else 2
        plan = distill.rollout_plan((1, 16, 9, 8, 8), (2, 2, 2), amplify_first_chunk=k == 0)
        for s, (stage, size) in enumerate(zip(section, ((2, 2), (4, 4), (8, 8)))):
            assert stage["latents"].shape == (n + 1, 1, 16, 9, *size) and stage["latents"].dtype == np.float32
            np.testing.assert_allclose(stage["timesteps"], plan.stages[s].timesteps, atol=1e-3)
            assert np.isfinite(stage["latents"]).all()
            assert min(np.abs(a - b).max() for a, b in zip(stage["latents"], stage["latents"][1:])) > 0


def test_recorded_states_are_the_plain_pipelines(pairs):
    """Same seed and prompt: the recording program's states equal the plain sampling program's output at the
    end of every section (the teacher's own outputs are its history), and the first state is the pipeline's
    first noise draw downsampled to stage 0."""
    _, ckpt, prompts, out = pairs
    file = ode.read_ode_pairs(os.path.join(out, "prompts_00000.safetensors"))
    settings = dict(height=PIXELS, width=PIXELS, num_frames=SECTIONS * 33, guidance_scale=5.0,
                    pyramid_num_inference_steps_list=(STEPS,) * 3, is_amplify_first_chunk=True, max_sequence_length=512)
    pipe = ode.load_teacher(ckpt, jnp.float32, STEPS, compilation_cache=False)
    embeds = jnp.asarray(file["prompt_embed"])[None]
    negative = pipe.prompt_encoder.encode([hj.generate.DEFAULT_NEGATIVE_PROMPT], max_sequence_length=512,
                                          dtype=jnp.float32)
    recorder = pipe.sampler  # the teacher's plans with the inference program, no recording:
    pipe.sampler = types.SimpleNamespace(plan=recorder.plan, denoise=hj.sampling.denoise_chunk)
    video = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, seed=42, output_type="latent", progress=False,
                 **settings)
    assert recorder.sections == [] and video.shape == (1, 16, 9 * SECTIONS, 8, 8)
    for k in range(SECTIONS):
        chunk, final = video[:, :, 9 * k:9 * (k + 1)], file["sections"][k][2]["latents"][-1]
        assert np.abs(chunk - final).max() <= 1e-6 * np.abs(final).max(), k
    first = downsample_to_first_stage(KeyNoise(42).normal((1, 16, 9, 8, 8)), 3)
    np.testing.assert_allclose(file["sections"][0][0]["latents"][0], np.asarray(first), atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda r, c, p, o: (str(r / "nope"), p, o, []), "nope does not exist"),
    (lambda r, c, p, o: (c, str(r / "empty.txt"), o, []), "no prompt"),
    (lambda r, c, p, o: (c, p, o, ["--num-frames", "100"]), "not a whole number"),
])
def test_bad_input_is_one_error_before_any_weight(pairs, change, message, capsys):
    root, ckpt, prompts, _ = pairs
    (root / "empty.txt").write_text("\n  \n")
    teacher, text, out, extra = change(root, ckpt, prompts, str(root / "never"))
    assert cli.main(["offload", "ode-pairs", teacher, text, out, *extra]) == 2
    assert message in capsys.readouterr().err and not os.path.exists(root / "never")


def test_single_stage_teacher_is_refused(tmp_path):
    index = {**MODEL_INDEX, "_class_name": "HeliosPipeline", "is_distilled": False,
             "scheduler": ["diffusers", "HeliosScheduler"]}
    ckpt = build_demo_checkpoint(tmp_path / "base", scheduler={"_class_name": "HeliosScheduler", "stages": 1,
                                                               "stage_range": [0, 1]}, model_index=index)
    with pytest.raises(DataError, match="pyramid teacher"):
        ode.offload_ode_pairs(ckpt, __file__, str(tmp_path / "out"))


def test_dataset_shuffles_shards_and_resumes(pairs):
    _, _, _, out = pairs
    shards = [ode.ODEPairDataset([out], seed=3, process_index=i, process_count=2) for i in range(2)]
    assert sorted(shards[0].epoch_order(0) + shards[1].epoch_order(0)) == [0, 1]
    it = ode.ODEPairDataset([out], seed=3).iterator(num_threads=1)
    first = next(it)
    assert first["states_0"].shape == (1, SECTIONS, 4, 16, 9, 2, 2) and first["counts"][0].tolist() == [[4] * 3, [2] * 3]
    state = it.get_state()
    after = [int(next(it)["index"][0]) for _ in range(3)]
    again = ode.ODEPairDataset([out], seed=3).iterator(num_threads=1)
    again.set_state(state)
    assert [int(next(again)["index"][0]) for _ in range(3)] == after


# ------------------------------------------------------------------------------------------ parity with torch


def synthetic_pairs(seed: int, sections: int = 3, channels: int = TINY["in_channels"], hw: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(sections):
        n = 4 if k == 0 else 2
        section = []
        for s, size in enumerate((hw // 4, hw // 2, hw)):
            t = np.sort(rng.uniform(*((0, 385), (386, 743), (744, 999))[2 - s], n))[::-1].astype(np.float32)
            section.append({"latents": rng.normal(size=(n + 1, 1, channels, 9, size, size)).astype(np.float32),
                            "timesteps": t})
        out.append(section)
    return {"sections": out, "prompt_embed": rng.normal(size=(7, TINY["text_dim"])).astype(np.float32)}


def torch_ode_loss(model, data, chosen, picks, weight) -> torch.Tensor:
    """docs/training.md §6.2 written out in torch: teacher-forced history, anchor, the stage's sigma from
    diffusers' HeliosScheduler tables (t = t_min + sigma' (t_max - t_min))."""
    sched = HeliosScheduler()
    embeds = torch.from_numpy(data["prompt_embed"])[None]
    sections = data["sections"]
    c, h, w = sections[0][2]["latents"].shape[2], *sections[0][2]["latents"].shape[-2:]
    hist, anchor, terms = torch.zeros(1, c, 19, h, w), torch.zeros(1, c, 1, h, w), []
    idx = torch.arange(29)
    indices = {"indices_hidden_states": idx[20:][None], "indices_latents_history_short": torch.tensor([[0, 19]]),
               "indices_latents_history_mid": idx[17:19][None], "indices_latents_history_long": idx[1:17][None]}
    for k, section in enumerate(sections):
        history = {"latents_history_long": hist[:, :, :16], "latents_history_mid": hist[:, :, 16:18],
                   "latents_history_short": torch.cat([anchor, hist[:, :, 18:]], dim=2)}
        if k in chosen:
            for s in range(3):
                j = picks[chosen.index(k)][s]
                x = torch.from_numpy(section[s]["latents"][j])
                t = torch.tensor([float(section[s]["timesteps"][j])])
                table = sched.timesteps_per_stage[s]
                sigma = ((t.double() - table.min()) / (table.max() - table.min())).float()
                flow = model(x, t, embeds, **indices, **history, return_dict=False)[0]
                target = torch.from_numpy(section[s]["latents"][-1])
                terms.append(0.5 * torch.mean((x - sigma * flow - target) ** 2))
        out = torch.from_numpy(section[2]["latents"][-1])
        if k == 0:
            anchor = out[:, :, :1]
        hist = torch.cat([hist, out], dim=2)[:, :, -19:]
    return weight * torch.stack(terms).mean()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' DiT with random PEFT LoRA factors (test_lora's), and the same weights and LoRA here."""
    root = tmp_path_factory.mktemp("ode_ref")
    model = peft_model(root / "base")
    cfg, params = hj.load_transformer(str(root / "base"))
    return model, cfg, params, hj.models.lora.load_lora(save_peft(model, root / "lora"), cfg)


def compare_grads(model, grads, cfg) -> None:
    ref = {n.replace(".default", ""): to_numpy(p.grad) for n, p in model.named_parameters() if "lora_" in n}
    ours = lora_format.state_dict(grads, T.keymap(cfg))
    assert sorted(k.removeprefix("transformer.") for k in ours) == sorted(ref)
    for name, grad in ours.items():
        want = ref[name.removeprefix("transformer.")]
        assert np.linalg.norm(want) > 0 and rel_err(grad, want) <= 1e-5, f"{name}: {rel_err(grad, want):.2e}"


def test_ode_regression_loss_and_lora_gradients_match_torch(reference):
    model, cfg, params, loaded = reference
    data = synthetic_pairs(0)
    batch = {k: jnp.asarray(v)[None] for k, v in ode.stack_sample(data).items()}
    settings = ode.ODESettings(HeliosSchedulerConfig(), weight=80.0, sections=2)
    draws = ode.draw(jax.random.key(4), batch["counts"], settings.sections)
    chosen, picks = np.asarray(draws.sections)[0].tolist(), np.asarray(draws.states)[0].tolist()
    assert chosen == sorted(set(chosen)) and len(chosen) == 2
    assert all(0 <= p < (4 if k == 0 else 2) for k, row in zip(chosen, picks) for p in row)

    net = stages.StageModel(hj.HeliosTransformer(cfg), jnp.float32, loaded.spec.scale)
    # The trainer's LossFn itself, with the step key whose draws the torch side replays.
    fn = lambda lora: ode.ode_regression_loss(net, settings, {"lora": lora}, {"params": params}, batch,  # noqa: E731
                                              jax.random.key(4))[0]
    value, grads = jax.jit(jax.value_and_grad(fn))(loaded.lora)

    model.zero_grad()
    ref = torch_ode_loss(model, data, chosen, picks, settings.weight)
    ref.backward()
    assert abs(float(value) - ref.item()) <= 1e-5 * abs(ref.item())
    compare_grads(model, grads, cfg)


def test_fake_score_loss_and_lora_gradients_match_torch(reference):
    """distill.fake_score_loss on the DiT's flow at add_noise(x, eps, t) (the critic's denoising loss)."""
    model, cfg, params, loaded = reference
    rng = np.random.default_rng(5)
    x, eps = (rng.normal(size=(2, TINY["in_channels"], 9, 8, 8)).astype(np.float32) for _ in range(2))
    data = synthetic_pairs(1)
    embeds = np.repeat(data["prompt_embed"][None], 2, axis=0)
    hist = rng.normal(size=(2, TINY["in_channels"], 19, 8, 8)).astype(np.float32)
    anchor = rng.normal(size=(2, TINY["in_channels"], 1, 8, 8)).astype(np.float32)
    timestep = np.array([137, 802], np.int32)
    table = distill.dmd_sigma_table((2, TINY["in_channels"], 9, 8, 8))

    net = stages.StageModel(hj.HeliosTransformer(cfg), jnp.float32, loaded.spec.scale)
    from helios_jax.training.samples import history_inputs

    cond = {"encoder_hidden_states": jnp.asarray(embeds), **history_inputs(jnp.asarray(anchor), jnp.asarray(hist))}

    def fn(lora):
        noisy = distill.add_noise(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(timestep), table)
        flow = net({"params": params, "lora": lora}, noisy, jnp.asarray(timestep, jnp.float32), cond)
        return distill.fake_score_loss(flow, jnp.asarray(eps), jnp.asarray(x))

    value, grads = jax.jit(jax.value_and_grad(fn))(loaded.lora)

    # The reference: the table of docs/training.md §7.2 in float64 numpy, nearest timestep; the target eps - x.
    mu = 9 * 8 * 8 / 4 * (1.15 - 0.5) / (4096 - 256) + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
    base = np.linspace(1, 0.001, 1000)
    sigmas = mu * base / (1 + (mu - 1) * base)
    sigma = sigmas[np.argmin(np.abs(sigmas[None] * 1000 - timestep[:, None]), axis=1)].reshape(-1, 1, 1, 1, 1)
    x_t = torch.from_numpy(((1 - sigma) * x + sigma * eps).astype(np.float32))
    th = torch.from_numpy(hist)
    history = {"latents_history_long": th[:, :, :16], "latents_history_mid": th[:, :, 16:18],
               "latents_history_short": torch.cat([torch.from_numpy(anchor), th[:, :, 18:]], dim=2)}
    idx = torch.arange(29)
    indices = {"indices_hidden_states": idx[20:][None].repeat(2, 1),
               "indices_latents_history_short": torch.tensor([[0, 19]] * 2),
               "indices_latents_history_mid": idx[17:19][None].repeat(2, 1),
               "indices_latents_history_long": idx[1:17][None].repeat(2, 1)}
    model.zero_grad()
    flow = model(x_t, torch.from_numpy(timestep).float(), torch.from_numpy(embeds), **indices, **history,
                 return_dict=False)[0]
    ref = torch.mean((flow - torch.from_numpy(eps - x)) ** 2)
    ref.backward()
    assert abs(float(value) - ref.item()) <= 1e-5 * abs(ref.item())
    compare_grads(model, grads, cfg)


# ------------------------------------------------------------------------------------------ the recipe, end to end


def test_official_stage_3_ode_yaml_is_accepted_and_bad_values_refused(caplog):
    with caplog.at_level(logging.DEBUG, logger=recipes.__name__):
        recipe = recipes.load(os.path.join(CONFIGS, "stage_3_ode.yaml"))
    assert len(caplog.records) == 1 and "not used here" in caplog.records[0].getMessage()
    assert recipe.stage == "stage3_ode" and recipe.section("training_config")["ode_regression_weight"] == 80.0
    assert recipe.ema() == EmaConfig(decay=0.99, start_step=250)  # use_ema: true, the official warm-up start
    ignored = set(re.findall(r"[\w.]+", caplog.records[0].getMessage()))
    assert not ignored & {"training_config.use_ema", "training_config.ema_decay", "training_config.ema_start_step"}
    for change, message in (("training_config.ode_num_latent_sections_min=2", "random section count"),
                            ("training_config.ema_decay=1.0", r"ema_decay = 1.0 must be in \[0, 1\)"),
                            ("training_config.use_dynamic_shifting=false", "must be true"),
                            ("training_config.is_train_dmd=true", "stage-3")):
        with pytest.raises(hj.config.ConfigError, match=message):
            recipes.load(os.path.join(CONFIGS, "stage_3_ode.yaml"), [change])


@pytest.mark.slow
def test_train_stage_3_ode_end_to_end_and_the_lora_loads_in_diffusers(pairs, tmp_path, capsys):
    root, ckpt, _, out = pairs
    run = str(tmp_path / "run")
    values = {"output_dir": run, "data_config.ode_data_root": f"[{out}]",
              "model_config.pretrained_model_name_or_path": ckpt, "model_config.transformer_model_name_or_path": ckpt,
              "model_config.subfolder": "transformer", "model_config.lora_rank": 4, "model_config.lora_alpha": 4.0,
              "training_config.max_train_steps": 2, "training_config.checkpointing_steps": 2,
              "training_config.learning_rate": 1e-3, "training_config.ode_num_latent_sections_min": SECTIONS,
              "training_config.ema_start_step": 0,
              "training_config.ode_num_latent_sections_max": SECTIONS, "training_config.mixed_precision": '"no"',
              "validation_config.first_step_valid": "false", "validation_config.validation_steps": 2,
              "validation_config.validation_height": PIXELS, "validation_config.validation_width": PIXELS,
              "validation_config.validation_max_num_frames": 33}
    code = cli.main(["train", os.path.join(CONFIGS, "stage_3_ode.yaml"), *[f"{k}={v}" for k, v in values.items()]])
    assert code == 0, capsys.readouterr().err
    records = trainer.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert [r["ema_decay"] for r in records] == [0.0, pytest.approx(2 / 11)]  # a copy, then the warm-up's 2/11
    assert os.listdir(os.path.join(run, "validation")) == ["step-2-0.mp4"]  # the student's 2+2+2 DMD sampler
    folder = os.path.join(run, "checkpoint-2")
    with safe_open(os.path.join(folder, lora_format.LORA_WEIGHTS), framework="numpy") as f:
        assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in set(f.keys())
    fresh = HeliosTransformer3DModel.from_pretrained(os.path.join(ckpt, "transformer"))
    pipe = TorchHeliosPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=fresh)
    pipe.load_lora_weights(folder)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    # The EMA's LoRA (what the official merges into transformer_ode) beside it, lagging the trained one.
    trained = safetensors.numpy.load_file(os.path.join(folder, lora_format.LORA_WEIGHTS))
    averaged = safetensors.numpy.load_file(os.path.join(folder, EMA_FOLDER, lora_format.LORA_WEIGHTS))
    assert sorted(trained) == sorted(averaged) and any(not np.allclose(trained[k], averaged[k]) for k in trained)
    assert json.load(open(os.path.join(run, "config.json")))["training_config"]["is_use_ode_regression"]


# ------------------------------------------------------------------------------------------ it distills

DISTILL_STEPS, DISTILL_MARGIN = 60, 0.5


def test_ode_regression_distills_the_teacher_into_a_2_2_2_student(pairs, tmp_path, capsys):
    """Issue 12's "it distills", with stage 3a: the teacher is the random-init pyramid model of ``pairs``, whose
    many-step samples (UniPC 20+ steps a stage, CFG 5) are the ODE pairs; `helios-jax train stage_3_ode.yaml`
    regresses a LoRA on them for DISTILL_STEPS steps. Then, from the pairs' seed (the same noise draws) and the
    same empty start, the 2+2+2 DMD sampler without CFG (the distilled model's, every chunk unamplified; later
    chunks on each model's own history, as at inference) of the student (base + LoRA) and of the undistilled
    model (the same base alone): the student's latents must be closer to the teacher's, latent MSE over both
    prompts and sections at most DISTILL_MARGIN x the undistilled one's. Measured (CPU, fp32, these seeds): student
    0.469, undistilled 5.087 (ratio 0.092) after 60 steps; 0.350 against 5.087 after 200. The prompts and noise
    are the distillation's own: this shows the regression works end to end, not that a 2-prompt student
    generalises. About 45 s of CPU beside the module's `pairs` fixture (the training step and the 2+2+2
    chunk program compile once each)."""
    root, ckpt, _, out = pairs
    base = build_demo_checkpoint(tmp_path / "base", transformer=TEACHER)  # the demo's DMD scheduler, distilled
    for name in os.listdir(os.path.join(ckpt, "transformer")):  # the undistilled model IS the teacher's weights
        assert filecmp.cmp(os.path.join(ckpt, "transformer", name), os.path.join(base, "transformer", name), False)
    run = str(tmp_path / "run")
    values = {"output_dir": run, "data_config.ode_data_root": f"[{out}]",
              "model_config.pretrained_model_name_or_path": ckpt, "model_config.transformer_model_name_or_path": ckpt,
              "model_config.subfolder": "transformer", "model_config.lora_rank": 8, "model_config.lora_alpha": 8.0,
              "training_config.max_train_steps": DISTILL_STEPS, "training_config.checkpointing_steps": DISTILL_STEPS,
              "training_config.learning_rate": 1e-3, "training_config.ode_num_latent_sections_min": SECTIONS,
              "training_config.ode_num_latent_sections_max": SECTIONS, "training_config.mixed_precision": '"no"',
              "validation_config.validation_prompts": "[]"}
    code = cli.main(["train", os.path.join(CONFIGS, "stage_3_ode.yaml"), *[f"{k}={v}" for k, v in values.items()]])
    assert code == 0, capsys.readouterr().err
    assert all(np.isfinite(r["loss"]) for r in trainer.read_metrics(run))

    pipe = HeliosPipeline.from_pretrained(base, dtype=jnp.float32, compilation_cache=False)
    undistilled = pipe.transformer_params
    lora = hj.models.lora.load_lora(os.path.join(run, f"checkpoint-{DISTILL_STEPS}"), pipe.transformer_config)
    student = hj.models.lora.apply_loaded(undistilled, lora)
    settings = dict(height=PIXELS, width=PIXELS, num_frames=SECTIONS * 33, guidance_scale=1.0,
                    pyramid_num_inference_steps_list=(2, 2, 2), is_amplify_first_chunk=False, max_sequence_length=512)
    errors = {"student": [], "undistilled": []}
    for name in sorted(os.listdir(out)):
        file = ode.read_ode_pairs(os.path.join(out, name))
        teacher = np.concatenate([section[-1]["latents"][-1] for section in file["sections"]], axis=2)
        for who, params in (("student", student), ("undistilled", undistilled)):
            pipe.transformer_params = params  # one pipeline: its chunk program compiles once
            video = pipe(prompt_embeds=jnp.asarray(file["prompt_embed"])[None], seed=42, output_type="latent",
                         progress=False, **settings)
            errors[who].append(np.mean((video - teacher) ** 2))
    mse = {who: float(np.mean(e)) for who, e in errors.items()}
    assert mse["student"] <= DISTILL_MARGIN * mse["undistilled"], mse
    print(f"it distills: latent MSE to the teacher, student {mse['student']:.4f}, undistilled "
          f"{mse['undistilled']:.4f}, ratio {mse['student'] / mse['undistilled']:.3f}")
