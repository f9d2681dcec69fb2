"""The official training YAMLs (shipped verbatim in helios_jax/training/configs/) read, typed and checked."""

import logging
import os
import warnings

import pytest

from helios_jax.config import ConfigError
from helios_jax.training import configs, recipes

CONFIGS = configs.FOLDER
STAGES_1_2 = ("stage_1_init", "stage_1_post", "stage_2_init", "stage_2_post")
STAGE_3_POST = ("stage_3_post", "stage_3_post_gan_version")


def path(name: str) -> str:
    return os.path.join(CONFIGS, f"{name}.yaml")


def load(*args, **kwargs):
    """The recipe and the debug lines that list the official keys not used here; any warning fails."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(recipes.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            recipe = recipes.load(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert all(r.levelno == logging.DEBUG for r in records)
    return recipe, [r.getMessage() for r in records]


def write(tmp_path, text: str) -> str:
    file = tmp_path / "run.yaml"
    file.write_text(text)
    return str(file)


MINIMAL = """
output_dir: out
model_config:
  lora_layers: all-linear
training_config:
  is_enable_stage1: true
  has_multi_term_memory_patch: true
  zero_history_timestep: true
  guidance_cross_attn: true
data_config:
  use_stage1_dataset: true
  instance_data_root: [data/]
"""


@pytest.mark.parametrize("name", STAGES_1_2)
def test_official_stage_1_2_yamls_parse_with_one_debug_line(name):
    recipe, messages = load(path(name))
    assert len(messages) == 1, messages
    # Keys that do not apply here are named, each under its section.
    for key in ("data_config.dataloader_num_workers", "report_to", "training_config.ema_zero3_port",
                "training_config.allow_tf32", "model_config.upcast_vae"):
        assert key in messages[0]
    assert recipe.section("data_config")["instance_data_root"] == ["demo_data/ultravideo-long"]


def test_official_values_are_typed():
    """The numbers of docs/training.md §11; YAML 1.1 reads 5e-5 and 1e-04 as strings, typed to floats here."""
    s1, _ = load(path("stage_1_init"))
    opt = s1.optimizer()
    assert (opt.learning_rate, opt.lr_scheduler, opt.adam_weight_decay, opt.adam_epsilon, opt.max_grad_norm) == (
        5e-5, "constant", 1e-4, 1e-8, 1.0)
    assert s1.stage == "stage1" and s1.values[""]["seed"] == 43
    assert s1.section("training_config")["train_batch_size"] == 2
    assert s1.section("model_config")["lora_rank"] == 128 and s1.section("model_config")["lora_alpha"] == 128.0
    s1p, _ = load(path("stage_1_post"))
    assert s1p.optimizer().learning_rate == 3e-5 and s1p.section("model_config")["subfolder"] == "transformer_init"
    s2, _ = load(path("stage_2_init"))
    assert (s2.optimizer().learning_rate, s2.optimizer().lr_scheduler, s2.optimizer().lr_warmup_steps) == (
        1e-4, "constant_with_warmup", 1000)
    assert s2.stage == "stage2_packed" and s2.section("training_config")["stage2_sample_ratios"] == [1, 2, 1]
    assert s2.section("training_config")["weighting_scheme"] == "none"
    s2p, _ = load(path("stage_2_post"))
    assert s2p.optimizer().lr_warmup_steps == 500
    assert s2p.section("training_config")["stage2_sample_ratios"] == [1, 1, 1]
    assert s2p.section("training_config")["is_train_lora_multi_term_memory_patchg"] is True
    run = s2p.run()
    assert (run.output_dir, run.checkpointing_steps, run.validation_steps, run.resume_from_checkpoint, run.seed) == (
        "ablation_stage_2_post", 500, 500, "latest", 46)
    assert run.config["training_config"]["learning_rate"] == 3e-5


@pytest.mark.parametrize("name", STAGE_3_POST)
def test_stage_3_post_yamls_parse_with_one_debug_line(name):
    """docs/training.md §7 and §11: the stage-3b values, typed; the two files differ in the GAN and the
    corruption mode only; memory/DeepSpeed/logging knobs and the vestigial DMD step list are listed."""
    recipe, messages = load(path(name))
    assert len(messages) == 1, messages
    for key in ("training_config.dmd_is_low_vram_mode", "training_config.dmd_denoising_step_list",
                "training_config.dmd_generator_deepspeed_config", "model_config.reward_model_name_or_path"):
        assert key in messages[0]
    assert "training_config.gan_start_step" not in messages[0] and "training_config.critic_learning_rate" not in messages[0]
    assert recipe.stage == "stage3_dmd" and recipe.values[""]["seed"] == 49
    t, m = recipe.section("training_config"), recipe.section("model_config")
    assert recipe.section("data_config")["gan_data_root"] == ["demo_data/ultravideo-long"]
    g, c = recipe.optimizer(), recipe.critic_optimizer()
    assert (g.learning_rate, g.adam_beta1, g.adam_weight_decay, g.max_grad_norm) == (2e-6, 0.0, 1e-3, 10.0)
    assert (c.learning_rate, c.adam_beta1, c.adam_weight_decay, c.max_grad_norm) == (4e-7, 0.0, 1e-3, 10.0)
    assert (t["dfake_gen_update_ratio"], t["real_guidance_scale"], t["ema_decay"], t["ema_start_step"]) == (5, 3.0, 0.99, 750)
    assert (t["generator_dynamic_sample_type"], t["generator_dynamic_alpha"], t["generator_dynamic_beta"],
            t["generator_dynamic_step"], t["critic_dynamic_sample_type"]) == ("beta", 4.0, 1.5, 500, "uniform")
    assert (t["gan_start_step"], t["gan_hooks"], t["gan_cond_map_dim"], t["gan_g_weight"], t["gan_d_weight"],
            t["r1_weight"], t["r1_sigma"]) == (1000, [5, 15, 25, 35], 768, 0.05, 0.01, 100.0, 0.1)
    assert (t["random_drop_t2v_ratio"], t["random_drop_v2v_ratio"], t["is_add_saturation"]) == (0.4, 0.5, True)
    assert recipe.section("validation_config")["stage2_simulated_inference_steps"] == [2, 2, 2]
    assert t["is_use_gan"] is (name == "stage_3_post_gan_version")
    assert t["corrupt_mode_history"] == ("random" if name == "stage_3_post_gan_version" else "noise")
    spec, subset = recipe.lora()
    assert (spec.rank, spec.patch_embedding, spec.history_patches, subset) == (256, False, True, "lora")
    critic = recipe.critic_lora()
    assert (critic.rank, critic.scale, critic.patch_embedding, critic.history_patches) == (256, 1.0, False, False)
    assert m["real_score_model_name_or_path"] == "BestWishYsh/Helios-Base" and m["subfolder"] == "transformer_ode"


@pytest.mark.parametrize("override, rule", [
    ("training_config.is_decouple_dmd=true", "decoupled DMD is not implemented"),
    ("training_config.is_consistency_align=true", "consistency-align"),
    ("training_config.is_use_gt_history=false", "GT"),
    ("training_config.fake_guidance_scale=1.5", "fake score runs without CFG"),
    ("training_config.r2_weight=1.0", "R2"),
    ("training_config.time_shift_type=exponential", "linear"),
    ("training_config.use_dynamic_shifting=false", "dynamically shifted"),
    ("training_config.is_use_reward_model=true", "is_use_reward_model"),
    ("training_config.gan_cond_map_dim=100", "multiple of 32"),
    ("validation_config.stage2_simulated_inference_steps=[2,2]", r"one\s+positive step count"),
    ("data_config.gan_data_root=[]", "gan_data_root is empty"),
])
def test_stage_3_post_values_it_cannot_run_are_refused(override, rule):
    with pytest.raises(ConfigError, match=rule):
        recipes.load(path("stage_3_post_gan_version"), [override])


def test_dmd_keys_outside_a_dmd_run_are_listed_as_unused(tmp_path):
    _, messages = load(write(tmp_path, MINIMAL), ["training_config.gan_start_step=3"])
    assert len(messages) == 1 and "training_config.gan_start_step" in messages[0]
    with pytest.raises(ConfigError, match="use_dynamic_shifting = True is not supported"):
        recipes.load(write(tmp_path, MINIMAL), ["training_config.use_dynamic_shifting=true"])


def test_correct_yaml_is_an_overlay():
    recipe, messages = load([path("stage_1_init"), path("correct")])
    t = recipe.section("training_config")
    assert (t["random_drop_i2v_ratio"], t["corrupt_mode_history"], t["is_add_saturation"]) == (0.1, "random", True)
    assert t["learning_rate"] == 5e-5  # the base file's value where the overlay is silent
    assert len(messages) == 1  # correct.yaml names only keys this port uses
    with pytest.raises(ConfigError, match="use_stage1_dataset"):
        recipes.load(path("correct"))  # alone it is not a runnable config


def test_overrides_are_typed_against_the_schema():
    recipe, _ = load(path("stage_1_init"), ["data_config.instance_data_root=[data/, more/]",
                                           "training_config.learning_rate=1e-4", "seed=7",
                                           "training_config.checkpoints_total_limit=3"])
    assert recipe.section("data_config")["instance_data_root"] == ["data/", "more/"]
    assert recipe.optimizer().learning_rate == 1e-4 and recipe.values[""]["seed"] == 7
    assert recipe.run().checkpoints_total_limit == 3
    with pytest.raises(ConfigError, match="max_train_steps = 'many'.*expected int"):
        recipes.load(path("stage_1_init"), ["training_config.max_train_steps=many"])
    with pytest.raises(ConfigError, match="unknown key 'training_config.learning_rat': did you mean "
                                          "'training_config.learning_rate'"):
        recipes.load(path("stage_1_init"), ["training_config.learning_rat=1e-4"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        recipes.load(path("stage_1_init"), ["training_config.learning_rate"])


def test_wrong_type_in_a_yaml_is_one_error(tmp_path):
    file = write(tmp_path, MINIMAL.replace("training_config:", "training_config:\n  train_batch_size: two"))
    with pytest.raises(ConfigError, match=r"training_config.train_batch_size = 'two' \(str\).*expected int"):
        recipes.load(file)


@pytest.mark.parametrize("override, rule", [
    ("training_config.lr_scheduler=cosine", "lr_scheduler = 'cosine' is not supported"),
    ("training_config.mixed_precision=fp16", "mixed_precision = 'fp16' is not supported"),
    ("training_config.history_sizes=[8,2,1]", "29-frame index layout"),
    ("training_config.gradient_accumulation_steps=4", "gradient accumulation"),
    ("training_config.is_enable_stage1=false", "neither is_enable_stage1"),
    ("data_config.instance_data_root=[]", "instance_data_root is empty"),
    ("training_config.is_train_lora_multi_term_memory_patchg=true", "train one way"),
])
def test_values_it_cannot_run_are_refused(tmp_path, override, rule):
    with pytest.raises(ConfigError, match=rule):
        recipes.load(write(tmp_path, MINIMAL), [override, "training_config.is_train_full_multi_term_memory_patchg=true"]
                     if "lora_multi" in override else [override])


def test_unused_official_keys_are_one_debug_line(tmp_path):
    _, messages = load(write(tmp_path, MINIMAL + "  pin_memory: true\n  dataloader_num_workers: 4\n"))
    assert len(messages) == 1
    assert "data_config.dataloader_num_workers, data_config.pin_memory" in messages[0]


def test_missing_folders_are_one_error(tmp_path):
    recipe, _ = load(write(tmp_path, MINIMAL), [f"data_config.instance_data_root=[{tmp_path}/absent]"])
    with pytest.raises(ConfigError, match="no data folder at .*absent"):
        recipes.check_paths(recipe)
    (tmp_path / "data").mkdir()
    recipe, _ = load(write(tmp_path, MINIMAL), [f"data_config.instance_data_root=[{tmp_path}/data]",
                                                f"model_config.pretrained_model_name_or_path={tmp_path}/ckpt",
                                                f"model_config.transformer_model_name_or_path={tmp_path}/ckpt"])
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path: .*ckpt does not exist"):
        recipes.check_paths(recipe)


def test_lora_setup_per_stage():
    """docs/training.md §11: LoRA on patch_embedding in stage 1 and 2-post, full patch convs in stage 1,
    patch-conv LoRA in stage 2-post, nothing extra in stage 2-init."""
    expected = {"stage_1_init": (128, True, False, "lora+history_patches"),
                "stage_2_init": (256, False, False, "lora"),
                "stage_2_post": (256, True, True, "lora")}
    for name, (rank, patch, history, subset) in expected.items():
        spec, got = load(path(name))[0].lora()
        assert (spec.rank, spec.patch_embedding, spec.history_patches, got) == (rank, patch, history, subset)
        assert spec.scale == 1.0 and spec.exclude == ("down", "up")


def test_cli_train_checks_before_any_compute(tmp_path, capsys):
    from helios_jax import cli

    assert cli.main(["train", path("stage_1_init"), f"data_config.instance_data_root=[{tmp_path}/absent]"]) == 2
    assert "no data folder at" in capsys.readouterr().err
    assert cli.main(["train", write(tmp_path, MINIMAL.replace("training_config:", "training_config:\n  seed: x"))]) == 2
    assert "unknown key 'training_config.seed'" in capsys.readouterr().err  # a key out of place is refused
    assert cli.main(["train", path("stage_3_post")]) == 2  # it runs, but its data folder is not here
    assert "data_config.gan_data_root: no data folder at 'demo_data/ultravideo-long'" in capsys.readouterr().err
    assert cli.main(["train", path("stage_3_ode")]) == 2  # it runs, but its ODE-pair folder is not here
    assert "data_config.ode_data_root: no data folder at 'demo_data/vidprom_filtered_extended'" in capsys.readouterr().err
    assert not os.path.exists("ablation_stage_1_init") and not os.path.exists("out")


OFFICIAL = ["correct", "stage_1_init", "stage_1_post", "stage_2_init", "stage_2_post", "stage_3_ode", "stage_3_post",
            "stage_3_post_gan_version"]  # PKU-YuanGroup/Helios scripts/training/configs/


def test_shipped_configs_are_found_by_bare_name(tmp_path, monkeypatch):
    assert configs.names() == OFFICIAL
    monkeypatch.chdir(tmp_path)  # no file of these names here
    for name in ("stage_1_init", "stage_1_init.yaml"):
        recipe, _ = load(name)
        assert recipe.section("training_config")["learning_rate"] == 5e-5  # the official file's value
    recipe, _ = load(["stage_1_init", "correct"])
    assert recipe.section("training_config")["corrupt_mode_history"] == "random"  # the overlay, by name too


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage_1_init.yaml").write_text(MINIMAL + "seed: 7\n")
    recipe, _ = load("stage_1_init.yaml")  # the user's own file in the working folder
    assert recipe.seed == 7
    recipe, _ = load("stage_1_init")  # not a path here: the shipped one
    assert recipe.seed != 7 and recipe.section("training_config")["learning_rate"] == 5e-5


@pytest.mark.parametrize("name", ["stage_1_nit", "stage_1_init.yml", "configs/stage_1_init.yaml"])
def test_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"no training config at '{name}'") as err:
        recipes.load(name)
    assert ", ".join(OFFICIAL) in str(err.value)


def test_train_help_lists_the_shipped_names(capsys):
    from helios_jax import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--help"])
    assert exit.value.code == 0
    assert ", ".join(OFFICIAL) in " ".join(capsys.readouterr().out.split())
