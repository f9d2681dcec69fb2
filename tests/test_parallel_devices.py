"""Generation and training on 8 virtual CPU devices (a subprocess, see parallel_worker.py) against one device.

Marked slow: each mesh compiles its own chunk program (a few minutes in all on 2 cores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from parallel_run import MESHES, WORKER, collectives, name, rel_err, run_worker, worker_env

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # relative L2, float32; max-abs stated beside it


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return run_worker("pipelines", str(tmp_path_factory.mktemp("pipelines")))


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    return run_worker("hlo", str(tmp_path_factory.mktemp("hlo")))


CASES = [(kind, name(sizes)) for kind, meshes in MESHES.items() for sizes in meshes]


@pytest.mark.parametrize("kind,mesh", CASES)
def test_same_latents_and_video_as_one_device(generated, kind, mesh):
    for what in ("latents", "video"):
        ours, ref = generated[f"{kind}/{mesh}/{what}"], generated[f"{kind}/one/{what}"]
        assert ours.shape == ref.shape
        rel, max_abs = rel_err(ours, ref)
        assert rel <= TOLERANCE and max_abs <= 1e-4, f"{kind} {mesh} {what}: rel {rel:.2e}, max-abs {max_abs:.2e}"


def test_ulysses_forward_is_all_to_all_without_gathering_activations(programs):
    rel, max_abs = rel_err(programs["forward/mesh"], programs["forward/one"])
    assert rel <= TOLERANCE and max_abs <= 1e-5
    hlo = str(programs["forward/hlo"])
    assert len(collectives(hlo, "all-to-all")) >= 4  # q, k, v in and o out, inside the layer loop
    # Activations are (1, 16 tokens, 64); only small tables and the model output (512 values) are gathered.
    gathered = [int(np.prod(s)) for op in collectives(hlo, "all-gather") for s in op]
    assert max(gathered, default=0) < 16 * 64, gathered


def test_fsdp_training_step_same_loss_and_gradients_and_gathers_layer_by_layer(programs):
    rel, _ = rel_err(programs["train/mesh/loss"], programs["train/one/loss"])
    assert rel <= TOLERANCE
    rel, max_abs = rel_err(programs["train/mesh/grads"], programs["train/one/grads"])
    assert rel <= TOLERANCE and max_abs <= 1e-5, (rel, max_abs)
    hlo = str(programs["train/hlo"])
    gathered = {s for op in collectives(hlo, "all-gather") for s in op}
    assert (32, 32) in gathered  # one layer's attention weight, gathered inside the layer loop
    stacked = {tuple(int(d) for d in s.strip("()").split(",") if d) for s in programs["train/weight_shapes"]}
    stacked = {s for s in stacked if len(s) == 3 and s[0] == 2}  # (layers, in, out) block kernels
    assert not gathered & stacked, f"a whole stacked weight is all-gathered: {gathered & stacked}"
    # Gradients are reduced across the batch devices (CPU XLA writes reduce-scatter as all-reduce + slice).
    assert collectives(hlo, "reduce-scatter") or collectives(hlo, "all-reduce")


def test_vae_decode_split_by_rows_exchanges_halos_only(programs):
    rel, max_abs = rel_err(programs["vae/mesh"], programs["vae/one"])
    assert rel <= TOLERANCE and max_abs <= 1e-5, (rel, max_abs)
    hlo = str(programs["vae/hlo"])
    assert collectives(hlo, "collective-permute")  # each convolution's halo rows from the neighbours
    # Nothing at pixel resolution is gathered: the only all-gathers are the mid block's attention at the
    # latent resolution (3 frames x 8 x 8 x at most the widest channel count).
    gathered = [int(np.prod(s)) for op in collectives(hlo, "all-gather") for s in op]
    assert max(gathered, default=0) <= 3 * 8 * 8 * int(programs["vae/widest"]), gathered


def test_trainer_on_a_mesh_matches_one_device_and_resumes_on_another_mesh(tmp_path):
    """trainer.train(mesh=data=2 x fsdp=4): the same losses and trainables as on one device (fp32, 4 steps of
    the tiny stage 1 with the official context), the LoRA split over fsdp; a run stopped at step 2 and
    resumed from its sharded checkpoint on fsdp=8 ends where the straight run ends."""
    runs = run_worker("trainer", str(tmp_path))
    for label in ("mesh", "resumed"):
        rel, _ = rel_err(runs[f"{label}/losses"], runs["one/losses"])
        assert rel <= TOLERANCE, (label, runs[f"{label}/losses"], runs["one/losses"])
        rel, max_abs = rel_err(runs[f"{label}/trainable"], runs["one/trainable"])
        assert rel <= TOLERANCE and max_abs <= 1e-5, (label, rel, max_abs)
    assert list(runs["mesh/lora_A_spec"]) == ["None", "fsdp", "None"]  # (layers, in: embed over fsdp, rank)
    assert int(runs["mesh/lora_A_shards"]) == 4
    assert list(runs["resumed/lora_A_spec"]) == ["None", "fsdp", "None"]


def test_two_processes_run_a_chunk_as_one_process_does(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = worker_env(devices=1)
    runs = [(0, 2), (1, 2), (0, 0)]  # two processes over 127.0.0.1 (a context=2 mesh), and one alone
    procs = [subprocess.Popen([sys.executable, WORKER, "process", str(i), str(n), str(port),
                               str(tmp_path / f"p{i}_{n}.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, n in runs]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-4000:]
    alone = np.load(tmp_path / "p0_0.npz")
    for i in (0, 1):
        both = np.load(tmp_path / f"p{i}_2.npz")
        assert int(both["devices"]) == 2 and int(alone["devices"]) == 1
        for what in ("latents", "video"):
            rel, max_abs = rel_err(both[what], alone[what])
            assert rel <= TOLERANCE and max_abs <= 1e-4, f"process {i} {what}: rel {rel:.2e}"
