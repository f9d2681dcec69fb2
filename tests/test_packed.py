"""The packed (NaViT) stage-2 forward: segment-id attention, PackedHeliosTransformer, packed_pyramid_loss.

The chain to the reference: the packed forward's per-segment outputs equal separate HeliosTransformer
forwards of each segment with the same history (here), and that forward equals diffusers'
HeliosTransformer3DModel (tests/test_transformer.py). Tiny fp32 configs; tolerances are relative L2.
Compiling dominates these tests (each program runs once), so their programs compile at XLA's lowest
optimisation level.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helios_jax.config import TransformerConfig
from helios_jax.models import lora as lora_lib, transformer as dit
from helios_jax.models.attention import attention
from helios_jax.models.packed import PackedHeliosTransformer, PackedLayout, packed_like
from helios_jax.training import losses as L

REL_TOL = 1e-5
CONFIG = TransformerConfig(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                           freq_dim=32, ffn_dim=128, num_layers=2, rope_dim=(12, 10, 10))
# The non-default branches: history tokens modulated with the segment's timestep and cross-attending.
FLIPPED = dataclasses.replace(CONFIG, zero_history_timestep=False, guidance_cross_attn=False)
SPEC = lora_lib.LoraSpec(rank=4, patch_embedding=True, history_patches=True)


def rel_l2(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def conditioning(key, batch: int, frames: int, terms: tuple[str, ...], hw=(8, 8)) -> dict[str, jax.Array]:
    """Text and the history inputs of the official 29-index layout (x0 and newest short, mid, long)."""
    keys = jax.random.split(key, 4)
    frames_of = {"short": 2, "mid": 2, "long": 4}
    indices = {"short": [0, 19], "mid": [17, 18], "long": [1, 2, 3, 4]}
    cond = {"encoder_hidden_states": jax.random.normal(keys[0], (batch, 5, CONFIG.text_dim)),
            "indices_hidden_states": jnp.arange(20, 20 + frames)[None]}
    for k, name in zip(keys[1:], terms):
        cond[f"latents_history_{name}"] = jax.random.normal(k, (batch, 16, frames_of[name], *hw))
        cond[f"indices_latents_history_{name}"] = jnp.asarray([indices[name]])
    return cond


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.partial(jit, static_argnums=0)
def plain_forward(cfg, variables, x, t, cond, lora_scale=None):
    return dit.HeliosTransformer(cfg).apply(variables, x, t, **cond, lora_scale=lora_scale)


@functools.partial(jit, static_argnums=0)
def packed_forward(cfg, variables, xs, ts, cond, lora_scale=None):
    return PackedHeliosTransformer(cfg).apply(variables, list(xs), list(ts), **cond, lora_scale=lora_scale)


@pytest.fixture(scope="module")
def params():
    return jit(functools.partial(dit.init_params, CONFIG))(jax.random.key(0))


# ---------------------------------------------------------------------------------------------------
# segment-id attention


def masked_reference(q, k, v, q_ids, kv_ids, key_mask=None):
    """float64 numpy: every (batch, query) attends with softmax over exactly the keys of its segment id."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            keys = np.flatnonzero((kv_ids[b] == q_ids[b, i]) & (True if key_mask is None else key_mask))
            logits = np.einsum("nh,tnh->nt", q[b, i], k[b, keys]) / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, i] = np.einsum("nt,tnh->nh", p / p.sum(-1, keepdims=True), v[b, keys])
    return out


def test_segment_id_attention_against_hand_masked_reference():
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    ids = np.array([[0, 0, 1, 1, 1, 0, 2, 2, 2], [3, 3, 3, 3, 1, 1, 1, 1, 1]], np.int32)  # per sample, not contiguous
    q, k, v = (jax.random.normal(key, (2, 9, 2, 16)) for key in (kq, kk, kv))
    out = attention(q, k, v, impl="xla", segment_ids=jnp.asarray(ids))
    assert rel_l2(out, masked_reference(q, k, v, ids, ids)) <= REL_TOL
    # A (q ids, kv ids) pair of different lengths, one id row for the whole batch, and a key mask on top.
    q_ids, kv_ids = np.array([[0, 1, 1, 0]], np.int32), np.array([[1, 0, 0, 1, 1, 0, 1, 0, 1]], np.int32)
    key_mask = np.array([True, True, False, True, True, True, False, True, True])
    out = attention(q[:, :4], k, v, impl="xla", segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
                    mask=jnp.asarray(key_mask)[None, None, None])
    ref = masked_reference(q[:, :4], k, v, np.repeat(q_ids, 2, 0), np.repeat(kv_ids, 2, 0), key_mask)
    assert rel_l2(out, ref) <= REL_TOL
    # Without segments it is not that answer (the test can fail).
    assert rel_l2(attention(q, k, v, impl="xla"), masked_reference(q, k, v, ids, ids)) > 0.1


@pytest.mark.parametrize("ids, match", [
    (np.zeros((2, 8), np.int32), r"shape \(1 or B=2, 9\)"),
    (np.zeros((9,), np.int32), r"got shape \(9,\)"),
    (np.zeros((3, 9), np.int32), r"got shape \(3, 9\)"),
    (np.zeros((2, 9), np.float32), "integer array"),
    ((np.zeros((2, 9), np.int32),) * 3, "pair; got 3"),
])
def test_bad_segment_ids_are_one_clear_error(ids, match):
    q = jnp.zeros((2, 9, 2, 16))
    with pytest.raises(ValueError, match=match):
        attention(q, q, q, segment_ids=ids)


def test_segment_ids_refused_where_a_backend_has_none():
    q, ids = jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"kv ids must be .* pair when their lengths differ"):
        attention(q, jnp.zeros((1, 6, 2, 16)), jnp.zeros((1, 6, 2, 16)), segment_ids=ids)  # one array, Tq != Tk
    with pytest.raises(ValueError, match="pallas attention kernel has no segment ids"):
        attention(q, q, q, impl="pallas", segment_ids=ids)


# ---------------------------------------------------------------------------------------------------
# the packed forward


def test_packed_layout_by_hand():
    layout = PackedLayout(history_len=3, noisy_lens=(2, 4), zero_history=True)
    assert layout.length == 12
    assert layout.pieces() == ((3, 0), (2, 1), (3, 0), (4, 2))
    assert layout.noisy_spans() == ((3, 5), (8, 12))
    np.testing.assert_array_equal(layout.segment_ids(), [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    assert PackedLayout(3, (2, 4), zero_history=False).pieces() == ((3, 0), (2, 0), (3, 1), (4, 1))
    assert PackedLayout(0, (2, 4), zero_history=True).pieces() == ((2, 1), (4, 2))


def test_packed_module_has_the_plain_params_tree(params):
    cond = conditioning(jax.random.key(2), 1, 1, ("short", "mid", "long"), hw=(2, 2))
    x = jnp.zeros((1, 16, 1, 2, 2))
    shapes = jax.eval_shape(lambda key: PackedHeliosTransformer(CONFIG).init(key, [x], [jnp.zeros((1,))],
                                                                             **cond)["params"], jax.random.key(0))
    flat = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}
    assert flat == {path: leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}


CASES = {  # config, batch, frames, history terms, segment (H, W) sizes
    "batch1-full-history-pyramid": (CONFIG, 1, 3, ("short", "mid", "long"), [(4, 4), (8, 8), (8, 8)]),
    "batch2-no-history": (CONFIG, 2, 2, (), [(4, 6), (8, 4)]),
    "batch2-short-history-flipped-flags": (FLIPPED, 2, 2, ("short",), [(6, 8), (2, 2)]),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if i == 0 else pytest.mark.slow)  # 3 programs each
                                  for i, c in enumerate(CASES)])
def test_packed_outputs_equal_separate_forwards(params, case):
    cfg, batch, frames, terms, sizes = CASES[case]
    keys = jax.random.split(jax.random.key(3), len(sizes) + 2)
    cond = conditioning(keys[0], batch, frames, terms)
    xs = [jax.random.normal(k, (batch, 16, frames, h, w)) for k, (h, w) in zip(keys[2:], sizes)]
    ts = list(jax.random.uniform(keys[1], (len(sizes), batch), maxval=1000.0))
    variables = {"params": params}
    outs = packed_forward(cfg, variables, xs, ts, cond)
    assert len(outs) == len(sizes)
    separate = [plain_forward(cfg, variables, x, t, cond) for x, t in zip(xs, ts)]
    for out, ref in zip(outs, separate):
        assert out.shape == ref.shape
        assert rel_l2(out, ref) <= REL_TOL, (case, out.shape, rel_l2(out, ref))
    # The segments really differ (so a mix-up of their order or their timesteps would fail).
    if len(sizes) > 1 and sizes[-1] == sizes[-2]:
        assert rel_l2(outs[-1], outs[-2]) > 0.01


def test_bad_segment_list_is_one_clear_error(params):
    cond = conditioning(jax.random.key(4), 1, 1, ())
    x, t = jnp.zeros((1, 16, 1, 4, 4)), jnp.zeros((1,))
    model = PackedHeliosTransformer(CONFIG)
    with pytest.raises(ValueError, match="2 segments of latents and 1 timesteps"):
        model.apply({"params": params}, [x, x], [t], **cond)
    with pytest.raises(ValueError, match="must be lists"):
        model.apply({"params": params}, x, t, **cond)
    with pytest.raises(ValueError, match="timestep must have shape"):  # the plain forward's checks, per segment
        model.apply({"params": params}, [x, x], [t, jnp.zeros((2,))], **cond)
    with pytest.raises(ValueError, match="GAN hooks"):
        packed_like(dit.HeliosTransformer(CONFIG, hooks=(1,)))


# ---------------------------------------------------------------------------------------------------
# the packed stage 2-init loss and its LoRA gradient


def random_lora(params) -> dict:
    """A LoRA with every factor random (the official init has B = 0, whose A gradients would all be 0)."""
    lora = lora_lib.init_lora(SPEC, params, jax.random.key(5))
    leaves, tree = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.slow  # four forward-and-backward programs to compile
def test_packed_pyramid_loss_and_lora_grads_equal_the_mean_of_separate_ones(params):
    cond = conditioning(jax.random.key(7), 1, 3, ("short", "mid", "long"))
    target = jax.random.normal(jax.random.key(8), (1, 16, 3, 8, 8))
    examples = L.pyramid_examples(jax.random.key(9), target, sample_ratios=(1, 2, 1))  # stage_2_init's s0 s1 s1' s2
    assert [ex.noisy.shape[-1] for ex in examples] == [2, 4, 4, 8]

    def model_fn(lora, x, t, c):
        return dit.HeliosTransformer(CONFIG).apply({"params": params, "lora": lora}, x, t, **c,
                                                   lora_scale=SPEC.scale)

    def packed_fn(lora, xs, ts, c):
        return packed_like(dit.HeliosTransformer(CONFIG, remat=True)).apply({"params": params, "lora": lora}, xs, ts, **c,
                                                     lora_scale=SPEC.scale)

    lora = random_lora(params)
    packed, g_packed = jit(jax.value_and_grad(lambda p: L.packed_pyramid_loss(packed_fn, p, examples, cond)))(lora)
    # The separate forwards (mean_pyramid_loss is their mean, tests/test_training_losses.py): one program per shape.
    separate = jit(jax.value_and_grad(lambda p, ex: L.example_loss(model_fn, p, ex, cond)))
    losses, grads = zip(*(separate(lora, ex) for ex in examples))
    mean = np.mean([float(x) for x in losses])
    g_mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
    assert abs(float(packed) - mean) <= REL_TOL * abs(mean)
    flat_packed, flat_mean = traverse_util.flatten_dict(g_packed), traverse_util.flatten_dict(g_mean)
    assert flat_packed.keys() == flat_mean.keys() and len(flat_mean) == 40  # A and B of 16 linears, 4 patch convs
    for path, ref in flat_mean.items():
        assert float(jnp.linalg.norm(ref)) > 0, path
        assert rel_l2(flat_packed[path], ref) <= REL_TOL, (path, rel_l2(flat_packed[path], ref))
