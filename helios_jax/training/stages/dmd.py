"""Stage 3b (``stage_3_post.yaml``, ``stage_3_post_gan_version.yaml``): DMD (+ the multi-head GAN) bound to
the Helios DiT, as the two players of ``training.duel`` (docs/training.md §7).

Trees: the generator's trainables ``{"lora": ...}`` (LoRA on every linear and the history patch convs);
the critic's ``{"lora": ..., "heads": ...}`` (its own LoRA and, in the GAN version, the discriminator
heads); the frozen ``{"params": base, "negative_prompt_embeds": (1, L, D)}``, plus ``"critic_params"``
only when the critic's base folder differs from the generator's. The real and fake scores always share
the critic's base: the fake score is it with the critic LoRA (its scale), the real score is it without
(the frozen teacher; the same as LoRA scale 0, without computing the zero term).

Generator loss: a backward-simulated pyramid rollout of the generator (``distill.rollout``: the
stages' ``stage2_simulated_inference_steps``, every stage's steps doubled for a history-free chunk
when ``is_amplify_first_chunk``) on the primary sample's context, ``t`` from the beta-to-uniform
annealed schedule, the fake and real scores (real with CFG against the negative prompt, encoded once
when the run is prepared) under ``stop_gradient`` -> ``distill.dmd_loss``; from ``gan_start_step``
(phase 1) ``+ gan_g_weight * discriminator.cache_grad_gan_loss`` on a half crop of the re-noised sample.
Critic loss: ``distill.fake_score_loss`` on a no-grad rollout of the (just updated) generator with the
secondary sample's context (``x0_2``, ``history_2``: another section of the same clip); from
``gan_start_step`` ``+ discriminator.critic_gan_loss`` with the primary sample's real chunk, noised with
the fake's noise and timestep, and its R1 twin, all in ONE discriminator forward.

Context (docs/training.md §7.3): the random drop, then frame-aware corruption always; saturation jitter only
on the generator's conditioning (the scores see the corrupted, unsaturated history).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from helios_jax import parallel
from helios_jax.checkpoint import read_checkpoint_configs
from helios_jax.config import ConfigError
from helios_jax.loading import COMPONENTS, transformer_component
from helios_jax.models import lora as lora_lib
from helios_jax.models.attention import default_impl
from helios_jax.models.transformer import HeliosTransformer, keeps_fp32
from helios_jax.prompts import PromptEncoder
from helios_jax.sampling.schedule import HeliosDMDSchedulerConfig
from helios_jax.training import distill, parts, recipes, samples, trainer
from helios_jax.training.discriminator import Discriminator, cache_grad_gan_loss, critic_gan_loss, crop_half
from helios_jax.training.distill import DmdSettings, GanSettings, TimestepDraw
from helios_jax.training.duel import Duel
from helios_jax.training.recipes import Recipe
from helios_jax.training.validation import Validator

Params = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DmdNets:
    """The DiT (and its hooked twin and heads for the GAN) as both players call it."""

    model: HeliosTransformer
    dtype: Any = jnp.bfloat16
    generator_scale: float = 1.0  # the generator LoRA's alpha / rank
    critic_scale: float = 1.0
    gan: GanSettings | None = None

    def _cast(self, tree: Params) -> Params:
        return trainer.cast_params(tree, self.dtype, keeps_fp32)

    def _apply(self, model: HeliosTransformer, params: Params, lora: Params | None, scale: float, x: jax.Array,
               t: jax.Array, cond: Mapping[str, jax.Array]) -> Any:
        variables = {"params": params} if lora is None else {"params": params, "lora": self._cast(lora)}
        return model.apply(variables, x.astype(self.dtype), t, **cond, lora_scale=scale)

    def generator(self, trainable: Params, frozen: Params, x, t, cond) -> jax.Array:
        return self._apply(self.model, frozen["params"], trainable["lora"], self.generator_scale, x, t, cond)

    def fake_score(self, critic: Params, frozen: Params, x, t, cond) -> jax.Array:
        return self._apply(self.model, critic_base(frozen), critic["lora"], self.critic_scale, x, t, cond)

    def real_score(self, frozen: Params, x, t, cond) -> jax.Array:
        return self._apply(self.model, critic_base(frozen), None, 0.0, x, t, cond)

    def discriminator(self) -> Discriminator:
        return Discriminator(self.gan.hooks, self.gan.features, remat=self.model.remat)

    def discriminate(self, critic: Params, frozen: Params, x, t, cond) -> jax.Array:
        """Logits (B, 1 + K): the fake-score backbone with hooks, then the heads."""
        hooked = HeliosTransformer(self.model.config, self.model.attention_impl, self.model.remat, hooks=self.gan.hooks)
        out = self._apply(hooked, critic_base(frozen), critic["lora"], self.critic_scale, x, t, cond)
        flow, features = out if self.gan.hooks else (out, ())
        return self.discriminator().apply({"params": critic["heads"]}, flow.astype(jnp.float32),
                                          [f.astype(jnp.float32) for f in features])


def critic_base(frozen: Params) -> Params:
    """The critic's (real and fake scores') base: its own only when its folder differs from the generator's."""
    return frozen.get("critic_params", frozen["params"])


# ----------------------------------------------------------------------------- context and rollout


def dmd_context(key: jax.Array, x0: jax.Array, hist: jax.Array, prompt: jax.Array, settings: DmdSettings,
                dtype: Any) -> tuple[dict, dict, jax.Array]:
    """(generator conditioning, score conditioning, history all zero?) of one sample's context."""
    k_drop, k_corrupt, k_sat = jax.random.split(key, 3)
    c = settings.context
    if c.random_drop:
        x0, hist, _ = samples.random_drop(k_drop, x0, hist, t2v_ratio=c.t2v_ratio, v2v_ratio=c.v2v_ratio,
                                          i2v_ratio=c.i2v_ratio)
    empty = ~jnp.any(hist != 0)
    x0, hist = samples.corrupt_history(k_corrupt, x0, hist, c.corruption or samples.CorruptionConfig())
    saturated = samples.saturate_history(k_sat, hist, settings.saturation) if settings.saturation else hist

    def cond(h: jax.Array) -> dict:
        inputs = samples.history_inputs(x0.astype(dtype), h.astype(dtype))
        return {"encoder_hidden_states": prompt.astype(dtype), **inputs}

    return cond(saturated), cond(hist), empty


@functools.lru_cache(maxsize=16)
def _plan(shape: tuple[int, ...], steps: tuple[int, ...], amplify: bool) -> distill.RolloutPlan:
    return distill.rollout_plan(shape, steps, amplify_first_chunk=amplify)


def _table(shape: tuple[int, ...]) -> distill.SigmaTable:
    return distill.dmd_sigma_table(shape)  # not cached: made inside a trace, its arrays belong to that trace


def simulate(nets: DmdNets, settings: DmdSettings, generator: Params, frozen: Params, cond: dict,
             empty: jax.Array, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """The generator's rollout x0 (B, C, 9, H, W) float32, the amplified schedule for a history-free chunk."""
    model_fn = lambda params, x, t: nets.generator(params, frozen, x, t, cond)  # noqa: E731
    plan = _plan(shape, settings.stage_steps, False)
    amplified = _plan(shape, settings.stage_steps, True) if settings.amplify_first_chunk else None
    return distill.rollout(model_fn, generator, plan, key, amplified=amplified, use_amplified=empty)[0]


def _timesteps(key: jax.Array, batch: int, step: jax.Array, draw: TimestepDraw, table: distill.SigmaTable):
    return distill.sample_dynamic_timestep(key, batch, step=step, shift=table.shift, kind=draw.kind,
                                           alpha=draw.alpha, beta=draw.beta, dynamic_step=draw.dynamic_step)


# ----------------------------------------------------------------------------- the two players


def generator_loss(nets: DmdNets, settings: DmdSettings, own: Params, critic: Params, frozen: Params, batch: Batch,
                   key: jax.Array, step: jax.Array, phase: int) -> tuple[jax.Array, dict]:
    """DMD (+ the Cache-Grad GAN term in phase 1) of the generator (``duel.PlayerLoss``)."""
    k_ctx, k_roll, k_t, k_noise, k_gan, k_crop = jax.random.split(key, 6)
    shape = tuple(batch["target"].shape)
    table = _table((1, *shape[1:]))
    cond_gen, cond_score, empty = dmd_context(k_ctx, batch["x0"], batch["history"], batch["prompt_embeds"],
                                              settings, nets.dtype)
    x_g = simulate(nets, settings, own, frozen, cond_gen, empty, shape, k_roll)
    t = _timesteps(k_t, shape[0], step, settings.generator_timestep, table)
    x_t = distill.add_noise(jax.lax.stop_gradient(x_g), samples.normal(k_noise, shape), t, table)
    negative = {**cond_score, "encoder_hidden_states": jnp.broadcast_to(
        frozen["negative_prompt_embeds"].astype(nets.dtype), cond_score["encoder_hidden_states"].shape)}
    fake = distill.flow_to_x0(nets.fake_score(critic, frozen, x_t, t, cond_score), x_t, t, table)
    real_cond = distill.flow_to_x0(nets.real_score(frozen, x_t, t, cond_score), x_t, t, table)
    real_uncond = distill.flow_to_x0(nets.real_score(frozen, x_t, t, negative), x_t, t, table)
    grad = jax.lax.stop_gradient(distill.dmd_gradient(x_g, fake, real_cond, real_uncond,
                                                      settings.real_guidance_scale))
    loss = distill.dmd_loss(x_g, grad)
    metrics = {"dmd_loss": loss, "dmd_grad_mean": jnp.mean(jnp.abs(grad)), "timestep": jnp.mean(t.astype(jnp.float32))}
    if phase and settings.gan is not None:
        y = crop_half(k_crop, distill.add_noise(x_g, samples.normal(k_gan, shape), t, table))
        gan = cache_grad_gan_loss(lambda z: nets.discriminate(critic, frozen, z, t, cond_score), y)
        metrics["gan_g_loss"] = gan
        loss = loss + settings.gan.g_weight * gan
    return loss, metrics


def _tile(cond: dict, *more: dict) -> dict:
    return {k: jnp.concatenate([cond[k], *(m[k] for m in more)], axis=0) for k in cond}


def critic_loss(nets: DmdNets, settings: DmdSettings, own: Params, generator: Params, frozen: Params, batch: Batch,
                key: jax.Array, step: jax.Array, phase: int) -> tuple[jax.Array, dict]:
    """The fake score's denoising loss (+ the discriminator's loss and approximate R1 in phase 1)."""
    k_ctx, k_real_ctx, k_roll, k_t, k_noise, k_gan = jax.random.split(key, 6)
    shape = tuple(batch["target"].shape)
    table = _table((1, *shape[1:]))
    cond_gen, cond_score, empty = dmd_context(k_ctx, batch["x0_2"], batch["history_2"], batch["prompt_embeds"],
                                              settings, nets.dtype)
    x_g = jax.lax.stop_gradient(simulate(nets, settings, generator, frozen, cond_gen, empty, shape, k_roll))
    t = _timesteps(k_t, shape[0], step, settings.critic_timestep, table)
    noise = samples.normal(k_noise, shape)
    x_t = distill.add_noise(x_g, noise, t, table)
    loss = distill.fake_score_loss(nets.fake_score(own, frozen, x_t, t, cond_score), noise, x_g)
    metrics = {"denoising_loss": loss}
    if phase and settings.gan is not None:
        # The real chunk is scored with its own (primary) context (official bug 3 fixed; discriminator.py).
        _, real_cond, _ = dmd_context(k_real_ctx, batch["x0"], batch["history"], batch["prompt_embeds"],
                                      settings, nets.dtype)
        real = distill.add_noise(batch["target"], noise, t, table)
        cond3, t3 = _tile(cond_score, real_cond, real_cond), jnp.concatenate([t, t, t])
        gan, parts = critic_gan_loss(lambda z: nets.discriminate(own, frozen, z, t3, cond3), k_gan, x_t, real,
                                     d_weight=settings.gan.d_weight, r1_weight=settings.gan.r1_weight,
                                     r1_sigma=settings.gan.r1_sigma)
        metrics.update(parts)
        loss = loss + gan
    return loss, metrics


def init_heads(nets: DmdNets, config, key: jax.Array, latent_hw: tuple[int, int]) -> Params:
    """Fresh discriminator heads (torch's default init) for the backbone's hooked feature shapes."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2  # the half crop
    ph, pw = config.patch_size[1:]
    flow = jnp.zeros((1, config.out_channels, samples.LATENT_WINDOW, h, w), jnp.float32)
    feats = [jnp.zeros((1, config.inner_dim, samples.LATENT_WINDOW, h // ph, w // pw), jnp.float32)
             for _ in nets.gan.hooks]
    return nets.discriminator().init(key, flow, feats)["params"]


# ----------------------------------------------------------------------------- a whole run from a recipe

def negative_prompt_embeds(recipe: Recipe, length: int, dtype: Any) -> jax.Array:
    """The negative prompt, encoded ONCE with the run's text encoder (1, length, D)."""
    folder = recipe.model().pipeline
    configs = read_checkpoint_configs(folder)
    text = COMPONENTS["text_encoder"].load(os.path.join(folder, "text_encoder"), dtype, configs.text_encoder)
    return PromptEncoder(*text, configs.tokenizer).encode(recipe.data().negative_prompt, max_sequence_length=length,
                                                          dtype=dtype)


def make_duel(recipe: Recipe, nets: DmdNets, settings: DmdSettings, **hooks: Any) -> Duel:
    """The two players of ``recipe`` over ``nets`` (what ``prepare`` trains and experiments/dmd_plan.py
    compiles); ``hooks``: ``export`` and ``validate``. The players compare by value (``trainer.Bound``), so
    a run prepared again in the same process finds its compiled step programs."""
    ratio, phase_steps = recipe.duel_schedule()
    return Duel(trainer.bind(generator_loss, nets, settings), trainer.bind(critic_loss, nets, settings),
                recipe.critic_optimizer(), ratio, recipe.ema(), phase_steps, recipe.optimizer(), **hooks)


def prepare(recipe: Recipe, *, progress: bool | None = None, validate: bool = True,
            num_threads: int = 2) -> parts.Prepared:
    """Stage 3b's run: checks (paths, resume, data, hooks) before the weights, then one base tree (two when
    the critic's folder differs), both LoRAs, the heads, the negative prompt."""
    recipes.check_paths(recipe)
    model = recipe.model()
    g_folder, c_folder = model.transformer, model.critic
    run = recipe.run(progress)
    trainer.check_resumable(run)
    mesh = parts.training_mesh(recipe.mesh)
    dataset = parts.offloaded_dataset(recipe.data(), mesh, secondary=True)
    dtype = parts.DTYPES[model.mixed_precision]
    component = transformer_component(g_folder)
    config = component.read_config(g_folder)
    parts.check_buckets(dataset, config, recipe.stage, pyramid=True)
    settings = recipe.dmd()
    if settings.gan is not None and any(not 0 <= k < config.num_layers for k in settings.gan.hooks):
        raise ConfigError(f"training_config.gan_hooks = {list(settings.gan.hooks)}: the transformer has "
                          f"{config.num_layers} blocks; hook blocks in [0, {config.num_layers})")
    if mesh is not None:
        parallel.check_mesh(mesh, heads=config.num_attention_heads)
    first = dataset.load(dataset[0])
    v = recipe.validation()
    validating = validate and bool(v.prompts)

    config, params = component.load(g_folder, dtype, config, mesh=mesh)  # split as it is read, on a mesh
    frozen = {"params": params}
    if os.path.realpath(c_folder) != os.path.realpath(g_folder):
        c_config, frozen["critic_params"] = COMPONENTS["transformer"].load(c_folder, dtype, mesh=mesh)
        if jax.tree.map(jnp.shape, frozen["critic_params"]) != jax.tree.map(jnp.shape, params):
            raise ConfigError(f"{c_folder}: the critic's transformer ({c_config}) is not shaped like the "
                              f"generator's ({g_folder}); the scores must be the same architecture")
    frozen["negative_prompt_embeds"] = negative_prompt_embeds(recipe, first["prompt_embeds"].shape[0], dtype)
    spec, _ = recipe.lora()
    critic_spec = recipe.critic_lora()
    keys = jax.random.split(jax.random.key(recipe.seed), 3)
    generator = {"lora": lora_lib.init_lora(spec, params, keys[0])}
    critic = {"lora": lora_lib.init_lora(critic_spec, params, keys[1])}
    nets = DmdNets(HeliosTransformer(config, default_impl(dtype), remat=model.remat), dtype, spec.scale, critic_spec.scale, settings.gan)
    if settings.gan is not None:
        critic["heads"] = init_heads(nets, config, keys[2], first["target"].shape[-2:])
    validator = None
    if validating:
        merge = trainer.bind(parts.merged_params, spec.scale)
        pipeline = parts.validation_pipeline(recipe, HeliosDMDSchedulerConfig(use_dynamic_shifting=True),
                                             (config, merge(generator, frozen)), pyramid=True, distilled=True)
        call = parts.validation_call(recipe, pyramid=True, is_amplify_first_chunk=settings.amplify_first_chunk)
        validator = Validator(pipeline, merge, list(v.prompts), call, v.videos, seed=recipe.seed)
    duel = make_duel(recipe, nets, settings, export=trainer.bind(parts.export_lora, spec, config), validate=validator)
    return parts.Prepared(run, duel, {"generator": generator, "critic": critic}, frozen,
                          dataset.iterator(num_threads), config, spec, mesh)
