"""What does fp16 extraction change in the compressor's norm stats (per-channel mean and std of the
DINOv2 layers 8..11), against the reference's fp32 (calc_norm_stats.py runs without autocast)?

Two effects, each measured on its own:
1. fp16 autocast of the DINOv2 forward (`extract --precision fp16`, the default on CUDA): the full-size
   ViT-B/14-reg4 architecture with seeded random weights (no pretrained weights here), on smoothed random
   crops, stats from the fp32 forward vs the fp16-autocast forward of the same images;
2. fp16 storage of the `layers` rows (what `train-compressor --cache` reads): the same fp32 features
   rounded to fp16; and, at the real per-channel magnitudes, Gaussian tokens drawn with the official
   file's mean and std (`--official dino_mean_std_8_9_10_11_256.pth`) rounded to fp16.
Each row: the largest and the median over the 3072 channels of |d mean| / std and |d std| / std (both in
units of the channel's fp32 std, i.e. the shift they cause in the standardized features the compressor
sees). For scale, the "other images" row is the same statistic between the stats of two disjoint halves
of the images (fp32): how much the stats move when the sample changes, e.g. from the first 77,312 images
to another 77,312.

    python bench/norm_stats_precision.py --images 8 [--official PATH] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from reglue.pipeline.compressor import load_norm_stats
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.trainer.compressor_data import Moments


def stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    m = Moments(x.shape[-1])
    m.update(x)
    return m.result()


def row(label: str, ref: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> None:
    dm, ds = np.abs(other[0] - ref[0]) / ref[1], np.abs(other[1] - ref[1]) / ref[1]
    print(f"| {label} | {dm.max():.2e} | {np.median(dm):.2e} | {ds.max():.2e} | {np.median(ds):.2e} |", flush=True)


def full_size_dino(img_size: int):
    """DINOv2 ViT-B/14-reg4, random weights perturbed off their init (as bench/encoders_precision.py)."""
    from reglue import weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dino = weights.build_encoder(img_size=img_size, init_values=1.0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in dino.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return dino.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--official", default=None, help="the official dino_mean_std_8_9_10_11_256.pth")
    ap.add_argument("--tokens", type=int, default=20_000, help="Gaussian tokens at the official scales")
    args = ap.parse_args()
    print("| features | max abs d mean / std | median | max abs d std / std | median |")
    print("|---|---|---|---|---|")

    # 1-2. The full-size random-weight model, fp32 and fp16 autocast forwards of the same crops.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 256, 256), generator=g, dtype=torch.uint8)
    images = F.avg_pool2d(images.float(), 5, 1, 2).round().to(torch.uint8)  # smoother than white noise
    dino = full_size_dino(EncoderSpec().input_size)
    layers = {}
    for precision in ("fp32", "fp16"):
        enc = FeatureEncoder(EncoderSpec(preset="tiny", precision=precision), args.device, vfm=dino, with_vae=False)
        t0 = time.perf_counter()
        layers[precision] = torch.cat([enc.layers(b).cpu() for b in images.split(args.batch)])  # [n, 256, 3072]
        print(f"<!-- {precision} forward of {args.images} images: {time.perf_counter() - t0:.1f} s -->", flush=True)
    ref = stats(layers["fp32"])
    row(f"full-size random weights, {args.images} images: fp16 autocast forward", ref, stats(layers["fp16"]))
    row(f"full-size random weights, {args.images} images: fp32 forward stored fp16", ref, stats(layers["fp32"].half()))
    row(f"full-size random weights, {args.images} images: fp16 autocast forward stored fp16", ref,
        stats(layers["fp16"].half()))
    half = args.images // 2
    row(f"full-size random weights: other images (stats of images 0-{half - 1} vs {half}-{args.images - 1}, fp32)",
        stats(layers["fp32"][:half]), stats(layers["fp32"][half:]))

    # 2'. fp16 storage at the real per-channel magnitudes.
    if args.official:
        s = load_norm_stats(args.official)
        g = torch.Generator().manual_seed(0)
        x = s.mean + s.std * torch.randn(args.tokens, len(s.mean), generator=g)
        row(f"Gaussian tokens at the official mean/std ({args.tokens:,}): stored fp16", stats(x), stats(x.half()))


if __name__ == "__main__":
    main()
