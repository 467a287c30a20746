"""What each vision encoder costs: bytes per image in the cache, extraction work per image, and the
training step's share (a script, not a test). Results: BENCHMARKS.md and docs/encoders.md.

    python bench/encoders.py                      # every supported family, CPU timings of the encoder forward
    python bench/encoders.py --no-time            # bytes and FLOPs only (exact, seconds)
    python bench/encoders.py --device cuda --batch 64   # GPU: fp16 autocast, as extraction runs there
    python bench/encoders.py --encoders vit_base_patch14_reg4_dinov2.lvd142m,vit_base_patch16_dinov3.lvd1689m

Per encoder at 256 px (grid 16, the SiT/2 token grid):
- cache bytes per image, raw (before zstd), from the store's own layout (pipeline/store.py `array_layout`)
  with the encoder's width: what every image stores (VAE moments, CLS, int8 patches + scales, 16-channel
  compressed features, labels, valid), and one `layers` row (the compressor's four layers, for the subset);
- extraction: encoder forward GFLOPs per image (torch FlopCounterMode, on the meta device: exact, no
  weights) and, unless --no-time, the median time per image of a full-size random-weight forward
  (--device, --batch; fp16 autocast on CUDA, the extraction default, fp32 on the CPU);
- training: the SiT-B/2 and SiT-XL/2 parameter counts with this width's CLS token and REPA projector
  (reglue method), and the loader's bytes per sample. Nothing of the encoder runs per step: the cache holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from reglue import weights
from reglue.pipeline.encoders import EncoderSpec, preprocess_encoder
from reglue.pipeline.store import CacheMeta, array_layout
from reglue.trainer.data import required_arrays
from reglue.trainer.models import count_parameters
from reglue.trainer.objective import get_method, sit_io

ENCODERS = (
    "vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch14_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2.lvd142m",
    "vit_large_patch14_dinov2.lvd142m", "vit_large_patch14_reg4_dinov2.lvd142m",
    "vit_giant_patch14_dinov2.lvd142m", "vit_giant_patch14_reg4_dinov2.lvd142m",
    "vit_small_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3.lvd1689m", "vit_large_patch16_dinov3.lvd1689m",
    "vit_huge_plus_patch16_dinov3.lvd1689m", "vit_7b_patch16_dinov3.lvd1689m",
    "vit_base_patch16_clip_224.openai", "vit_large_patch14_clip_224.openai",
)
TIMED_MAX_PARAMS = 1.2e9  # CPU forwards beyond ViT-G (DINOv3 7B: 27 GB of fp32 weights) are left out


def cache_bytes(spec: EncoderSpec) -> tuple[int, int, int]:
    """(bytes per image of every sample's arrays, bytes of one `layers` row, loader bytes per reglue sample)."""
    a = spec.arch
    meta = CacheMeta(num_samples=1, chunk_size=1, resolution=spec.resolution, latent_channels=4,
                     latent_size=spec.latent_size, vae_scaling_factor=0.18215, dino_dim=a.width,
                     num_patches=spec.num_patches, grid=spec.grid, layers=spec.layers, layers_count=1, num_classes=1000,
                     class_names=(), encoders={}, patches_encoding="", source={}, versions={}, compressed_channels=16,
                     dtypes={"vae_moments": "float16", "cls": "float32", "patches": "int8", "patches_scale": "float16",
                             "labels": "int64", "valid": "bool", "layers": "float16", "compressed": "float16"})
    size = {name: int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            for name, (shape, dtype, _) in array_layout(meta).items()}
    per_image = sum(v for k, v in size.items() if k != "layers")
    read = sum(size[k] for k in required_arrays(get_method("reglue"), _Has(meta.dtypes)))
    return per_image, size["layers"], read


class _Has:
    """The one thing `required_arrays` asks of a cache."""

    def __init__(self, dtypes):
        self.dtypes, self.url = dtypes, "bench"

    def has(self, name):
        return name in self.dtypes


def forward_gflops(spec: EncoderSpec) -> float:
    with torch.device("meta"):
        model = weights.build_encoder(spec.encoder, spec.input_size).eval()
        x = torch.empty(1, 3, spec.input_size, spec.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_intermediates(x, indices=list(spec.layers), norm=True, output_fmt="NLC",
                                    intermediates_only=True, return_prefix_tokens=True)
    return counter.get_total_flops() / 1e9


def forward_ms(spec: EncoderSpec, repeats: int, device: torch.device, batch: int) -> float:
    """Median milliseconds per image of the encoder's forward (after one warm-up call)."""
    with device:  # built where it runs: a GPU initialises the large ones in seconds
        model = weights.build_encoder(spec.encoder, spec.input_size, weight_init="skip").eval()
    images = torch.randint(0, 256, (batch, 3, spec.resolution, spec.resolution), dtype=torch.uint8, device=device)
    autocast = torch.autocast("cuda", torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    times = []
    with torch.no_grad(), autocast:
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.forward_intermediates(preprocess_encoder(images, spec), indices=list(spec.layers), norm=True,
                                        output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - t)
    del model
    return 1e3 * statistics.median(times) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default=",".join(ENCODERS))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="skip the timed forwards")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, base = [], None
    for name in args.encoders.split(","):
        spec = EncoderSpec(encoder=name, resolution=args.resolution)
        a = spec.arch
        per_image, layers_row, read = cache_bytes(spec)
        io = sit_io(get_method("reglue"), latent_channels=4, latent_size=spec.latent_size, dino_dim=a.width,
                    compressed_channels=16)
        params = {p: count_parameters(p, **io, num_classes=1000) for p in ("SiT-B/2", "SiT-XL/2")}
        with torch.device("meta"):
            size = sum(p.numel() for p in weights.build_encoder(name, spec.input_size).parameters())
        timed = not args.no_time and (size <= TIMED_MAX_PARAMS or args.device != "cpu")
        ms = forward_ms(spec, args.repeats, torch.device(args.device), args.batch) if timed else None
        rows.append((name, a, spec, size, per_image, layers_row, read, forward_gflops(spec), ms, params))
        if name == weights.DEFAULT_ENCODER:
            base = rows[-1]
        print(f"done {name}", flush=True)
    print("\n| encoder | D | depth | patch / input | layers | params | cache B/image | layers row B | "
          f"read B/sample | GFLOPs/image | {args.device} ms/image | vs default | SiT-B/2 params | SiT-XL/2 params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, a, spec, size, per_image, layers_row, read, gf, ms, params in rows:
        ratio = f"{ms / base[8]:.2f}x" if ms and base and base[8] else "-"
        print(f"| {name} | {a.width} | {a.depth} | /{a.patch_size} @ {spec.input_size} | "
              f"{spec.layers[0]}..{spec.layers[-1]} | {size / 1e6:,.0f}M | {per_image:,} | {layers_row:,} | "
              f"{read:,} | {gf:.1f} | "
              f"{f'{ms:,.0f}' if ms else '-'} | {ratio} | {params['SiT-B/2']:,} | {params['SiT-XL/2']:,} |")


if __name__ == "__main__":
    main()
