"""The PyTorch reference (diffusers' HeliosTransformer3DModel) on the same GPU and shapes as bench_dit.

    python experiments/bench_reference.py                      # eager (SDPA flash, SDPA cuDNN) and compiled
    python experiments/bench_reference.py --modes eager --attention flash

Random bf16 weights made on the GPU (the modules diffusers keeps in float32 in float32, as after
``from_pretrained(torch_dtype=bfloat16)``), the config of ``helios_jax.config.TransformerConfig()``
so both sides run the same model, and the inputs of ``common.Workload`` at each pyramid stage.

Modes: ``eager``; ``compiled`` = ``torch.compile(model, mode="max-autotune-no-cudagraphs",
dynamic=False)`` with ``cudnn.benchmark``, as the official ``infer_helios.py --enable_compile``
does. Attention: torch's SDPA restricted to one backend, ``flash`` (FlashAttention-2 in torch) or
``cudnn`` (cuDNN's fused attention). The official inference uses FlashAttention-3 from the
``kernels`` hub, which needs a network this machine does not have; cuDNN's Hopper kernel is the
nearest stand-in. Timing with CUDA events, median; memory is the peak allocated in each forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from helios_jax.config import TransformerConfig, to_dict

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
COMPILE_MODE = "max-autotune-no-cudagraphs"  # PKU-YuanGroup/Helios infer_helios.py, --enable_compile


@dataclasses.dataclass
class Bench:
    model: torch.nn.Module
    cfg: TransformerConfig
    work: common.Workload
    device: torch.device
    modes: list[str]
    attention: list[str]
    stages: list[int]
    reps: int
    warmup: int
    compile_mode: str
    matmul_tflops: float


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


def stage_inputs(cfg: TransformerConfig, work: common.Workload, stage: int, device: torch.device) -> dict[str, Any]:
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
            noisy, history = common.token_counts(cfg, work, stage)
            flops = common.dit_flops(cfg, work, stage)["total"]
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
                    rows.append([stage, f"{noisy}+{history}", mode, backend,
                                 f"failed: {type(e).__name__}: {str(e)[:80]}", "", "", "", ""])
                    continue
                peak = common.gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else ""
                tflops = flops / ms / 1e9
                rows.append([stage, f"{noisy}+{history}", mode, backend, first_s, ms, tflops,
                             100 * tflops / bench.matmul_tflops, peak])
    headers = ["stage", "tokens (noisy+history)", "mode", "attention", "first call s", "ms/forward", "TFLOP/s",
               "MFU %", "peak GiB"]
    title = (f"diffusers HeliosTransformer3DModel forward, {cfg.num_layers} layers x {cfg.inner_dim} "
             f"({common.workload_label(work)}), bf16, median of {bench.reps} after {bench.warmup} warm-ups; "
             f"compiled = torch.compile(mode={bench.compile_mode!r}, dynamic=False); MFU against "
             f"{bench.matmul_tflops:.4g} TFLOP/s (bf16 matmul measured in this run).")
    return {"title": title, "headers": headers, "rows": rows, "notes": ""}


MEASUREMENTS: dict[str, Callable[[Bench], dict[str, Any]]] = {"forward": measure_forward}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", default=",".join(MEASUREMENTS), help=f"any of {list(MEASUREMENTS)}")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--attention", default=None, help=f"SDPA backends among {list(BACKENDS)} (default flash,cudnn)")
    parser.add_argument("--compile-mode", default=COMPILE_MODE, help="torch.compile mode")
    parser.add_argument("--stages", default=None, help="pyramid stages, e.g. 0,1,2 (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on tiny latents (CPU smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--results", default=common.RESULTS, help="markdown file to append to ('' = none)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TransformerConfig(**common.tiny_config_kwargs()) if args.tiny else TransformerConfig()
    work = common.TINY if args.tiny else common.HELIOS
    stages = [int(s) for s in args.stages.split(",")] if args.stages else list(range(len(work.stages)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    env = common.environment(f"{name} ({device.type})", common.versions("torch", "diffusers", "triton", "numpy"))
    print(common.describe(env), flush=True)

    model = build_model(cfg, device)
    rate = matmul_tflops(device, 512 if args.tiny else 8192, args.reps)
    bench = Bench(model, cfg, work, device, args.modes.split(","), (args.attention or "flash,cudnn").split(","),
                  stages, args.reps, args.warmup, args.compile_mode, rate)
    tables = {name: MEASUREMENTS[name](bench) for name in args.measure.split(",")}
    body = "\n\n".join(f"{t['title']}\n\n{common.markdown_table(t['headers'], t['rows'])}{t['notes']}"
                       for t in tables.values())
    print(body, flush=True)
    if args.results:
        common.append_results("bench_reference", env, body, args.results)
    result = {"env": env, "matmul_tflops": rate, "tables": tables}
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
