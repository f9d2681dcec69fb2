"""How far a nano DiT's caption reaches its output: the change of the velocity when the caption changes, at
several text lengths.

    python -m experiments.studies.caption_reach FOLDER [FOLDER ...] [--lengths 512 64 16] [--results]

Each FOLDER is a nano pipeline folder (the shipped checkpoint, a `make nano` run's stage1/ or distilled/). The DiT
sees the same noisy latents, history and timestep with two captions; the table gives ||v(a) - v(b)|| / ||v(a)||,
averaged over held-out captions, two timesteps (t = 900 and 500) and two noise draws, for pairs that differ in
the colour only, in the background only, and in every word. The caption's embeddings are zero past its tokens, and
the DiT's cross-attention has no mask (the reference's), so at 512 tokens about 500 identical padding keys share
the softmax with the caption's 13 (docs/nano.md, "Text length"). Measured on this machine's CPU.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import paths, provenance, reporting
from helios_jax import loading
from helios_jax.models.transformer import HeliosTransformer
from helios_jax.nano import scoring, world
from helios_jax.prompts import PromptEncoder

TIMESTEPS = (900.0, 500.0)
DRAWS = 2
HISTORY = (("short", 2), ("mid", 2), ("long", 16))  # the official history sizes, 9 + 20 latent frames in all


def pairs(captions: list[str]) -> dict[str, list[tuple[str, str]]]:
    """For each held-out caption, its twin with another colour, another background, and another of everything."""
    out: dict[str, list[tuple[str, str]]] = {"colour": [], "background": [], "every word": []}
    for text in captions:
        p = world.parse_caption(text)
        colour = next(c for c in world.COLOURS if c != p.colour)
        background = next(b for b in world.BACKGROUNDS if b != p.background)
        shape = next(s for s in world.SHAPES if s != p.shape)
        out["colour"].append((text, text.replace(f" {p.colour} ", f" {colour} ", 1)))
        out["background"].append((text, text.replace(f" {p.background} background", f" {background} background")))
        other = text.replace(f" {p.colour} ", f" {colour} ", 1).replace(f" {p.shape} ", f" {shape} ", 1)
        out["every word"].append((text, other.replace(f" {p.background} background", f" {background} background")))
    return out


def reach(folder: str, lengths: list[int], captions: list[str]) -> tuple[int, dict[tuple[int, str], float]]:
    """The length the folder's tokenizer says it was trained at, and (text length, pair kind) -> the mean relative
    velocity change."""
    cfg, params = loading.load_transformer(f"{folder}/transformer", jnp.float32)
    encoder = PromptEncoder.from_pretrained(folder)
    model = HeliosTransformer(cfg)
    forward = jax.jit(lambda x, t, e, hist: model.apply({"params": params}, x, t, e, **hist))
    h, w = world.WORLD.height // 8, world.WORLD.width // 8
    inputs = []
    for draw in range(DRAWS):
        keys = jax.random.split(jax.random.key(draw), 1 + len(HISTORY))
        hist, start = {}, 0
        for key, (name, frames) in zip(keys[1:], HISTORY):
            hist[f"latents_history_{name}"] = 0.5 * jax.random.normal(key, (1, cfg.in_channels, frames, h, w))
            hist[f"indices_latents_history_{name}"] = jnp.arange(start, start + frames)[None]
            start += frames
        hist["indices_hidden_states"] = jnp.arange(start, start + 9)[None]
        inputs.append((jax.random.normal(keys[0], (1, cfg.in_channels, 9, h, w)), hist))
    table = {}
    for length in lengths:
        def embed(text: str) -> jax.Array:
            return encoder.encode(text, max_sequence_length=length, dtype=jnp.float32)
        for kind, twins in pairs(captions).items():
            changes = []
            for a, b in twins:
                ea, eb = embed(a), embed(b)
                for x, hist in inputs:
                    for t in TIMESTEPS:
                        va, vb = (forward(x, jnp.array([t]), e, hist) for e in (ea, eb))
                        changes.append(float(jnp.linalg.norm(va - vb) / jnp.linalg.norm(va)))
            table[(length, kind)] = float(np.mean(changes))
    return encoder.max_sequence_length, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.studies.caption_reach",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="nano pipeline folders")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 64, 16], help="text lengths (tokens)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out captions")
    parser.add_argument("--results", nargs="?", const=paths.RESULTS, help="append the table to RESULTS.md")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    captions = scoring.held_out_captions(args.prompts)
    kinds = list(pairs(captions))
    rows, result = [], {}
    for folder in args.folders:
        trained_at, table = reach(folder, args.lengths, captions)
        result[folder] = {f"{length} {kind}": v for (length, kind), v in table.items()}
        for length in args.lengths:
            rows.append([folder, trained_at, length, *[table[(length, kind)] for kind in kinds]])
    body = (f"{args.prompts} held-out captions x {len(TIMESTEPS)} timesteps x {DRAWS} noise draws; "
            "||v(a) - v(b)|| / ||v(a)|| for caption pairs that differ as the column says\n\n")
    body += reporting.markdown_table(["model", "its tokenizer's length", "text length", *kinds], rows)
    env = provenance.jax_environment("flax")
    reporting.report("Nano Helios: how far the caption reaches the DiT (experiments/studies/caption_reach.py)",
                     env, body, {"rows": result, "settings": vars(args)}, args)


if __name__ == "__main__":
    main()
