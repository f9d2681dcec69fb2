"""``attention(..., impl="splash")``: jax's Pallas TPU splash kernel behind the one dispatch, run on the CPU in
Pallas interpret mode (the same kernel code a TPU compiles with Mosaic; interpret mode pads nothing for us, so a
padded key that leaked into a real row changes the numbers).

Shapes are small (2 heads, ragged 200-300 tokens, head_dim 64 or 128), so each case still spans several 128-row
tiles plus a padded tail. References and tolerances (relative L2 ``rel`` and max-abs ``abs`` errors):
- forward, float32: float64 numpy softmax attention on the same inputs; rel <= 1e-5, abs <= 1e-5 (seen ~4e-7);
- forward, bfloat16: the float64 reference on the same bf16-rounded inputs; the error is at most twice XLA's own
  bf16 attention's error there (the house rule for bf16, docs/design.md), and rel <= 1e-2;
- gradients (``jax.grad`` through the kernel's custom VJP): XLA's attention differentiated in float32 at full
  precision; float32 rel <= 1e-5 (seen ~4e-7); bfloat16 at most twice XLA's own bf16 gradient's error, rel <= 2e-2;
- under a mesh (4 CPU devices in a subprocess: Ulysses, the K/V all-gather, a batch x heads split, a caller's own
  shard_map): the same float32 forward tolerance against XLA's attention without a mesh;
- the tiny DiT with impl="splash" against impl="xla": rel <= 1e-5, abs <= 1e-5 of the output's scale.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parallel_run import ROOT, rel_err, worker_env

from helios_jax.config import TransformerConfig
from helios_jax.models import attention as dispatch, splash
from helios_jax.models.transformer import HeliosTransformer, init_params

FP32_TOL = 1e-5


def qkv(seed: int, batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, dtype) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((batch, q_len, heads, head_dim), (batch, kv_len, heads, head_dim), (batch, kv_len, heads, head_dim))
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, shapes))


def reference(q, k, v, mask=None) -> np.ndarray:
    """Softmax attention in float64 numpy, (B, T, N, H) layout; ``mask`` (B or 1, 1, Tq, Tk), True = attend."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqnh,bknh->bnqk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)


def packed_ids(batch: int, tokens: int) -> jax.Array:
    """Three segments per sample, of different lengths per sample (a packed stage-2 batch)."""
    cuts = [(tokens // 3, tokens // 2), (tokens // 5, 2 * tokens // 3)][:batch]
    return jnp.asarray([np.searchsorted(np.asarray(c), np.arange(tokens), side="right") for c in cuts], jnp.int32)


def splash_fn(**kwargs):
    return jax.jit(lambda q, k, v: dispatch.attention(q, k, v, impl="splash", **kwargs))


@pytest.mark.parametrize("case", ["self, 200 tokens, segment ids", "cross, 300 queries x 77 keys"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_against_float64_on_ragged_lengths(case, dtype):
    self_attention = case.startswith("self")
    q_len, kv_len, head_dim = (200, 200, 128) if self_attention else (300, 77, 64)
    q, k, v = qkv(q_len + kv_len, 2, q_len, kv_len, 2, head_dim, dtype)
    ids = packed_ids(2, q_len) if self_attention else None
    mask = None if ids is None else ids[:, None, :, None] == ids[:, None, None, :]
    out = splash_fn(segment_ids=ids)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(q, k, v, mask)
    rel, abs_err = rel_err(np.asarray(out, np.float32), ref)
    if dtype == jnp.float32:
        assert rel <= FP32_TOL and abs_err <= FP32_TOL, (rel, abs_err)
    else:
        xla = dispatch.attention(q, k, v, impl="xla", segment_ids=ids)
        xla_rel, xla_abs = rel_err(np.asarray(xla, np.float32), ref)
        assert rel <= max(2 * xla_rel, 1e-3) and abs_err <= max(2 * xla_abs, 1e-2) and rel <= 1e-2, \
            (rel, abs_err, xla_rel, xla_abs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_against_xla_with_segment_ids(dtype):
    q, k, v = qkv(7, 2, 230, 230, 2, 64, dtype)
    ids = packed_ids(2, 230)
    cotangent = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)

    def grads(impl, *xs):
        loss = lambda q, k, v: jnp.sum(dispatch.attention(q, k, v, impl=impl, segment_ids=ids).astype(jnp.float32)  # noqa: E731
                                       * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*xs)

    wide = tuple(x.astype(jnp.float32) for x in (q, k, v))
    ref = grads("xla", *wide)
    ours = grads("splash", q, k, v)
    if dtype == jnp.bfloat16:
        xla = grads("xla", q, k, v)
    for i, name in enumerate("qkv"):
        assert ours[i].dtype == dtype and np.isfinite(np.asarray(ours[i], np.float32)).all()
        rel, abs_err = rel_err(np.asarray(ours[i], np.float32), np.asarray(ref[i]))
        if dtype == jnp.float32:
            assert rel <= FP32_TOL and abs_err <= FP32_TOL, (name, rel, abs_err)
        else:
            xla_rel, _ = rel_err(np.asarray(xla[i], np.float32), np.asarray(ref[i]))
            assert rel <= max(2 * xla_rel, 2e-3) and rel <= 2e-2, (name, rel, xla_rel)


def test_key_mask_removes_keys_and_padding_is_invisible():
    """The context split's key mask (``parallel.context.key_mask``: real keys first) and the tail padding: the
    masked keys are given values far from the rest, so a leak shows."""
    q, k, v = qkv(3, 1, 140, 140, 2, 64, jnp.float32)
    v = v.at[:, 131:].set(1e3)
    mask = (jnp.arange(140) < 131)[None, None, None, :]
    out = splash_fn(mask=mask)(q, k, v)
    rel, abs_err = rel_err(np.asarray(out), reference(q, k, v, mask))
    assert rel <= FP32_TOL and abs_err <= FP32_TOL, (rel, abs_err)


def test_bad_input_is_one_clear_error_before_any_work():
    q, k, v = qkv(0, 1, 8, 8, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="splash attention kernel takes no bias"):
        dispatch.attention(q, k, v, impl="splash", bias=jnp.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match=r"a mask only of keys, \(B or 1, 1, 1, Tk\)"):
        dispatch.attention(q, k, v, impl="splash", mask=jnp.ones((1, 1, 8, 8), bool))
    with pytest.raises(ValueError, match="segment_ids: the kv ids must be an integer array"):
        dispatch.attention(q, k, v, impl="splash", segment_ids=(jnp.zeros((1, 8), int), jnp.zeros((1, 9), int)))
    with pytest.raises(ValueError, match="one dtype among"):
        splash.splash_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="multiples of 128"):
        splash.Tiles(100, 128, 128, "")


def test_block_table_covers_helios_shapes_with_little_padding():
    """Every Helios shape (self-attention at 2,940 / 4,560 / 11,040 tokens, cross-attention to 512 text tokens, also
    as a context split of 8 pads them) finds its table row, whose tiles the kernel accepts and which pads each
    axis by at most 5%; a shape not in the table gets the rule's tiles."""
    for tokens in (2940, 4560, 11040):
        for context in (1, 8):
            padded = -(-tokens // context) * context
            for kv_len in (padded, 512):
                tiles = splash.tiles_for(padded, kv_len)
                assert tiles in splash.BLOCK_TABLE.values() and tiles.reason
                for length, tile in ((padded, tiles.q), (kv_len, tiles.kv)):
                    assert (-(-length // tile) * tile - length) <= 0.05 * length, (tokens, kv_len, tiles)
                tiles.block_sizes()  # the kernel's own dataclass accepts them
    rule = splash.tiles_for(200, 77)
    assert (rule.q, rule.kv, rule.kv_compute) == (128, 128, 128) and "not in the table" in rule.reason
    assert splash.tiles_for(8640, 512).q == 512  # 8,704 = 17 x 512: 0.7% padding


def test_default_impl_is_splash_on_a_tpu():
    assert dispatch.default_impl(jnp.bfloat16, "tpu") == dispatch.default_impl(jnp.float32, "tpu") == "splash"
    assert dispatch.default_impl(jnp.bfloat16, "cpu") == "xla"


def test_under_meshes_of_four_cpu_devices():
    """Ulysses (data=2 x context=2; its all-to-alls in the program), the K/V all-gather (context=4 > 2 heads), the
    batch x heads split of a mesh without context (data=2 x tensor=2) and a caller's own shard_map: each equals
    XLA's attention without a mesh, and the gradient under the batch x heads split too."""
    proc = subprocess.run([sys.executable, "-c", MESH_WORKER], env=worker_env(4), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"ulysses", "all-gather", "data x tensor", "caller's shard_map", "grad data x tensor"}
    for name, (rel, abs_err) in results.items():
        assert rel <= FP32_TOL and abs_err <= FP32_TOL, (name, rel, abs_err)


MESH_WORKER = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
jax.config.update("jax_default_matmul_precision", "highest")
from helios_jax import parallel
from helios_jax.models.attention import attention

assert jax.device_count() == 4
keys = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(key, (2, 200, 4, 64), jnp.float32) for key in keys[:3])
cot = jax.random.normal(keys[3], q.shape)
results = {}

def err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(np.abs(out - ref).max())

def run(name, sizes, q, k, v):
    ref = attention(q, k, v, impl="xla")
    with jax.set_mesh(parallel.make_mesh(**sizes)):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, impl="splash"))
        compiled = fn.lower(q, k, v).compile()
        results[name] = err(compiled(q, k, v), ref)
    return compiled.as_text()

assert "all-to-all" in run("ulysses", {"data": 2, "context": 2}, q, k, v)
assert "all-gather" in run("all-gather", {"context": 4}, q[:, :, :2], k[:, :, :2], v[:, :, :2])
run("data x tensor", {"data": 2, "tensor": 2}, q, k, v)

mesh = parallel.make_mesh(data=2, tensor=2)
spec = P("data", None, "tensor", None)
inner = jax.shard_map(lambda q, k, v: attention(q, k, v, impl="splash"), mesh=mesh, in_specs=spec, out_specs=spec,
                      check_vma=False)
results["caller's shard_map"] = err(jax.jit(inner)(q, k, v), attention(q, k, v, impl="xla"))

def grad(impl):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl) * cot), argnums=(0, 1, 2))
ref = jax.jit(grad("xla"))(q, k, v)
with jax.set_mesh(mesh):
    ours = jax.jit(grad("splash"))(q, k, v)
results["grad data x tensor"] = max(err(a, b) for a, b in zip(ours, ref))
print(json.dumps(results))
'''


CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=32, rope_dim=(10, 10, 12), in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=48, num_layers=2, is_amplify_history=True)


def test_dit_forward_with_splash_equals_xla():
    """The tiny DiT (noisy and history tokens, text cross-attention to 5 tokens, no length a multiple of 128) gives
    the same velocity through either backend."""
    keys = jax.random.split(jax.random.key(0), 6)
    inputs = {
        "hidden_states": jax.random.normal(keys[0], (1, 4, 2, 4, 6)),
        "timestep": jnp.array([700.0]),
        "encoder_hidden_states": jax.random.normal(keys[1], (1, 5, 16)),
        "indices_hidden_states": jnp.array([[3, 4]]),
    }
    for i, (name, frames) in enumerate((("short", 1), ("mid", 2), ("long", 4))):
        inputs[f"latents_history_{name}"] = jax.random.normal(keys[2 + i], (1, 4, frames, 4, 6))
        inputs[f"indices_latents_history_{name}"] = jnp.arange(frames)[None]
    variables = {"params": init_params(CFG, jax.random.key(1))}

    def forward(impl):
        return jax.jit(lambda v, x: HeliosTransformer(CFG, attention_impl=impl).apply(v, **x))(variables, inputs)

    ours, ref = forward("splash"), forward("xla")
    rel, abs_err = rel_err(np.asarray(ours), np.asarray(ref))
    assert rel <= FP32_TOL and abs_err <= FP32_TOL * float(jnp.max(jnp.abs(ref))), (rel, abs_err)
