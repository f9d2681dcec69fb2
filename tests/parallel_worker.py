"""Runs in a subprocess with 8 virtual CPU devices (the flag must precede JAX's start): tiny pipelines and
DiT programs on one device and on several meshes, results written to an .npz for tests/test_parallel*.py.

``python parallel_worker.py pipelines OUT.npz``  latents and video per (pipeline, mesh)
``python parallel_worker.py hlo OUT.npz``        compiled HLO text of a DiT forward, a training gradient, a VAE decode; sharded loads and GAN heads
``python parallel_worker.py trainer OUT.npz``    the trainer on one device, on a mesh, and resumed on another
``python parallel_worker.py process I N PORT OUT.npz``  one chunk as process I of N (jax.distributed)
``python parallel_worker.py process-train I N PORT OUT.npz``  one training step as process I of N
"""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from parallel_run import MESHES, name  # noqa: E402

from helios_jax import demo, parallel  # noqa: E402
from helios_jax.config import TransformerConfig  # noqa: E402
from helios_jax.loading import COMPONENTS  # noqa: E402
from helios_jax.pipeline import HeliosPipeline  # noqa: E402

SIZE = 64  # 64x64 video: latents 8x8, pyramid stages 2x2 / 4x4 / 8x8; tokens 49 / 76 / 184 with history
PROMPTS = ["a train in the fields", "mountains and sky"]
def transformer(heads: int) -> TransformerConfig:
    return TransformerConfig(num_attention_heads=heads, attention_head_dim=8, in_channels=16, out_channels=16,
                             text_dim=64, freq_dim=16, ffn_dim=64, num_layers=2, rope_dim=(4, 2, 2),
                             is_amplify_history=True)


def checkpoint(root: str, kind: str) -> str:
    folder = os.path.join(root, kind)
    if kind == "distilled":
        return demo.build_demo_checkpoint(folder, transformer=transformer(8))
    scheduler = {"_class_name": "HeliosScheduler", "stages": 1, "stage_range": [0, 1], "gamma": 0.25, "shift": 3.0}
    index = {**demo.MODEL_INDEX, "_class_name": "HeliosPipeline", "is_distilled": False,
             "scheduler": ["diffusers", "HeliosScheduler"]}
    return demo.build_demo_checkpoint(folder, transformer=transformer(4), scheduler=scheduler, model_index=index)


def generate(pipe: HeliosPipeline, kind: str) -> tuple[np.ndarray, np.ndarray]:
    settings = dict(height=SIZE, width=SIZE, num_frames=1, seed=0, progress=False)
    if kind == "distilled":
        settings.update(prompt=PROMPTS, pyramid_num_inference_steps_list=(1, 1, 1), guidance_scale=1.0)
    else:
        settings.update(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, negative_prompt="static")
    latents = pipe(output_type="latent", **settings)
    return latents, np.asarray(pipe.decode(jnp.asarray(latents), "float"))


def mesh_of(sizes: dict[str, int]) -> jax.sharding.Mesh:
    return parallel.make_mesh(**sizes, devices=jax.devices()[:math.prod(sizes.values())])


def pipelines(out: str) -> None:
    root = os.path.dirname(out)
    results = {}
    for kind, meshes in MESHES.items():
        folder = checkpoint(root, kind)
        load = dict(dtype=jnp.float32, attention_impl="xla", compilation_cache=False)
        results[f"{kind}/one/latents"], results[f"{kind}/one/video"] = generate(
            HeliosPipeline.from_pretrained(folder, **load), kind)
        for sizes in meshes:
            pipe = HeliosPipeline.from_pretrained(folder, mesh=mesh_of(sizes), **load)
            results[f"{kind}/{name(sizes)}/latents"], results[f"{kind}/{name(sizes)}/video"] = generate(pipe, kind)
            ours, ref = results[f"{kind}/{name(sizes)}/latents"], results[f"{kind}/one/latents"]
            print(kind, name(sizes), "latents rel err", np.linalg.norm(ours - ref) / np.linalg.norm(ref), flush=True)
    np.savez(out, **results)


def dit(heads: int, batch: int, seed: int = 0) -> tuple[TransformerConfig, dict, dict]:
    """A tiny DiT, its random params and inputs with a short history: 2x(2x2) noisy + 2x(2x2) history tokens."""
    from helios_jax.models.transformer import keymap, param_shapes

    cfg = transformer(heads)
    params = demo.random_params(param_shapes(cfg), keymap(cfg), np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    inputs = dict(hidden_states=rng.standard_normal((batch, 16, 2, 4, 4)), timestep=np.full((batch,), 500.0),
                  encoder_hidden_states=rng.standard_normal((batch, 5, 64)),
                  latents_history_short=rng.standard_normal((batch, 16, 2, 4, 4)))
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    inputs["indices_latents_history_short"] = np.array([[0, 1]], np.int32)
    return cfg, params, inputs


def hlo(out: str) -> None:
    """Compiled programs and their values: a DiT forward on context=8 (Ulysses) and a training loss and
    gradient on data=2 x fsdp=4, each beside the same computation on one device."""
    from helios_jax.models.transformer import HeliosTransformer

    results = {}
    cfg, params, inputs = dit(8, 1)
    model = HeliosTransformer(cfg)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    results["forward/one"] = np.asarray(forward(params, inputs))
    mesh = mesh_of({"context": 8})
    placed = parallel.shard_params(params, mesh, parallel.DIT_RULES), parallel.to_mesh(inputs, parallel.replicated(mesh))
    with jax.set_mesh(mesh):  # a fresh jit: JAX's trace cache does not key on the current mesh
        compiled = jax.jit(lambda p, x: model.apply({"params": p}, **x)).lower(*placed).compile()
        results["forward/mesh"] = np.asarray(compiled(*placed))
    results["forward/hlo"] = np.array(compiled.as_text())

    cfg, params, inputs = dit(4, 8)
    target = np.random.default_rng(3).standard_normal((8, 16, 2, 4, 4)).astype(np.float32)

    def loss(p, x, y):
        return jnp.mean((model.apply({"params": p}, **x) - y) ** 2)

    model = HeliosTransformer(cfg)
    step = jax.value_and_grad(loss)
    results["train/one/loss"], grads = jax.jit(step)(params, inputs, target)
    results["train/one/grads"] = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    mesh = mesh_of({"data": 2, "fsdp": 4})
    weights = parallel.shardings(params, mesh, parallel.DIT_RULES)
    batch = {k: parallel.batch_sharding(mesh, v.shape) if k != "indices_latents_history_short"
             else parallel.replicated(mesh) for k, v in inputs.items()}
    args = (parallel.shard_params(params, mesh, parallel.DIT_RULES), parallel.to_mesh(inputs, batch),
            parallel.to_mesh(target, parallel.batch_sharding(mesh, target.shape)))
    compiled = jax.jit(step, out_shardings=(parallel.replicated(mesh), weights)).lower(*args).compile()
    results["train/mesh/loss"], grads = compiled(*args)
    results["train/mesh/grads"] = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    results["train/hlo"] = np.array(compiled.as_text())
    results["train/weight_shapes"] = np.array(sorted({str(tuple(v.shape)) for v in jax.tree.leaves(params)}))
    results.update(context_training())
    results.update(vae_decode_programs())
    results.update(discriminator_heads())
    results.update(sharded_loads())
    np.savez(out, **results)


def stage1_setup(batch: int = 4) -> tuple:
    """The tiny stage 1 of training_fixtures in float32: its loss, (trainable, frozen), one batch and a key."""
    import training_fixtures as tf

    from helios_jax.training import trainer as T

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, 2, 16, 9, 4, 4)).astype(np.float32)
    embeds = rng.standard_normal((batch, tf.TEXT_TOKENS, tf.CONFIG.text_dim)).astype(np.float32)
    data = next(iter(tf.dataset(latents, embeds, batch=batch).to_iter_dataset()))
    # One key for every process (trainer.train folds in the process index; see tests/test_parallel_devices.py).
    # remat off: the same numbers, and a CPU compile a fraction as long.
    return (tf.make_stage1_loss(remat=False, dtype=jnp.float32), tf.stage1_variables(dtype=jnp.float32), data,
            T.step_key(5, 0, 0))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def context_training() -> dict[str, np.ndarray]:
    """The stage-1 loss and its gradients (the trainer's mesh path: its placement, the mesh current) on one
    device, on context=2 and on data=2 x context=2; and the compiled trainer step on context=2."""
    from helios_jax.training import trainer as T

    loss, (trainable, frozen), batch, key = stage1_setup()
    grad = jax.value_and_grad(loss, has_aux=True)
    (value, _), grads = jax.jit(grad)(trainable, frozen, batch, key)
    results = {"context_train/one/loss": np.asarray(value), "context_train/one/grads": flat(grads)}
    for sizes in ({"context": 2}, {"data": 2, "context": 2}):
        mesh = mesh_of(sizes)
        args = (T.shard_variables(trainable, mesh), T.shard_variables(frozen, mesh), T.global_batch(batch, mesh), key)
        with T.on_mesh(mesh):
            (value, _), grads = jax.jit(grad)(*args)
        results[f"context_train/{name(sizes)}/loss"] = np.asarray(value)
        results[f"context_train/{name(sizes)}/grads"] = flat(grads)
    mesh = mesh_of({"context": 2})
    optimizer = T.OptimizerConfig(learning_rate=1e-3)
    state = T.init_state(T.shard_variables(trainable, mesh), T.make_optimizer(optimizer))
    placement = T.state_shardings(state, mesh)
    step = T.make_step(loss, T.make_optimizer(optimizer), T.learning_rate(optimizer), placement)
    with T.on_mesh(mesh):
        compiled = step.lower(jax.device_put(state, placement), T.shard_variables(frozen, mesh),
                              T.global_batch(batch, mesh), key).compile()
    results["context_train/hlo"] = np.array(compiled.as_text())
    return results


def sharded_loads() -> dict[str, np.ndarray]:
    """The demo DiT loaded on one device and split as it is read onto fsdp=4 x tensor=2, from its
    diffusers safetensors and from saved (orbax) params: per leaf the values, the placement the load gave
    it, the placement the DiT's table asks for, and the largest share of its elements one device holds."""
    import tempfile

    from helios_jax.convert import save_params
    from helios_jax.loading import load_transformer

    mesh = mesh_of({"fsdp": 4, "tensor": 2})
    results = {}
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(demo.build_demo_checkpoint(os.path.join(root, "c")), "transformer")
        config, one = load_transformer(folder, jnp.float32)
        save_params(os.path.join(root, "saved"), one, COMPONENTS["transformer"].config_json(config))
        for source, path in (("diffusers", folder), ("saved", os.path.join(root, "saved"))):
            _, split = COMPONENTS["transformer"].load(path, jnp.float32, mesh=mesh)
            wanted = parallel.shardings(split, mesh, parallel.DIT_RULES)
            for (keys, leaf), ref, target in zip(jax.tree_util.tree_leaves_with_path(split), jax.tree.leaves(one),
                                                 jax.tree.leaves(wanted)):
                key = f"load/{source}/{jax.tree_util.keystr(keys)}"
                share = max(int(np.prod(s.data.shape)) for s in leaf.addressable_shards) / max(leaf.size, 1)
                results[key] = np.asarray(leaf) - np.asarray(ref)
                results[key + "#spec"] = np.array([str(leaf.sharding.spec), str(target.spec), str(share)])
    return results


def discriminator_heads() -> dict[str, np.ndarray]:
    """The GAN heads' softplus loss and its gradients on one device and with the heads split by the training
    table over fsdp=8 (input channels; a batch of 8 over fsdp), and each gradient's share held per device."""
    from helios_jax.training import discriminator
    from helios_jax.training.trainer import TRAINING_RULES

    rng = np.random.default_rng(7)
    flow = rng.standard_normal((8, 16, 9, 8, 8)).astype(np.float32)
    hooked = [rng.standard_normal((8, 64, 9, 4, 4)).astype(np.float32)]
    model = discriminator.Discriminator(hooks=(1,), features=32)
    heads = model.init(jax.random.key(0), flow[:1], [h[:1] for h in hooked])["params"]

    def loss(p, f, h):
        return jnp.mean(jax.nn.softplus(model.apply({"params": p}, f, h)))

    step = jax.value_and_grad(loss)
    results = {}
    results["heads/one/loss"], grads = jax.jit(step)(heads, flow, hooked)
    results["heads/one/grads"] = flat(grads)
    mesh = mesh_of({"fsdp": 8})
    placement = parallel.shardings(heads, mesh, TRAINING_RULES)
    args = (parallel.shard_params(heads, mesh, TRAINING_RULES), parallel.to_mesh(flow, parallel.batch_sharding(mesh, flow.shape)),
            [parallel.to_mesh(h, parallel.batch_sharding(mesh, h.shape)) for h in hooked])
    results["heads/mesh/loss"], grads = jax.jit(step, out_shardings=(parallel.replicated(mesh), placement))(*args)
    results["heads/mesh/grads"] = flat(grads)
    results["heads/mesh/shares"] = np.array([max(s.data.size for s in g.addressable_shards) / g.size
                                             for g in jax.tree.leaves(grads) if g.ndim > 1])
    return results


def vae_decode_programs() -> dict[str, np.ndarray]:
    """The demo VAE's decode of 3 latent frames at 8x8 on one device and split by rows over context=4 and over
    tensor=4 (a tensor-parallel DiT's chips decode row bands too)."""
    import tempfile

    from helios_jax.loading import load_vae
    from helios_jax.models import vae as vae_lib

    with tempfile.TemporaryDirectory() as root:
        cfg, params = load_vae(os.path.join(demo.build_demo_checkpoint(os.path.join(root, "c")), "vae"))
    latents = np.random.default_rng(5).standard_normal((1, cfg.z_dim, 3, 8, 8)).astype(np.float32)
    decode = vae_lib.chunk_decoder(cfg, jnp.float32, "float")
    results = {"vae/one": np.asarray(decode(params, latents))}
    for axis in ("context", "tensor"):
        mesh = mesh_of({axis: 4})
        placed = parallel.to_mesh((params, latents), parallel.replicated(mesh))
        with jax.set_mesh(mesh):
            compiled = vae_lib.chunk_decoder(cfg, jnp.float32, "float").lower(*placed).compile()
            results[f"vae/{axis}"] = np.asarray(compiled(*placed))
        results[f"vae/{axis}/hlo"] = np.array(compiled.as_text())
    results["vae/widest"] = np.array(cfg.base_dim * max(cfg.dim_mult))
    return results


def trainer_runs(out: str) -> None:
    """The real trainer (tiny stage 1, float32) for 4 steps on one device and on data=2 x fsdp=4; then a run
    interrupted at step 2 on that mesh and resumed from its sharded checkpoint on fsdp=8."""
    import dataclasses

    import training_fixtures as tf

    from helios_jax.training import trainer as T

    root = os.path.dirname(out)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((8, 2, 16, 9, 4, 4)).astype(np.float32)
    embeds = rng.standard_normal((8, tf.TEXT_TOKENS, tf.CONFIG.text_dim)).astype(np.float32)
    data = lambda: iter(tf.dataset(latents, embeds, batch=8).to_iter_dataset())  # noqa: E731
    stage = T.Stage(tf.make_stage1_loss(dtype=jnp.float32), T.OptimizerConfig(learning_rate=1e-3))
    start = lambda: tf.stage1_variables(dtype=jnp.float32)  # noqa: E731
    run = T.RunConfig(output_dir=os.path.join(root, "one"), max_train_steps=4, checkpointing_steps=2, seed=5)
    results = {}
    for label, sizes in (("one", None), ("mesh", {"data": 2, "fsdp": 4})):
        final = T.train(dataclasses.replace(run, output_dir=os.path.join(root, label)), stage, *start(), data(),
                        mesh=None if sizes is None else mesh_of(sizes))
        results[f"{label}/losses"] = np.array([r["loss"] for r in T.read_metrics(os.path.join(root, label))])
        results[f"{label}/trainable"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(final.trainable)])
        if sizes is not None:
            kernel = final.trainable["lora"]["blocks"]["attn1"]["to_q"]["lora_A"]["kernel"]
            results["mesh/lora_A_spec"] = np.array([str(axis) for axis in kernel.sharding.spec])
            results["mesh/lora_A_shards"] = np.array(len({str(s.index) for s in kernel.addressable_shards}))

    broken = dataclasses.replace(run, output_dir=os.path.join(root, "resumed"), max_train_steps=2)
    T.train(broken, stage, *start(), data(), mesh=mesh_of({"data": 2, "fsdp": 4}))
    final = T.train(dataclasses.replace(broken, max_train_steps=4), stage, *start(), data(),
                    mesh=mesh_of({"fsdp": 8}))
    results["resumed/losses"] = np.array([r["loss"] for r in T.read_metrics(broken.output_dir)])
    results["resumed/trainable"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(final.trainable)])
    kernel = final.trainable["lora"]["blocks"]["attn1"]["to_q"]["lora_A"]["kernel"]
    results["resumed/lora_A_spec"] = np.array([str(axis) for axis in kernel.sharding.spec])
    np.savez(out, **results)


def errors(out: str) -> None:
    """The messages of bad meshes: the pipeline's (before any compute) and the model's (while tracing)."""
    from helios_jax.models.transformer import HeliosTransformer

    messages = {}
    folder = checkpoint(os.path.dirname(out), "base")  # 4 heads: 184 tokens at 64x64, 278 at 64x96
    pipe = HeliosPipeline.from_pretrained(folder, dtype=jnp.float32, attention_impl="xla", compilation_cache=False,
                                          mesh=mesh_of({"context": 8}))
    for label, settings in (("base_ok", {}), ("base_uneven", {"height": 64, "width": 96})):
        try:
            pipe._check({"height": SIZE, "width": SIZE, "num_frames": 1, **settings}, prompt="a", seed=0)
            messages[label] = "ok"
        except parallel.MeshError as err:
            messages[label] = str(err)
    cfg, params, inputs = dit(4, 1)
    inputs["hidden_states"] = inputs["hidden_states"][:, :, :1]  # 4 + 8 tokens: 12 over context=8, 4 heads
    try:
        with jax.set_mesh(mesh_of({"context": 8})):
            jax.jit(lambda p, x: HeliosTransformer(cfg).apply({"params": p}, **x)).trace(params, inputs)
        messages["model"] = "ok"
    except parallel.MeshError as err:
        messages["model"] = str(err)
    np.savez(out, **messages)


def process(index: int, count: int, port: int, out: str) -> None:
    if count:
        parallel.initialize(f"127.0.0.1:{port}", count, index)
    folder = checkpoint(os.path.join(os.path.dirname(out), f"ckpt{index}_{count}"), "distilled")
    pipe = HeliosPipeline.from_pretrained(folder, dtype=jnp.float32, attention_impl="xla", compilation_cache=False,
                                          mesh=parallel.make_mesh(context=len(jax.devices())) if count else None)
    latents, video = generate(pipe, "distilled")
    np.savez(out, latents=latents, video=video, devices=len(jax.devices()))


def process_train(index: int, count: int, port: int, out: str) -> None:
    """One optimizer step of the tiny stage 1 as process ``index`` of ``count`` on a data=``count`` mesh (each
    process feeds its slice of the batch, as trainer.train does), or alone (count 0) with the whole batch."""
    from helios_jax.training import trainer as T

    if count:
        parallel.initialize(f"127.0.0.1:{port}", count, index)
    loss, (trainable, frozen), batch, key = stage1_setup()
    initial = flat(trainable)
    optimizer = T.OptimizerConfig(learning_rate=1e-3)
    mesh = parallel.make_mesh(data=len(jax.devices())) if count else None
    state = T.init_state(T.shard_variables(trainable, mesh), T.make_optimizer(optimizer))
    if mesh is None:
        step = T.make_step(loss, T.make_optimizer(optimizer), T.learning_rate(optimizer))
    else:
        placement = T.state_shardings(state, mesh)
        state = jax.device_put(state, placement)
        step = T.make_step(loss, T.make_optimizer(optimizer), T.learning_rate(optimizer), placement)
        local = len(next(iter(batch.values()))) // count
        batch = jax.tree.map(lambda x: np.asarray(x)[index * local:(index + 1) * local], batch)
    with T.on_mesh(mesh):
        state, metrics = step(state, T.shard_variables(frozen, mesh), T.global_batch(batch, mesh), key)
    np.savez(out, loss=np.asarray(jax.device_get(metrics["loss"])), trainable=flat(T.host_values(state.trainable)),
             initial=initial,
             devices=len(jax.devices()), processes=jax.process_count())


if __name__ == "__main__":
    if sys.argv[1] == "pipelines":
        pipelines(sys.argv[2])
    elif sys.argv[1] == "errors":
        errors(sys.argv[2])
    elif sys.argv[1] == "hlo":
        hlo(sys.argv[2])
    elif sys.argv[1] == "trainer":
        trainer_runs(sys.argv[2])
    elif sys.argv[1] == "process":
        process(*map(int, sys.argv[2:5]), sys.argv[5])
    elif sys.argv[1] == "process-train":
        process_train(*map(int, sys.argv[2:5]), sys.argv[5])
