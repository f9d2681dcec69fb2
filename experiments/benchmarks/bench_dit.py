"""The 14B Helios DiT on one GPU, random bf16 weights: forwards and whole chunks (FPS) per attention impl.

    python -m experiments.benchmarks.bench_dit                       # every measurement, every impl
    python -m experiments.benchmarks.bench_dit --measure forward --impls cudnn,pallas --stages 2
    python -m experiments.benchmarks.bench_dit --measure distilled --impls cudnn --pyramid-steps 2,2,2 --amplify 0

Each measurement is one function of a ``Bench`` (config, weights on the device, the workload, the
matmul rate measured in this run) returning a ``Table``; ``MEASUREMENTS`` names them, and
``--measure`` picks.

``forward``: one DiT forward at each pyramid stage with the full history (noisy latents 12x20,
24x40, 48x80 of 9 frames; short/mid/long history of 2/2/16 frames at 48x80; 512 text tokens; batch 1).

``distilled``: whole chunks as real-time generation runs them: ``helios_jax.pipeline.HeliosPipeline``
(pyramid, distilled, HeliosDMDScheduler) over the same DiT weights and the Wan2.1 VAE (random weights
made on the device, fp32 as the official inference runs it), random bf16 text embeddings in place of
the text encoder, 384x640, guidance 1.0, pyramid steps 2+2+2 and 1+1+1, with and without
``is_amplify_first_chunk``. For each setting a two-chunk stream warms up (its first chunk, "cold",
includes compiling whatever an earlier row of the same impl did not compile), then a stream of
``--chunks`` chunks is timed chunk by chunk on the host clock (each chunk's frames are on the host
when it is counted): its first chunk ("warm") and the median of the rest (steady state; FPS = 33
frames over it). The VAE decode is timed alone with the pipeline's compiled decoder (``pipe.decode``);
sampling = steady chunk - decode.

``base``: the base setting, ``HeliosPipeline`` with a single-stage UniPC HeliosScheduler, 50 steps
with CFG 5.0 (negative embeddings given), one stream of ``--base-chunks`` chunks (the first compiles).

MFU is model FLOPs (``flop_counts.dit_flops``: every matmul, attention included; for a chunk, forwards per
stage x FLOPs per forward) per second over the bf16 matmul rate measured in the same process; for a
chunk it is taken over the sampling time. Memory is XLA's plan for the compiled forward (weights,
inputs, outputs and temporaries); for chunks, the process peak after each row (monotone within a run:
impls run in the order given, so later rows include earlier ones' peaks).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from experiments import flop_counts, provenance, reporting, timing, workloads
from experiments.benchmarks import chunk_bench
from experiments.model_inputs import random_params, stage_inputs
from helios_jax.compilation import enable_compilation_cache
from helios_jax.config import TransformerConfig, VAEConfig
from helios_jax.models import vae as vae_lib
from helios_jax.models.transformer import HeliosTransformer
from helios_jax.pipeline import HeliosPipeline, PipelineSpec

VAE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: str = ""

    def markdown(self) -> str:
        return f"{self.title}\n\n{reporting.markdown_table(self.headers, self.rows)}{self.notes}"


@dataclasses.dataclass
class Bench:
    cfg: TransformerConfig
    work: workloads.Workload
    params: Any
    impls: list[str]
    stages: list[int]
    reps: int
    warmup: int
    matmul_tflops: float
    chunk: chunk_bench.ChunkSettings | None = None  # what the chunk measurements generate
    vaes: dict[str, tuple[VAEConfig, Any]] = dataclasses.field(default_factory=dict)  # by dtype name, made once
    compilation_cache: str = ""  # the persistent cache the chunk pipelines use, and how full it was at the start

    def vae(self, dtype_name: str) -> tuple[VAEConfig, Any]:
        """The chunk settings' VAE config and random params in ``dtype_name`` (made on first use)."""
        if dtype_name not in self.vaes:
            cfg = VAEConfig(**self.chunk.vae_kwargs)
            self.vaes[dtype_name] = cfg, random_vae_params(cfg, jax.random.key(2), VAE_DTYPES[dtype_name])
        return self.vaes[dtype_name]


def random_vae_params(cfg: VAEConfig, key: jax.Array, dtype: Any = jnp.float32) -> Any:
    """The VAE's params, made on the device from one draw (0.5 GB at full size; a draw per leaf compiles
    for long on the CPU): kernels ~ N(0, 1/fan_in) so activations stay finite through the decoder, norm
    gammas ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.01^2)."""
    flat, tree = jax.tree_util.tree_flatten_with_path(vae_lib.param_shapes(cfg))
    sizes = [math.prod(leaf.shape) for _, leaf in flat]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def scaled(path: tuple, leaf: Any, z: jax.Array) -> jax.Array:
        name = path[-1].key
        if name == "kernel":
            return z / math.sqrt(math.prod(leaf.shape[:-1]))
        return 1.0 + 0.1 * z if name == "gamma" else 0.01 * z

    @jax.jit
    def make(key):
        z = jax.random.normal(key, (sum(sizes),), jnp.float32)
        return tree.unflatten([scaled(path, leaf, z[start:start + size].reshape(leaf.shape)).astype(dtype)
                               for (path, leaf), start, size in zip(flat, starts, sizes)])

    return make(key)


def matmul_tflops(n: int, reps: int) -> float:
    """bf16 matmul rate of this device on random data: the ceiling MFU is measured against."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    ms = timing.median_ms(lambda: jax.jit(jnp.matmul)(a, b), jax.block_until_ready, warmup=2, reps=reps)
    return 2 * n**3 / ms / 1e9


def rel_diff(out: jax.Array, ref: jax.Array) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def measure_forward(bench: Bench) -> Table:
    cfg, work = bench.cfg, bench.work
    rows = []
    for stage in bench.stages:
        noisy, history = flop_counts.token_counts(cfg, work, stage)
        flops = flop_counts.dit_flops(cfg, work, stage)
        inputs = stage_inputs(cfg, work, stage, jax.random.key(100 + stage))
        first = None
        for impl in bench.impls:
            apply = jax.jit(HeliosTransformer(cfg, attention_impl=impl).apply)
            try:
                start = time.perf_counter()
                compiled = apply.lower({"params": bench.params}, **inputs).compile()
                compile_s = time.perf_counter() - start
                run = lambda: compiled({"params": bench.params}, **inputs)  # noqa: E731
                out = run()
                ms = timing.median_ms(run, jax.block_until_ready, warmup=bench.warmup, reps=bench.reps)
            except Exception as e:  # an impl that fails here (no cuDNN, out of memory) must not hide the rest
                rows.append(chunk_bench.failed_row([stage, f"{noisy}+{history}", impl], e, 10))
                continue
            mem = compiled.memory_analysis()  # XLA's buffer plan; None where a backend gives none
            planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                       - mem.alias_size_in_bytes) if mem else float("nan")
            temp = mem.temp_size_in_bytes if mem else float("nan")
            tflops = flops["total"] / ms / 1e9
            diff = "" if first is None else rel_diff(out, first[1])
            first = first or (impl, out)
            rows.append([stage, f"{noisy}+{history}", impl, compile_s, ms, tflops,
                         100 * tflops / bench.matmul_tflops, reporting.gib(planned), reporting.gib(temp), diff])
    headers = ["stage", "tokens (noisy+history)", "impl", "compile s", "ms/forward", "TFLOP/s", "MFU %",
               "planned GiB", "temp GiB", f"rel diff vs {bench.impls[0]}"]
    notes = ""
    for stage in bench.stages:
        flops = flop_counts.dit_flops(cfg, work, stage)
        notes += (f"\nstage {stage}: {flops['total'] / 1e12:.1f} TFLOP per forward, "
                  f"{100 * flops['attention'] / flops['total']:.0f}% of it in attention.")
    notes += "\n"
    title = (f"DiT forward, {cfg.num_layers} layers x {cfg.inner_dim} ({workloads.workload_label(work)}), bf16 weights, "
             f"median of {bench.reps} after {bench.warmup} warm-ups; MFU against {bench.matmul_tflops:.4g} TFLOP/s "
             "(bf16 matmul measured in this run).")
    return Table(title, headers, rows, notes)


def peak_gib() -> Any:
    """The process's peak device memory so far in GiB ('' where the backend keeps no statistics)."""
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return reporting.gib(peak) if peak else ""


def chunk_seconds(pipe: HeliosPipeline, chunks: int, **settings: Any) -> list[float]:
    """Wall seconds of each chunk of one ``pipe.stream``, the first counted from the call (so it holds the
    preparation and any compilation); a chunk counts when its frames are on the host."""
    times = []
    start = time.perf_counter()
    frames = workloads.video_frames(settings["num_latent_frames_per_chunk"])
    for _ in pipe.stream(num_frames=chunks * frames, seed=0, progress=False, **settings):
        now = time.perf_counter()
        times.append(now - start)
        start = now
    if len(times) != chunks:
        raise RuntimeError(f"the stream yielded {len(times)} chunks, not {chunks}")
    return times


def decode_seconds(pipe: HeliosPipeline, bench: Bench, key: jax.Array) -> tuple[float, float]:
    """(first call s, median s) of the pipeline's compiled decode of one chunk's latents."""
    s = bench.chunk
    factor = workloads.VAE_FACTOR
    shape = (1, bench.cfg.in_channels, s.latent_frames, s.height // factor, s.width // factor)
    latents = jax.random.normal(key, shape, jnp.float32)
    start = time.perf_counter()
    jax.block_until_ready(pipe.decode(latents))
    first_s = time.perf_counter() - start
    ms = timing.median_ms(lambda: pipe.decode(latents), jax.block_until_ready, warmup=bench.warmup, reps=bench.reps)
    return first_s, ms / 1e3


def text_embeddings(bench: Bench, seed: int) -> jax.Array:
    """Random bf16 embeddings in place of the text encoder's output (1, tokens, text_dim)."""
    shape = (1, bench.chunk.text_tokens, bench.cfg.text_dim)
    return jax.random.normal(jax.random.key(seed), shape, jnp.bfloat16)


def chunk_title(what: str, bench: Bench, work: workloads.Workload) -> str:
    s = bench.chunk
    return (f"{what}, {bench.cfg.num_layers} layers x {bench.cfg.inner_dim} bf16 DiT + VAE "
            f"(base_dim {VAEConfig(**s.vae_kwargs).base_dim}), {s.height}x{s.width}, "
            f"{workloads.video_frames(s.latent_frames)} frames "
            f"per chunk ({workloads.workload_label(work)}); decode: median of {bench.reps} after {bench.warmup} "
            f"warm-ups; MFU of the sampling against {bench.matmul_tflops:.4g} TFLOP/s (bf16 matmul measured in "
            f"this run). XLA compilation cache: {bench.compilation_cache}.")


def measure_distilled(bench: Bench) -> Table:
    s = bench.chunk
    work = workloads.chunk_workload(s.height, s.width, 3, s.text_tokens, s.latent_frames)
    scheduler = workloads.distilled_scheduler()
    work_frames = workloads.video_frames(s.latent_frames)
    context = text_embeddings(bench, 1)
    headers = ["impl", "VAE", "steps", "amplify 1st", "decode compile s", *chunk_bench.CHUNK_HEADERS]
    rows = []
    for vae_name in s.vae_dtypes:
        for impl in bench.impls:
            try:
                pipe = HeliosPipeline((bench.cfg, bench.params), bench.vae(vae_name), None, scheduler,
                                      PipelineSpec(pyramid=True, is_distilled=True), attention_impl=impl)
                decode_compile_s, decode_s = decode_seconds(pipe, bench, jax.random.key(3))
            except Exception as e:  # an impl that fails here must not hide the rest
                rows.append(chunk_bench.failed_row([impl, vae_name], e, len(headers)))
                continue
            for steps in s.pyramid_steps:
                flops = flop_counts.chunk_flops(bench.cfg, work, steps, guided=False)
                for amplify in s.amplify:
                    label = [impl, vae_name, "+".join(map(str, steps)), "yes" if amplify else "no"]
                    settings = dict(prompt_embeds=context, height=s.height, width=s.width, guidance_scale=1.0,
                                    num_latent_frames_per_chunk=s.latent_frames,
                                    pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amplify)
                    try:
                        cold = chunk_seconds(pipe, 2, **settings)
                        timed = chunk_seconds(pipe, s.chunks, **settings)
                    except Exception as e:
                        rows.append(chunk_bench.failed_row(label, e, len(headers)))
                        continue
                    rows.append(chunk_bench.chunk_row([*label, decode_compile_s], cold[0], timed[0], timed[1:], decode_s,
                                                 work_frames, flops, bench.matmul_tflops, peak_gib()))
                    print(reporting.markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
            del pipe
    notes = "".join(
        f"\n{'+'.join(map(str, steps))} steps: {flop_counts.chunk_flops(bench.cfg, work, steps, False) / 1e15:.3g} PFLOP "
        "of DiT per steady chunk." for steps in s.pyramid_steps)
    notes += (f"\nA stream of {s.chunks} chunks per row after a 2-chunk warm-up stream; steady = median of its "
              f"chunks 2..{s.chunks}; FPS = {work_frames} / steady chunk s. The amplified first chunk runs "
              "twice the steps; later chunks are the same in both amplify rows.\n")
    return Table(chunk_title("Distilled chunk (HeliosPipeline, pyramid + DMD, guidance 1.0)", bench, work),
                 headers, rows, notes)


def measure_base(bench: Bench) -> Table:
    s = bench.chunk
    work = workloads.chunk_workload(s.height, s.width, 1, s.text_tokens, s.latent_frames)
    scheduler = workloads.base_scheduler(s.base_shift)
    context, negative = text_embeddings(bench, 1), text_embeddings(bench, 4)
    vae_name = s.vae_dtypes[0]
    flops = flop_counts.chunk_flops(bench.cfg, work, (s.base_steps,), guided=True)
    headers = ["impl", "VAE", "steps", "guidance", "decode compile s", *chunk_bench.CHUNK_HEADERS]
    rows = []
    for impl in bench.impls:
        label = [impl, vae_name, s.base_steps, f"CFG {s.guidance_scale:g}"]
        try:
            pipe = HeliosPipeline((bench.cfg, bench.params), bench.vae(vae_name), None, scheduler,
                                  PipelineSpec(pyramid=False), attention_impl=impl)
            decode_compile_s, decode_s = decode_seconds(pipe, bench, jax.random.key(3))
            timed = chunk_seconds(pipe, s.base_chunks, prompt_embeds=context, negative_prompt_embeds=negative,
                                  height=s.height, width=s.width, num_inference_steps=s.base_steps,
                                  num_latent_frames_per_chunk=s.latent_frames,
                                  guidance_scale=s.guidance_scale)
            del pipe
        except Exception as e:
            rows.append(chunk_bench.failed_row(label, e, len(headers)))
            continue
        rows.append(chunk_bench.chunk_row([*label, decode_compile_s], timed[0], "", timed[1:], decode_s,
                                     workloads.video_frames(s.latent_frames), flops, bench.matmul_tflops, peak_gib()))
        print(reporting.markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
    notes = (f"\n{flops / 1e15:.3g} PFLOP of DiT per chunk ({s.base_steps} steps x 2 forwards at "
             f"{work.stages[0][0]}x{work.stages[0][1]}). One stream of {s.base_chunks} chunks per impl: the first "
             f"compiles (cold), steady = median of the rest. Scheduler: single-stage UniPC, shift {s.base_shift:g} "
             "(Helios-Base's own value unverified; it changes timestep values, not the work).\n")
    return Table(chunk_title(f"Base chunk (HeliosPipeline, {s.base_steps} UniPC steps, CFG)", bench, work),
                 headers, rows, notes)


MEASUREMENTS: dict[str, Callable[[Bench], Table]] = {
    "forward": measure_forward,
    "distilled": measure_distilled,
    "base": measure_base,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chunk_bench.bench_arguments(parser, list(MEASUREMENTS))
    parser.add_argument("--impls", default=None,
                        help="attention impls (default: cudnn,pallas,xla on a GPU; xla,pallas on a CPU)")
    parser.add_argument("--compilation-cache", default=None,
                        help="persistent XLA cache folder (default: a fresh one per run, so first chunks compile "
                             "cold; pipelines of one run share the programs they have in common, e.g. the decoder)")
    args = parser.parse_args(argv)
    measures = chunk_bench.selected_measures(parser, args, list(MEASUREMENTS))

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    cfg = TransformerConfig(**workloads.tiny_config_kwargs()) if args.tiny else TransformerConfig()
    work = workloads.TINY if args.tiny else workloads.HELIOS
    impls = (args.impls or ("cudnn,pallas,xla" if on_gpu else "xla,pallas")).split(",")
    stages = [int(s) for s in args.stages.split(",")] if args.stages else list(range(len(work.stages)))
    env = provenance.jax_environment("flax", "numpy")
    print(provenance.describe(env), flush=True)
    chunk = chunk_bench.chunk_settings(args, work.text_tokens)
    cache_note = ""
    if set(measures) - {"forward"}:
        cache = enable_compilation_cache(args.compilation_cache or tempfile.mkdtemp(prefix="bench-dit-xla-"))
        cache_note = f"{cache}, {len(os.listdir(cache))} entries at the start"
        print(f"persistent compilation cache: {cache_note}", flush=True)

    start = time.perf_counter()
    params = jax.block_until_ready(random_params(cfg, jax.random.key(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    made_s = time.perf_counter() - start
    print(f"{n_params / 1e9:.2f}B random parameters made on {device} in {made_s:.1f} s", flush=True)
    rate = matmul_tflops(512 if args.tiny else 8192, args.reps)
    bench = Bench(cfg, work, params, impls, stages, args.reps, args.warmup, rate, chunk, compilation_cache=cache_note)

    tables = [MEASUREMENTS[name](bench) for name in measures]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    peak = f"\nProcess peak device memory: {reporting.gib(peak):.1f} GiB.\n" if peak else ""
    body = "\n\n".join(t.markdown() for t in tables) + peak
    result = {"env": env, "matmul_tflops": rate, "params": n_params,
              "tables": {name: dataclasses.asdict(t) for name, t in zip(measures, tables)}}
    return reporting.report("bench_dit", env, body, result, args)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # 28 GB of weights plus XLA attention's logits
    main()
