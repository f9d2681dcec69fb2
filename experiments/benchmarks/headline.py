"""The headline numbers from one GPU call: JAX against diffusers on one device, beside the roofline.

    python3 -m experiments.benchmarks.headline --setup             # on a bare GPU machine (the device tool), ~9 min
    python -m experiments.benchmarks.headline --tiny --out /tmp/h  # the CPU rehearsal (tests/test_experiments.py)

Parts, each a fresh process (so that JAX and torch each get the whole GPU), writing into ``--out`` ($OUT):

1. ``plan``: the device's target config (``target_config.txtpb``: commit it to experiments/targets/) and the
   roofline of the programs compiled for this very device (experiments/plans/roofline.py on the DiT forward at
   stage 2 and the distilled chunks 2+2+2 and 1+1+1);
2. ``jax``: bench_dit.py, cuDNN attention: the DiT forward at stage 2 and the distilled chunk's steady FPS at
   2+2+2 and 1+1+1, with XLA's GEMM autotune results dumped to ``autotune.txt`` (commit it too: the gpu-plan
   tier and the roofline replay it with ``--autotune``);
3. ``torch``: bench_reference.py, diffusers in eager torch, the same measurements;
4. ``attention``: bench_attention.py at Helios' five attention shapes (bf16, 40 heads x 128), cuDNN, the
   Pallas-Triton kernel and the Mosaic GPU kernel (``impl="mosaic"``, not yet the default): each output is first
   checked against float32 attention on the same device (XLA's, full precision), and one past the bf16 tolerance
   is reported wrong and not timed. The rehearsal runs xla and pallas (interpreted) at tiny shapes, and says why
   mosaic is skipped (its kernel needs a CUDA device).

Then two tables: each measurement's JAX and torch time, their ratio and the roofline's lower bound beside
them; and per attention shape each impl's time, the Mosaic kernel's time over cuDNN's and its error. Printed
and appended to ``<out>/results.md`` (``python -m experiments.benchmarks.run_all --merge`` adds it to RESULTS.md
here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from experiments import paths, provenance, reporting, workloads
from experiments.benchmarks import run_all

STEPS = ("2,2,2", "1,1,1")
TINY_STEPS = ("1,1,1",)  # the rehearsal compiles one chunk program (a chunk compiles slowly on a CPU)


def steps_for(tiny: bool) -> tuple[str, ...]:
    return TINY_STEPS if tiny else STEPS


def forward_stage(tiny: bool) -> int:
    """The full-size stage of the benchmarks' forward workload (workloads.TINY has two stages, HELIOS three)."""
    return len((workloads.TINY if tiny else workloads.HELIOS).stages) - 1


def part_commands(tiny: bool) -> dict[str, list[str]]:
    size = ["--tiny", "--reps", "1", "--warmup", "0", "--chunks", "2"] if tiny else ["--reps", "3", "--warmup", "1",
                                                                                    "--chunks", "3"]
    shared = ["--measure", "forward,distilled", "--stages", str(forward_stage(tiny)),
              "--pyramid-steps", "/".join(steps_for(tiny)), "--amplify", "0", *size]
    return {
        "plan": ["experiments.benchmarks.headline", "--plan-child", *(["--tiny"] if tiny else [])],
        "jax": [run_all.DIT, *shared, "--impls", "xla" if tiny else "cudnn"],
        "torch": [run_all.REFERENCE, *shared, "--modes", "eager", *(["--attention", "math"] if tiny else [])],
        "attention": ["experiments.benchmarks.bench_attention", "--impls", ",".join(attention_impls(tiny)),
                      *(["--tiny"] if tiny else ["--reps", "10"])],
    }


def attention_impls(tiny: bool) -> tuple[str, ...]:
    """cuDNN (the default on a GPU), then our two kernels; the CPU rehearsal has no cuDNN, so XLA's stands in."""
    return ("xla" if tiny else "cudnn", "pallas", "mosaic")


def plan_child(args: argparse.Namespace) -> None:
    """In a fresh JAX process on the device: its target config and the roofline of its compiled programs."""
    import jax
    from jax._src.lib import xla_client  # jax.lib.xla_client before jax 0.10, which no longer exports it

    from experiments.plans import gpu_plan, roofline

    device = jax.devices()[0]
    try:
        target = xla_client.get_topology_for_devices([device]).target_config
    except Exception as err:  # a CPU has no GPU target config: the rehearsal says so instead
        target = f"# no GPU target config on {device.platform}: {type(err).__name__}: {err}\n"
    reporting.write_atomic(os.path.join(args.out, "target_config.txtpb"), target)
    size = gpu_plan.TINY if args.tiny else gpu_plan.HELIOS_14B
    sharding = jax.sharding.SingleDeviceSharding(device)
    plans = {"forward stage 2": gpu_plan.dit_forward(size.cfg, size.work, 2, sharding, platform=device.platform)}
    distilled = gpu_plan.abstract_pipeline(size.cfg, size.vae, dict(gpu_plan.demo.SCHEDULER), gpu_plan.DISTILLED,
                                           platform=device.platform)
    for steps in steps_for(args.tiny):
        lowered = distilled.lower_chunk(**size.settings(), guidance_scale=1.0, sharding=sharding,
                                        pyramid_num_inference_steps_list=[int(n) for n in steps.split(",")])
        plans[f"distilled {steps.replace(',', '+')}"] = gpu_plan.compile_plan(steps, lowered)
    plans["decode"] = gpu_plan.decode_program(size, sharding, "float32")
    kernels = roofline.analyse(plans)
    predicted = {name: roofline.predicted_ms(ks) for name, ks in kernels.items()}
    shares = {name: roofline.other_share(ks) for name, ks in kernels.items()}
    reporting.write_json(args.json or os.path.join(args.out, "plan.json"),
                         {"device": device.device_kind, "predicted_ms": predicted, "other_share": shares})


def _load(out: str, part: str) -> dict:
    path = os.path.join(out, f"{part}.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cell(table: dict | None, value: str, where: dict[str, Any]) -> float | str:
    """The first timed ``value`` of a row matching ``where`` ('' where none was measured)."""
    if not table:
        return ""
    for row in table["rows"]:
        cells = dict(zip(table["headers"], row))
        if all(cells.get(k) == v for k, v in where.items()) and run_all.timed(cells.get(value)):
            return cells[value]
    return ""


def headline_table(out: str, frames: int, steps_lists: tuple[str, ...] = STEPS) -> str:
    """JAX, torch and the roofline side by side, from the parts' JSON files in ``out``."""
    plan = _load(out, "plan").get("predicted_ms", {})
    jax_tables, torch_tables = _load(out, "jax").get("tables", {}), _load(out, "torch").get("tables", {})
    rows = []
    stage = forward_stage(frames != workloads.LATENT_FRAMES)
    jax_ms = _cell(jax_tables.get("forward"), "ms/forward", {"stage": stage})
    torch_ms = _cell(torch_tables.get("forward"), "ms/forward", {"stage": stage})
    rows.append(["DiT forward, stage 2 (ms)", jax_ms, torch_ms, _ratio(torch_ms, jax_ms), plan.get("forward stage 2", ""),
                 _ratio(plan.get("forward stage 2"), jax_ms)])
    for steps in steps_lists:
        label = steps.replace(",", "+")
        jax_s = _cell(jax_tables.get("distilled"), "steady chunk s", {"steps": label})
        torch_s = _cell(torch_tables.get("distilled"), "steady chunk s", {"steps": label})
        bound = plan.get(f"distilled {label}")
        bound_s = (bound + plan.get("decode", 0.0)) / 1e3 if bound is not None else ""
        rows.append([f"distilled chunk {label} + decode (s)", jax_s, torch_s, _ratio(torch_s, jax_s), bound_s,
                     _ratio(bound_s, jax_s)])
        fps = [workloads.video_frames(frames) / v if run_all.timed(v) and v else "" for v in (jax_s, torch_s, bound_s)]
        rows.append([f"distilled chunk {label} FPS", fps[0], fps[1], _ratio(fps[0], fps[1]), fps[2],
                     _ratio(fps[0], fps[2])])
    headers = ["measurement", "JAX (cuDNN)", "torch eager", "JAX speed-up over torch", "roofline bound",
               "roofline / JAX (time) or JAX / roofline (FPS)"]
    return ("Headline: one device, one call (experiments/benchmarks/headline.py). Roofline bound: the programs "
            "compiled for this device, max(FLOPs / 790 TFLOP/s, bytes / 3.35 TB/s) per kernel "
            "(experiments/plans/roofline.py).\n\n"
            + reporting.markdown_table(headers, rows))


def attention_table(out: str, impls: tuple[str, ...]) -> str:
    """Per shape: each impl's ms (or why it has none), Mosaic over the first impl's time, Mosaic's error."""
    result = _load(out, "attention")
    if not result:
        return "No attention table: its part wrote no JSON (see headline.log).\n"
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for row in result["rows"]:
        cells = dict(zip(result["headers"], row))
        found.setdefault(cells["shape"], {})[cells["impl"]] = cells
    rows = []
    for shape, by_impl in found.items():
        ms = [by_impl.get(i, {}).get("ms", "") for i in impls]
        mosaic = by_impl.get("mosaic", {})
        rows.append([shape, *ms, _ratio(ms[-1], ms[0]), mosaic.get("rel err vs f32", ""),
                     mosaic.get("max abs err", "")])
    headers = ["shape", *(f"{i} ms" for i in impls), f"mosaic / {impls[0]} (time)", "mosaic rel err vs f32",
               "mosaic max abs err"]
    return (f"Attention at Helios' shapes (bench_attention.py, bf16): {', '.join(impls)}; each output checked against "
            f"float32 attention on the device before timing (wrong past a relative error of "
            f"{result.get('rel_tolerance', '?')}).\n\n" + reporting.markdown_table(headers, rows))


def _ratio(a: Any, b: Any) -> float | str:
    return a / b if run_all.timed(a) and run_all.timed(b) and b else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(paths.ROOT, "out", "headline"))
    parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal: tiny model, tiny chunks")
    parser.add_argument("--setup", action="store_true", help="put helios-jax and .whl/*.whl into /tmp/site first")
    parser.add_argument("--parts", default="plan,jax,torch,attention")
    parser.add_argument("--plan-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)  # the plan child's JSON (run_all.run_part passes it)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.plan_child:
        plan_child(args)
        return 0
    env = dict(os.environ)
    if args.setup:
        run_all.setup(env)
    if not args.tiny:
        env.setdefault("JAX_PLATFORMS", "cuda")
    flags = f"--xla_gpu_dump_autotune_results_to={os.path.join(args.out, 'autotune.txt')}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    commands = part_commands(args.tiny)
    commands["plan"] += ["--out", args.out]
    start, ok = time.perf_counter(), True
    with open(os.path.join(args.out, "headline.log"), "a", encoding="utf-8") as log:
        for name in args.parts.split(","):
            run_all.PARTS[f"headline-{name}"] = commands[name]
            ok &= run_all.run_part(f"headline-{name}", args.out, env, [], log)
        for name in args.parts.split(","):  # run_part names each JSON after its part
            path = os.path.join(args.out, f"headline-{name}.json")
            if os.path.exists(path):
                os.replace(path, os.path.join(args.out, f"{name}.json"))
        body = headline_table(args.out, 2 if args.tiny else workloads.LATENT_FRAMES, steps_for(args.tiny))
        body += "\n" + attention_table(args.out, attention_impls(args.tiny))
        body += f"\nWhole call: {time.perf_counter() - start:.0f} s.\n"
        print("\n" + body, flush=True)
        log.write(body)
    jax_env = _load(args.out, "jax").get("env") or provenance.environment("unknown", {})
    reporting.append_results("headline", jax_env, body, os.path.join(args.out, "results.md"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
