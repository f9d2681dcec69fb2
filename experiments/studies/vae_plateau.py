"""Why the first nano VAE plateaued at about 16 dB: short `train-vae` runs of the nano VAE, each scored the same way.

Every run is ``autoencoder.train_vae`` (the code `helios-jax train-vae` runs) from the same random init on the
same world, with one setting changed from the first recipe's (9-frame windows, batch 4, rate 2e-3; this study is why
nano/recipe.py now trains at 5e-4).
Each trained VAE is then scored on the same held-out 9-frame windows (a seed the training never draws from):

* PSNR of the posterior MEAN decoded and of a posterior SAMPLE decoded (does the sampling noise cost anything?),
  of frame 0 (the causal VAE's image path) and of frames 1-8, and over the object's pixels alone;
* the object's colour error: the mean over object pixels of the decoded colour's distance to the true colour
  (0-255 RGB units), which is what the world's colour metric reads;
* the encoder's mean log-variance (how far the KL let it shrink its noise);
* a linear probe of the object's colour from the latent mean, of the trained encoder and of the random init
  train_vae starts from (does training put the colour into the latents, or take it out?).

    python -m experiments.studies.vae_plateau [--world DIR] [--vae RUN/vae-run/vae] [--steps 250]
        [--runs rate-2e-3,rate-5e-4] [--results]

Without ``--world`` a small world is written to a temporary folder first (nano/world.py, seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from experiments import paths, provenance, reporting

EVAL_WINDOWS, EVAL_SEED = 8, 12345
WORLD_CLIPS, WORLD_FRAMES = 64, 33  # the world written when none is given


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``train_vae`` run: the first recipe's settings unless changed."""

    frames: int = 9
    batch: int = 4
    rate: float = 2e-3


RUNS = {
    "rate-2e-3": Run(),
    "rate-5e-4": Run(rate=5e-4),
    "frames-1": Run(frames=1),
    "frames-1-rate-5e-4": Run(frames=1, rate=5e-4),
}


def evaluation_windows(clips, frames: int = 9):
    import numpy as np

    from helios_jax.training.autoencoder import as_model_range

    rng = np.random.default_rng(EVAL_SEED)
    picks = [(int(rng.integers(len(clips))), 0) for _ in range(EVAL_WINDOWS)]
    picks = [(i, int(rng.integers(len(clips[i]) - frames + 1))) for i, _ in picks]
    return np.stack([as_model_range(clips[i][s:s + frames]) for i, s in picks])


def colour_probe(model, params, clips, batch: int = 16) -> tuple[float, float]:
    """Does the encoder's latent say the object's colour? A least-squares linear map from the posterior mean of
    each 8x8 cell the object fills (first frames of every clip) to its RGB colour, fitted on 3/4 of the cells:
    its mean error on the rest, and that of always answering the mean colour (0-255 RGB units)."""
    import jax
    import numpy as np

    from helios_jax.training.autoencoder import as_model_range

    encode = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode").mean)
    features, colours = [], []
    for i in range(0, len(clips) - batch + 1, batch):
        video = np.stack([as_model_range(c[:1]) for c in clips[i:i + batch]])  # (B, 3, 1, H, W)
        latents = np.asarray(encode(params, video))[:, :, 0]  # (B, z, h, w)
        h, w = latents.shape[-2:]
        image = video[:, :, 0]
        obj = np.any(np.abs(image - image[:, :, :1, :1]) > 0.02, axis=1)  # (B, H, W)
        full = obj.reshape(len(obj), h, obj.shape[1] // h, w, obj.shape[2] // w).all(axis=(2, 4))  # (B, h, w)
        for b, y, x in zip(*np.nonzero(full)):
            features.append(latents[b, :, y, x])
            colours.append(image[b, :, y * image.shape[2] // h, x * image.shape[3] // w])
    x = np.concatenate([np.array(features), np.ones((len(features), 1))], axis=1)
    y = np.array(colours)
    n = len(x) * 3 // 4
    weights = np.linalg.lstsq(x[:n], y[:n], rcond=None)[0]
    error = np.linalg.norm(x[n:] @ weights - y[n:], axis=1).mean() * 127.5
    return float(error), float(np.linalg.norm(y[n:] - y[:n].mean(axis=0), axis=1).mean() * 127.5)


def score(folder: str, video, clips) -> dict[str, float]:
    """The trained VAE in ``folder`` on ``video`` (B, 3, 9, H, W) in [-1, 1], its encoder probed on ``clips``."""
    import jax
    import numpy as np

    from helios_jax.loading import load_vae
    from helios_jax.models import vae as vae_lib
    from helios_jax.training.autoencoder import initial_params

    cfg, params = load_vae(folder)
    model = vae_lib.WanVAE(cfg)
    posterior = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode"))(params, video)
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    noise = jax.random.normal(jax.random.key(EVAL_SEED), posterior.mean.shape)
    mean_frames = np.asarray(decode(params, posterior.mean))
    sample_frames = np.asarray(decode(params, posterior.sample(noise=noise)))
    background = video[:, :, :, :1, :1]  # the world's corner is background
    obj = np.any(np.abs(video - background) > 0.02, axis=1)  # (B, T, H, W)

    def psnr(err) -> float:
        return float(10 * np.log10(4.0 / max(float(np.mean(err)), 1e-10)))

    sq = np.square(mean_frames - video)
    colour = np.linalg.norm(np.moveaxis(mean_frames - video, 1, -1), axis=-1)[obj] * 127.5
    probe, constant = colour_probe(model, params, clips)
    at_init, _ = colour_probe(model, initial_params(cfg, None, 0), clips)  # train_vae's init (seed 0)
    return {"psnr mean": psnr(sq), "psnr sample": psnr(np.square(sample_frames - video)),
            "psnr frame 0": psnr(sq[:, :, 0]), "psnr frames 1-8": psnr(sq[:, :, 1:]),
            "psnr object": psnr(np.moveaxis(sq, 1, -1)[obj]), "object colour error": float(np.mean(colour)),
            "logvar": float(np.mean(np.asarray(posterior.logvar))), "colour probe error": probe,
            "colour probe at init": at_init, "mean-colour error": constant}


def training_psnr(metrics: str, last: int = 50) -> float:
    """The mean training PSNR (a posterior sample decoded, as metrics.jsonl logs it) of a run's last steps."""
    import json

    with open(metrics, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sum(r["psnr"] for r in rows[-last:]) / len(rows[-last:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.studies.vae_plateau", description=__doc__.split("\n")[0])
    parser.add_argument("--world", help="a world dataset folder (meta.json); default: a small one written here")
    parser.add_argument("--steps", type=int, default=250, help="steps of each run")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}; '' for none")
    parser.add_argument("--vae", nargs="*", default=[], help="trained VAE folders scored first, as they are (e.g. "
                        "a `make nano` run's vae-run/vae; its metrics.jsonl beside it gives the training PSNR)")
    parser.add_argument("--results", nargs="?", const=paths.RESULTS, help="append the table to RESULTS.md")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}: choose from {', '.join(RUNS)}")

    import numpy as np

    from helios_jax.nano import world
    from helios_jax.training.autoencoder import read_clips, train_vae

    with tempfile.TemporaryDirectory(prefix="vae-plateau-") as scratch:
        folder = args.world or world.write_dataset(os.path.join(scratch, "world"),
                                                   world.sample_scenes(WORLD_CLIPS, 0), WORLD_FRAMES)
        meta = os.path.join(folder, "meta.json")
        clips = read_clips(meta, height=64, width=64, frames=9)
        video = np.asarray(evaluation_windows(clips))
        rows, result = [], {}
        for vae in args.vae:
            logged = os.path.join(os.path.dirname(os.path.abspath(vae)), "metrics.jsonl")
            scores = {"train psnr (last 50)": training_psnr(logged) if os.path.exists(logged) else float("nan"),
                      **score(vae, video, clips)}
            result[vae] = scores
            rows.append([vae, "-", "-", "-", "-", "-", *scores.values()])
            print(rows[-1], flush=True)
        for name in names:
            run = RUNS[name]
            steps = args.steps
            start = time.perf_counter()
            vae = train_vae(meta, os.path.join(scratch, name), steps=steps, batch=run.batch, frames=run.frames,
                            learning_rate=run.rate, checkpointing_steps=steps, progress=False)
            seconds = time.perf_counter() - start
            scores = {"train psnr (last 50)": training_psnr(os.path.join(scratch, name, "metrics.jsonl")),
                      **score(vae, video, clips)}
            result[name] = {**dataclasses.asdict(run), "steps": steps, "seconds": seconds, **scores}
            rows.append([name, run.frames, run.batch, f"{run.rate:g}", steps, seconds, *scores.values()])
            print(rows[-1], flush=True)
    headers = ["run", "frames", "batch", "rate", "steps", "train_vae wall s", *scores]
    env = provenance.jax_environment("flax", "optax")
    config = (f"the nano VAE (nano/models.py VAE) trained by autoencoder.train_vae from seed 0 on "
              f"{args.world or f'a {WORLD_CLIPS}-clip world of {WORLD_FRAMES} frames (seed 0)'}; scored on "
              f"{EVAL_WINDOWS} held-out 9-frame windows (seed {EVAL_SEED}); colour error in 0-255 RGB units over "
              f"the object's pixels; {reporting.load_note()}\n\n")
    body = config + reporting.markdown_table(headers, rows)
    reporting.report("Why the nano VAE plateaus (experiments/studies/vae_plateau.py)", env, body, result, args)


if __name__ == "__main__":
    main()
