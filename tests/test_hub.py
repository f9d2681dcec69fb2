"""Checkpoints named by hub id, resolved offline from a Hugging Face cache seeded in the test's own folder (the
library's layout: blobs, snapshots linking to them, refs naming commits), and outputs never replaced silently.

Every test runs with HF_HUB_OFFLINE set and the hub's address pointed at a closed local port: none reaches a hub.
Nothing here reads a weight or compiles a program: the seeded checkpoints hold the published configs only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.utils import filter_repo_objects
from umt5_fixtures import write_tokenizer

from helios_jax import cli, generate, hub
from helios_jax.checkpoint import read_checkpoint_configs
from helios_jax.config import ConfigError
from helios_jax.pipeline import HeliosPipeline
from helios_jax.prompts import PromptEncoder
from helios_jax.training import recipes

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CONFIGS = os.path.join(FIXTURES, "checkpoint-configs")
REPO = "BestWishYsh/Helios-Distilled"
MAIN, OTHER = "a" * 40, "b" * 40  # the commits of the seeded snapshots
MISSING_ID = "org/missing"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, offline mode on, and no reachable hub."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    return home / "hub"


def checkpoint_files(name: str, tokenizer: str) -> dict[str, bytes]:
    """A published checkpoint's configs (tests/fixtures/checkpoint-configs) with a small tokenizer.json."""
    root = os.path.join(CONFIGS, name)
    files = {}
    for folder, _, names in os.walk(root):
        for file in names:
            with open(os.path.join(folder, file), "rb") as f:
                files[os.path.relpath(os.path.join(folder, file), root)] = f.read()
    with open(os.path.join(tokenizer, "tokenizer.json"), "rb") as f:
        files["tokenizer/tokenizer.json"] = f.read()
    return files


def seed(cache, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """One snapshot of ``repo_id`` in huggingface_hub's cache layout; returns the snapshot folder."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, content in files.items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture
def seeded(offline, tmp_path):
    """REPO at main: Helios-Distilled's configs; at the branch v2 (and its commit): Helios-Mid's."""
    tokenizer = write_tokenizer(str(tmp_path / "tokenizer"))
    main = seed(offline, REPO, MAIN, checkpoint_files("Helios-Distilled", tokenizer))
    other = seed(offline, REPO, OTHER, checkpoint_files("Helios-Mid", tokenizer), refs=("v2",))
    return main, other


def test_the_seeded_cache_is_the_librarys_layout(seeded, offline):
    """huggingface_hub's own cache scanner reads the seeded repository, both revisions and their refs."""
    info = scan_cache_dir(offline)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO
    assert {ref: revision.commit_hash for ref, revision in repo.refs.items()} == {"main": MAIN, "v2": OTHER}
    assert {r.commit_hash for r in repo.revisions} == {MAIN, OTHER}


def test_a_hub_id_resolves_offline_to_its_snapshot(seeded):
    main, other = seeded
    assert hub.resolve(REPO) == main
    configs = read_checkpoint_configs(hub.resolve(REPO))
    assert configs.spec.pyramid and configs.spec.is_distilled


@pytest.mark.parametrize("revision", ["v2", OTHER])
def test_the_revision_is_honoured(seeded, revision):
    """A branch (through refs/) or a commit hash picks the other snapshot: Helios-Mid, not distilled."""
    assert hub.resolve(REPO, revision=revision) == seeded[1]
    assert not read_checkpoint_configs(hub.resolve(REPO, revision=revision)).spec.is_distilled


def test_offline_and_not_cached_names_the_id_and_the_command(seeded):
    with pytest.raises(hub.HubError) as err:
        hub.resolve(MISSING_ID)
    assert MISSING_ID in str(err.value) and "HF_HUB_OFFLINE is set" in str(err.value)
    assert str(err.value).endswith(f"`HF_HUB_OFFLINE=0 helios-jax download {MISSING_ID}`")
    with pytest.raises(hub.HubError, match=f"`HF_HUB_OFFLINE=0 helios-jax download {REPO} --revision v3`"):
        hub.resolve(REPO, revision="v3")


def test_a_partly_fetched_snapshot_is_named_so(seeded, offline):
    """The cache's listing of the commit (trees/COMMIT.json, as huggingface_hub documents it) names a weights file
    the snapshot lacks: the whole checkpoint is refused, its tokenizer folder alone still resolves."""
    files = {name: {"size": 1, "blob_id": "0" * 40} for name in ("model_index.json", "tokenizer/tokenizer.json",
                                                                 "transformer/diffusion_pytorch_model.safetensors")}
    trees = offline / f"models--{REPO.replace('/', '--')}" / "trees"
    trees.mkdir()
    (trees / f"{MAIN}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    with pytest.raises(hub.HubError, match=f"holds only part of it and HF_HUB_OFFLINE is set; fetch it with "
                                           f"`HF_HUB_OFFLINE=0 helios-jax download {REPO}`"):
        hub.resolve(REPO)
    assert hub.resolve(REPO, folders=("tokenizer",)) == seeded[0]


def test_local_files_only_is_honoured_online_too(seeded, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.resolve(REPO, local_files_only=True) == seeded[0]
    with pytest.raises(hub.HubError, match=f"local_files_only is set; fetch it with `helios-jax download {MISSING_ID}`"):
        hub.resolve(MISSING_ID, local_files_only=True)


def test_paths_are_returned_as_they_are_or_said_not_to_exist(tmp_path, monkeypatch):
    assert hub.resolve(tmp_path) == str(tmp_path)
    with pytest.raises(hub.HubError, match="is for a hub id"):
        hub.resolve(tmp_path, revision="main")
    (tmp_path / "org").mkdir()
    monkeypatch.chdir(tmp_path)
    # not ids: an absolute or relative path, a deeper path, a bare name, an id whose org is a local folder
    for name in (str(tmp_path / "nope"), "./org/name", "~/org/name", "a/b/c", "nope", "org/name"):
        with pytest.raises(hub.HubError, match=f"^{name} does not exist"):
            hub.resolve(name)


def test_allow_patterns_select_what_the_pipeline_reads():
    """Of a published repository's listing, exactly the files checkpoint.py, loading.py and tokenizer.py read."""
    read = [
        "model_index.json", "scheduler/scheduler_config.json",
        "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    ]
    unread = [".gitattributes", "README.md", "assets/teaser.mp4", "modular_model_index.json",
              "tokenizer/spiece.model", "tokenizer/special_tokens_map.json", "transformer/diffusion_pytorch_model.bin",
              "transformer_ode/config.json"]
    assert sorted(filter_repo_objects(read + unread, allow_patterns=hub.allow_patterns())) == sorted(read)
    encoders = list(filter_repo_objects(read, allow_patterns=hub.allow_patterns(("vae", "text_encoder", "tokenizer"))))
    assert encoders == [f for f in read if f.split("/")[0] in ("vae", "text_encoder", "tokenizer")]
    assert hub.allow_patterns(("transformer_ode",)) == ["transformer_ode/config.json", "transformer_ode/*.safetensors",
                                                       "transformer_ode/*.safetensors.index.json"]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", MISSING_ID, "--output", "{tmp}/v.mp4"],
    ["convert", MISSING_ID, "{tmp}/converted"],
    ["offload", "{tmp}/meta.json", "--checkpoint", MISSING_ID, "--output", "{tmp}/latents"],
    ["offload", "ode-pairs", MISSING_ID, "{tmp}/prompts.txt", "{tmp}/pairs"],
    ["download", MISSING_ID],
], ids=lambda argv: argv[0] if argv[1] != "ode-pairs" else "ode-pairs")
def test_every_command_names_the_id_and_the_download_command(seeded, tmp_path, capsys, argv):
    before = sorted(os.listdir(tmp_path))
    status, _, err = _main([a.format(tmp=tmp_path) for a in argv], capsys)
    command = cli.ODE_PAIRS if argv[1] == "ode-pairs" else argv[0]
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"helios-jax {command}: error: {MISSING_ID}: ")
    assert err.rstrip().endswith(f"`HF_HUB_OFFLINE=0 helios-jax download {MISSING_ID}`")
    assert sorted(os.listdir(tmp_path)) == before, "nothing may be written"


@pytest.mark.parametrize("load", [HeliosPipeline.from_pretrained, PromptEncoder.from_pretrained],
                         ids=["HeliosPipeline", "PromptEncoder"])
def test_from_pretrained_takes_hub_ids(seeded, load):
    with pytest.raises(hub.HubError, match=f"{MISSING_ID}: .*`HF_HUB_OFFLINE=0 helios-jax download {MISSING_ID}`"):
        load(MISSING_ID)


def test_download_prints_the_cached_folder(seeded, capsys):
    status, out, _ = _main(["download", REPO, "--revision", "v2"], capsys)
    assert status == 0 and out.strip() == seeded[1]


def test_an_interrupted_download_says_what_the_cache_keeps(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "snapshot_download", interrupted)
    status, _, err = _main(["download", REPO], capsys)
    assert status == 130 and "interrupted (SIGINT); the Hugging Face cache keeps the files fetched so far" in err


def test_generate_reads_a_hub_id_before_any_weight(seeded, tmp_path):
    args = cli.parser().parse_args(["generate", "--checkpoint", REPO, "--revision", "v2",
                                    "--output", str(tmp_path / "v.mp4")])
    assert generate.prepare(args).checkpoint == seeded[1]


def test_an_existing_output_is_replaced_only_with_overwrite(seeded, tmp_path, capsys):
    args = ["generate", "--checkpoint", REPO, "--output", str(tmp_path / "v.mp4")]
    for existing in ("v.mp4", "v.png"):
        (tmp_path / existing).write_bytes(b"keep")
        status, _, err = _main(args, capsys)
        assert status == 2 and "already exist" in err and "--overwrite" in err, err
        assert (tmp_path / existing).read_bytes() == b"keep"
        job = generate.prepare(cli.parser().parse_args([*args, "--overwrite"]))  # checked, nothing written yet
        assert job.output == str(tmp_path / "v.mp4") and (tmp_path / existing).read_bytes() == b"keep"
        (tmp_path / existing).unlink()


def test_the_official_yaml_finds_its_hub_ids_in_the_cache(offline, tmp_path):
    """stage_1_post.yaml names BestWishYsh/Helios-Base and its transformer_init subfolder, as published."""
    data = tmp_path / "data"
    data.mkdir()
    yaml = "stage_1_post"  # the shipped YAML, found by name
    recipe = recipes.load(yaml, [f"data_config.instance_data_root=[{data}]"])
    with pytest.raises(ConfigError, match="model_config.pretrained_model_name_or_path: BestWishYsh/Helios-Base: .*"
                                          "`HF_HUB_OFFLINE=0 helios-jax download BestWishYsh/Helios-Base`"):
        recipes.check_paths(recipe)
    snapshot = seed(offline, "BestWishYsh/Helios-Base", MAIN, {"model_index.json": b"{}",
                                                               "transformer_init/config.json": b"{}"})
    recipes.check_paths(recipe)
    model = recipe.model()
    assert model.pipeline == snapshot and model.transformer == os.path.join(snapshot, "transformer_init")
    shutil.rmtree(os.path.join(snapshot, "transformer_init"))
    with pytest.raises(ConfigError, match="transformer_model_name_or_path: no folder at .*transformer_init"):
        recipes.check_paths(recipe)
