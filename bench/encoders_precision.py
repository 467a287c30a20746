"""How far do reduced-precision forwards move the cached features from fp32?

Runs `FeatureEncoder.encode` under fp32, bf16 and fp16 autocast on the same uint8 crops and
reports, per output, the max abs difference and the mean / min cosine (per token or per sample)
against fp32. Models: the tiny preset, and the full-size architectures (SD-VAE, ViT-B/14-reg4)
with seeded random weights (no pretrained weights needed).

    python bench/encoders_precision.py [--device cuda] [--full] [--batch 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from reglue import weights
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder


def full_size_models(img_size: int):
    """SD-VAE and DINOv2 ViT-B/14-reg4 architectures, random weights perturbed off their init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = weights.build_vae()
        dino = weights.build_encoder(img_size=img_size, init_values=1.0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # as the golden full-size check: N(0, 0.02^2) on every parameter
            for p in dino.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return vae.eval(), dino.eval()


def compare(ref: dict, out: dict) -> dict[str, tuple[float, float, float]]:
    rows = {}
    for k, r in ref.items():
        o = out[k]
        flat_r, flat_o = r.flatten(0, -2) if r.ndim > 2 else r, o.flatten(0, -2) if o.ndim > 2 else o
        if k.startswith("vae"):  # per sample: [B, zc*h*h]
            flat_r, flat_o = r.flatten(1), o.flatten(1)
        cos = F.cosine_similarity(flat_o, flat_r, dim=-1)
        rows[k] = ((o - r).abs().max().item(), cos.mean().item(), cos.min().item())
    return rows


def run(label: str, spec: EncoderSpec, device: str, batch: int, models=None):
    vae, dino = models or (None, None)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, spec.resolution, spec.resolution), generator=g, dtype=torch.uint8)
    # smooth the noise a little so the crops look less like white noise to the VAE
    images = F.avg_pool2d(images.float(), 5, 1, 2).round().to(torch.uint8)
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        enc = FeatureEncoder(EncoderSpec(**{**spec.__dict__, "precision": precision}), device, vae=vae, vfm=dino)
        t0 = time.perf_counter()
        results[precision] = {k: v.cpu() for k, v in enc.encode(images, with_layers=True).items()}
        print(f"{label}: {precision} forward {time.perf_counter() - t0:.1f} s")
    for precision in ("bf16", "fp16"):
        for k, (mx, cmean, cmin) in compare(results["fp32"], results[precision]).items():
            print(f"| {label} | {precision} | {k} | {mx:.2e} | {cmean:.7f} | {cmin:.7f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also the full-size random-weight models at 256")
    args = ap.parse_args()
    print("| model | autocast | output | max abs diff vs fp32 | mean cos | min cos |")
    run("tiny (64 px)", EncoderSpec.tiny(), args.device, args.batch)
    if args.full:
        spec = EncoderSpec(preset="tiny", resolution=256)  # models passed in; preset unused
        run("full-size random (256 px)", spec, args.device, args.batch, full_size_models(spec.input_size))


if __name__ == "__main__":
    main()
