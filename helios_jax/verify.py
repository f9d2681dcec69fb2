"""``helios-jax verify``: every component against the installed PyTorch reference, as a table.

Each check builds a tiny random-weight reference model (diffusers / transformers), runs it and our
port on the same inputs, and reports the relative L2 error ``|ours - ref| / |ref|`` and the max-abs
error, in float32 and in bf16. A float32 row passes under a fixed tolerance; a bf16 row passes when our
error against the float32 reference is at most twice the reference's own bf16 error. The exit status
is 0 only if every row passes.

The reference (torch, diffusers, transformers) is needed only here: in the source checkout,
``pip install -e '.[test]'`` (or ``make install-test``). It is imported when a check runs, never by the
generation path. ``helios-jax verify --checkpoint DIR`` (``verify_checkpoint``) checks a real checkpoint instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import tempfile
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import helios_jax as hj
from helios_jax.checkpoint import PipelineError
from helios_jax.models import vae as vae_lib

FP32_TOL = 1e-5
BF16_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Row:
    component: str
    precision: str
    rel: float
    max_abs: float
    limit: float  # the bound on rel

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.limit)


def _reference() -> tuple[Any, Any, Any]:
    """torch, diffusers and transformers, with their own logging and warnings quiet (the table speaks)."""
    try:
        torch, diffusers, transformers = (importlib.import_module(name)
                                          for name in ("torch", "diffusers", "transformers"))
    except ImportError as err:
        raise PipelineError(f"verify runs the PyTorch reference, which is not installed ({err.name}): in the "
                            "source checkout, pip install -e '.[test]' (or make install-test)") from err
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="(diffusers|transformers|torch)")
    return torch, diffusers, transformers


def _errors(out: Any, ref: Any) -> tuple[float, float]:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(np.max(np.abs(out - ref)))


def _randomize(torch: Any, module: Any, seed: int, scale: float) -> Any:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().numpy()


def _rows(component: str, ours32: Any, ours16: Any, ref32: Any, ref16: Any) -> list[Row]:
    rel32, abs32 = _errors(ours32, ref32)
    rel16, abs16 = _errors(ours16, ref32)
    ref_rel16, _ = _errors(ref16, ref32)
    return [Row(component, "fp32", rel32, abs32, FP32_TOL),
            Row(component, "bf16", rel16, abs16, BF16_FACTOR * ref_rel16)]


def transformer_inputs(torch: Any, in_channels: int, text_dim: int) -> dict[str, Any]:
    """The DiT's float32 inputs for a 3-frame chunk with short, mid and long history (seeded torch draws)."""
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, in_channels, 3, 4, 6, generator=g), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 5, text_dim, generator=g))
    for name, frames, first in (("long", 16, 1), ("mid", 2, 17), ("short", 2, 18)):
        inputs[f"latents_history_{name}"] = torch.randn(1, in_channels, frames, 6, 10, generator=g)
        inputs[f"indices_latents_history_{name}"] = torch.arange(first, first + frames)[None]
    inputs["indices_hidden_states"] = torch.arange(20, 23)[None]
    return inputs


def jax_inputs(inputs: dict[str, Any], dtype: Any) -> dict[str, jax.Array]:
    """The same inputs for the port: floats in ``dtype`` (the timestep stays float32, as the reference keeps it)."""
    return {k: jnp.asarray(v.numpy(), dtype if v.is_floating_point() and k != "timestep" else None)
            for k, v in inputs.items()}


# The checks below jit a new function each time on purpose (and have no static callables): verify checks the
# code as it is when it runs, so it traces it afresh instead of reusing a program that a cache keyed by value
# could hold from before a change (tests/test_cli.py patches a function in between and expects a failure).
def check_transformer(torch: Any, diffusers: Any, transformers: Any, folder: str) -> list[Row]:
    """The DiT over a chunk with short, mid and long history (float32 and bf16)."""
    model = _randomize(torch, diffusers.HeliosTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
        ffn_dim=24, num_layers=2, rope_dim=(6, 6, 4)), seed=0, scale=0.3)
    model.save_pretrained(folder)
    inputs = transformer_inputs(torch, in_channels=4, text_dim=8)
    ref16_model = diffusers.HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref32 = _numpy(model(**inputs, return_dict=False)[0])
        ref16 = _numpy(ref16_model(**{k: v.bfloat16() if v.is_floating_point() and k != "timestep" else v
                                      for k, v in inputs.items()}, return_dict=False)[0])
    outs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        cfg, params = hj.load_transformer(folder, dtype)
        args = jax_inputs(inputs, dtype)
        outs.append(jax.jit(hj.HeliosTransformer(cfg).apply)({"params": params}, **args).astype(jnp.float32))
    return _rows("transformer", *outs, ref32, ref16)


def check_vae(torch: Any, diffusers: Any, transformers: Any, folder: str) -> list[Row]:
    """The VAE decoding a 3-latent chunk (float32 and bf16)."""
    model = _randomize(torch, diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0]), seed=2, scale=0.15)
    model.save_pretrained(folder)
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref32 = _numpy(model.decode(latents).sample)
        ref16 = _numpy(model.to(torch.bfloat16).decode(latents.bfloat16()).sample)
    outs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        cfg, params = hj.load_vae(folder, dtype)
        decode = jax.jit(lambda p, z: vae_lib.WanVAE(cfg, dtype).apply({"params": p}, z, method="decode"))
        outs.append(decode(params, jnp.asarray(latents.numpy(), dtype)).astype(jnp.float32))
    return _rows("vae", *outs, ref32, ref16)


def check_text_encoder(torch: Any, diffusers: Any, transformers: Any, folder: str) -> list[Row]:
    """The UMT5 encoder on a padded batch of two (float32 and bf16)."""
    config = transformers.UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=12)
    model = _randomize(torch, transformers.UMT5EncoderModel(config), seed=4, scale=0.3)
    model.save_pretrained(folder)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref32 = _numpy(model(ids, mask).last_hidden_state)
        ref16 = _numpy(model.to(torch.bfloat16)(ids, mask).last_hidden_state)
    outs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        cfg, params = hj.load_text_encoder(folder, dtype)
        encode = jax.jit(hj.UMT5Encoder(cfg).apply)
        outs.append(encode({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())).astype(jnp.float32))
    return _rows("text_encoder", *outs, ref32, ref16)


def check_pipeline(torch: Any, diffusers: Any, transformers: Any, folder: str) -> list[Row]:
    """Two chunks of the distilled pyramid pipeline on the embedded checkpoint, fed the reference's
    own noise (float32 frames; gamma 0.25, where torch's float32 Cholesky runs on the CPU)."""
    from helios_jax import demo
    from helios_jax.noise import ReplayNoise
    from helios_jax.pipeline import HeliosPipeline

    checkpoint = demo.build_demo_checkpoint(os.path.join(folder, "ckpt"))
    path = os.path.join(checkpoint, "scheduler", "scheduler_config.json")
    with open(path, encoding="utf-8") as f:
        scheduler = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**scheduler, "gamma": 0.25}, f)
    args = dict(prompt="a speeding train", height=64, width=64, num_frames=40, guidance_scale=1.0,
                pyramid_num_inference_steps_list=[1, 1, 1], max_sequence_length=16)
    reference = diffusers.HeliosPyramidPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)  # a pipeline's bar is its own tqdm, not diffusers' logging's
    draws: list[np.ndarray] = []
    with record_draws(torch, draws):
        ref = reference(**args, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    pipe = HeliosPipeline.from_pretrained(checkpoint, dtype=jnp.float32, compilation_cache=False)
    ours = pipe(**args, noise=ReplayNoise(draws), output_type="float", progress=False)
    rel, max_abs = _errors(ours, ref)
    return [Row("pipeline (2 chunks)", "fp32", rel, max_abs, 1e-4)]


@contextlib.contextmanager
def record_draws(torch: Any, record: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """Record (as float32 numpy, in order) every ``torch.randn`` / ``torch.rand`` result drawn inside
    the block: all the randomness of the reference pipelines, to replay into ours with ReplayNoise."""
    randn, rand = torch.randn, torch.rand

    def recording(fn: Callable) -> Callable:
        def draw(*args, **kwargs):
            out = fn(*args, **kwargs)
            record.append(out.detach().float().numpy().copy())
            return out
        return draw

    torch.randn, torch.rand = recording(randn), recording(rand)
    try:
        yield record
    finally:
        torch.randn, torch.rand = randn, rand


CHECKS: dict[str, Callable[..., list[Row]]] = {
    "transformer": check_transformer,
    "vae": check_vae,
    "text_encoder": check_text_encoder,
    "pipeline": check_pipeline,
}


def run_checks(only: tuple[str, ...] = ()) -> Iterator[Row]:
    torch, diffusers, transformers = _reference()
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as folder:
            yield from check(torch, diffusers, transformers, folder)


def table(rows: list[Row]) -> str:
    lines = ["| component | precision | rel L2 error | max-abs error | limit on rel | result |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.component} | {r.precision} | {r.rel:.2e} | {r.max_abs:.2e} | {r.limit:.2e} | "
              f"{'pass' if r.passed else 'FAIL'} |" for r in rows]
    return "\n".join(lines)


def run(only: tuple[str, ...] = ()) -> int:
    """Print the table; exit status 0 when every row passes."""
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise PipelineError(f"unknown component(s) {unknown}; choose from {sorted(CHECKS)}")
    rows = []
    for row in run_checks(only):
        rows.append(row)
        print(f"  {row.component:20s} {row.precision}: rel {row.rel:.2e} ({'pass' if row.passed else 'FAIL'})",
              flush=True)
    print(table(rows))
    failed = [f"{r.component} {r.precision}" for r in rows if not r.passed]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1
