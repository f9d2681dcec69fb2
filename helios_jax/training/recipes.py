"""The official training YAMLs (``scripts/training/configs/*.yaml``) read, typed and checked: the one
place that knows the YAML.

A YAML has the sections ``data_config``, ``model_config``, ``validation_config`` and
``training_config`` plus a few top-level keys, with the names of the official ``train_config.py``.
Every key falls in one of four groups:

* keys this port uses (``SCHEMA``, stage 3a's ODE-regression keys included): typed against the official
  type and default; some only run at certain values (``Key.allowed``): any other value is a
  :class:`ConfigError`;
* keys of the official schema that do not apply here (``NOT_APPLICABLE``: DeepSpeed, wandb, NPU,
  torch data-loader workers, offload-time settings, the knobs of the stage-3 features not run here):
  listed once per file at debug level (``logging``), since every official YAML carries about 30 of them;
* stage 3b's keys (``DMD_SCHEMA``: DMD, GAN, EMA, the critic): typed and checked like ``SCHEMA``'s when
  ``is_train_dmd`` is on (``stage_3_post*.yaml``), listed as not used otherwise;
* the stage-3 switches (``STAGE3_SWITCHES``): stage 3a (ODE regression alone) and stage 3b (DMD, with
  GAN and EMA) run; any other switch that is on (the reward model, ODE regression beside DMD) is refused
  with one error naming the switches.

A key or section in none of these groups is a typo: one :class:`ConfigError` naming it and the closest
known name (``difflib``), since a misspelt ``learning_rat`` would otherwise train with the default. A float
must be finite (``.nan`` or ``.inf`` would train to the end with a NaN loss).

Several files merge in order (``stage_1_init.yaml correct.yaml``: the second overrides the first), then
``section.key=value`` overrides (values read as YAML, typed like the file's). Everything is checked
before any compute. A checked :class:`Recipe` then gives the stages typed, frozen configs
(:class:`DataConfig`, :class:`ModelConfig`, :class:`ValidationConfig`, the context, the pyramid, the ODE
and DMD settings): no other module reads a YAML key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
from typing import Any, Sequence

import yaml

from helios_jax import hub
from helios_jax.config import ConfigError
from helios_jax.hub import HubError
from helios_jax.models.lora import LoraSpec
from helios_jax.prompts import DEFAULT_NEGATIVE_PROMPT
from helios_jax.sampling.schedule import HeliosSchedulerConfig
from helios_jax.training import configs
from helios_jax.training.distill import DmdSettings, GanSettings, TimestepDraw
from helios_jax.training.ema import EmaConfig
from helios_jax.training.losses import PyramidSchedule, PyramidSettings, TimestepSampling
from helios_jax.training.ode import ODESettings
from helios_jax.training.samples import ContextConfig, CorruptionConfig, SaturationConfig
from helios_jax.training.trainer import SCHEDULES, OptimizerConfig, RunConfig

SECTIONS = ("data_config", "model_config", "validation_config", "training_config")
TOP = ""  # the section name of the top-level keys
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Key:
    """One key: its type (bool, int, float, str, "str?" for an optional string, or a (list, item) pair),
    the official default, and the values this port runs (None: any) with the reason for the rule."""

    type: Any
    default: Any
    allowed: tuple | None = None
    why: str = ""


_NOT_HERE = "not implemented in this port"
_LAYOUT = "the fixed 29-frame index layout (history 16/2/1, chunks of 9 latent frames) is what the model is built for"

_STAGES_1_2: dict[str, dict[str, Key]] = {
    TOP: {
        "output_dir": Key(str, "Helios"),
        "seed": Key(int, 42),
        # This port's own key (not the official schema's): the device mesh, e.g. "data=2,fsdp=4".
        "mesh": Key("str?", None),
    },
    "data_config": {
        "instance_data_root": Key((list, str), []),
        "use_shuffle": Key(bool, False),
        "single_res": Key(bool, False),
        "single_height": Key(int, 384),
        "single_width": Key(int, 640),
        "use_stage1_dataset": Key(bool, False, (True,), "stages 1 and 2 train on the offloaded short latents"),
        "caption_dropout_p": Key(float, 0.0, (0.0,), f"caption dropout is {_NOT_HERE} (0 in every official YAML)"),
        "id_token": Key(str, "", ("",), f"an id token prefix is {_NOT_HERE}"),
        "dataset_sampling_ratios": Key((list, float), [], ([],), f"per-dataset resampling is {_NOT_HERE}"),
        "negative_prompt": Key(str, ""),
    },
    "model_config": {
        "pretrained_model_name_or_path": Key("str?", None),
        "transformer_model_name_or_path": Key("str?", None),
        "subfolder": Key("str?", None),
        "revision": Key("str?", None),  # of the hub ids above (a branch, tag or commit)
        "lora_rank": Key(int, 128),
        "lora_alpha": Key(float, 128.0),
        "lora_dropout": Key(float, 0.0, (0.0,), f"LoRA dropout is {_NOT_HERE} (0 in every official YAML)"),
        "lora_layers": Key("str?", None, ("all-linear",), "the LoRA targets every linear layer ('all-linear')"),
        "lora_target_modules": Key((list, str), [], ([],), "with lora_layers='all-linear' the targets are implied"),
        "lora_exclude_modules": Key((list, str), []),
        "lora_paths": Key((list, str), [], ([],), f"starting from saved LoRAs is {_NOT_HERE}; merge them first"),
        "train_norm_layers": Key(bool, False, (False,), "norm layers stay frozen (as the official fused norms do)"),
        "load_checkpoints_custom": Key(bool, False, (False,), f"custom checkpoint loading is {_NOT_HERE}"),
        "load_dcp": Key(bool, False, (False,), "torch distributed checkpoints are not read"),
        "bnb_quantization_config_path": Key("str?", None, (None,), "bitsandbytes quantization is torch-only"),
    },
    "validation_config": {
        "validation_steps": Key(int, 100),
        "validation_height": Key(int, 480),
        "validation_width": Key(int, 832),
        "validation_max_num_frames": Key(int, 81),
        "validation_prompts": Key((list, str), ["A frog jumps on a lotus leaf."]),
        "validation_guidance_scale": Key(float, 9.0),
        "validation_latent_window_size": Key((list, int), [9], ([9],), _LAYOUT),
        "first_step_valid": Key(bool, True),
        "num_validation_videos": Key(int, 1),
        "num_inference_steps": Key(int, 30),
        "use_dynamic_shifting": Key(bool, False),
        "time_shift_type": Key(str, "linear", ("exponential", "linear"), "the two shift types of the scheduler"),
        "use_kv_cache": Key(bool, False, (False,), f"a KV cache is {_NOT_HERE}"),
        "stage2_simulated_inference_steps": Key((list, int), [10, 10, 10]),
    },
    "training_config": {
        # Loop and optimizer.
        "gradient_checkpointing": Key(bool, True),
        "mixed_precision": Key(str, "bf16", ("bf16", "no"), "bf16 frozen weights with fp32 trainables, or fp32"),
        "offload": Key(bool, False, (False,), "training reads offloaded latents; on-the-fly encoding is not run"),
        "max_train_steps": Key(int, 1000),
        "train_batch_size": Key(int, 1),
        "gradient_accumulation_steps": Key(int, 1, (1,), f"gradient accumulation is {_NOT_HERE} (1 everywhere)"),
        "checkpointing_steps": Key(int, 500),
        "checkpoints_total_limit": Key("int?", None),
        "resume_from_checkpoint": Key("str?", None),
        "learning_rate": Key(float, 2e-4),
        "scale_lr": Key(bool, False, (False,), "the learning rate is used as written"),
        "lr_scheduler": Key(str, "constant", SCHEDULES, "the official configs' schedules"),
        "lr_warmup_steps": Key(int, 500),
        "optimizer": Key(str, "adamw", ("adamw",), "optax AdamW, as every official config"),
        "use_8bit_adam": Key(bool, False, (False,), "8-bit Adam is bitsandbytes-only"),
        "adam_beta1": Key(float, 0.9),
        "adam_beta2": Key(float, 0.999),
        "adam_weight_decay": Key(float, 1e-4),
        "adam_epsilon": Key(float, 1e-8),
        "max_grad_norm": Key(float, 1.0),
        # This port's own key: skip (and count in metrics.jsonl) an update whose gradient is not finite,
        # instead of stopping the run there.
        "skip_nonfinite": Key(bool, False),
        "weighting_scheme": Key(str, "logit_normal", ("logit_normal", "none"),
                                "the timestep samplings of stages 1 (logit-normal) and 2 (uniform)"),
        "logit_mean": Key(float, 0.0),
        "logit_std": Key(float, 1.0),
        "use_dynamic_shifting": Key(bool, False, (False,), "flow-matching training runs unshifted (asserted so officially)"),
        # Model structure the recipe must agree with.
        "is_enable_stage1": Key(bool, False),
        "history_sizes": Key((list, int), [16, 2, 1], ([16, 2, 1],), _LAYOUT),
        "latent_window_size": Key((list, int), [9], ([9],), _LAYOUT),
        "has_multi_term_memory_patch": Key(bool, False, (True,), "Helios conditions on the multi-term memory patches"),
        "zero_history_timestep": Key(bool, False, (True,), "the Helios DiT modulates history with t=0"),
        "guidance_cross_attn": Key(bool, False, (True,), "the Helios DiT keeps history out of cross-attention"),
        "is_amplify_history": Key(bool, False, (False,), f"training the history key scale is {_NOT_HERE}"),
        "restrict_self_attn": Key(bool, False, (False,), f"restricted self-attention is {_NOT_HERE}"),
        "restrict_lora": Key(bool, False, (False,), f"the history-only restrict LoRA is {_NOT_HERE}"),
        "is_train_restrict_lora": Key(bool, False, (False,), f"the history-only restrict LoRA is {_NOT_HERE}"),
        # Trainable sets.
        "is_train_full_patch_embedding": Key(bool, False, (False,), "the noisy patch embedding trains through LoRA only"),
        "is_train_lora_patch_embedding": Key(bool, False),
        "is_train_full_multi_term_memory_patchg": Key(bool, False),
        "is_train_lora_multi_term_memory_patchg": Key(bool, False),
        # Sample assembly and anti-drifting (helios_jax.training.samples).
        "is_random_drop": Key(bool, False),
        "random_drop_i2v_ratio": Key(float, 0.0),
        "random_drop_v2v_ratio": Key(float, 0.0),
        "random_drop_t2v_ratio": Key(float, 0.0),
        "corrupt_model_input": Key(bool, False, (False,), f"corrupting the model input is {_NOT_HERE} (off everywhere)"),
        "corrupt_history": Key(bool, False),
        "corrupt_mode_history": Key(str, "noise", ("noise", "downsample", "random"), "the official corruption modes"),
        "corrupt_mode_prob_history": Key(float, 0.9),
        "is_frame_independent_corrupt_history": Key(bool, False),
        "is_chunk_independent_corrupt_history": Key(bool, False),
        "noise_corrupt_ratio_history_short": Key(float, 1 / 3),
        "noise_corrupt_ratio_history_mid": Key(float, 1 / 3),
        "noise_corrupt_ratio_history_long": Key(float, 1 / 3),
        "noise_corrupt_clean_prob_history": Key(float, 0.1),
        "downsample_min_corrupt_ratio_history": Key(float, 0.9),
        "downsample_max_corrupt_ratio_history": Key(float, 1.0),
        "is_add_saturation": Key(bool, False),
        "saturation_ratio_min": Key(float, 0.3),
        "saturation_ratio_max": Key(float, 1.7),
        "saturation_ratio_clean_prob": Key(float, 0.1),
        # Error recycling (samples.RecycleBuffers, push_errors, inject_errors) stays a library, not a YAML switch:
        # its buffers are state carried from step to step, and at the official sizes (500 errors x 50 timestep
        # cells of one (16, 9, 48, 80) latent, two buffers) they are 110 GB of float32 per resolution, more than
        # a GPU holds; and the original refuses it beside history corruption, which every released config uses
        # (docs/training.md §8.3).
        "use_error_recycling": Key(bool, False, (False,), "error recycling is not a training switch here (its buffers "
                                   "would be 110 GB of step-to-step state at the official sizes; off in every "
                                   "official config); helios_jax.training.samples has its pieces"),
        # Stage 2: the pyramid.
        "is_enable_stage2": Key(bool, False),
        "is_navit_pyramid": Key(bool, False),
        "stage2_num_stages": Key(int, 3, (3,), "the Helios pyramid has three stages"),
        "stage2_timestep_shift": Key(float, 1.0, (1.0,), "the pyramid scheduler of Helios runs with shift 1"),
        "stage2_scheduler_gamma": Key(float, 1 / 3),
        "stage2_stage_range": Key((list, float), [0.0, 1 / 3, 2 / 3, 1.0]),
        "stage2_sample_ratios": Key((list, int), [1, 2, 1]),
        "efficient_sample": Key(bool, False, (False,), "the official code asserts on a missing key when it is on"),
    },
}

# Keys of the official schema that change nothing here (runtime, logging, hardware, offload-time and stage-3 knobs);
# NOT_APPLICABLE is this less the keys stage 3a and 3b read.
_OFFICIAL_ONLY: dict[str, frozenset[str]] = {
    TOP: frozenset({"logging_dir", "report_to"}),
    "data_config": frozenset({
        "pin_memory", "persistent_workers", "dataloader_num_workers", "prefetch_factor", "force_rebuild",
        "instance_video_root", "stride", "resolution", "single_length", "single_num_frame", "multi_res",
        "gan_data_root", "ode_data_root", "text_data_root",
    }),
    "model_config": frozenset({
        "siglip_model_name_or_path", "variant", "load_model_path", "load_dcp_path", "upcast_vae",
        "enable_slicing", "enable_tiling", "critic_lora_name_or_path", "critic_subfolder", "critic_lora_rank",
        "critic_lora_alpha", "critic_lora_dropout", "real_score_model_name_or_path", "reward_model_name_or_path",
    }),
    "validation_config": frozenset({"validation_images", "validation_stream_chunk_size"}),
    "training_config": frozenset({
        "local_rank", "allow_tf32", "enable_xformers_memory_efficient_attention", "enable_npu_flash_attention",
        "upcast_before_saving", "profile_out_dir", "num_train_epochs", "save_checkpoints_custom", "lr_num_cycles",
        "lr_power", "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup",
        "mode_scale", "time_shift_type", "base_seq_len", "max_seq_len", "base_shift", "max_shift",
        "vae_decode_type", "use_ema_validation", "ema_decay", "ema_start_step", "ema_zero3_port",
        "ema_deepspeed_config_file", "history_scale_mode", "restrict_lora_rank",
        "corrupt_mode_model_input", "corrupt_mode_prob_model_input", "is_frame_independent_corrupt_model_input",
        "is_chunk_independent_corrupt_model_input", "noise_corrupt_ratio_model_input",
        "noise_corrupt_clean_prob_model_input", "downsample_min_corrupt_ratio_model_input",
        "downsample_max_corrupt_ratio_model_input",
        # Stage 3 knobs (read only with a stage-3 switch on, and those are refused).
        "dmd_is_low_vram_mode", "is_gan_low_vram_mode", "dmd_is_offload_grad", "log_iters", "no_visualize",
        "max_grad_norm_critic", "dmd_generator_deepspeed_config", "dmd_critic_deepspeed_config",
        "critic_learning_rate", "dfake_gen_update_ratio", "dmd_denoising_step_list", "num_critic_input_frames",
        "dmd_timestep_shift", "dmd_last_step_only", "dmd_last_section_grad_only", "dmd_teacher_forcing",
        "dmd_teacher_forcing_ratio", "fake_guidance_scale", "real_guidance_scale", "is_skip_first_section",
        "is_amplify_first_chunk", "use_gt_history_ratio", "is_use_gt_coherence_dmd", "is_dmd_vae_decode",
        "is_multi_pyramid_stage_backward_simulated", "is_consistency_align", "consistentcy_align_weight",
        "is_smoothness_loss", "smoothness_loss_weight", "is_mean_var_regular", "mean_var_regular_weight",
        "regular_mean", "regular_var", "is_x0_mean_var_regular", "mean_var_regular_x0_weight", "regular_x0_mean",
        "regular_x0_var", "is_chunk_mean_var_regular", "chunk_mean_var_regular_weight", "chunk_regular_mean",
        "chunk_regular_var", "is_chunk_x0_mean_var_regular", "chunk_mean_var_regular_x0_weight",
        "chunk_regular_x0_mean", "chunk_regular_x0_var", "ode_regression_weight", "ode_num_latent_sections_min",
        "ode_num_latent_sections_max", "gan_start_step", "is_separate_gan_grad", "is_use_gan_hooks",
        "is_use_gan_final", "gan_cond_map_dim", "gan_hooks", "gan_g_weight", "gan_d_weight", "aprox_r1", "aprox_r2",
        "r1_weight", "r2_weight", "r1_sigma", "r2_sigma", "reward_start_step", "reward_weight_vq",
        "reward_weight_mq", "reward_weight_ta", "is_decouple_dmd", "decouple_ca_start_step",
        "decouple_ca_end_step", "is_enable_cold_start", "cold_start_step", "stage_cold_start_step",
        "generator_is_forcing_low_renoise", "generator_dynamic_alpha", "generator_dynamic_beta",
        "generator_dynamic_sample_type", "generator_dynamic_step", "critic_dynamic_alpha", "critic_dynamic_beta",
        "critic_dynamic_sample_type", "critic_dynamic_step", "dmd_num_latent_sections_min",
        "dmd_num_latent_sections_max", "dmd_dynamic_alpha", "dmd_dynamic_beta", "dmd_dynamic_sample_type",
        "dmd_dynamic_step", "ode_dynamic_alpha", "ode_dynamic_beta", "ode_dynamic_sample_type", "ode_dynamic_step",
        "y_error_sample_from_all_grids", "error_buffer_size", "buffer_replacement_strategy", "buffer_warmup_iter",
        "timestep_grid_size", "num_grids", "y_error_num", "error_modulate_factor", "error_setting", "noise_prob",
        "y_prob", "latent_prob", "clean_prob", "clean_buffer_update_prob",
    }),
}

# The switches of the distillation stages (issue 12): any of them on refuses the config, except those that
# stage 3b (DMD, ``is_train_dmd``) runs (DMD_SWITCHES).
STAGE3_SWITCHES: dict[str, tuple[str, ...]] = {
    "data_config": ("use_stage3_dataset",),
    "training_config": ("is_train_dmd", "use_ema", "is_use_ode_regression", "is_only_ode_regression", "is_use_gan",
                        "is_use_gt_history", "is_use_reward_model"),
}
DMD_SWITCHES = frozenset({"use_stage3_dataset", "is_train_dmd", "use_ema", "is_use_gan", "is_use_gt_history"})

# Stage 3a's keys (ODE regression, helios_jax.training.ode): part of SCHEMA.
ODE_SCHEMA: dict[str, dict[str, Key]] = {
    "data_config": {"use_stage3_dataset": Key(bool, False), "ode_data_root": Key((list, str), [])},
    "training_config": {
        "is_use_ode_regression": Key(bool, False), "is_only_ode_regression": Key(bool, False),
        "use_ema": Key(bool, False), "ema_decay": Key(float, 0.99), "ema_start_step": Key(int, 750),
        "ode_regression_weight": Key(float, 0.25),
        "ode_num_latent_sections_min": Key(int, 3), "ode_num_latent_sections_max": Key(int, 3),
        "time_shift_type": Key(str, "linear"),
        "base_seq_len": Key(int, 256), "max_seq_len": Key(int, 4096),
        "base_shift": Key(float, 0.5), "max_shift": Key(float, 1.15),
    },
}

_DMD = "stage 3b (DMD)"
_OFF = f"is {_NOT_HERE} (off in every official config; docs/training.md §7.6)"
# Stage 3b's keys (docs/training.md §7): typed and checked like SCHEMA's; read only when is_train_dmd is on.
DMD_SCHEMA: dict[str, dict[str, Key]] = {
    "data_config": {
        "use_stage1_dataset": Key(bool, False, (False,), f"{_DMD} reads the stage-3 dataset (use_stage3_dataset)"),
        "use_stage3_dataset": Key(bool, False),
        "gan_data_root": Key((list, str), []),
    },
    "model_config": {
        "real_score_model_name_or_path": Key("str?", None),
        "critic_subfolder": Key("str?", None),
        "critic_lora_rank": Key(int, 128),
        "critic_lora_alpha": Key(float, 128.0),
        "critic_lora_dropout": Key(float, 0.0, (0.0,), f"LoRA dropout is {_NOT_HERE} (0 in every official YAML)"),
        "critic_lora_name_or_path": Key("str?", None, (None,), f"starting the critic from a saved LoRA is {_NOT_HERE}"),
    },
    "training_config": {
        "is_train_dmd": Key(bool, False),
        "use_dynamic_shifting": Key(bool, False),  # True for 3b (_check_dmd); stages 1-2 keep SCHEMA's rule
        "use_ema": Key(bool, False),
        "ema_decay": Key(float, 0.99),
        "ema_start_step": Key(int, 750),
        "use_ema_validation": Key(bool, False, (False,), "validation runs the trained generator (as the official)"),
        "critic_learning_rate": Key(float, 4e-7),
        "max_grad_norm_critic": Key(float, 10.0),
        "dfake_gen_update_ratio": Key(int, 5),
        "real_guidance_scale": Key(float, 3.0),
        "fake_guidance_scale": Key(float, 0.0, (0.0,), "the fake score runs without CFG (as every official config)"),
        "is_use_gt_history": Key(bool, False, (True,), f"{_DMD} rolls out on the data's (GT) history only"),
        "use_gt_history_ratio": Key(float, 1.0, (1.0,), f"{_DMD} rolls out on the data's (GT) history only"),
        "is_amplify_first_chunk": Key(bool, True),
        "num_critic_input_frames": Key(int, 9, (9,), _LAYOUT),
        "dmd_num_latent_sections_min": Key(int, 1, (1,), "with GT history the official rolls out one section"),
        "dmd_num_latent_sections_max": Key(int, 1, (1,), "with GT history the official rolls out one section"),
        "time_shift_type": Key(str, "linear", ("linear",), "the DMD scheduler's shift is linear"),
        "base_seq_len": Key(int, 256, (256,), "the DMD scheduler's dynamic shift"),
        "max_seq_len": Key(int, 4096, (4096,), "the DMD scheduler's dynamic shift"),
        "base_shift": Key(float, 0.5, (0.5,), "the DMD scheduler's dynamic shift"),
        "max_shift": Key(float, 1.15, (1.15,), "the DMD scheduler's dynamic shift"),
        "generator_dynamic_sample_type": Key(str, "beta", ("beta", "uniform"), "the official timestep samplings"),
        "generator_dynamic_alpha": Key(float, 4.0),
        "generator_dynamic_beta": Key(float, 1.5),
        "generator_dynamic_step": Key(int, 500),
        "critic_dynamic_sample_type": Key(str, "uniform", ("beta", "uniform"), "the official timestep samplings"),
        "critic_dynamic_alpha": Key(float, 4.0),
        "critic_dynamic_beta": Key(float, 1.5),
        "critic_dynamic_step": Key(int, 500),
        "is_use_gan": Key(bool, False),
        "gan_start_step": Key(int, 1000),
        "is_use_gan_hooks": Key(bool, True),
        "is_use_gan_final": Key(bool, True, (True,), "the final head is always part of the discriminator"),
        "gan_hooks": Key((list, int), [5, 15, 25, 35]),
        "gan_cond_map_dim": Key(int, 768),
        "gan_g_weight": Key(float, 0.05),
        "gan_d_weight": Key(float, 0.01),
        "aprox_r1": Key(bool, True, (True,), "R1 is the approximate one (logit change under input noise)"),
        "r1_weight": Key(float, 100.0),
        "r1_sigma": Key(float, 0.1),
        "r2_weight": Key(float, 0.0, (0.0,), f"the R2 penalty {_OFF}"),
        "is_separate_gan_grad": Key(bool, False, (False,), f"a separate GAN gradient {_OFF}"),
        "dmd_last_step_only": Key(bool, False, (False,), f"last-step-only DMD {_OFF}"),
        "dmd_last_section_grad_only": Key(bool, False, (False,), f"last-section-only gradients {_OFF}"),
        "dmd_teacher_forcing": Key(bool, False, (False,), f"teacher forcing {_OFF}"),
        "is_dmd_vae_decode": Key(bool, False, (False,), f"the VAE re-encode in the rollout {_OFF}"),
        "is_multi_pyramid_stage_backward_simulated": Key(bool, False, (False,), f"multi-stage backward simulation {_OFF}"),
        "is_decouple_dmd": Key(bool, False, (False,), f"decoupled DMD {_OFF}"),
        "is_consistency_align": Key(bool, False, (False,), f"the consistency-align loss {_OFF}"),
        "is_smoothness_loss": Key(bool, False, (False,), f"the chunk-boundary smoothness loss {_OFF}"),
        "is_mean_var_regular": Key(bool, False, (False,), f"the mean/var regulariser {_OFF}"),
        "is_x0_mean_var_regular": Key(bool, False, (False,), f"the mean/var regulariser {_OFF}"),
        "is_chunk_mean_var_regular": Key(bool, False, (False,), f"the mean/var regulariser {_OFF}"),
        "is_chunk_x0_mean_var_regular": Key(bool, False, (False,), f"the mean/var regulariser {_OFF}"),
        "is_enable_cold_start": Key(bool, False, (False,), f"the cold start {_OFF}"),
        "generator_is_forcing_low_renoise": Key(bool, False, (False,), f"forced low renoise {_OFF}"),
    },
}
SCHEMA: dict[str, dict[str, Key]] = {s: {**keys, **ODE_SCHEMA.get(s, {})} for s, keys in _STAGES_1_2.items()}
NOT_APPLICABLE: dict[str, frozenset[str]] = {
    s: keys - frozenset(ODE_SCHEMA.get(s, {})) - frozenset(DMD_SCHEMA.get(s, {})) for s, keys in _OFFICIAL_ONLY.items()}


# ------------------------------------------------------------------------------------------ typed configs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a run reads (``data_config``): the stage's folders (:func:`data_roots`), ``train_batch_size`` per
    batch shard, the shuffle and seed, the one resolution of ``single_res`` (None: every bucket) and the
    negative prompt (the official default when the YAML's is empty)."""

    roots: tuple[str, ...]
    batch_size: int
    seed: int
    shuffle: bool
    resolutions: tuple[tuple[int, int], ...] | None
    negative_prompt: str


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The folders a run loads (``model_config``) and how: ``pipeline`` holds the VAE and text encoder,
    ``transformer`` the trained DiT (with its ``subfolder``), ``critic`` stage 3b's scores' DiT (the
    generator's when ``real_score_model_name_or_path`` is unset); ``mixed_precision`` ("bf16" or "no") and
    ``remat`` (``gradient_checkpointing``)."""

    pipeline: str | None
    transformer: str | None
    critic: str | None
    mixed_precision: str
    remat: bool


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """The validation videos (``validation_config``): prompts, count, size, guidance and steps (stage 1's
    ``num_inference_steps``, the pyramid's ``stage2_simulated_inference_steps``), the sampler's shifting."""

    prompts: tuple[str, ...]
    videos: int
    height: int
    width: int
    num_frames: int
    guidance_scale: float
    num_inference_steps: int
    pyramid_steps: tuple[int, ...]
    use_dynamic_shifting: bool
    time_shift_type: str


def _corruption(t: dict[str, Any]) -> CorruptionConfig:
    """The history corruption of ``training_config`` (``corrupt_*_history`` and its ratios)."""
    return CorruptionConfig(
        mode=t["corrupt_mode_history"], noise_mode_prob=t["corrupt_mode_prob_history"],
        frame_independent=t["is_frame_independent_corrupt_history"],
        ratio_short=t["noise_corrupt_ratio_history_short"], ratio_mid=t["noise_corrupt_ratio_history_mid"],
        ratio_long=t["noise_corrupt_ratio_history_long"], clean_prob=t["noise_corrupt_clean_prob_history"],
        downsample_min=t["downsample_min_corrupt_ratio_history"],
        downsample_max=t["downsample_max_corrupt_ratio_history"])


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A checked config: ``values[section][key]`` for every key of ``SCHEMA`` (file, else default)."""

    values: dict[str, dict[str, Any]]
    sources: tuple[str, ...]

    def section(self, name: str) -> dict[str, Any]:
        return self.values[name]

    @property
    def stage(self) -> str:
        """"stage1", "stage2_packed" (NaViT, stage 2-init), "stage2_sequential" (stage 2-post), "stage3_ode"
        (stage 3a) or "stage3_dmd" (stage 3b)."""
        training = self.values["training_config"]
        if training.get("is_train_dmd"):
            return "stage3_dmd"
        if training["is_use_ode_regression"]:
            return "stage3_ode"
        if training["is_enable_stage2"]:
            return "stage2_packed" if training["is_navit_pyramid"] else "stage2_sequential"
        return "stage1"

    @property
    def seed(self) -> int:
        return self.values[TOP]["seed"]

    @property
    def mesh(self) -> str | None:
        """The device mesh, e.g. "data=2,fsdp=4" (None: one device)."""
        return self.values[TOP]["mesh"]

    def data(self) -> DataConfig:
        d, t = self.values["data_config"], self.values["training_config"]
        return DataConfig(tuple(data_roots(self.values)), t["train_batch_size"], self.seed, d["use_shuffle"],
                          ((d["single_height"], d["single_width"]),) if d["single_res"] else None,
                          d["negative_prompt"] or DEFAULT_NEGATIVE_PROMPT)

    def model(self) -> ModelConfig:
        """The model folders, hub ids resolved to their local snapshots (fetched by the first call)."""
        m, t = self.values["model_config"], self.values["training_config"]
        folders = {key: _model_folder(m, key) for key in _MODEL_KEYS if m.get(key) is not None}
        transformer = folders.get("transformer_model_name_or_path")
        return ModelConfig(folders.get("pretrained_model_name_or_path"), transformer,
                           folders.get("real_score_model_name_or_path", transformer), t["mixed_precision"],
                           t["gradient_checkpointing"])

    def validation(self) -> ValidationConfig:
        v = self.values["validation_config"]
        return ValidationConfig(
            tuple(v["validation_prompts"]), v["num_validation_videos"], v["validation_height"], v["validation_width"],
            v["validation_max_num_frames"], v["validation_guidance_scale"], v["num_inference_steps"],
            tuple(v["stage2_simulated_inference_steps"]), v["use_dynamic_shifting"], v["time_shift_type"])

    def context(self) -> ContextConfig:
        """Stages 1, 2 and 3b's random drops and history corruption (no saturation: the DMD settings hold
        the rollouts')."""
        t = self.values["training_config"]
        return ContextConfig(random_drop=t["is_random_drop"], t2v_ratio=t["random_drop_t2v_ratio"],
                             v2v_ratio=t["random_drop_v2v_ratio"], i2v_ratio=t["random_drop_i2v_ratio"],
                             corruption=_corruption(t) if t["corrupt_history"] else None)

    def timestep_sampling(self) -> TimestepSampling:
        t = self.values["training_config"]
        return TimestepSampling(t["weighting_scheme"], t["logit_mean"], t["logit_std"])

    def pyramid(self) -> PyramidSettings:
        """Stage 2's training pyramid scheduler, sample ratios and timestep sampling (``stage2_*``)."""
        t = self.values["training_config"]
        schedule = PyramidSchedule.create(t["stage2_timestep_shift"], t["stage2_num_stages"],
                                          tuple(t["stage2_stage_range"]), t["stage2_scheduler_gamma"])
        return PyramidSettings(schedule, tuple(t["stage2_sample_ratios"]), self.timestep_sampling())

    def pyramid_scheduler(self, **extra: Any) -> HeliosSchedulerConfig:
        """The training pyramid as a sampler's scheduler config (``stage2_*``), with ``extra`` fields."""
        t = self.values["training_config"]
        return HeliosSchedulerConfig(shift=t["stage2_timestep_shift"], stages=t["stage2_num_stages"],
                                     stage_range=tuple(t["stage2_stage_range"]), gamma=t["stage2_scheduler_gamma"],
                                     **extra)

    def ode(self, patch: tuple[int, int, int]) -> ODESettings:
        """Stage 3a's loss settings for a DiT of ``patch``: the training pyramid with the shift's ``base_*``
        keys, ``ode_regression_weight`` and the section count."""
        t = self.values["training_config"]
        scheduler = self.pyramid_scheduler(base_image_seq_len=t["base_seq_len"], max_image_seq_len=t["max_seq_len"],
                                           base_shift=t["base_shift"], max_shift=t["max_shift"])
        return ODESettings(scheduler, t["ode_regression_weight"], t["ode_num_latent_sections_max"], tuple(patch))

    def dmd(self) -> DmdSettings:
        """Stage 3b's loss settings: the rollout steps, the scores' CFG, the timestep draws, the context (the
        corruption always on the GT history, the saturation jitter with ``is_add_saturation``), the GAN."""
        t, v = self.values["training_config"], self.values["validation_config"]
        draw = lambda who: TimestepDraw(t[f"{who}_dynamic_sample_type"], t[f"{who}_dynamic_alpha"],  # noqa: E731
                                        t[f"{who}_dynamic_beta"], t[f"{who}_dynamic_step"])
        context = dataclasses.replace(self.context(), corruption=_corruption(t))
        saturation = SaturationConfig(t["saturation_ratio_min"], t["saturation_ratio_max"],
                                      t["saturation_ratio_clean_prob"]) if t["is_add_saturation"] else None
        gan = None
        if t["is_use_gan"]:
            gan = GanSettings(tuple(t["gan_hooks"]) if t["is_use_gan_hooks"] else (), t["gan_cond_map_dim"],
                              t["gan_g_weight"], t["gan_d_weight"], t["r1_weight"], t["r1_sigma"])
        return DmdSettings(tuple(v["stage2_simulated_inference_steps"]), t["is_amplify_first_chunk"],
                           t["real_guidance_scale"], draw("generator"), draw("critic"), context, saturation, gan)

    def duel_schedule(self) -> tuple[int, tuple[int, ...]]:
        """Stage 3b's generator update ratio (``dfake_gen_update_ratio``) and phase steps (the GAN terms from
        ``gan_start_step``, when on)."""
        t = self.values["training_config"]
        return t["dfake_gen_update_ratio"], (t["gan_start_step"],) if t["is_use_gan"] else ()

    def as_json(self) -> dict[str, Any]:
        """The whole config as plain JSON (what ``output_dir/config.json`` holds and resume compares)."""
        out = {k: v for k, v in self.values[TOP].items()}
        out.update({s: dict(self.values[s]) for s in SECTIONS})
        return out

    def optimizer(self) -> OptimizerConfig:
        t = self.values["training_config"]
        return OptimizerConfig(
            learning_rate=t["learning_rate"], lr_scheduler=t["lr_scheduler"], lr_warmup_steps=t["lr_warmup_steps"],
            adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_weight_decay=t["adam_weight_decay"],
            adam_epsilon=t["adam_epsilon"], max_grad_norm=t["max_grad_norm"], skip_nonfinite=t["skip_nonfinite"],
        )

    def critic_optimizer(self) -> OptimizerConfig:
        """Stage 3b's critic: the generator's AdamW settings with ``critic_learning_rate`` and
        ``max_grad_norm_critic`` (the official DeepSpeed run clipped both at 1.0 instead: docs/training.md §10)."""
        t = self.values["training_config"]
        return dataclasses.replace(self.optimizer(), learning_rate=t["critic_learning_rate"],
                                   max_grad_norm=t["max_grad_norm_critic"])

    def ema(self) -> EmaConfig | None:
        """Stage 3's EMA of the trained LoRA (``use_ema``, ``ema_decay``, ``ema_start_step``); None without."""
        t = self.values["training_config"]
        return EmaConfig(t["ema_decay"], t["ema_start_step"]) if t.get("use_ema") else None

    def critic_lora(self) -> LoraSpec:
        """Stage 3b's critic LoRA: every linear layer (no patch convs), ``critic_lora_rank`` / ``_alpha``."""
        m = self.values["model_config"]
        return LoraSpec(rank=m["critic_lora_rank"], alpha=m["critic_lora_alpha"], targets="all-linear",
                        exclude=tuple(m["lora_exclude_modules"]))

    def lora(self) -> tuple[LoraSpec, str]:
        """The LoRA spec and the trainable subset (``helios_jax.models.lora.SUBSETS``) of this stage:
        stage 1 trains the history patch convs in full beside the LoRA, stage 2-post gives them a LoRA."""
        m, t = self.values["model_config"], self.values["training_config"]
        spec = LoraSpec(rank=m["lora_rank"], alpha=m["lora_alpha"], targets="all-linear",
                        patch_embedding=t["is_train_lora_patch_embedding"],
                        history_patches=t["is_train_lora_multi_term_memory_patchg"],
                        exclude=tuple(m["lora_exclude_modules"]))
        return spec, "lora+history_patches" if t["is_train_full_multi_term_memory_patchg"] else "lora"

    def run(self, progress: bool | None = None) -> RunConfig:
        t, v = self.values["training_config"], self.values["validation_config"]
        return RunConfig(
            output_dir=self.values[TOP]["output_dir"], max_train_steps=t["max_train_steps"],
            checkpointing_steps=t["checkpointing_steps"], checkpoints_total_limit=t["checkpoints_total_limit"],
            resume_from_checkpoint=t["resume_from_checkpoint"], validation_steps=v["validation_steps"],
            first_step_valid=v["first_step_valid"], seed=self.values[TOP]["seed"], config=self.as_json(),
            progress=progress,
        )


def _known(section: str, key: str) -> bool:
    return (key in SCHEMA[section] or key in NOT_APPLICABLE[section] or key in STAGE3_SWITCHES.get(section, ())
            or key in DMD_SCHEMA.get(section, {}))


def _typed(where: str, kind: Any, value: Any) -> Any:
    """``value`` as ``kind``, or one ConfigError naming the key, the value and the expected type."""

    def fail() -> None:
        name = kind if isinstance(kind, str) else (f"a list of {kind[1].__name__}" if isinstance(kind, tuple)
                                                   else kind.__name__)
        raise ConfigError(f"{where} = {value!r} ({type(value).__name__}) has the wrong type: expected {name}")

    if isinstance(kind, tuple):
        if not isinstance(value, list):
            fail()
        return [_typed(f"{where}[{i}]", kind[1], v) for i, v in enumerate(value)]
    if kind in ("str?", "int?"):
        return None if value is None else _typed(where, str if kind == "str?" else int, value)
    if kind is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string; the official OmegaConf casts it
            try:
                value = float(value)
            except ValueError:
                fail()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a finite number (a NaN or infinite value would train "
                              f"to the end with a NaN loss)")
        return float(value)
    if not isinstance(value, kind):
        fail()
    return value


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"no training config at {path!r} (neither a file nor a shipped name); the shipped ones "
                          f"are {', '.join(configs.names())} (e.g. helios-jax train stage_1_init)")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {SECTIONS}, got {type(raw).__name__}")
    for name in SECTIONS:
        if name in raw and not isinstance(raw[name] or {}, dict):
            raise ConfigError(f"{path}: {name} must be a mapping of keys, got {raw[name]!r}")
    return raw


def _entries(raw: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(section, key) -> value of a file (top-level keys in section TOP)."""
    out = {}
    for key, value in raw.items():
        if key in SECTIONS:
            out.update({(key, k): v for k, v in (value or {}).items()})
        else:
            out[(TOP, key)] = value
    return out


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _refuse_unknown(origin: str, entries: dict[tuple[str, str], Any]) -> None:
    """ONE error for the first key or section that no group knows, with the closest known name: a typo
    must not train with the default."""
    for (section, key), value in entries.items():
        if section not in SCHEMA or (section == TOP and isinstance(value, dict) and not _known(TOP, key)):
            section = key if section == TOP else section  # a mapping at the top level is a misspelt section
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the sections are {', '.join(SECTIONS)}"
            raise ConfigError(f"{origin}: unknown section {section!r}: {hint}")
        if not _known(section, key):
            names = [*SCHEMA[section], *NOT_APPLICABLE[section], *STAGE3_SWITCHES.get(section, ()),
                     *DMD_SCHEMA.get(section, {})]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {_dotted(section, close[0])!r}?" if close else "no known key is close; see docs/training.md"
            raise ConfigError(f"{origin}: unknown key {_dotted(section, key)!r}: {hint}")


def _log_unused(origin: str, entries: dict[tuple[str, str], Any], dmd: bool = False) -> None:
    """The official keys that do not apply here (stage 3b's outside a DMD run too), listed once at debug
    level: they are there on purpose in every official YAML."""
    unused = sorted(_dotted(s, k) for s, k in entries if s in NOT_APPLICABLE and (
        k in NOT_APPLICABLE[s] or (not dmd and k in DMD_SCHEMA.get(s, {}) and k not in SCHEMA[s])))
    if unused:
        _log.debug("%s: official keys not used here (they change nothing in this port): %s", origin, ", ".join(unused))


def _override(text: str) -> tuple[tuple[str, str], Any]:
    """``section.key=value`` (or ``key=value`` for a top-level key), the value read as YAML."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. data_config.instance_data_root=[data/]")
    section, _, key = name.rpartition(".")
    _refuse_unknown(f"override {text!r}", {(section, key): None})
    return (section, key), yaml.safe_load(value)


def load(paths: str | Sequence[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge, type and check YAML files and overrides (see the module doc). A file is a path or the
    bare name of a shipped official YAML (``stage_1_init``; :mod:`helios_jax.training.configs`)."""
    paths = tuple(map(configs.find, (paths,) if isinstance(paths, (str, os.PathLike)) else paths))
    files = [(path, _entries(_read_yaml(path))) for path in map(os.fspath, paths)]
    cli = dict(_override(o) for o in overrides)
    merged: dict[tuple[str, str], Any] = {}
    for _, entries in (*files, ("", cli)):
        merged.update(entries)
    dmd = merged.get(("training_config", "is_train_dmd")) is True
    for path, entries in (*files, ("the command line", cli)):
        _refuse_unknown(path, entries)
        _log_unused(path, entries, dmd)

    _refuse_stage3(merged)
    values: dict[str, dict[str, Any]] = {s: {} for s in (TOP, *SECTIONS)}
    dmd = merged.get(("training_config", "is_train_dmd")) is True
    schema = {s: {**keys, **(DMD_SCHEMA.get(s, {}) if dmd else {})} for s, keys in SCHEMA.items()}
    for section, keys in schema.items():
        for key, spec in keys.items():
            where = f"{section}.{key}" if section else key
            value = _typed(where, spec.type, merged.get((section, key), copy.deepcopy(spec.default)))
            if spec.allowed is not None and value not in spec.allowed and (section, key) not in _ode_rules(merged):
                allowed = spec.allowed[0] if len(spec.allowed) == 1 else list(spec.allowed)
                raise ConfigError(f"{where} = {value!r} is not supported: {spec.why}; use {allowed!r}")
            values[section][key] = value
    _check_stage(values)
    return Recipe(values, tuple(map(os.fspath, paths)))


def _refuse_stage3(merged: dict[tuple[str, str], Any]) -> None:
    dmd = merged.get(("training_config", "is_train_dmd")) is True
    on = [f"{s}.{k}" for s, keys in STAGE3_SWITCHES.items() for k in keys if merged.get((s, k))]
    on = [name for name in on if name.split(".")[1] not in DMD_SWITCHES] if dmd else _ode_switches(on)
    if on:
        raise ConfigError(
            f"this is a stage-3 (distillation) config: {', '.join(on)} on, which this port does not run; it runs "
            f"stage 3a (is_use_ode_regression with is_only_ode_regression, use_stage3_dataset, use_ema) and stage "
            f"3b (is_train_dmd with use_stage3_dataset, use_ema, is_use_gan, is_use_gt_history); the reward "
            f"model and ODE regression beside DMD are not implemented"
        )


def _check_stage(values: dict[str, dict[str, Any]]) -> None:
    t = values["training_config"]
    if t.get("is_train_dmd"):
        _check_dmd(values)
    if not (t["is_enable_stage1"] or t["is_enable_stage2"]):
        raise ConfigError("training_config: neither is_enable_stage1 nor is_enable_stage2 is true; "
                          "set is_enable_stage1: true (stage 1) or both (stage 2)")
    if t["is_train_full_multi_term_memory_patchg"] and t["is_train_lora_multi_term_memory_patchg"]:
        raise ConfigError("training_config: is_train_full_multi_term_memory_patchg and "
                          "is_train_lora_multi_term_memory_patchg are both true; the patch convs train one way")
    if t["is_enable_stage2"]:
        ranges, ratios = t["stage2_stage_range"], t["stage2_sample_ratios"]
        if len(ranges) != t["stage2_num_stages"] + 1 or len(ratios) != t["stage2_num_stages"]:
            raise ConfigError(f"training_config: stage2_stage_range {ranges} needs {t['stage2_num_stages'] + 1} "
                              f"bounds and stage2_sample_ratios {ratios} {t['stage2_num_stages']} counts")
    if t["is_use_ode_regression"]:
        _check_ode(values)
    elif not data_roots(values):
        raise ConfigError(f"data_config.{_data_key(values)} is empty: name the offloaded data folder(s), "
                          f"e.g. data_config.{_data_key(values)}=[data/]")
    for section, key in (("training_config", "max_train_steps"), ("training_config", "train_batch_size"),
                         ("training_config", "checkpointing_steps"), ("validation_config", "validation_steps"),
                         ("model_config", "lora_rank"), ("model_config", "critic_lora_rank")):
        if key in values[section] and values[section][key] < 1:
            raise ConfigError(f"{section}.{key} = {values[section][key]} must be a positive integer")


def _check_dmd(values: dict[str, dict[str, Any]]) -> None:
    t, d, v = values["training_config"], values["data_config"], values["validation_config"]
    if not (t["is_enable_stage1"] and t["is_enable_stage2"] and d["use_stage3_dataset"]):
        raise ConfigError("training_config.is_train_dmd: stage 3b distils the pyramid student on the stage-3 "
                          "dataset; set is_enable_stage1, is_enable_stage2 and data_config.use_stage3_dataset true")
    if not t["use_dynamic_shifting"]:
        raise ConfigError("training_config.use_dynamic_shifting = False is not supported with is_train_dmd: the "
                          "student's schedule is dynamically shifted (as every official stage-3 config); use True")
    steps = v["stage2_simulated_inference_steps"]
    if len(steps) != t["stage2_num_stages"] or min(steps) < 1:
        raise ConfigError(f"validation_config.stage2_simulated_inference_steps = {steps}: the student needs one "
                          f"positive step count per pyramid stage ({t['stage2_num_stages']}), e.g. [2, 2, 2]")
    for key in ("dfake_gen_update_ratio", "gan_cond_map_dim"):
        if t[key] < 1:
            raise ConfigError(f"training_config.{key} = {t[key]} must be a positive integer")
    if t["gan_cond_map_dim"] % 32:
        raise ConfigError(f"training_config.gan_cond_map_dim = {t['gan_cond_map_dim']} must be a multiple of 32 "
                          "(the heads' GroupNorm(32, c)); the official value is 768")
    if d["instance_data_root"]:
        raise ConfigError("data_config.instance_data_root is set with is_train_dmd: stage 3b reads "
                          "data_config.gan_data_root (the offloaded short latents); move the folders there")


def _data_key(values: dict[str, dict[str, Any]]) -> str:
    t = values["training_config"]
    if t.get("is_train_dmd"):
        return "gan_data_root"
    return "ode_data_root" if t.get("is_use_ode_regression") else "instance_data_root"


def data_roots(values: dict[str, dict[str, Any]]) -> list[str]:
    """The data folders of a run: ``gan_data_root`` for stage 3b (offloaded short latents), ``ode_data_root``
    for stage 3a (ODE pairs), else ``instance_data_root``."""
    return values["data_config"][_data_key(values)]


def check_paths(recipe: Recipe) -> None:
    """The folders a run reads must exist (one error naming the first missing one), before any compute."""
    key = _data_key(recipe.values)
    for folder in data_roots(recipe.values):
        if not os.path.isdir(folder):
            what = "write ODE pairs there first (helios-jax offload ode-pairs)" if key == "ode_data_root" else \
                "offload videos there first (helios-jax offload)"
            raise ConfigError(f"data_config.{key}: no data folder at {folder!r}; {what} or fix the path")
    model = recipe.section("model_config")
    for key in _MODEL_KEYS:
        if model.get(key) is None:
            if key == "real_score_model_name_or_path":
                continue  # the generator's folder
            raise ConfigError(f"model_config.{key} is not set: give a diffusers folder or a hub id (org/name)")
        try:
            path = _model_folder(model, key)
        except HubError as err:
            raise ConfigError(f"model_config.{key}: {err}") from None
        if not os.path.isdir(path):
            raise ConfigError(f"model_config.{key}: no folder at {path!r}; give a diffusers folder or a hub id")


# The model folders of a run and the subfolder key of each (None: the folder itself is read).
_MODEL_KEYS = {"pretrained_model_name_or_path": None, "transformer_model_name_or_path": "subfolder",
               "real_score_model_name_or_path": "critic_subfolder"}


def _model_folder(model: dict[str, Any], key: str) -> str:
    """The local folder a ``model_config`` key names (a path, or a hub id through ``hub.resolve`` at
    ``model_config.revision``), with its subfolder: a critic's defaults to ``transformer``."""
    subfolder = model.get(_MODEL_KEYS[key]) if _MODEL_KEYS[key] else None
    if key == "real_score_model_name_or_path":
        subfolder = subfolder or "transformer"
    folder = hub.resolve(model[key], revision=model["revision"], folders=(subfolder,) if subfolder else None)
    return os.path.join(folder, subfolder) if subfolder else folder


_ODE_ON = ("data_config.use_stage3_dataset", "training_config.is_use_ode_regression",
           "training_config.is_only_ode_regression", "training_config.use_ema")


def _ode_switches(on: list[str]) -> list[str]:
    """The stage-3 switches still refused: in a stage-3a recipe (ODE regression, no DMD) none of its own;
    any other stage-3 recipe is refused as a whole."""
    if "training_config.is_use_ode_regression" not in on or "training_config.is_train_dmd" in on:
        return on
    return [name for name in on if name not in _ODE_ON]


def _ode_rules(merged: dict[tuple[str, str], Any]) -> tuple[tuple[str, str], ...]:
    """The stage-1/2 rules a stage-3a recipe replaces with its own (``_check_ode``)."""
    if not merged.get(("training_config", "is_use_ode_regression")):
        return ()
    return (("data_config", "use_stage1_dataset"), ("training_config", "use_dynamic_shifting"))


def _check_ode(values: dict[str, dict[str, Any]]) -> None:
    """Stage 3a's rules: ODE regression only, on ODE pairs, linear dynamic shift, a fixed section count."""
    t, d = values["training_config"], values["data_config"]
    rules = [
        (t["is_only_ode_regression"], "training_config.is_only_ode_regression must be true (ODE regression "
                                      "beside DMD is not implemented; stage 3a trains on ODE pairs alone)"),
        (d["use_stage3_dataset"], "data_config.use_stage3_dataset must be true (stage 3a reads ODE pairs)"),
        (bool(d["ode_data_root"]), "data_config.ode_data_root is empty: name the folder(s) written by "
                                   "`helios-jax offload ode-pairs`, e.g. data_config.ode_data_root=[ode/]"),
        (t["use_dynamic_shifting"], "training_config.use_dynamic_shifting must be true for stage 3a (the ODE "
                                    "timesteps are shifted; asserted so officially)"),
        (t["time_shift_type"] == "linear", f"training_config.time_shift_type = {t['time_shift_type']!r} is not "
                                           "supported: stage 3a shifts linearly (asserted so officially); use 'linear'"),
        (t["ode_num_latent_sections_min"] == t["ode_num_latent_sections_max"] >= 1,
         f"ode_num_latent_sections_min = {t['ode_num_latent_sections_min']} and _max = "
         f"{t['ode_num_latent_sections_max']}: a random section count is not implemented; set both to one "
         "count (3 officially)"),
        (t["train_batch_size"] >= 1, "training_config.train_batch_size must be at least 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    if t["use_ema"] and not 0.0 <= t["ema_decay"] < 1.0:
        raise ConfigError(f"training_config.ema_decay = {t['ema_decay']} must be in [0, 1)")
