"""The PyTorch reference (diffusers' Helios) on the same GPU, shapes and chunks as bench_dit.

    python -m experiments.benchmarks.bench_reference                      # eager (SDPA flash, SDPA cuDNN) and compiled
    python -m experiments.benchmarks.bench_reference --modes eager --attention flash
    python -m experiments.benchmarks.bench_reference --measure distilled --modes compiled

Random bf16 weights made on the GPU (the modules diffusers keeps in float32 in float32, as after
``from_pretrained(torch_dtype=bfloat16)``), the config of ``helios_jax.config.TransformerConfig()``
so both sides run the same model, and the inputs of ``workloads.Workload`` at each pyramid stage.

Modes: ``eager``; ``compiled`` = ``torch.compile(model, mode="max-autotune-no-cudagraphs",
dynamic=False)`` with ``cudnn.benchmark``, as the official ``infer_helios.py --enable_compile``
does. Attention: torch's SDPA restricted to one backend, ``flash`` (FlashAttention-2 in torch) or
``cudnn`` (cuDNN's fused attention). The official inference uses FlashAttention-3 from the
``kernels`` hub, which needs a network this machine does not have; cuDNN's Hopper kernel is the
nearest stand-in. Timing with CUDA events, median; memory is the peak allocated in each forward.

``distilled`` and ``base`` time whole chunks with diffusers' ``HeliosPyramidPipeline`` (distilled,
HeliosDMDScheduler) and ``HeliosPipeline`` (single-stage UniPC, 50 steps, CFG) built from the same
random-weight transformer, the Wan2.1 ``AutoencoderKLWan`` (fp32, as the official inference) and the
scheduler configs bench_dit uses, with random bf16 ``prompt_embeds`` instead of a text encoder.
``compiled`` compiles the pipeline's transformer in place (``transformer.compile(mode=..., dynamic=False)``,
as ``infer_helios.py --enable_compile``). That script also calls ``vae.compile(...)``, but ``Module.compile``
wraps only ``__call__`` and the pipelines call ``vae.decode``, so it changes nothing there; not repeated here.
The reference decodes each chunk as soon as it is sampled; a wrapper around its ``vae.decode``
synchronises the device around the decode and reads the host clock, which gives each chunk's wall
time (the first counted from the call) and its decode time, in the same run. A two-chunk call warms
up, then a call of ``--chunks`` chunks is timed: its first chunk, and the median of the rest (steady
state, FPS = 33 / steady s). ``output_type="latent"`` leaves out the reference's final whole-video
conversion to numpy (once per video, after the last chunk). The distilled scheduler's gamma is 1/3
on a GPU; on a CPU torch's float32 Cholesky of that covariance (``HeliosPyramidPipeline.sample_block_noise``)
fails, the matrix being singular after rounding at 1/3, so 0.25 is used there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from experiments import flop_counts, provenance, reporting, workloads
from experiments.benchmarks import chunk_bench
from helios_jax.config import TransformerConfig, VAEConfig, to_dict

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
COMPILE_MODE = "max-autotune-no-cudagraphs"  # PKU-YuanGroup/Helios infer_helios.py, --enable_compile
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_GAMMA = 0.25  # torch's float32 Cholesky of the gamma = 1/3 block covariance fails on a CPU


@dataclasses.dataclass
class Bench:
    model: torch.nn.Module
    cfg: TransformerConfig
    work: workloads.Workload
    device: torch.device
    modes: list[str]
    attention: list[str]
    stages: list[int]
    reps: int
    warmup: int
    compile_mode: str
    matmul_tflops: float
    chunk: chunk_bench.ChunkSettings | None = None  # what the chunk measurements generate
    gamma: float = 1 / 3  # the distilled scheduler's block-noise correlation


def build_model(cfg: TransformerConfig, device: torch.device, std: float = 0.02) -> torch.nn.Module:
    """diffusers' model with random normal weights, made on ``device`` in bf16 (no float32 copy of 14B)."""
    from diffusers import HeliosTransformer3DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = HeliosTransformer3DModel(**to_dict(cfg))
    finally:
        torch.set_default_dtype(default)
    keep = set(model._keep_in_fp32_modules)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep & set(name.split(".")):
                p.data = p.data.float()
            p.normal_(0.0, std, generator=generator)
    return model.eval().requires_grad_(False)


def stage_inputs(cfg: TransformerConfig, work: workloads.Workload, stage: int, device: torch.device) -> dict[str, Any]:
    """The same arguments as bench_dit's: random bf16 latents and text, the pipeline's frame indices."""
    generator = torch.Generator(device).manual_seed(100 + stage)
    b, c = work.batch, cfg.in_channels
    h, w = work.stages[stage]
    normal = lambda *shape: torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)  # noqa: E731
    indices = work.frame_indices()
    inputs = {
        "hidden_states": normal(b, c, work.frames, h, w),
        "timestep": torch.full((b,), 999.0, device=device),
        "encoder_hidden_states": normal(b, work.text_tokens, cfg.text_dim),
        "indices_hidden_states": torch.tensor([indices["noisy"]], device=device),
    }
    for name, frames in work.history_frames:
        inputs[f"latents_history_{name}"] = normal(b, c, frames, *work.history_hw)
        inputs[f"indices_latents_history_{name}"] = torch.tensor([indices[name]], device=device)
    return inputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median of CUDA-event timings on a GPU (host timer around a synchronised call on a CPU)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / median_ms(lambda: a @ b, device, 3, reps) / 1e9


def measure_forward(bench: Bench) -> dict[str, Any]:
    cfg, work, device = bench.cfg, bench.work, bench.device
    rows = []
    for mode in bench.modes:
        if mode == "compiled":
            torch.backends.cudnn.benchmark = True
            model = torch.compile(bench.model, mode=bench.compile_mode, dynamic=False)
        else:
            model = bench.model
        # Compiled graphs are specialised to the attention backend they were traced with: one is enough.
        backends = bench.attention[:1] if mode == "compiled" else bench.attention
        for stage in bench.stages:
            noisy, history = flop_counts.token_counts(cfg, work, stage)
            flops = flop_counts.dit_flops(cfg, work, stage)["total"]
            inputs = stage_inputs(cfg, work, stage, device)
            for backend in backends:

                def run():
                    with sdpa_kernel([BACKENDS[backend]]):
                        return model(**inputs, return_dict=False)[0]

                try:
                    with torch.no_grad():
                        start = time.perf_counter()
                        run()
                        synchronize(device)
                        first_s = time.perf_counter() - start
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        ms = median_ms(run, device, bench.warmup, bench.reps)
                except Exception as e:  # one backend unavailable must not hide the others
                    rows.append(chunk_bench.failed_row([stage, f"{noisy}+{history}", mode, backend], e, 9))
                    continue
                peak = reporting.gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else ""
                tflops = flops / ms / 1e9
                rows.append([stage, f"{noisy}+{history}", mode, backend, first_s, ms, tflops,
                             100 * tflops / bench.matmul_tflops, peak])
    headers = ["stage", "tokens (noisy+history)", "mode", "attention", "first call s", "ms/forward", "TFLOP/s",
               "MFU %", "peak GiB"]
    title = (f"diffusers HeliosTransformer3DModel forward, {cfg.num_layers} layers x {cfg.inner_dim} "
             f"({workloads.workload_label(work)}), bf16, median of {bench.reps} after {bench.warmup} warm-ups; "
             f"compiled = torch.compile(mode={bench.compile_mode!r}, dynamic=False); MFU against "
             f"{bench.matmul_tflops:.4g} TFLOP/s (bf16 matmul measured in this run).")
    return {"title": title, "headers": headers, "rows": rows, "notes": ""}


def build_vae(settings: chunk_bench.ChunkSettings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' AutoencoderKLWan of ``settings.vae_kwargs`` (the Wan2.1 VAE by default), made on
    ``device`` with its own random initialisation."""
    from diffusers import AutoencoderKLWan

    with device:
        vae = AutoencoderKLWan(**to_dict(VAEConfig(**settings.vae_kwargs)))
    if dtype != torch.float32:  # made in float32; diffusers warns on any .to(dtype), even a no-op
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def build_pipeline(bench: Bench, vae: torch.nn.Module, scheduler_config: dict[str, Any], distilled: bool) -> Any:
    """HeliosPyramidPipeline (distilled) or HeliosPipeline from the bench's transformer and ``vae``, no text encoder."""
    from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler

    schedulers = {"HeliosDMDScheduler": HeliosDMDScheduler, "HeliosScheduler": HeliosScheduler}
    scheduler = schedulers[scheduler_config["_class_name"]].from_config(scheduler_config)
    parts = dict(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=bench.model)
    pipe = HeliosPyramidPipeline(**parts, is_distilled=True) if distilled else HeliosPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def compiled(model: torch.nn.Module, mode: str):
    """``model.compile`` in place for the block (as infer_helios.py compiles the pipeline's transformer),
    eager again after, so that later measurements of the same model start eager."""
    torch.backends.cudnn.benchmark = True
    model.compile(mode=mode, dynamic=False)
    try:
        yield
    finally:
        model._compiled_call_impl = None  # what Module.compile set; None restores the eager call


class ChunkClock:
    """Wraps the pipeline's ``vae.decode``, which the reference calls once at the end of every chunk: the
    host time each chunk is done and each decode's duration, the device synchronised around the decode."""

    def __init__(self, pipe: Any, device: torch.device):
        self.vae, self.device, self.decode = pipe.vae, device, pipe.vae.decode
        self.ends: list[float] = []
        self.decodes: list[float] = []

    def __enter__(self) -> "ChunkClock":
        self.vae.decode = self._timed
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.vae.decode  # the instance attribute: the class's method is back

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        out = self.decode(*args, **kwargs)
        synchronize(self.device)
        end = time.perf_counter()
        self.decodes.append(end - start)
        self.ends.append(end)
        return out


def chunk_seconds(pipe: Any, bench: Bench, chunks: int, backend: str,
                  **settings: Any) -> tuple[list[float], list[float]]:
    """Wall seconds of each chunk of one pipeline call (the first counted from the call) and of each decode."""
    frames = workloads.video_frames(settings["num_latent_frames_per_chunk"])
    generator = torch.Generator(bench.device).manual_seed(0)
    with ChunkClock(pipe, bench.device) as clock, sdpa_kernel([BACKENDS[backend]]):
        start = time.perf_counter()
        pipe(num_frames=chunks * frames, generator=generator, output_type="latent", **settings)
    ends = [start, *clock.ends]
    if len(clock.ends) != chunks:
        raise RuntimeError(f"the pipeline decoded {len(clock.ends)} chunks, not {chunks}")
    return [b - a for a, b in zip(ends, ends[1:])], clock.decodes


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Any:
    return reporting.gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else ""


def text_embeddings(bench: Bench, seed: int) -> torch.Tensor:
    generator = torch.Generator(bench.device).manual_seed(seed)
    return torch.randn(1, bench.chunk.text_tokens, bench.cfg.text_dim, generator=generator, device=bench.device,
                       dtype=torch.bfloat16)


def mode_settings(bench: Bench):
    """(mode, attention backends, context) for each mode: eager with every backend, compiled with the first
    (compiled graphs are specialised to the backend they were traced with)."""
    for mode in bench.modes:
        if mode == "compiled":
            yield mode, bench.attention[:1], compiled(bench.model, bench.compile_mode)
        else:
            yield mode, bench.attention, contextlib.nullcontext()


def chunk_title(what: str, bench: Bench, work: workloads.Workload) -> str:
    s = bench.chunk
    return (f"{what}, diffusers + torch, {bench.cfg.num_layers} layers x {bench.cfg.inner_dim} bf16 transformer + "
            f"AutoencoderKLWan (base_dim {VAEConfig(**s.vae_kwargs).base_dim}), {s.height}x{s.width}, "
            f"{workloads.video_frames(s.latent_frames)} frames per chunk ({workloads.workload_label(work)}); compiled = "
            f"transformer.compile(mode={bench.compile_mode!r}, "
            f"dynamic=False); MFU of the sampling against {bench.matmul_tflops:.4g} TFLOP/s (bf16 matmul measured "
            "in this run).")


def measure_distilled(bench: Bench) -> dict[str, Any]:
    s = bench.chunk
    work = workloads.chunk_workload(s.height, s.width, 3, s.text_tokens, s.latent_frames)
    frames = workloads.video_frames(s.latent_frames)
    scheduler = {**workloads.distilled_scheduler(), "gamma": bench.gamma}
    context = text_embeddings(bench, 1)
    headers = ["mode", "attention", "VAE", "steps", "amplify 1st", *chunk_bench.CHUNK_HEADERS]
    rows = []
    for vae_name in s.vae_dtypes:
        vae = build_vae(s, bench.device, VAE_DTYPES[vae_name])
        pipe = build_pipeline(bench, vae, scheduler, distilled=True)
        for mode, backends, context_manager in mode_settings(bench):
            with context_manager:
                for backend in backends:
                    for steps in s.pyramid_steps:
                        flops = flop_counts.chunk_flops(bench.cfg, work, steps, guided=False)
                        for amplify in s.amplify:
                            label = [mode, backend, vae_name, "+".join(map(str, steps)), "yes" if amplify else "no"]
                            settings = dict(prompt_embeds=context, height=s.height, width=s.width, guidance_scale=1.0,
                                            num_latent_frames_per_chunk=s.latent_frames,
                                            pyramid_num_inference_steps_list=list(steps),
                                            is_amplify_first_chunk=amplify)
                            try:
                                cold, _ = chunk_seconds(pipe, bench, 2, backend, **settings)
                                reset_peak(bench.device)
                                timed, decodes = chunk_seconds(pipe, bench, s.chunks, backend, **settings)
                            except Exception as e:  # one backend unavailable must not hide the others
                                rows.append(chunk_bench.failed_row(label, e, len(headers)))
                                continue
                            rows.append(chunk_bench.chunk_row(label, cold[0], timed[0], timed[1:],
                                                         statistics.median(decodes[1:]), frames, flops,
                                                         bench.matmul_tflops, peak_gib(bench.device)))
                            print(reporting.markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
        del pipe, vae
    notes = (f"\nGamma {bench.gamma:.4g}. A call of {s.chunks} chunks per row after a 2-chunk warm-up call; steady = "
             f"median of its chunks 2..{s.chunks}, decode = median of their decodes; FPS = {frames} / steady chunk "
             "s; peak GiB: torch's peak allocated in the timed call.\n")
    return {"title": chunk_title("Distilled chunk (HeliosPyramidPipeline, DMD, guidance 1.0)", bench, work),
            "headers": headers, "rows": rows, "notes": notes}


def measure_base(bench: Bench) -> dict[str, Any]:
    s = bench.chunk
    work = workloads.chunk_workload(s.height, s.width, 1, s.text_tokens, s.latent_frames)
    frames = workloads.video_frames(s.latent_frames)
    flops = flop_counts.chunk_flops(bench.cfg, work, (s.base_steps,), guided=True)
    context, negative = text_embeddings(bench, 1), text_embeddings(bench, 4)
    vae_name = s.vae_dtypes[0]
    vae = build_vae(s, bench.device, VAE_DTYPES[vae_name])
    pipe = build_pipeline(bench, vae, workloads.base_scheduler(s.base_shift), distilled=False)
    headers = ["mode", "attention", "VAE", "steps", "guidance", *chunk_bench.CHUNK_HEADERS]
    rows = []
    for mode, backends, context_manager in mode_settings(bench):
        with context_manager:
            for backend in backends:
                label = [mode, backend, vae_name, s.base_steps, f"CFG {s.guidance_scale:g}"]
                try:
                    reset_peak(bench.device)
                    timed, decodes = chunk_seconds(
                        pipe, bench, s.base_chunks, backend, prompt_embeds=context, negative_prompt_embeds=negative,
                        height=s.height, width=s.width, num_inference_steps=s.base_steps,
                        guidance_scale=s.guidance_scale, num_latent_frames_per_chunk=s.latent_frames)
                except Exception as e:
                    rows.append(chunk_bench.failed_row(label, e, len(headers)))
                    continue
                rows.append(chunk_bench.chunk_row(label, timed[0], "", timed[1:], statistics.median(decodes[1:]), frames,
                                             flops, bench.matmul_tflops, peak_gib(bench.device)))
                print(reporting.markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
    notes = (f"\nOne call of {s.base_chunks} chunks per row: the first (cold) warms up and compiles, steady = "
             f"median of the rest. Scheduler: single-stage UniPC, shift {s.base_shift:g}.\n")
    return {"title": chunk_title(f"Base chunk (HeliosPipeline, {s.base_steps} UniPC steps, CFG)", bench, work),
            "headers": headers, "rows": rows, "notes": notes}


MEASUREMENTS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "forward": measure_forward,
    "distilled": measure_distilled,
    "base": measure_base,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chunk_bench.bench_arguments(parser, list(MEASUREMENTS))
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--attention", default=None, help=f"SDPA backends among {list(BACKENDS)} (default flash,cudnn)")
    parser.add_argument("--compile-mode", default=COMPILE_MODE, help="torch.compile mode")
    parser.add_argument("--gamma", type=float, default=None,
                        help=f"the distilled scheduler's gamma (default 1/3; {CPU_GAMMA} on a CPU)")
    args = parser.parse_args(argv)
    measures = chunk_bench.selected_measures(parser, args, list(MEASUREMENTS))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TransformerConfig(**workloads.tiny_config_kwargs()) if args.tiny else TransformerConfig()
    work = workloads.TINY if args.tiny else workloads.HELIOS
    stages = [int(s) for s in args.stages.split(",")] if args.stages else list(range(len(work.stages)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    env = provenance.environment(f"{name} ({device.type})", provenance.versions("torch", "diffusers", "triton", "numpy"))
    print(provenance.describe(env), flush=True)

    model = build_model(cfg, device)
    rate = matmul_tflops(device, 512 if args.tiny else 8192, args.reps)
    gamma = args.gamma if args.gamma is not None else (1 / 3 if device.type == "cuda" else CPU_GAMMA)
    chunk = chunk_bench.chunk_settings(args, work.text_tokens)
    bench = Bench(model, cfg, work, device, args.modes.split(","), (args.attention or "flash,cudnn").split(","),
                  stages, args.reps, args.warmup, args.compile_mode, rate, chunk, gamma)
    tables = {name: MEASUREMENTS[name](bench) for name in measures}
    body = "\n\n".join(f"{t['title']}\n\n{reporting.markdown_table(t['headers'], t['rows'])}{t['notes']}"
                       for t in tables.values())
    return reporting.report("bench_reference", env, body, {"env": env, "matmul_tflops": rate, "tables": tables}, args)


if __name__ == "__main__":
    main()
