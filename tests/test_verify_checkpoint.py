"""``helios-jax verify --checkpoint DIR`` on checkpoints written by diffusers' ``save_pretrained``: a clean
one passes, one with a damaged tensor (NaN, damaged bytes, a wrong shape in its file's header) fails and the
report names that tensor's key, and a port that computes wrongly is caught by the comparison."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
from pipeline_fixtures import reference_pipeline

from helios_jax import cli, verify_checkpoint
from helios_jax.convert.sources import SafetensorsSource

DAMAGED_KEY = "blocks.1.ffn.net.0.proj.weight"  # inside the compared blocks
UNCOMPARED_KEY = "blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The base pipeline's checkpoint, float32, its components in 200 KB shards (so the DiT has an index)."""
    _, folder = reference_pipeline("base", str(tmp_path_factory.mktemp("verify_ckpt")))
    return folder


def _shard_of(folder: str, key: str) -> str:
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), encoding="utf-8") as f:
        return os.path.join(folder, json.load(f)["weight_map"][key])


def _overwrite(checkpoint: str, key: str, fill: bytes) -> None:
    """Overwrite the bytes of one tensor of the transformer (the rest of its file untouched)."""
    path = _shard_of(os.path.join(checkpoint, "transformer"), key)
    _, _, start, end = SafetensorsSource([path])._meta[key]
    assert end - start >= 8 * len(fill)
    with open(path, "r+b") as f:
        f.seek(start + 4 * len(fill))
        f.write(fill * 3)


def _copy(checkpoint: str, tmp_path) -> str:
    copy = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, copy)
    return copy


def test_a_clean_checkpoint_verifies(checkpoint, capsys):
    assert cli.main(["verify", "--checkpoint", checkpoint]) == 0
    out = capsys.readouterr().out
    assert "checkpoint verified" in out
    for row in ("transformer blocks 0,1 | float32", "vae encode", "vae decode", "tokenizer (token ids)",
                "| text_encoder | float32"):
        assert row in out, out


def test_a_bf16_transformer_verifies_in_bf16(checkpoint, tmp_path, capsys):
    """Saved by diffusers in bf16 (its float32 modules kept), compared in bf16 on our side; the reference widens
    it to float32, as its bf16 attention cannot take this model's amplified history."""
    import torch
    from diffusers import HeliosTransformer3DModel

    bf16 = _copy(checkpoint, tmp_path)
    shutil.rmtree(os.path.join(bf16, "transformer"))
    HeliosTransformer3DModel.from_pretrained(os.path.join(checkpoint, "transformer"), torch_dtype=torch.bfloat16
                                             ).save_pretrained(os.path.join(bf16, "transformer"))
    assert verify_checkpoint.file_dtype(os.path.join(bf16, "transformer")) == "bfloat16"
    assert cli.main(["verify", "--checkpoint", bf16, "--only", "transformer"]) == 0
    assert "| bfloat16 (reference float32) |" in capsys.readouterr().out


@pytest.mark.parametrize("fill,reason", [
    (np.float32(np.nan).tobytes(), "NaN or infinite"),
    (b"\x7f\x7f\x7f\x7f", "damaged bytes"),  # 3.4e38: finite, far beyond a weight
])
def test_a_damaged_tensor_is_named_and_fails(checkpoint, tmp_path, capsys, fill, reason):
    damaged = _copy(checkpoint, tmp_path)
    _overwrite(damaged, UNCOMPARED_KEY, fill)
    assert cli.main(["verify", "--checkpoint", damaged, "--only", "transformer"]) == 1
    out = capsys.readouterr().out
    assert f"'{UNCOMPARED_KEY}'" in out and reason in out, out
    assert f"FAILED: tensor {UNCOMPARED_KEY} of transformer" in out
    assert "not compared (damaged tensors): transformer" in out


def test_a_wrong_shape_in_a_header_is_named(checkpoint, tmp_path, capsys):
    damaged = _copy(checkpoint, tmp_path)
    path = _shard_of(os.path.join(damaged, "transformer"), DAMAGED_KEY)
    with open(path, "rb") as f:
        data = f.read()
    shape = json.dumps(SafetensorsSource([path]).shape(DAMAGED_KEY)[0]).encode()
    entry = data.index(f'"{DAMAGED_KEY}"'.encode())
    at = data.index(b'"shape":[' + shape, entry) + len(b'"shape":[')
    wrong = str(int(shape) + 1).encode()
    assert len(wrong) == len(shape)  # the header keeps its length; only the tensor's entry is wrong
    with open(path, "wb") as f:
        f.write(data[:at] + wrong + data[at + len(shape):])
    assert cli.main(["verify", "--checkpoint", damaged, "--only", "transformer"]) == 1
    out = capsys.readouterr().out
    assert f"'{DAMAGED_KEY}'" in out and "does not fit the file" in out, out


def test_a_port_that_computes_wrongly_fails_the_comparison(checkpoint, monkeypatch, capsys):
    from helios_jax.models import transformer

    real = transformer.apply_rope
    monkeypatch.setattr(transformer, "apply_rope", lambda x, cos, sin: real(x, sin, cos))  # swapped tables
    assert cli.main(["verify", "--checkpoint", checkpoint, "--only", "transformer", "--blocks", "-1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: transformer blocks 1 float32" in out, out


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such folder"),
    (["--blocks", "0"], "give --checkpoint DIR"),
    (["--checkpoint", "CKPT", "--only", "pipeline"], "a checkpoint's components are"),
    (["--checkpoint", "CKPT", "--blocks", "2"], "has 2 blocks"),
])
def test_user_errors_exit_2_before_any_work(checkpoint, argv, message, capsys):
    assert cli.main(["verify", *[checkpoint if a == "CKPT" else a for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("helios-jax verify: error:") and message in err, err


def test_the_block_subset_reads_only_the_chosen_blocks(checkpoint, tmp_path, monkeypatch):
    """What streams a 14B DiT: the subset model holds the chosen blocks, renumbered, and reads no other block."""
    folder = os.path.join(checkpoint, "transformer")
    full = SafetensorsSource(sorted(glob.glob(os.path.join(folder, "*.safetensors"))))
    read, real = [], SafetensorsSource.read
    monkeypatch.setattr(SafetensorsSource, "read", lambda self, key: read.append(key) or real(self, key))
    out = verify_checkpoint.write_block_subset(folder, (1,), str(tmp_path / "subset"))
    assert read and not [k for k in read if k.startswith("blocks.0.")]
    subset = SafetensorsSource([os.path.join(out, "diffusion_pytorch_model.safetensors")])
    assert sorted(subset.keys()) == sorted(k.replace("blocks.1.", "blocks.0.") for k in full.keys()
                                           if not k.startswith("blocks.0."))
    np.testing.assert_array_equal(subset.read("blocks.0.attn1.to_q.weight"), full.read("blocks.1.attn1.to_q.weight"))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_layers"] == 1


def test_tolerance_grows_with_epsilon_depth_and_width():
    import jax.numpy as jnp

    assert verify_checkpoint.tolerance(jnp.bfloat16, 3, 13824) < 0.15  # a damaged weight's error is ~1
    assert verify_checkpoint.tolerance(jnp.float32, 3, 13824) < 1e-3
    assert verify_checkpoint.tolerance(jnp.float32, 1, 1) < verify_checkpoint.tolerance(jnp.float32, 4, 1) \
        < verify_checkpoint.tolerance(jnp.float32, 4, 100) < verify_checkpoint.tolerance(jnp.bfloat16, 4, 100)
