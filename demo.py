"""`reglue demo`: the whole flow on a built-in tiny default, offline, in a few minutes on a CPU.

images -> extract -> train-compressor --src images --fill cache -> train -> sample -> fid-ref + fid
(the README's real flow: one VAE pass; the compressor trains on the images, as the reference does).

Every model here is the `tiny` preset: the real architectures (SD-VAE AutoencoderKL, DINOv2 ViT/14
with 4 registers, SiT, the Inception FID network) at tiny width with seeded random weights. The
numbers it prints show that the plumbing works; they are NOT results. Rerunning the same command
resumes: each stage skips work its outputs already hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class DemoConfig:
    """The tiny default flow."""

    out: str = "demo"
    """Folder for everything the demo writes (images/, cache.zarr, compressor/, run/, samples)."""
    classes: int = 4
    """Synthetic classes (each a shape drawn on a colour)."""
    per_class: int = 12
    """Images per class."""
    resolution: int = 64
    """Center-crop side: latent 8x8, DINOv2 input 56 -> a 4x4 patch grid."""
    method: str = "reglue"
    """Method trained: sit | repa | reg | redi | reglue."""
    steps: int = 60
    """SiT optimizer steps."""
    samples: int = 16
    """Images sampled and scored."""
    seed: int = 0
    """Seed of the synthetic images and of every stage."""

    def __post_init__(self):
        if self.classes < 1 or self.per_class < 2 or self.steps < 1 or self.samples < 2:
            raise ValueError("demo needs classes >= 1, per_class >= 2, steps >= 1, samples >= 2")


def make_images(root: Path, classes: int, per_class: int, seed: int) -> Path:
    """A labelled folder of varied sizes, plus one truncated file to show the bad-input report."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 29 + 160) % 256])
        for i in range(per_class):
            w, h = (int(s) for s in rng.integers(72, 200, size=2))
            pixels = np.clip(hue + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            box = [int(v) for v in (w * 0.2, h * 0.2, w * 0.8, h * 0.8)]
            draw = ImageDraw.Draw(img)
            [draw.ellipse, draw.rectangle, draw.chord, draw.pieslice][c % 4](
                box, *(() if c % 4 < 2 else (30, 300)), fill=tuple(255 - hue))
            img.save(folder / f"img_{i:03d}.jpg", quality=90)
    good = (root / "class_00" / "img_000.jpg").read_bytes()
    (root / "class_00" / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes to OUT/demo.json) what each produced."""
    from reglue.pipeline.encoders import EncoderSpec
    from reglue.pipeline.extract import ExtractConfig, extract
    from reglue.pipeline.store import info
    from reglue.trainer.compressor_train import CompressorConfig, train_compressor
    from reglue.trainer.evaluate import FidConfig, RefConfig, evaluate, reference_stats
    from reglue.trainer.generate import GenerateConfig, generate
    from reglue.trainer.inception import save_standin
    from reglue.trainer.loop import TrainConfig, train
    from reglue.trainer.sampling import SamplerConfig

    out = Path(cfg.out)
    say = lambda step, text: print(f"\n== demo {step}/6: {text}", flush=True)
    say(1, f"a synthetic labelled folder ({cfg.classes} classes x {cfg.per_class}, + 1 broken file)")
    images = out / "images"
    if not images.exists():
        make_images(images, cfg.classes, cfg.per_class, cfg.seed)

    say(2, "reglue extract (tiny preset: random-weight SD-VAE + DINOv2-reg4, NOT for real use)")
    cache = str(out / "cache.zarr")
    spec = EncoderSpec.tiny(resolution=cfg.resolution)
    extract(ExtractConfig(str(images), cache, spec, chunk_size=16, batch_size=16, num_workers=0,
                          flip=True))  # both views: any method
    print(info(cache))

    say(3, "reglue train-compressor --src images --fill cache (DINOv2 on the images: norm stats, the conv "
           "autoencoder; then the cache's compressed features)")
    train_compressor(CompressorConfig(str(out / "compressor"), src=str(images), fill=cache, spec=spec, epochs=5,
                                      global_batch=16, bn_batch=8, hidden=32, seed=cfg.seed, num_workers=0))

    say(4, f"reglue train --method {cfg.method} --model SiT-tiny/2 ({cfg.steps} steps, fp32 on CPU)")
    run = out / "run"
    train(TrainConfig(cache, str(run), method=cfg.method, model="SiT-tiny/2", max_steps=cfg.steps,
                      global_batch=8, precision="fp32", seed=cfg.seed, log_every=max(1, cfg.steps // 4),
                      ckpt_every=cfg.steps, snapshot_every=cfg.steps, sample_every=0, window=32, trackers=()))
    snapshot = run / "snapshots" / f"ema-{cfg.steps:07d}.safetensors"

    say(5, f"reglue sample ({cfg.samples} images, 25-step SDE with the paper's guidance; the tiny VAE, from the "
           "snapshot's metadata)")
    sampler = SamplerConfig(num_steps=25)
    samples = generate(GenerateConfig(str(snapshot), str(out / "samples.npz"), num=cfg.samples, batch_size=8,
                                      seed=cfg.seed, sampler=sampler, grid=cfg.samples,
                                      part_size=8, cpu=True))

    say(6, "reglue fid-ref + reglue fid (a random-weight Inception stands in for the real file)")
    inception = out / "inception-standin" / "inception-2015-12-05.pt"  # the real file's name, random weights
    if not inception.exists():
        inception.parent.mkdir(parents=True, exist_ok=True)
        save_standin(inception, seed=cfg.seed)
    ref = reference_stats(RefConfig(source=str(images), out=str(out / "ref.npz"), resolution=cfg.resolution,
                                    acts=cfg.samples, inception=str(inception), batch_size=16, cpu=True))
    metrics = evaluate(FidConfig(samples=str(samples), ref=str(ref), inception=str(inception), batch_size=16,
                                 cpu=True))
    result = {"cache": cache, "run": str(run), "snapshot": str(snapshot), "samples": str(samples),
              "grid": str(samples.with_suffix(".grid.png")), "metrics": metrics}
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    grid = samples.with_suffix(".grid.png")
    print(f"\n{metrics['summary']} (plumbing check with random weights, not a result)\n"
          f"demo: run {run}, samples {samples}, grid {grid}, everything listed in {out / 'demo.json'}")
    return result
