"""helios_jax.parallel without a compile: meshes, their errors, and the sharding tables (one device here;
the 8-device checks run in a subprocess, see test_parallel_devices.py)."""

from __future__ import annotations

import jax
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec as P
from parallel_run import run_worker

from helios_jax import cli, demo, parallel
from helios_jax.models import transformer, umt5
from helios_jax.training import discriminator, trainer


def abstract(**sizes: int) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in parallel.AXES), parallel.AXES)


def test_make_mesh_on_all_devices_and_sizes_that_do_not_fit():
    n = len(jax.devices())
    mesh = parallel.make_mesh(data=n)
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor") and mesh.devices.shape == (n, 1, 1, 1)
    with pytest.raises(parallel.MeshError, match=rf"context={2 * n},tensor=1 has {2 * n} devices but {n} are given"):
        parallel.make_mesh(context=2 * n)
    with pytest.raises(parallel.MeshError, match="positive integers"):
        parallel.make_mesh(context=0)


def test_parse_mesh():
    assert parallel.parse_mesh("context=4,data=2") == {"context": 4, "data": 2}
    for bad in ("context=4,context=2", "ctx=4", "context", "context=x", ""):
        with pytest.raises(parallel.MeshError, match="--mesh"):
            parallel.parse_mesh(bad)


def test_check_mesh_rules():
    parallel.check_mesh(abstract(context=8), heads=40, tokens=(2940,))  # Ulysses; tokens get padded
    parallel.check_mesh(abstract(context=3), heads=40, tokens=(2940, 4560, 11040))  # K/V all-gather
    with pytest.raises(parallel.MeshError, match=r"context=3 divides neither the 40 heads .* \[4561\]"):
        parallel.check_mesh(abstract(context=3), heads=40, tokens=(4561, 2940))
    with pytest.raises(parallel.MeshError, match="tensor=3 does not divide the model's 40 attention heads"):
        parallel.check_mesh(abstract(tensor=3), heads=40)
    with pytest.raises(parallel.MeshError, match="neither the 5 heads per tensor shard"):
        parallel.check_mesh(abstract(tensor=8, context=2), heads=40, tokens=(11,))


def test_dit_table_names_every_large_weight():
    specs = traverse_util.flatten_dict(parallel.logical_specs(transformer.param_shapes(demo.TRANSFORMER),
                                                              parallel.DIT_RULES))
    assert specs[("blocks", "attn1", "to_q", "kernel")] == P(None, "embed", "heads")
    assert specs[("blocks", "attn2", "to_out_0", "kernel")] == P(None, "heads", "embed")
    assert specs[("blocks", "ffn", "net_0", "proj", "kernel")] == P(None, "embed", "mlp")
    assert specs[("blocks", "ffn", "net_2", "kernel")] == P(None, "mlp", "embed")
    assert specs[("patch_long", "kernel")] == P(None, None, None, None, "embed")
    assert specs[("blocks", "scale_shift_table")] == P(None, None, None, None)
    kernels = [k for k in specs if k[-1] == "kernel" and k[0] == "blocks"]
    assert all(any(a is not None for a in specs[k]) for k in kernels), "a block kernel left unsharded"


def test_umt5_lora_and_optimizer_state_tables():
    specs = traverse_util.flatten_dict(parallel.logical_specs(umt5.param_shapes(demo.TEXT_ENCODER),
                                                              parallel.UMT5_RULES))
    assert specs[("encoder", "embed_tokens", "embedding")] == P("vocab", "embed")
    assert specs[("encoder", "block", "layer_1", "DenseReluDense", "wo", "kernel")] == P(None, "mlp", "embed")
    # helios_jax.models.lora's layout: blocks/attn1/to_q/lora_A/kernel (layers, in, r), lora_B/kernel (layers, r, out)
    lora = {"blocks": {"attn1": {"to_q": {"lora_A": {"kernel": jax.ShapeDtypeStruct((2, 64, 4), "float32")},
                                          "lora_B": {"kernel": jax.ShapeDtypeStruct((2, 4, 64), "float32")}}},
                       "ffn": {"net_2": {"lora_A": {"kernel": jax.ShapeDtypeStruct((2, 96, 4), "float32")}}}}}
    specs = traverse_util.flatten_dict(parallel.logical_specs(lora, parallel.LORA_RULES))
    assert specs[("blocks", "attn1", "to_q", "lora_A", "kernel")] == P(None, "embed", "lora_rank")
    assert specs[("blocks", "attn1", "to_q", "lora_B", "kernel")] == P(None, "lora_rank_fsdp", "heads")
    assert specs[("blocks", "ffn", "net_2", "lora_A", "kernel")] == P(None, "mlp", "lora_rank_fsdp")
    # optax state mirrors the params: adam's mu/nu leaves take their param's axes, the count none.
    state = ({"count": jax.ShapeDtypeStruct((), "int32"),
              "mu": {"blocks": {"ffn": {"net_2": {"kernel": jax.ShapeDtypeStruct((2, 64, 32), "float32")}}}}},)
    leaves = jax.tree.leaves(parallel.logical_specs(state, parallel.DIT_RULES), is_leaf=lambda x: isinstance(x, P))
    assert leaves == [P(), P(None, "mlp", "embed")]


def test_discriminator_heads_split_their_input_channels_over_fsdp():
    """The GAN heads of the critic's trainable tree ({"lora", "heads"}) and their AdamW moments: every conv and
    the last Dense split their input channels, which fsdp=8 divides; norms and biases stay whole."""
    flow, hooked = jax.ShapeDtypeStruct((1, 16, 9, 8, 8), "float32"), [jax.ShapeDtypeStruct((1, 96, 9, 4, 4), "float32")]
    heads = jax.eval_shape(lambda f, h: discriminator.Discriminator(hooks=(1,), features=32).init(
        jax.random.key(0), f, h)["params"], flow, hooked)
    tree = {"heads": heads, "mu": {"heads": heads}}
    specs = traverse_util.flatten_dict(parallel.logical_specs(tree, trainer.TRAINING_RULES))
    for root in (("heads",), ("mu", "heads")):
        assert specs[(*root, "gan_heads_1", "head3d_0", "kernel")] == P(None, None, None, "embed", None)
        assert specs[(*root, "gan_final_head", "head3d_15", "kernel")] == P(None, None, None, "embed", None)
        assert specs[(*root, "gan_final_head", "head3d_20", "kernel")] == P("embed", None)
        assert specs[(*root, "gan_heads_1", "head3d_1", "scale")] == P(None)
        assert specs[(*root, "gan_heads_1", "head3d_0", "bias")] == P(None)
    shardings = traverse_util.flatten_dict(parallel.shardings(heads, abstract(fsdp=8), trainer.TRAINING_RULES))
    assert shardings[("gan_heads_1", "head3d_0", "kernel")].spec == P(None, None, None, "fsdp", None)  # 96 / 8
    assert shardings[("gan_final_head", "head3d_0", "kernel")].spec == P(None, None, None, "fsdp", None)  # 16 / 8
    kernels = [k for k in shardings if k[-1] == "kernel"]
    assert len(kernels) == 14 and all(any(shardings[k].spec) for k in kernels), "a head kernel left whole"


def test_mesh_spec_maps_logical_axes_and_replicates_what_does_not_divide():
    mesh = abstract(data=2, fsdp=4)
    assert parallel.rules.mesh_spec((2, 64, 96), P(None, "embed", "heads"), mesh) == P(None, "fsdp", None)
    assert parallel.rules.mesh_spec((2, 30, 96), P(None, "embed", "heads"), mesh) == P(None, None, None)
    assert parallel.rules.mesh_spec((8, 3), P("batch"), mesh) == P(("data", "fsdp"), None)
    assert parallel.rules.mesh_spec((64, 64), P("embed", "heads"), abstract(tensor=2)) == P(None, "tensor")


def test_bad_mesh_is_one_clear_error_before_any_compile(tmp_path):
    """On 8 devices: the pipeline refuses context=8 for 4 heads and 278 tokens when called (nothing computed),
    takes it for 184 tokens (the K/V all-gather), and the bare model refuses it while tracing."""
    messages = run_worker("errors", str(tmp_path), timeout=900)
    assert str(messages["base_ok"]) == "ok"
    assert "context=8 divides neither the 4 heads per tensor shard" in str(messages["base_uneven"])
    assert "[278]" in str(messages["base_uneven"])
    assert "divides neither" in str(messages["model"]) and "[12]" in str(messages["model"])


@pytest.mark.parametrize("mesh,message", [("context={}", "has {} devices but {} are given"), ("ctx=2", "expected comma")])
def test_generate_bad_mesh_flag_is_one_line_and_no_file(tmp_path, capsys, monkeypatch, mesh, message):
    n = len(jax.devices())
    mesh, message = mesh.format(2 * n), message.format(2 * n, n)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "video.mp4"
    assert cli.main(["generate", "--output", str(out), "--mesh", mesh]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
