"""Bad training input is one clear error before anything is written (issue 24, items 2-4): non-finite config
values, typos in a YAML, bad offload files and LoRA files; a step that goes non-finite stops the run before a
checkpoint of it is written, or is skipped and counted with ``skip_nonfinite``."""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from helios_jax import cli
from helios_jax.config import ConfigError
from helios_jax.demo import TRANSFORMER, build_demo_checkpoint
from helios_jax.models import lora as lora_lib, transformer
from helios_jax.training import DataError, NonFiniteError, configs, data, ode, recipes, trainer

PIXELS, FRAMES = 64, 121  # latents 8 x 8, the official minimum clip length
TEXT_TOKENS = 16


def offload_arrays(seed: int, channels: int = TRANSFORMER.in_channels, width: int = TRANSFORMER.text_dim):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(2, channels, 9, PIXELS // 8, PIXELS // 8)).astype(np.float32)
    return latent, rng.normal(size=(TEXT_TOKENS, width)).astype(np.float32)


def clip_path(folder, name: str) -> str:
    return os.path.join(folder, data.offload_name(name, FRAMES, PIXELS, PIXELS))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The demo checkpoint (only its configs are read before the errors below) and one good offload file."""
    root = tmp_path_factory.mktemp("inputs")
    ckpt = build_demo_checkpoint(root / "ckpt")
    good = clip_path(root, "clip0")
    data.write_offload(good, *offload_arrays(0), "a square")
    return root, ckpt, good


def overrides(ckpt: str, folder: str, out: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data_config.instance_data_root=[{folder}]",
            f"data_config.single_height={PIXELS}", f"data_config.single_width={PIXELS}",
            f"model_config.pretrained_model_name_or_path={ckpt}", f"model_config.transformer_model_name_or_path={ckpt}",
            "model_config.subfolder=transformer", "model_config.lora_rank=4", "model_config.lora_alpha=4.0",
            "training_config.max_train_steps=2", "training_config.checkpointing_steps=1",
            "training_config.train_batch_size=1", "validation_config.first_step_valid=false", *extra]


def train(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["train", os.path.join(configs.FOLDER, "stage_1_init.yaml"), *args])
    return code, capsys.readouterr().err


def data_folder(workspace, tmp_path, bad: bytes | None = None, **arrays) -> str:
    """The good clip and a bad one sorted after it (so the check must read every file, not the first)."""
    root, _, good = workspace
    folder = tmp_path / "data"
    folder.mkdir()
    with open(good, "rb") as f:
        (folder / os.path.basename(good)).write_bytes(f.read())
    path = clip_path(folder, "clip9")
    if bad is not None:
        with open(path, "wb") as f:
            f.write(bad)
    else:
        safetensors.numpy.save_file(arrays, path)
    return str(folder)


def good_bytes(workspace) -> bytes:
    with open(workspace[2], "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------- config values and typos


@pytest.mark.parametrize("change, message", [
    ("training_config.learning_rate=.nan", "training_config.learning_rate = nan must be a finite number"),
    ("training_config.learning_rate=.inf", "training_config.learning_rate = inf must be a finite number"),
    ("training_config.max_grad_norm=.nan", "training_config.max_grad_norm = nan must be a finite number"),
    ("model_config.lora_rank=0", "model_config.lora_rank = 0 must be a positive integer"),
    ("training_config.learning_rat=1e-4", "unknown key 'training_config.learning_rat': did you mean "
                                          "'training_config.learning_rate'?"),
    ("trainig_config.learning_rate=1e-4", "unknown section 'trainig_config': did you mean 'training_config'?"),
])
def test_bad_config_values_are_one_line_and_nothing_written(workspace, tmp_path, capsys, change, message):
    root, ckpt, _ = workspace
    out = tmp_path / "run"
    code, err = train(overrides(ckpt, str(root), str(out), change), capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_typos_in_a_yaml_file_suggest_the_closest_name(tmp_path):
    base = "training_config:\n  is_enable_stage1: true\n"
    for text, message in ((base + "  learning_rat: 1.0e-4\n", "did you mean 'training_config.learning_rate'"),
                          (base + "trainig_config:\n  seed: 1\n", "unknown section 'trainig_config': did you mean "
                                                                  "'training_config'"),
                          (base + "model_config:\n  lora_rnak: 8\n", "did you mean 'model_config.lora_rank'")):
        file = tmp_path / "run.yaml"
        file.write_text(text)
        with pytest.raises(ConfigError, match=message):
            recipes.load(str(file))


def test_optimizer_config_refuses_non_finite_numbers():
    for field in ("learning_rate", "max_grad_norm", "adam_epsilon"):
        with pytest.raises(ConfigError, match=f"{field} = nan.*must be finite"):
            trainer.OptimizerConfig(**{field: float("nan")})
    with pytest.raises(ConfigError, match="learning_rate = inf"):
        trainer.OptimizerConfig(learning_rate=float("inf"))


# ------------------------------------------------------------------------------------------- offload files


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable offload file"),
    ("empty", "not a readable offload file"),
    ("garbage", "not a readable offload file"),
    ("no prompt_embed", "no prompt_embed tensor"),
    ("8 channels", "latents of 8 channels; the transformer takes 16"),
    ("32 wide", "prompt embeddings of width 32; the transformer's text_dim is 64"),
])
def test_bad_offload_files_are_one_line_and_nothing_written(workspace, tmp_path, capsys, case, message):
    whole = good_bytes(workspace)
    latent, embed = offload_arrays(1)
    folder = data_folder(workspace, tmp_path, **{
        "truncated": {"bad": whole[:len(whole) // 2]},
        "empty": {"bad": b""},
        "garbage": {"bad": b"this is not a safetensors file" * 4},
        "no prompt_embed": {"vae_latent": latent},
        "8 channels": dict(zip(("vae_latent", "prompt_embed"), offload_arrays(1, channels=8))),
        "32 wide": dict(zip(("vae_latent", "prompt_embed"), offload_arrays(1, width=32))),
    }[case])
    out = tmp_path / "run"
    code, err = train(overrides(workspace[1], folder, str(out)), capsys)
    assert code == 2 and message in err and "clip9" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"this is not a safetensors file" * 4], ids=["empty", "garbage"])
def test_an_unreadable_ode_pair_file_is_one_data_error_when_the_dataset_is_made(tmp_path, content):
    """Stage 3a's data: every file's header is read when the dataset is built, before a run writes anything."""
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "prompt0.safetensors").write_bytes(content)
    with pytest.raises(DataError, match=r"prompt0\.safetensors: not a readable ODE-pair file"):
        ode.ODEPairDataset([str(tmp_path / "pairs")])


# ------------------------------------------------------------------------------------------ non-finite steps


def toy_loss(trainable, frozen, batch, key):
    return jnp.mean((batch["x"] @ trainable["w"] - batch["y"]) ** 2), {}


def toy_data(nan_from: int, nan_until: int, steps: int = 24, batch: int = 4):
    """Batches in order; those of steps [nan_from, nan_until) (1-based) hold a NaN."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 3)).astype(np.float32)
    x[(nan_from - 1) * batch:(nan_until - 1) * batch:batch, 0] = np.nan
    y = x @ np.ones((3, 1), np.float32)
    return iter(grain.MapDataset.source([{"x": x[i], "y": y[i]} for i in range(len(x))]).batch(batch).to_iter_dataset())


def toy_run(tmp_path, steps: int, every: int = 2) -> trainer.RunConfig:
    return trainer.RunConfig(output_dir=str(tmp_path / "run"), max_train_steps=steps, checkpointing_steps=every,
                             config={})


def checkpoints(run: trainer.RunConfig) -> list[str]:
    return sorted(n for n in os.listdir(run.output_dir) if n.startswith(trainer.CHECKPOINT_PREFIX))


def start():
    return {"w": jnp.zeros((3, 1))}, {}


def test_a_non_finite_step_stops_the_run_before_its_checkpoint(tmp_path):
    run = toy_run(tmp_path, steps=6)
    with pytest.raises(NonFiniteError, match=r"step 4 gave a non-finite grad_norm, loss; stopped before writing"):
        trainer.train(run, trainer.Stage(toy_loss, trainer.OptimizerConfig(learning_rate=0.1)), *start(),
                      toy_data(4, 5))
    assert checkpoints(run) == ["checkpoint-2"]  # the step-4 checkpoint (NaN weights) was never written
    assert [r["step"] for r in trainer.read_metrics(run.output_dir)] == [1, 2, 3, 4]


def test_skip_nonfinite_skips_and_counts_until_too_many_in_a_row(tmp_path):
    stage = trainer.Stage(toy_loss, trainer.OptimizerConfig(learning_rate=0.1, skip_nonfinite=True))
    run = toy_run(tmp_path, steps=6)
    state = trainer.train(run, stage, *start(), toy_data(3, 5))
    records = trainer.read_metrics(run.output_dir)
    assert [r[trainer.SKIPPED] for r in records] == [0, 0, 1, 2, 2, 2]
    assert [r[trainer.NONFINITE_RUN] for r in records] == [0, 0, 1, 2, 0, 0]
    assert np.isfinite(np.asarray(state.trainable["w"])).all() and int(state.step) == 6
    assert checkpoints(run) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # optax.apply_if_finite would apply the update after NONFINITE_PATIENCE skips in a row, NaN and all.
    run = toy_run(tmp_path / "long", steps=20, every=100)
    last = 2 + trainer.NONFINITE_PATIENCE - 1
    with pytest.raises(NonFiniteError, match=f"step {last} gave .*{trainer.NONFINITE_PATIENCE} updates in a row"):
        trainer.train(run, stage, *start(), toy_data(2, 20))
    assert checkpoints(run) == []


def test_the_command_stops_at_the_non_finite_step_with_exit_2(workspace, tmp_path, capsys, monkeypatch):
    """``helios-jax train`` over the toy run (the tiny DiT's step would cost a compile here): NaN in the data
    trained to the end, wrote NaN checkpoints and exited 0; now one line, exit 2, no checkpoint."""
    from helios_jax.training import parts, stages

    run = toy_run(tmp_path, steps=4, every=1)
    toy = parts.Prepared(run, trainer.Stage(toy_loss, trainer.OptimizerConfig(learning_rate=0.1)), *start(),
                         toy_data(1, 5), config=TRANSFORMER, spec=lora_lib.LoraSpec(rank=2))
    monkeypatch.setattr(stages, "prepare", lambda recipe: toy)
    code, err = train(overrides(workspace[1], str(workspace[0]), run.output_dir), capsys)
    assert code == 2 and "step 1 gave a non-finite grad_norm, loss" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert checkpoints(run) == []


def test_recipe_key_skip_nonfinite_reaches_the_optimizer(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("training_config:\n  is_enable_stage1: true\n  has_multi_term_memory_patch: true\n"
                    "  zero_history_timestep: true\n  guidance_cross_attn: true\n  skip_nonfinite: true\n"
                    "model_config:\n  lora_layers: all-linear\n"
                    "data_config:\n  use_stage1_dataset: true\n  instance_data_root: [data/]\n")
    recipe = recipes.load(str(file))
    assert recipe.optimizer().skip_nonfinite


# ------------------------------------------------------------------------------------------------ LoRA files


@pytest.fixture(scope="module")
def lora_file(workspace, tmp_path_factory):
    spec = lora_lib.LoraSpec(rank=2)
    shapes = lora_lib.lora_shapes(spec, transformer.param_shapes(TRANSFORMER))
    lora = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
    folder = tmp_path_factory.mktemp("lora")
    lora_lib.save_lora(folder, lora, spec, TRANSFORMER)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("cut", ["truncated", "empty", "garbage"])
def test_an_unreadable_lora_file_is_one_error_in_the_api_and_the_cli(workspace, lora_file, tmp_path, capsys, cut):
    with open(lora_file, "rb") as f:
        whole = f.read()
    bad = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    bad.parent.mkdir()
    bad.write_bytes({"truncated": whole[:-8], "empty": b"", "garbage": b"\x00garbage" * 16}[cut])
    with pytest.raises(lora_lib.LoraError, match="not a readable LoRA file"):
        lora_lib.load_lora(str(bad.parent), TRANSFORMER)
    out = tmp_path / "merged"
    code = cli.main(["convert", os.path.join(workspace[1], "transformer"), str(out), "--merge_lora", str(bad.parent)])
    err = capsys.readouterr().err
    assert code == 2 and "not a readable LoRA file" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_lora_of_the_wrong_shape_names_the_tensor_and_both_shapes(workspace, lora_file, tmp_path, capsys):
    with safetensors.safe_open(lora_file, "numpy") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = next(k for k in tensors if k.endswith("attn1.to_q.lora_A.weight"))
    tensors[name] = np.zeros((2, TRANSFORMER.inner_dim // 2), np.float32)
    folder = tmp_path / "wrong"
    folder.mkdir()
    safetensors.numpy.save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), meta)
    with pytest.raises(lora_lib.LoraError, match=rf"{name}: shape \(2, {TRANSFORMER.inner_dim // 2}\), the model "
                                                 rf"needs \(r, {TRANSFORMER.inner_dim}\)"):
        lora_lib.load_lora(str(folder), TRANSFORMER)
    out = tmp_path / "merged"
    code = cli.main(["convert", os.path.join(workspace[1], "transformer"), str(out), "--merge_lora", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and name in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_lora_tree_of_the_wrong_shape_is_one_error_in_apply():
    """The API: a LoRA tree handed to ``apply`` is checked against the base where it is read (traced only here)."""
    params = transformer.param_shapes(TRANSFORMER)
    lora = lora_lib.lora_shapes(lora_lib.LoraSpec(rank=2), params)
    layers, fan_in, rank = lora["blocks"]["attn1"]["to_q"]["lora_A"]["kernel"].shape
    lora["blocks"]["attn1"]["to_q"]["lora_A"]["kernel"] = jax.ShapeDtypeStruct((layers, fan_in // 2, rank), jnp.float32)
    model = transformer.HeliosTransformer(TRANSFORMER)
    inputs = {"hidden_states": jax.ShapeDtypeStruct((1, TRANSFORMER.in_channels, 1, 4, 4), jnp.float32),
              "timestep": jax.ShapeDtypeStruct((1,), jnp.float32),
              "encoder_hidden_states": jax.ShapeDtypeStruct((1, 5, TRANSFORMER.text_dim), jnp.float32)}
    with pytest.raises(lora_lib.LoraError, match=rf"LoRA .*to_q: lora_A \({fan_in // 2}, {rank}\), lora_B "
                                                 rf"\({rank}, {fan_in}\); the model needs lora_A \({fan_in}, r\)"):
        jax.eval_shape(lambda p, f, x: model.apply({"params": p, "lora": f}, **x), params, lora, inputs)
