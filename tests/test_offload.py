"""Block offloading (``helios_jax.models.offload``): the blocks' params in pinned host memory, streamed to the
device a layer ahead, give the resident model's numbers; so do the text encoder's (its layers streamed, its token
embedding looked up row by row from host memory).

On the CPU, jax's device has the memory kinds ``device`` and ``pinned_host`` as a GPU does, so the program that
streams the layers runs here for real. The resident forward (nn.scan over the stacked params) is the reference,
itself tested against diffusers in test_transformer.py: float32, a tiny random model with three distinct layers
(so a layer fetched out of turn would show), relative L2 <= 1e-6 and max-abs <= 1e-5 of the velocity's scale
(the same arithmetic in another loop; only summation order may differ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import cli, demo, generate
from helios_jax.config import TransformerConfig, UMT5Config
from helios_jax.models import offload, umt5
from helios_jax.models.transformer import HeliosTransformer, init_params, text_kv
from helios_jax.pipeline import HeliosPipeline

CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=32, rope_dim=(10, 10, 12), in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=48, num_layers=3)
REL, ABS = 1e-6, 1e-5


def _inputs(batch: int = 2) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 5)
    inputs = {
        "hidden_states": jax.random.normal(keys[0], (batch, 4, 2, 4, 6)),
        "timestep": jnp.array([700.0, 300.0][:batch]),
        "encoder_hidden_states": jax.random.normal(keys[1], (batch, 5, 16)),
        "indices_hidden_states": jnp.array([[3, 4]]),
    }
    for i, (name, frames) in enumerate((("short", 1), ("mid", 2))):
        inputs[f"latents_history_{name}"] = jax.random.normal(keys[2 + i], (batch, 4, frames, 4, 6))
        inputs[f"indices_latents_history_{name}"] = jnp.arange(frames)[None]
    return inputs


def _close(out, ref) -> None:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.linalg.norm(out - ref) <= REL * np.linalg.norm(ref)
    assert np.abs(out - ref).max() <= ABS * np.abs(ref).max()


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(1))


def _forward(params, inputs, streamed: bool, with_text_kv: bool = True):
    def run(variables, inputs):
        kv = text_kv(CFG, variables, inputs["encoder_hidden_states"], offload=streamed) if with_text_kv else None
        return HeliosTransformer(CFG, offload=streamed).apply(variables, **inputs, text_kv=kv)
    return jax.jit(run)({"params": params}, inputs)


def test_blocks_live_in_pinned_host_memory_and_the_rest_on_the_device(params):
    hosted = offload.to_host(params)
    kinds = {path[0].key: leaf.sharding.memory_kind for path, leaf in jax.tree_util.tree_leaves_with_path(hosted)}
    assert kinds["blocks"] == "pinned_host"
    assert kinds["patch_embedding"] == kinds["proj_out"] == "device"


def test_streamed_blocks_give_the_resident_forward(params):
    """With the text K/V streamed once (as the pipeline runs it) and with the blocks projecting the text themselves."""
    inputs = _inputs()
    reference = _forward(params, inputs, streamed=False)
    for with_text_kv in (True, False):
        _close(_forward(offload.to_host(params), inputs, streamed=True, with_text_kv=with_text_kv), reference)


@pytest.mark.parametrize("model_type", ["umt5", "t5"])
def test_streamed_text_encoder_gives_the_resident_one(model_type):
    """UMT5 (a bias table per layer, streamed with its layer) and T5 (one table, kept on the device): three distinct
    layers, a padded prompt, the same tolerances."""
    cfg = UMT5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=3, num_heads=2, model_type=model_type)
    params = jax.jit(umt5.init_params, static_argnums=0)(cfg, jax.random.key(2))
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    reference = jax.jit(umt5.UMT5Encoder(cfg).apply)({"params": params}, ids, mask)
    hosted = offload.to_host(params, umt5.is_hosted_leaf)
    kinds = {path: leaf.sharding.memory_kind for path, leaf in jax.tree_util.tree_leaves_with_path(hosted)}
    assert {kind for path, kind in kinds.items() if path[1].key in ("block", "embed_tokens")} == {"pinned_host"}
    assert {kind for path, kind in kinds.items() if path[1].key not in ("block", "embed_tokens")} == {"device"}
    _close(jax.jit(umt5.UMT5Encoder(cfg, offload=True).apply)({"params": hosted}, ids, mask), reference)


def test_offload_mode_is_checked():
    with pytest.raises(ValueError, match="offload = 'layers'"):
        offload.check_mode("layers")


def test_the_pipeline_loads_the_blocks_into_pinned_host_memory():
    """``from_pretrained(offload="blocks")`` places each block leaf on the host as it is read, and its chunk
    program streams them (the streamed forward itself is checked above; a whole video costs a minute here)."""
    pipe = HeliosPipeline.from_pretrained(demo.demo_checkpoint(), dtype=jnp.float32, compilation_cache=False,
                                          offload="blocks")
    kinds = {name: {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}
             for name, tree in pipe.transformer_params.items()}
    assert kinds.pop("blocks") == {"pinned_host"}
    assert set().union(*kinds.values()) == {"device"}
    assert pipe._model_fn.model.offload and pipe._context_fn.offload
    encoder = pipe.prompt_encoder.params["encoder"]
    assert {leaf.sharding.memory_kind for name in ("block", "embed_tokens") for leaf in jax.tree.leaves(encoder[name])
            } == {"pinned_host"}
    assert pipe.prompt_encoder.offload and pipe.prompt_encoder._encode.args[0].offload


def test_generate_passes_offload_and_the_vae_dtype(tmp_path, monkeypatch):
    """``generate --offload blocks --vae_dtype bf16`` (the 12 GB card's settings) reaches from_pretrained as such."""
    class Loaded(Exception):
        pass

    def from_pretrained(folder, **kwargs):
        raise Loaded(kwargs)

    monkeypatch.setattr(HeliosPipeline, "from_pretrained", from_pretrained)
    args = cli.parser().parse_args(["generate", "--output", str(tmp_path / "v.mp4"), "--offload", "blocks",
                                    "--vae_dtype", "bf16"])
    with pytest.raises(Loaded) as loaded:
        generate.run(args)
    assert loaded.value.args[0]["offload"] == "blocks" and loaded.value.args[0]["vae_dtype"] == jnp.bfloat16
