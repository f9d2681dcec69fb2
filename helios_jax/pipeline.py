"""Chunked autoregressive generation: text, image or video in, frames out, chunk by chunk.

``HeliosPipeline.from_pretrained(folder)`` reads a diffusers Helios checkpoint and behaves as
diffusers' ``HeliosPipeline`` or ``HeliosPyramidPipeline`` according to its ``model_index.json``
(scheduler, ``is_distilled``, ``is_cfg_zero_star``). ``pipe(...)`` returns the whole video;
``pipe.stream(...)`` yields each chunk's frames as soon as they are decoded, holding only the
fixed-size history window between chunks, so memory stays flat however long the video; ``pipe.session(...)``
is the same generation a chunk per ``next``, steerable between chunks (helios_jax/session.py holds the loop).

Every random draw goes through one :class:`~helios_jax.noise.NoiseSource`, asked in the reference's
order, and each chunk is one jit-compiled sampling program (``helios_jax.sampling.denoise_chunk``)
followed by one jit-compiled decode: after the first chunk (and, for the distilled model's amplified
first chunk, the second) nothing compiles again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax import hub, parallel
from helios_jax.checkpoint import PipelineError, PipelineSpec, check_spec_matches_scheduler, read_checkpoint_configs
from helios_jax.compilation import enable_compilation_cache
from helios_jax.config import TransformerConfig, VAEConfig
from helios_jax.history import VAE_SPATIAL_FACTOR, HistoryLayout, num_chunks, output_frames, video_frames_per_chunk
from helios_jax.kernels.flash import HEAD_DIMS as FLASH_HEAD_DIMS
from helios_jax.kernels.mosaic import unsupported as mosaic_unsupported
from helios_jax.loading import COMPONENTS, check_lora_base, check_quantize
from helios_jax.models import fp8, offload as offload_lib, vae as vae_lib
from helios_jax.models.attention import default_impl
from helios_jax.models.lora import apply_loaded, load_lora
from helios_jax.models.transformer import HeliosTransformer, TextKV, compute_dtype, sequence_length, text_kv
from helios_jax.noise import KeyNoise, NoiseSource
from helios_jax.prompts import PromptEncoder, check_prompt_plan
from helios_jax.request import Request, check_prompts, check_request, check_seed, check_video_length
from helios_jax.sampling import (
    ChunkNoise,
    ChunkPlan,
    SchedulerConfig,
    denoise_chunk_checked,
    guidance_mode,
    lower_denoise_chunk,
    noise_shapes,
    plan_pyramid_chunk,
    plan_single_stage_chunk,
    read_scheduler_config,
)
from helios_jax.sampling.pyramid import stage_sizes
from helios_jax.session import StreamSession, single_prompt_schedule
from helios_jax.step_cache import StepCache
from helios_jax.video import load_image, load_video

Params = dict[str, Any]


def _output_type(output_type: str, allowed: tuple[str, ...], where: str) -> str:
    """``output_type`` checked; the reference's "np" is this port's "float" (the same [0, 1] float frames)."""
    if output_type == "np" and "float" in allowed:
        return "float"
    if output_type not in allowed:
        raise PipelineError(f"{where}: output_type = {output_type!r}: expected one of {[*allowed, 'np']}")
    return output_type


def _abstract(tree: Any, sharding: jax.sharding.Sharding | None) -> Any:
    """``tree``'s leaves as shape structs placed by ``sharding`` (inputs of a lowering: nothing allocated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def _is_abstract(tree: Any) -> bool:
    """Whether a params tree is shapes only (a pipeline built to lower its programs, not to run them)."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class TextContext:
    """The ``context_fn`` of ``denoise_chunk``: the text embeddings with every block's text K/V, once per chunk.

    A static argument of the jitted chunk, so it hashes and compares by value (the DiT's config): every
    pipeline of the same model shares the compiled chunk (docs/design.md, Conventions)."""

    config: TransformerConfig
    offload: bool = False  # the blocks' params are in host memory (helios_jax.models.offload)

    def __call__(self, args: tuple[Params, dict[str, jax.Array]], context: jax.Array) -> tuple[jax.Array, TextKV]:
        return context, text_kv(self.config, {"params": args[0]}, context, offload=self.offload)


def _check_weight_dtype(weight_dtype: str | None, transformer_folder: str, lora: Any, config: TransformerConfig,
                        offload: str | None) -> str | None:
    """``weight_dtype`` is None or one of ``fp8.STORAGES`` that this transformer and ``offload`` can run; a LoRA
    cannot be fused into weights that are fp8 already."""
    if weight_dtype not in (None, *fp8.STORAGES):
        raise PipelineError(f"weight_dtype = {weight_dtype!r}: give None (weights in `dtype`), {fp8.FP8!r} (fp8 "
                            f"block linears) or {fp8.FP8_EDGES!r} (fp8 but the first and last blocks); bf16, fp16 "
                            "and fp32 are chosen with `dtype`")
    check_quantize("transformer", weight_dtype, config, offload)
    if lora is not None:
        check_lora_base(transformer_folder)
    return weight_dtype


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """The ``model_fn`` of ``denoise_chunk``: the DiT with the chunk's history (tiled for a doubled batch)
    and the text K/V of :class:`TextContext`.

    A static argument of the jitted chunk, so it hashes and compares by value: ``model`` is the unbound
    flax module, a dataclass of the DiT's frozen config and the attention implementation, and the weights
    come in ``args``. A second pipeline of the same model therefore runs the chunk programs the first one
    compiled. Nothing in it talks to the host: progress is reported per chunk by the host loop, so the
    compiled chunk runs without a round trip per step and compiles ahead of time for a GPU."""

    model: HeliosTransformer

    def __call__(self, args: tuple[Params, dict[str, jax.Array]], latents: jax.Array, timestep: jax.Array,
                 context: tuple[jax.Array, TextKV]) -> jax.Array:
        params, history = args
        context, kv = context
        inputs = {}
        for name, value in history.items():
            reps = latents.shape[0] // value.shape[0] if name.startswith("latents_") else 1
            inputs[name] = jnp.tile(value, (reps,) + (1,) * (value.ndim - 1)) if reps > 1 else value
        return self.model.apply({"params": params}, latents, timestep, context, **inputs, text_kv=kv)


class ChunkSampler(Protocol):
    """A replacement of how the pipeline samples each chunk (``HeliosPipeline.sampler``, set before the first
    chunk): ``plan`` makes the chunk's plan for its layout, ``denoise`` runs it, with the arguments and the
    result of ``sampling.denoise_chunk``. The chunk loop (history, anchor, noise order) stays the pipeline's.
    Stage 3a's teacher (``training.ode.TrajectoryRecorder``) records the sampler's states so."""

    def plan(self, latent_shape: tuple[int, ...], guidance: str, amplify: bool) -> ChunkPlan: ...

    def denoise(self, model_fn: Any, model_args: Any, plan: ChunkPlan, noise: ChunkNoise, context: jax.Array,
                negative: jax.Array | None, guidance_scale: float, context_fn: Any) -> jax.Array: ...


class HeliosPipeline:
    """Helios text/image/video-to-video generation in JAX (see the module docstring)."""

    def __init__(
        self,
        transformer: tuple[TransformerConfig, Params],
        vae: tuple[VAEConfig, Params],
        prompt_encoder: PromptEncoder | None,
        scheduler_config: SchedulerConfig | dict,
        spec: PipelineSpec,
        *,
        attention_impl: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        offload: str | None = None,
    ):
        self.offload = offload_lib.check_mode(offload)
        self.transformer_config, self.transformer_params = transformer
        if offload and fp8.storage_of(self.transformer_params) == fp8.FP8_EDGES:
            raise PipelineError(f"offload = {offload!r} streams one block stack, and these transformer params keep "
                                f"their first and last blocks apart ({fp8.FP8_EDGES!r}): quantize them with "
                                f"{fp8.FP8!r} to offload them, or drop the offload")
        self.vae_config, self.vae_params = vae
        # Offloaded, the text encoder's weights stay off the device too (its embedding and layers streamed).
        self.prompt_encoder = prompt_encoder.offloaded() if offload and prompt_encoder is not None else prompt_encoder
        self.scheduler_config = read_scheduler_config(scheduler_config)
        self.spec = spec
        if self.transformer_config.in_channels != self.vae_config.z_dim:
            raise PipelineError(
                f"the transformer takes {self.transformer_config.in_channels} latent channels but the VAE makes "
                f"{self.vae_config.z_dim} (z_dim): these components come from different models"
            )
        check_spec_matches_scheduler(spec, self.scheduler_config, "the pipeline's spec")
        self.model_dtype = compute_dtype(self.transformer_params)
        self.vae_dtype = jax.tree.leaves(self.vae_params)[0].dtype
        self.mesh = mesh
        if mesh is not None:
            # The DiT's weights split by its table (fsdp / tensor); the VAE's replicated (it runs on every device).
            parallel.check_mesh(mesh, heads=self.transformer_config.num_attention_heads)
            self.transformer_params = parallel.shard_params(self.transformer_params, mesh, parallel.DIT_RULES)
            self.vae_params = parallel.shard_params(self.vae_params, mesh, ())  # no rule: every leaf replicated
        if offload and not _is_abstract(self.transformer_params):
            self.transformer_params = offload_lib.to_host(self.transformer_params)
        self.attention_impl = attention_impl or default_impl(self.model_dtype)
        # Every compiled program is keyed on values (configs, dtypes, shapes), never on this object: a second
        # pipeline of the same model reuses the programs of the first (tests/test_compiled_programs.py).
        streamed = offload is not None
        self._model_fn = Denoiser(HeliosTransformer(self.transformer_config, self.attention_impl, offload=streamed))
        self._context_fn = TextContext(self.transformer_config, streamed)
        self._decoders = {out: vae_lib.chunk_decoder(self.vae_config, self.vae_dtype, out) for out in ("uint8", "float")}
        self._encode = vae_lib.video_encoder(self.vae_config)
        self._plans: dict[tuple, ChunkPlan] = {}
        self.sampler: ChunkSampler | None = None  # None: the plans and the sampling call below
        self.step_cache: StepCache | None = None  # skips steps by a calibration (helios_jax.step_cache); None: never

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: Any = jnp.bfloat16,
        vae_dtype: Any = jnp.float32,
        attention_impl: str | None = None,
        compilation_cache: bool | str = True,
        mesh: jax.sharding.Mesh | None = None,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        weight_dtype: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        offload: str | None = None,
    ) -> "HeliosPipeline":
        """Load every component of a diffusers Helios folder, or of a hub id's snapshot (``hub.resolve``: the
        Hugging Face cache, fetched unless ``local_files_only`` or HF_HUB_OFFLINE; ``revision`` a branch, tag or
        commit). ``dtype`` is the transformer's and the text
        encoder's (the reference's ``torch_dtype``); the VAE runs in ``vae_dtype`` as the official inference
        does. ``attention_impl`` None picks cuDNN on a GPU in 16-bit, else XLA (``default_impl``).
        ``compilation_cache`` is a folder, True for the default user cache folder, or False. ``lora`` (a
        diffusers LoRA folder or file) is read and checked first, then fused into the DiT at ``lora_scale``.
        ``mesh`` (``helios_jax.parallel.make_mesh``) runs the DiT on many devices: tokens split over
        ``context``, CFG's two passes and the prompts over ``data``, weights over ``fsdp``/``tensor``.
        ``weight_dtype="fp8"`` stores the DiT's block linears as float8_e4m3fn with per-channel scales and
        runs them as FP8 GEMMs (``helios_jax.models.fp8``; the rest of the DiT stays in ``dtype``);
        ``"fp8-edges"`` does so but keeps the first and last blocks whole in ``dtype`` (less error, 0.65 GiB more
        at 14B; not with ``offload``). A checkpoint converted to fp8 (``helios-jax convert --dtype fp8`` or
        ``fp8-edges``) runs in its saved layout whatever this says, but all-fp8 blocks cannot give "fp8-edges".
        ``offload="blocks"`` keeps the DiT's blocks (99% of its weights) in pinned host memory and streams each
        layer to the device while the one before it computes (``helios_jax.models.offload``; docs/generation.md);
        the text encoder's token embedding and layers likewise, so the device holds neither."""
        offload_lib.check_mode(offload)
        folder = hub.resolve(folder, revision=revision, local_files_only=local_files_only)
        configs = read_checkpoint_configs(folder)  # every config checked before the first weight is read
        quantize = _check_weight_dtype(weight_dtype, os.path.join(folder, "transformer"), lora, configs.transformer,
                                       offload)
        head_dim = configs.transformer.attention_head_dim
        if attention_impl == "pallas" and head_dim not in FLASH_HEAD_DIMS:
            raise PipelineError(f"attention_impl 'pallas' (the flash kernel) takes head_dim {FLASH_HEAD_DIMS}, and "
                                f"{folder}'s transformer has {head_dim}: use 'xla' or 'cudnn' (--attention)")
        if attention_impl == "mosaic" and (why := mosaic_unsupported(head_dim, dtype)):
            raise PipelineError(f"attention_impl 'mosaic' (the Mosaic GPU kernel): {why}, and {folder}'s transformer "
                                f"has head_dim {head_dim} at dtype {jnp.dtype(dtype)}: use 'xla' or 'cudnn' (--attention)")
        loaded = None if lora is None else load_lora(lora, configs.transformer)
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache is True else compilation_cache)

        def load(name: str, component_dtype: Any, quantize: str | None = None,
                 on: jax.sharding.Mesh | None = None, offload: str | None = None) -> tuple[Any, Params]:
            return COMPONENTS[name].load(os.path.join(folder, name), component_dtype, getattr(configs, name),
                                         quantize=quantize, mesh=on, offload=offload)

        # A LoRA is fused into the 16-bit kernels, which are then quantized.
        # On a mesh the DiT is split as it is read: no device ever holds all of it.
        transformer = load("transformer", dtype, None if loaded is not None else quantize, mesh,
                           None if loaded is not None else offload)
        if loaded is not None:
            transformer = (transformer[0], apply_loaded(transformer[1], loaded, lora_scale))
            if quantize:
                transformer = (transformer[0], fp8.quantize_params(transformer[1], quantize == fp8.FP8_EDGES))
        text_config, text_params = load("text_encoder", dtype, offload=offload)
        return cls(
            transformer,
            load("vae", vae_dtype),
            PromptEncoder(text_config, text_params, configs.tokenizer, offload=offload is not None),
            configs.scheduler,
            configs.spec,
            attention_impl=attention_impl,
            mesh=mesh,
            offload=offload,
        )

    # ------------------------------------------------------------------------------------ public API

    def __call__(self, prompt: str | Sequence[str] | None = None, *, output_type: str = "uint8", **kwargs) -> np.ndarray:
        """The whole video: uint8 (T, H, W, 3) for one prompt, (B, T, H, W, 3) for a list; ``output_type``
        "float" (or the reference's name, "np") gives [0, 1] float32 as the reference's "np", "latent" the latents (B, C, T, h, w)."""
        output_type = _output_type(output_type, ("uint8", "float", "latent"), "the pipeline")
        chunks = list(self._generate(prompt, output_type=output_type, **kwargs))
        if output_type == "latent":
            return np.concatenate(chunks, axis=2)
        video = np.concatenate(chunks, axis=1)
        return video[0] if isinstance(prompt, str) or (prompt is None and len(video) == 1) else video

    def stream(self, prompt: str | Sequence[str] | None = None, *, output_type: str = "uint8",
               **kwargs) -> Iterator[np.ndarray]:
        """Each chunk's frames, (B, t, H, W, 3), as soon as they are decoded (the last chunk trimmed to the
        reference's frame count)."""
        output_type = _output_type(output_type, ("uint8", "float"), "stream")
        return self._generate(prompt, output_type=output_type, **kwargs)

    def session(self, prompt: str | None = None, *, output_type: str = "uint8", progress: bool | None = False,
                **kwargs) -> StreamSession:
        """One video, a chunk per ``next(session)``, steerable between chunks: ``set_prompt``, ``set_image``,
        ``pause``, ``resume``, ``stop`` (``helios_jax.session``). Takes ``stream``'s arguments for one prompt
        (``prompt``, ``prompt_embeds`` of one row or ``interactive_prompts``); every one is checked here, and the
        prompts are encoded here, before the first chunk."""
        output_type = _output_type(output_type, ("uint8", "float"), "session")
        return self._session(prompt, output_type=output_type, progress=progress, single=True, **kwargs)

    def decode(self, latents: jax.Array, output_type: str = "uint8") -> jax.Array:
        """One chunk's latents (B, C, T, h, w), as ``output_type="latent"`` returns them, to frames on the
        device, (B, 1 + 4(T - 1), H, W, 3): the compiled decode ``stream`` runs after every chunk."""
        output_type = _output_type(output_type, tuple(self._decoders), "decode")
        with self._on_mesh():
            return self._placed(self._decoders[output_type](self.vae_params, self._placed(latents)))

    def _on_mesh(self) -> contextlib.AbstractContextManager:
        """The mesh as JAX's current one (attention then runs context-parallel), or nothing."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _placed(self, tree: Any) -> Any:
        """Inputs of the compiled programs on the mesh, replicated (the programs split them); unchanged without one."""
        return tree if self.mesh is None else parallel.to_mesh(tree, parallel.replicated(self.mesh))

    def lower_chunk(self, *, batch: int = 1, text_tokens: int | None = None, first_chunk: bool = True,
                    sharding: jax.sharding.Sharding | None = None, lowering_platforms: tuple[str, ...] | None = None,
                    **settings: Any) -> jax.stages.Lowered:
        """The sampling program of one chunk exactly as ``stream`` runs it, lowered from abstract inputs.

        Nothing is allocated or run, so this reads the plan of a device that is not here: with ``sharding``
        (e.g. a device of ``jax.experimental.topologies``' H100) every input is placed there, and the
        pipeline's params may themselves be ``jax.ShapeDtypeStruct``s. ``settings`` are the generation's
        (height, width, guidance_scale, pyramid_num_inference_steps_list, is_amplify_first_chunk, ...);
        ``first_chunk`` picks the amplified first chunk's program when that is asked for. On a mesh (and no
        ``sharding``) it is the mesh's program: the DiT's params keep their shardings, the rest is replicated,
        and it is lowered with the mesh current, as ``stream`` runs it (its params may be shape structs
        sharded over the devices of ``jax.experimental.topologies``' 8-GPU host). ``lowering_platforms``: see
        ``sampling.lower_denoise_chunk`` (the offloaded program's plan for a GPU, lowered on this machine's devices).
        """
        tokens = text_tokens or settings.get("max_sequence_length", self.max_sequence_length)
        embeds = jax.ShapeDtypeStruct((batch, tokens, self.transformer_config.text_dim), self.model_dtype)
        request, layout = self._check(dict(settings), prompt_embeds=embeds)
        guidance = guidance_mode(request.guidance_scale, self.spec.pyramid and self.spec.is_cfg_zero_star)
        latent_hw = (request.height // VAE_SPATIAL_FACTOR, request.width // VAE_SPATIAL_FACTOR)
        latent_shape = (batch, self.transformer_config.in_channels, request.num_latent_frames_per_chunk, *latent_hw)
        plan = self._plan(request, latent_shape, guidance, amplify=request.is_amplify_first_chunk and first_chunk)
        window = jax.ShapeDtypeStruct((*latent_shape[:2], layout.window, *latent_hw), jnp.float32)
        prefix = jax.ShapeDtypeStruct((*latent_shape[:2], 1, *latent_hw), jnp.float32)
        indices = {k: jnp.asarray(v) for k, v in layout.indices().items()}
        history = jax.eval_shape(lambda w, p: self._history(layout, indices, w, p), window,
                                 prefix if layout.keep_first_frame else None)
        noise = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), noise_shapes(plan),
                             is_leaf=lambda x: isinstance(x, tuple) and bool(x) and all(isinstance(d, int) for d in x))
        negative = embeds if guidance != "none" else None
        rest = (history, plan, noise, embeds, negative, jax.ShapeDtypeStruct((), jnp.float32))
        on_mesh = sharding is None and self.mesh is not None
        params = self.transformer_params if on_mesh else _abstract(self.transformer_params, sharding)
        if self.offload and sharding is not None:
            where = offload_lib.host_blocks(params, jax.tree.map(lambda _: sharding, params))
            params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, where)
        history, *rest = _abstract(rest, parallel.replicated(self.mesh) if on_mesh else sharding)
        with self._on_mesh():
            return lower_denoise_chunk(self._model_fn, (params, history), *rest, context_fn=self._context_fn,
                                       lowering_platforms=lowering_platforms)

    def lower_decode(self, *, batch: int = 1, height: int = 384, width: int = 640, latent_frames: int = 9,
                     output_type: str = "uint8", sharding: jax.sharding.Sharding | None = None) -> jax.stages.Lowered:
        """The compiled decode ``stream`` runs after each chunk, lowered from abstract inputs (see lower_chunk). On a
        mesh (and no ``sharding``) it is the mesh's program, split by rows as ``decode`` runs it."""
        output_type = _output_type(output_type, tuple(self._decoders), "lower_decode")
        latents = (batch, self.vae_config.z_dim, latent_frames, height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR)
        args = (self.vae_params, jax.ShapeDtypeStruct(latents, jnp.float32))
        on_mesh = sharding is None and self.mesh is not None
        with self._on_mesh() if on_mesh else contextlib.nullcontext():
            return self._decoders[output_type].lower(*_abstract(args, parallel.replicated(self.mesh) if on_mesh
                                                                else sharding))

    def num_output_frames(self, num_frames: int, num_latent_frames_per_chunk: int = 9) -> int:
        """How many frames a request for ``num_frames`` returns (whole chunks, trimmed to 4k + 1)."""
        return output_frames(num_chunks(num_frames, num_latent_frames_per_chunk), num_latent_frames_per_chunk)

    # ------------------------------------------------------------------------------------ generation

    def _generate(self, prompt: str | Sequence[str] | None, **kwargs: Any) -> Iterator[np.ndarray]:
        """Validate and prepare everything (errors are raised here, before any compute), then return the iterator
        over chunks, each dispatched before the previous one is fetched."""
        return self._session(prompt, **kwargs).pipelined()

    def _session(
        self,
        prompt: str | Sequence[str] | None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        prompt_embeds: jax.Array | None = None,
        negative_prompt_embeds: jax.Array | None = None,
        interactive_prompts: Sequence[tuple[int, str]] | None = None,
        interpolation_chunks: int = 0,
        image: Any = None,
        video: Any = None,
        seed: int | None = None,
        key: jax.Array | None = None,
        noise: NoiseSource | None = None,
        output_type: str = "uint8",
        progress: bool | None = None,
        single: bool = False,
        **settings: Any,
    ) -> StreamSession:
        """Validate and prepare everything (errors are raised here, before any compute), then return the
        generation as a session. ``progress``: None shows bars of chunks and steps on a terminal and logs
        one line per chunk otherwise (``helios_jax.progress``); True always draws the bars, False nothing.
        ``single``: one prompt, whose chunks come without the batch axis."""
        request, layout = self._check(settings, prompt=prompt, prompt_embeds=prompt_embeds,
                                      negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
                                      interactive_prompts=interactive_prompts,
                                      interpolation_chunks=interpolation_chunks, image=image, video=video, seed=seed,
                                      single=single)
        chunks = num_chunks(request.num_frames, request.num_latent_frames_per_chunk)
        guidance = guidance_mode(request.guidance_scale, self.spec.pyramid and self.spec.is_cfg_zero_star)
        pixels = (request.height, request.width)
        image = None if image is None else load_image(image, *pixels)
        video = None if video is None else load_video(video, *pixels)
        if video is not None:
            check_video_length(len(video), request)
        contexts, negative = self._embeddings(request, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                              interactive_prompts, interpolation_chunks, chunks, guidance != "none")
        source = noise or KeyNoise(key if key is not None else (0 if seed is None else seed))
        return StreamSession(self, request, layout, chunks, guidance, contexts, negative, image, video, source,
                             output_type, progress, interpolation_chunks=interpolation_chunks, single=single)

    def _denoise(self, plan: ChunkPlan, history: dict[str, jax.Array], noise: ChunkNoise, context: jax.Array,
                 negative: jax.Array | None, guidance_scale: float) -> tuple[jax.Array, jax.Array | None]:
        """One chunk's sampling program and whether its latents are finite (``self.sampler``'s program, when one
        is set, does not say: None)."""
        args = (self._model_fn, (self.transformer_params, history), plan, noise, context, negative, guidance_scale,
                self._context_fn)
        if self.sampler is None and self.step_cache is not None:
            return self.step_cache.denoise(*args)
        if self.sampler is None:
            return denoise_chunk_checked(*args)
        return self.sampler.denoise(*args), None

    def _history(self, layout: HistoryLayout, indices: dict[str, jax.Array], window: jax.Array,
                 prefix: jax.Array | None) -> dict[str, jax.Array]:
        """The model's history inputs (indices, and the latents in the model's dtype) for one chunk."""
        history = {**indices, **layout.terms(window, prefix)}
        return {n: v.astype(self.model_dtype) if n.startswith("latents_") else v for n, v in history.items()}

    def _plan(self, request: Request, latent_shape: tuple[int, ...], guidance: str, amplify: bool) -> ChunkPlan:
        """The chunk plan (cached: one per distinct layout, so programs are reused across chunks)."""
        key = (latent_shape, guidance, amplify, request)
        if key not in self._plans and self.sampler is not None:
            self._plans[key] = self.sampler.plan(latent_shape, guidance, amplify)
        if key not in self._plans:
            patch = self.transformer_config.patch_size
            # On a mesh with a data axis, CFG's two passes run as one batch split over it.
            batch_cfg = self.mesh is not None and parallel.axis_size(self.mesh, "data") > 1
            if self.spec.pyramid:
                plan = plan_pyramid_chunk(
                    self.scheduler_config, request.pyramid_num_inference_steps_list, latent_shape, patch_size=patch,
                    guidance=guidance, amplify_first_chunk=amplify, zero_steps=request.zero_steps,
                    use_zero_init=request.use_zero_init, model_dtype=self.model_dtype, batch_cfg=batch_cfg,
                )
            else:
                sigmas = None if request.sigmas is None else np.asarray(request.sigmas)
                plan = plan_single_stage_chunk(self.scheduler_config, request.num_inference_steps, latent_shape,
                                               patch_size=patch, sigmas=sigmas, guidance=guidance,
                                               model_dtype=self.model_dtype, batch_cfg=batch_cfg)
            self._plans[key] = plan
        return self._plans[key]

    # ------------------------------------------------------------------------------------ conditioning

    def _encode_sample(self, frames: np.ndarray, source: NoiseSource) -> jax.Array:
        """Normalised posterior sample of (T, H, W, 3) frames in [-1, 1]: (1, C, t, h, w) float32."""
        video = jnp.asarray(np.moveaxis(frames, -1, 0)[None], self.vae_dtype)
        posterior = self._encode(self.vae_params, video)
        sample = posterior.sample(noise=source.normal(posterior.mean.shape).astype(posterior.mean.dtype))
        return vae_lib.normalize_latents(self.vae_config, sample).astype(jnp.float32)

    @staticmethod
    def _noised(latents: jax.Array, sigma: jax.Array, source: NoiseSource) -> jax.Array:
        return sigma * source.normal(latents.shape) + (1 - sigma) * latents

    @staticmethod
    def _sigma(source: NoiseSource, shape: tuple[int, ...], low: float, high: float) -> jax.Array:
        return source.uniform(shape) * (high - low) + low

    def _image_latents(self, image: np.ndarray, request: Request, source: NoiseSource) -> tuple[jax.Array, jax.Array]:
        """I2V: the image's latent (the first-frame prefix) and the fake history latent, as the reference
        makes them: the image encoded alone, and the last latent of the image repeated over a chunk."""
        image_latents = self._encode_sample(image[None], source)
        repeated = np.repeat(image[None], video_frames_per_chunk(request.num_latent_frames_per_chunk), axis=0)
        fake = self._encode_sample(repeated, source)[:, :, -1:]
        if request.add_noise_to_image_latents:
            image_latents = self._image_noised(image_latents, request, source)
            sigma = self._sigma(source, (1,), request.video_noise_sigma_min, request.video_noise_sigma_max)
            fake = self._noised(fake, sigma, source)
        return image_latents, fake

    def _image_prefix(self, image: np.ndarray, request: Request, source: NoiseSource) -> jax.Array:
        """An image's latent as the first-frame prefix alone (a session's ``set_image`` mid-run): encoded, and
        noised as I2V noises it."""
        latents = self._encode_sample(image[None], source)
        return self._image_noised(latents, request, source) if request.add_noise_to_image_latents else latents

    def _image_noised(self, latents: jax.Array, request: Request, source: NoiseSource) -> jax.Array:
        sigma = self._sigma(source, (1,), request.image_noise_sigma_min, request.image_noise_sigma_max)
        return self._noised(latents, sigma, source)

    def _video_latents(self, video: np.ndarray, request: Request, source: NoiseSource) -> tuple[jax.Array, jax.Array]:
        """V2V: the first frame's latent and the latents of the video's last whole chunks, each chunk
        encoded on its own and noised per latent frame."""
        window = video_frames_per_chunk(request.num_latent_frames_per_chunk)
        count = len(video) // window
        start = len(video) - count * window
        first = self._encode_sample(video[:1], source)
        encoded = [self._encode_sample(video[start + i * window: start + (i + 1) * window], source) for i in range(count)]
        latents = jnp.concatenate(encoded, axis=2)
        if request.add_noise_to_video_latents:
            sigma = self._sigma(source, (1,), request.image_noise_sigma_min, request.image_noise_sigma_max)
            first = self._noised(first, sigma, source)
            noisy = []
            for chunk in encoded:
                frames = chunk.shape[2]
                sigmas = self._sigma(source, (frames,), request.video_noise_sigma_min, request.video_noise_sigma_max)
                noisy.append(self._noised(chunk, sigmas.reshape(1, 1, frames, 1, 1), source))
            latents = jnp.concatenate(noisy, axis=2)
        return first, latents

    def _embeddings(self, request: Request, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                    interactive_prompts, interpolation_chunks: int, chunks: int,
                    guided: bool) -> tuple[Sequence[jax.Array], jax.Array | None]:
        """Per-chunk text embeddings (a ``PromptSchedule`` for one prompt) and the negative ones, in the
        transformer's dtype."""
        dtype, length = self.model_dtype, request.max_sequence_length
        if interactive_prompts is not None:
            starts, texts = zip(*interactive_prompts)
            schedule = self._prompts().encode_interactive(list(texts), list(starts), chunks,
                                                          interpolation_chunks=interpolation_chunks,
                                                          max_sequence_length=length, dtype=dtype)
            contexts = schedule
        elif prompt_embeds is not None:
            contexts = single_prompt_schedule(jnp.asarray(prompt_embeds, dtype), chunks)
        else:
            contexts = single_prompt_schedule(self._prompts().encode(prompt, max_sequence_length=length, dtype=dtype),
                                              chunks)
        if not guided:
            return contexts, None
        if negative_prompt_embeds is not None:
            return contexts, jnp.asarray(negative_prompt_embeds, dtype)
        batch = contexts[0].shape[0]
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * batch if isinstance(negative, str) else list(negative)
        return contexts, self._prompts().encode(negative, max_sequence_length=length, dtype=dtype)

    def _prompts(self) -> PromptEncoder:
        if self.prompt_encoder is None:
            raise PipelineError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds)")
        return self.prompt_encoder

    @property
    def max_sequence_length(self) -> int:
        """The text length of a request that gives none: the text encoder's default (512, or the length the
        tokenizer's ``model_max_length`` says its model was trained on)."""
        encoder = self.prompt_encoder
        return Request.max_sequence_length if encoder is None else encoder.max_sequence_length

    # ------------------------------------------------------------------------------------ validation

    def _check(self, settings: dict[str, Any], *, prompt=None, prompt_embeds=None, negative_prompt=None,
               negative_prompt_embeds=None, interactive_prompts=None, interpolation_chunks=0, image=None, video=None,
               seed=None, single=False) -> tuple[Request, HistoryLayout]:
        """Every user error, before any compute: one clear message naming the value and the rule."""
        settings = {"max_sequence_length": self.max_sequence_length, **settings}
        request, layout = check_request(settings, pyramid=self.spec.pyramid, stages=self.scheduler_config.stages,
                                        scheduler_type=self.scheduler_config.scheduler_type)
        if image is not None and video is not None:
            raise PipelineError("image and video cannot both be given: image-to-video or video-to-video, not both")
        batch = check_prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, interactive_prompts,
                              interpolation_chunks)
        if (image is not None or video is not None) and batch != 1:
            raise PipelineError(f"image- and video-to-video take one prompt; got a batch of {batch}")
        if single and batch != 1:
            raise PipelineError(f"a session steers one video: give one prompt; got a batch of {batch}")
        if interactive_prompts is not None:
            check_prompt_plan(interactive_prompts, num_chunks(request.num_frames, request.num_latent_frames_per_chunk),
                              interpolation_chunks)
        if self.mesh is not None:
            parallel.check_mesh(self.mesh, heads=self.transformer_config.num_attention_heads,
                                tokens=self._sequence_lengths(request, layout, self.scheduler_config.stages if self.spec.pyramid else 1))
        check_seed(seed)
        return request, layout

    def _sequence_lengths(self, request: Request, layout: HistoryLayout, stages: int) -> list[int]:
        """The DiT's token count at every pyramid stage of this request (for the mesh check)."""
        cfg, frames = self.transformer_config, request.num_latent_frames_per_chunk
        height, width = request.height // VAE_SPATIAL_FACTOR, request.width // VAE_SPATIAL_FACTOR
        long, mid, short = layout.sizes
        history = {name: (1, cfg.in_channels, t, height, width)
                   for name, t in (("long", long), ("mid", mid), ("short", short + layout.keep_first_frame))}
        history = history if cfg.has_multi_term_memory_patch else {}
        return [sequence_length(cfg, (1, cfg.in_channels, frames, h, w), history)
                for h, w in stage_sizes(height, width, stages)]
