"""``helios-jax verify --checkpoint DIR``: a real checkpoint's own components against the reference.

Where ``helios-jax verify`` checks the port's code on tiny random models, this checks a downloaded (or
converted, or fine-tuned) checkpoint: every tensor of its transformer, VAE and text encoder is read once,
one at a time, and must fit its file and be finite and of a sane magnitude (a corrupted tensor is named
by its key); then the same files run through diffusers / transformers and through helios-jax, in the
dtype of the files, and the outputs are compared.

What it holds in memory, so that a 14B checkpoint verifies on a machine with 24 GiB:

- the scan: one tensor at a time (the largest of the 14B DiT is 140 MB in bf16);
- the DiT: only the chosen blocks (``--blocks``, default the first two and the last) and the small
  non-block layers, copied into a temporary folder as a model of ``num_layers=len(blocks)`` that both
  sides load (about 2 GB in bf16 for three 14B blocks, on each side);
- the VAE (0.5 GB) whole, on one 9-frame 32x32 clip: the first frame and two 4-frame causal chunks;
- the text encoder (umt5-xxl, 11 GB in bf16) whole, the reference first, freed before ours loads.

The reference (torch, diffusers, transformers) is imported when the command runs, never by the generation path.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import math
import os
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import helios_jax as hj
from helios_jax.checkpoint import PipelineError, read_checkpoint_configs
from helios_jax.convert import CheckpointError, open_source
from helios_jax.convert.export import save_safetensors
from helios_jax.convert.sources import TensorError
from helios_jax.models import vae as vae_lib
from helios_jax.progress import track
from helios_jax.verify import Row, _errors, _numpy, _reference, jax_inputs, table, transformer_inputs

DEFAULT_BLOCKS = (0, 1, -1)
# A weight larger than this is not a trained value but damaged bytes (a flipped exponent bit of a bf16 weight
# gives ~1e38): trained Wan / UMT5 weights stay below ~1e3, and float16, a dtype these models run in, ends at 65504.
MAX_WEIGHT = 65504.0
# The dtypes a component's weights may be stored in; both sides compute in it (torch's dtype of the same name).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FLOATS = ("float64", "float32", "float16", "bfloat16")
SCAN_SLICE = 1 << 24  # values widened to float32 at a time by the scan (64 MB)
PROMPT = "A red fox trots through fresh snow at dawn, its breath misting in the cold air."
VAE_CLIP = (9, 32, 32)  # frames, height, width: one first frame and two 4-frame chunks through the causal caches


def tolerance(dtype: Any, depth: int, width: int) -> float:
    """The bound on the relative L2 error of two implementations run in ``dtype`` through ``depth`` stages (a DiT
    or UMT5 block, a VAE convolution) whose longest dot product sums ``width`` terms.

    Each stage rounds its activations to ``dtype``, and the two sides round at different places (fused
    kernels, another summation order): a relative difference of about ``eps(dtype)`` per stage. Each dot
    product accumulates in float32 on both sides (16-bit matmuls too) in its own order: about
    ``eps(float32) * sqrt(width)``. The stages' differences are independent, so they add in quadrature
    (``sqrt(depth)``); 8 is the margin over that expectation (attention's softmax amplifies its logits' error).
    A wrong or damaged weight gives an error of order 1, far above this: three bf16 blocks of the 14B DiT
    allow 0.11, float32 ones 2e-4."""
    eps, eps32 = float(jnp.finfo(dtype).eps), float(jnp.finfo(jnp.float32).eps)
    return 8.0 * math.sqrt(max(depth, 1)) * (eps + eps32 * math.sqrt(width))


@dataclasses.dataclass(frozen=True)
class Problem:
    """A tensor that cannot be trusted: where it is and why."""

    component: str
    file: str
    key: str | None  # None when the file itself is unreadable
    reason: str

    def __str__(self) -> str:
        where = f"{self.component}/{os.path.basename(self.file)}"
        return f"{where}: {self.key!r}: {self.reason}" if self.key else f"{where}: {self.reason}"


def _weight_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def _damage(values: np.ndarray) -> str | None:
    """What is wrong with a float tensor's values, if anything; read a slice at a time in float32, so the
    scan never holds more than the tensor itself (umt5-xxl's embedding is 2 GB in bf16, 4 GB widened)."""
    flat, bad, largest = values.reshape(-1), 0, 0.0
    for start in range(0, flat.size, SCAN_SLICE):
        part = flat[start:start + SCAN_SLICE].astype(np.float32)
        finite = np.isfinite(part)
        bad += int(part.size - np.count_nonzero(finite))
        largest = max(largest, float(np.max(np.abs(part), initial=0.0, where=finite)))
    if bad:
        return f"{bad} of {flat.size} values are NaN or infinite"
    if largest > MAX_WEIGHT:
        return f"holds {largest:.3g}, beyond any trained weight (limit {MAX_WEIGHT:g}): damaged bytes"
    return None


def scan_tensors(component: str, folder: str) -> list[Problem]:
    """Read every tensor of a component folder once, one at a time: each must fit its file (a header entry
    whose shape or byte range is wrong names the tensor), and a float one must be finite and below MAX_WEIGHT."""
    problems, files = [], _weight_files(folder)
    for file in track(files, len(files), f"scanning {component}", unit="file"):
        try:
            source = open_source(file)
        except TensorError as err:
            problems.append(Problem(component, file, err.key, err.problem))
            continue
        except CheckpointError as err:
            problems.append(Problem(component, file, None, str(err).replace(f"{file}: ", "")))
            continue
        for key in source.keys():
            if source.dtype(key).name in FLOATS:
                try:
                    reason = _damage(source.read(key))
                except TensorError as err:
                    reason = err.problem
                if reason:
                    problems.append(Problem(component, file, key, reason))
    return problems


def file_dtype(folder: str) -> str:
    """The dtype the component's weights are stored in: that of its largest floating tensor."""
    source = open_source(folder)
    floats = [k for k in source.keys() if source.dtype(k).name in DTYPES]
    if not floats:
        raise CheckpointError(f"{folder} holds no float32, bfloat16 or float16 tensor")
    return source.dtype(max(floats, key=lambda k: math.prod(source.shape(k)))).name


def choose_blocks(blocks: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The block indices (negative counts from the end), checked, in order and without repeats."""
    wrong = [b for b in blocks if not -num_layers <= b < num_layers]
    if wrong or not blocks:
        raise PipelineError(f"--blocks {list(blocks)}: the transformer has {num_layers} blocks, so each must be in "
                            f"{-num_layers}..{num_layers - 1} (negative counts from the end), and at least one is needed")
    return tuple(sorted({b % num_layers for b in blocks}))


def write_block_subset(folder: str, blocks: tuple[int, ...], out: str) -> str:
    """A transformer folder holding only ``blocks`` (renumbered 0..k-1) and the non-block layers, with its
    config's ``num_layers = k``: the model that both sides build, read tensor by tensor from the shards."""
    source = open_source(folder)
    renumber = {str(b): str(i) for i, b in enumerate(blocks)}
    tensors = {}
    for key in source.keys():
        parts = key.split(".")
        if parts[0] == "blocks":
            if parts[1] not in renumber:
                continue
            parts[1] = renumber[parts[1]]
        tensors[".".join(parts)] = source.read(key)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, "num_layers": len(blocks)}, f)
    save_safetensors(tensors, os.path.join(out, "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    return out


def _longest_sum(folder: str, prefix: str = "") -> int:
    """The longest dot product of a component's weights under ``prefix``: a weight (out, in, *kernel) sums
    ``in * prod(kernel)`` terms per output."""
    source = open_source(folder)
    return max((math.prod(source.shape(k)[1:]) for k in source.keys()
                if k.startswith(prefix) and len(source.shape(k)) >= 2), default=1)


def _conv_count(folder: str, prefix: str) -> int:
    source = open_source(folder)
    return sum(1 for k in source.keys() if k.startswith(prefix) and len(source.shape(k)) == 5)


def check_transformer(torch: Any, diffusers: Any, transformers: Any, folder: str, work: str,
                      blocks: tuple[int, ...]) -> list[Row]:
    """The chosen DiT blocks (with the embeddings and the output layer) on a chunk with history."""
    cfg = hj.loading.COMPONENTS["transformer"].read_config(folder)
    chosen = choose_blocks(blocks, cfg.num_layers)
    subset = write_block_subset(folder, chosen, os.path.join(work, "transformer"))
    name = file_dtype(subset)
    dtype, torch_dtype = DTYPES[name], getattr(torch, name)
    if cfg.is_amplify_history and name != "float32":
        # diffusers' 16-bit attention rejects the float32 keys its own history scale makes (history_key_scale is
        # kept in float32), so the reference runs the same weights, exactly widened, in float32; ours stays 16-bit.
        # One side rounding instead of two: the bound below still holds.
        torch_dtype, name = torch.float32, f"{name} (reference float32)"
    inputs = transformer_inputs(torch, cfg.in_channels, cfg.text_dim)
    reference = diffusers.HeliosTransformer3DModel.from_pretrained(subset, torch_dtype=torch_dtype).eval()
    with torch.no_grad():
        ref = _numpy(reference(**{k: v.to(torch_dtype) if v.is_floating_point() and k != "timestep" else v
                                  for k, v in inputs.items()}, return_dict=False)[0])
    del reference  # the reference's model is freed before ours loads: the two are never in memory together
    gc.collect()
    sub_cfg, params = hj.load_transformer(subset, dtype)
    out = jax.jit(hj.HeliosTransformer(sub_cfg).apply)({"params": params}, **jax_inputs(inputs, dtype))
    rel, max_abs = _errors(out.astype(jnp.float32), ref)
    label = f"transformer blocks {','.join(map(str, chosen))}"
    return [Row(label, name, rel, max_abs, tolerance(dtype, len(chosen), _longest_sum(subset, "blocks.")))]


def check_vae(torch: Any, diffusers: Any, transformers: Any, folder: str, work: str,
              blocks: tuple[int, ...]) -> list[Row]:
    """The VAE encoding one clip (its posterior's mean) and decoding the reference's latents of it."""
    name = file_dtype(folder)
    dtype, torch_dtype = DTYPES[name], getattr(torch, name)
    frames, height, width = VAE_CLIP
    video = np.random.default_rng(0).uniform(-1, 1, (1, 3, frames, height, width)).astype(np.float32)
    reference = diffusers.AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch_dtype).eval()
    with torch.no_grad():
        latents = reference.encode(torch.from_numpy(video).to(torch_dtype)).latent_dist.mode()
        ref_decoded = _numpy(reference.decode(latents).sample)
    ref_latents = _numpy(latents)
    del reference, latents
    gc.collect()
    cfg, params = hj.load_vae(folder, dtype)
    model = vae_lib.WanVAE(cfg, dtype)
    encoded = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode").mode())(params, jnp.asarray(video))
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(
        params, jnp.asarray(ref_latents, dtype))
    rows = []
    for part, out, ref, prefix in (("encode", encoded, ref_latents, "encoder."),
                                   ("decode", decoded, ref_decoded, "decoder.")):
        rel, max_abs = _errors(np.asarray(out.astype(jnp.float32)), ref)
        limit = tolerance(dtype, _conv_count(folder, prefix), _longest_sum(folder, prefix))
        rows.append(Row(f"vae {part} ({frames}x{height}x{width})", name, rel, max_abs, limit))
    return rows


def check_text_encoder(torch: Any, diffusers: Any, transformers: Any, folder: str, work: str,
                       blocks: tuple[int, ...]) -> list[Row]:
    """A prompt through the checkpoint's tokenizer (ours against transformers', token for token) and its
    text encoder; the reference model is freed before ours loads."""
    from helios_jax.tokenizer import PromptTokenizer

    checkpoint = os.path.dirname(folder)
    tokenizer_folder = os.path.join(checkpoint, "tokenizer")
    length = 32
    ids, mask = PromptTokenizer.from_pretrained(tokenizer_folder)([PROMPT], length)
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)(
        [PROMPT], padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
        return_attention_mask=True, return_tensors="np")
    differ = int(np.count_nonzero(theirs["input_ids"] != ids))
    rows = [Row("tokenizer (token ids)", "ids", differ / ids.size, float(differ), 0.0)]
    name = file_dtype(folder)
    dtype, torch_dtype = DTYPES[name], getattr(torch, name)
    reference = transformers.UMT5EncoderModel.from_pretrained(folder, torch_dtype=torch_dtype).eval()
    with torch.no_grad():
        ref = _numpy(reference(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).last_hidden_state)
    del reference  # the reference's model is freed before ours loads: the two are never in memory together
    gc.collect()
    cfg, params = hj.load_text_encoder(folder, dtype)
    out = jax.jit(hj.UMT5Encoder(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    rel, max_abs = _errors(np.asarray(out.astype(jnp.float32)), ref)
    rows.append(Row("text_encoder", name, rel, max_abs, tolerance(dtype, cfg.num_layers, _longest_sum(folder))))
    return rows


CHECKS = {"transformer": check_transformer, "vae": check_vae, "text_encoder": check_text_encoder}


def check_folder(checkpoint: str, only: tuple[str, ...]) -> tuple[str, ...]:
    """The components to check, after one clear error for a folder that is not a Helios checkpoint."""
    if not os.path.isdir(checkpoint):
        raise PipelineError(f"--checkpoint {checkpoint}: no such folder")
    read_checkpoint_configs(checkpoint)
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise PipelineError(f"--only {unknown} with --checkpoint: a checkpoint's components are {list(CHECKS)}")
    chosen = tuple(c for c in CHECKS if not only or c in only)
    for component in chosen:
        if not _weight_files(os.path.join(checkpoint, component)):
            raise PipelineError(f"{checkpoint}/{component} holds no .safetensors file: verify reads diffusers' "
                                "safetensors folders (convert a pickled or orbax checkpoint back first)")
    return chosen


def verify_checkpoint(checkpoint: str, only: tuple[str, ...] = (),
                      blocks: tuple[int, ...] = DEFAULT_BLOCKS) -> Iterator[Row | Problem]:
    """Every tensor's problems, then the comparison rows, component by component. A component with a
    problem is not compared (its files would not load, or would load damaged values)."""
    components = check_folder(checkpoint, only)
    if "transformer" in components:
        choose_blocks(blocks, hj.loading.COMPONENTS["transformer"].read_config(
            os.path.join(checkpoint, "transformer")).num_layers)
    torch, diffusers, transformers = _reference()
    for component in components:
        folder = os.path.join(checkpoint, component)
        problems = scan_tensors(component, folder)
        yield from problems
        if problems:
            continue
        # Full float32 products on our side: a GPU's default TF32 matmuls (10-bit mantissa) would be measured
        # against the reference's true float32 ones, which are what the bound assumes. 16-bit inputs are unaffected.
        with tempfile.TemporaryDirectory() as work, jax.default_matmul_precision("highest"):
            rows = CHECKS[component](torch, diffusers, transformers, folder, work, blocks)
        yield from rows


def run(checkpoint: str, only: tuple[str, ...] = (), blocks: tuple[int, ...] = DEFAULT_BLOCKS) -> int:
    """Print each damaged tensor and the table; exit status 0 when every tensor is sound and every row passes."""
    rows, problems = [], []
    for item in verify_checkpoint(os.fspath(checkpoint), only, blocks):
        if isinstance(item, Problem):
            problems.append(item)
            print(f"  DAMAGED {item}", flush=True)
        else:
            rows.append(item)
            print(f"  {item.component:30s} {item.precision}: rel {item.rel:.2e} "
                  f"({'pass' if item.passed else 'FAIL'})", flush=True)
    if rows:
        print(table(rows))
    failed = [f"{r.component} {r.precision}" for r in rows if not r.passed]
    failed += [f"tensor {p.key or os.path.basename(p.file)} of {p.component}" for p in problems]
    skipped = sorted({p.component for p in problems})
    if skipped:
        print(f"not compared (damaged tensors): {', '.join(skipped)}")
    print("checkpoint verified" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1
