"""Train-step throughput: SiT fed from the cache vs the same step with DINOv2 + compressor online.

    python bench/train_step.py                       # GPU: SiT-B/2 and SiT-XL/2, batch 256 (or the largest that fits)
    python bench/train_step.py --models SiT-B/2 --batch 128 --steps 30 --compile
    python bench/train_step.py --smoke               # CPU: tiny dims and SiT-tiny/2, a few steps (checks it runs)

Both feeds run `trainer.loop.train_step` (method reglue, AdamW, clip, bf16 autocast) plus the EMA update:
- cache: rows of a synthetic real-size store (bench/loader.py `synthetic_cache`, ViT-B / 256 px shapes)
  through `CacheLoader` (background thread, pinned memory) and `prepare_batch`;
- online: the reference's per-step work (train.py:303-341): uint8 images (resident on the device, so
  image decoding is NOT counted, a best case for it) -> ImageNet normalize + bicubic resize to 224 ->
  DINOv2 ViT-B/14-reg `get_intermediate_layers(8..11, norm=True)` -> standardize -> compressor
  encoder -> bilinear upsample, under no_grad and the same autocast; VAE moments from the cache.
Weights are random (no download): shapes and FLOPs are real, values are not. MFU counts the SiT's
train FLOPs only (3x its forward, measured with torch's FlopCounterMode), against the GPU's dense
bf16 peak (--peak-tflops to override); the online feed's extra DINOv2 work shows as a lower MFU.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from loader import REAL, TINY, synthetic_cache
from torch.utils.flop_counter import FlopCounterMode

from reglue import weights
from reglue.pipeline.compressor import EncoderDecoder, NormStats, compress
from reglue.pipeline.encoders import EncoderSpec, preprocess_encoder
from reglue.trainer.data import CacheLoader, prepare_batch, required_arrays
from reglue.trainer.draws import Draws
from reglue.trainer.ema import EMA
from reglue.trainer.loop import Plan, train_step
from reglue.trainer.models import SiT, preset_kwargs
from reglue.trainer.objective import Batch, get_method, sit_io

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity
LAYERS = [8, 9, 10, 11]


def online_features(dims: dict, device: torch.device, images: torch.Tensor):
    """make_batch for the online feed: DINOv2 + compressor on the images, as reference train.py:303-341."""
    spec = EncoderSpec(resolution=dims["resolution"])  # the default encoder, DINOv2 ViT-B/14-reg (random weights)
    dino = (weights.tiny_encoder(img_size=spec.input_size) if dims is TINY
            else weights.build_encoder(img_size=spec.input_size))
    dino = dino.to(device).eval().requires_grad_(False)
    C = len(LAYERS) * dims["dino_dim"]
    encoder = EncoderDecoder([C, 256, dims["compressed_channels"]]).encoder.to(device).eval().requires_grad_(False)
    stats = NormStats(torch.zeros(C), torch.ones(C))
    h = dims["latent_size"]

    @torch.no_grad()
    def make_batch(raw: dict, draws: Draws) -> Batch:
        x = preprocess_encoder(images[raw["index"].to(device) % len(images)], spec)  # [B,3,224,224]
        outs = dino.get_intermediate_layers(x, n=LAYERS, reshape=False, return_prefix_tokens=True, norm=True)
        patches, prefix = outs[-1]
        cls = prefix[:, 0].float()
        features = compress(encoder, torch.cat([p for p, _ in outs], dim=-1), stats).float()  # [B,c,g,g]
        mean, std = raw["vae_moments"].to(device).float().chunk(2, dim=1)
        return Batch(latent=(mean + std * draws.posterior(mean)) * 0.18215, labels=raw["labels"].to(device),
                     features=F.interpolate(features, size=(h, h), mode="bilinear", align_corners=False),
                     cls=cls, repa_target=torch.cat([cls[:, None], patches.float()], dim=1))

    return make_batch


def train_flops_per_image(model: SiT, kwargs: dict, device: torch.device) -> float:
    h, D = kwargs["input_size"], kwargs["cls_dim"]
    x = torch.randn(1, kwargs["in_channels"], h, h, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.rand(1, device=device), torch.zeros(1, dtype=torch.long, device=device),
              torch.randn(1, D, device=device))
    return 3.0 * counter.get_total_flops()


def bench(accelerator, cache, dims, preset: str, feed: str, batch: int, steps: int, warmup: int) -> dict:
    method = get_method("reglue")
    m = cache.meta
    kwargs = {**preset_kwargs(preset), **sit_io(method, latent_channels=m.latent_channels, latent_size=m.latent_size,
                                                dino_dim=m.dino_dim, compressed_channels=m.compressed_channels),
              "num_classes": m.num_classes}
    device = accelerator.device
    model = SiT(**kwargs).to(device)
    flops = train_flops_per_image(model, kwargs, device)
    ema = EMA(model, 0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    if feed == "cache":
        names = required_arrays(method, cache)
        make_batch = lambda raw, draws: prepare_batch(raw, method, m, device, draws=draws)
    else:
        names = ("vae_moments", "labels")
        images = torch.randint(0, 256, (min(batch, 512), 3, m.resolution, m.resolution), dtype=torch.uint8,
                               device=device)
        make_batch = online_features(dims, device, images)
    loader = CacheLoader(cache, names, batch, pin_memory=device.type == "cuda")
    plan = Plan(method, kwargs, tuple(names), {}, 1, batch, batch, 1)
    try:
        for step in range(warmup + steps):
            if step == warmup:
                _sync(device)
                t0 = time.perf_counter()
            train_step(accelerator, model, optimizer, next(loader), make_batch, plan, 0, 1.0, step)
            ema.update(bare)
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
    finally:
        loader.close()
        accelerator.free_memory()  # drop the prepared model and optimizer before the next configuration
    return {"img_s": batch / seconds, "step_ms": 1e3 * seconds, "flops": flops}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def largest_batch(accelerator, cache, dims, preset, feed, batch, steps, warmup) -> tuple[int, dict]:
    """Try `batch`, halving on CUDA out-of-memory."""
    while True:
        try:
            return batch, bench(accelerator, cache, dims, preset, feed, batch, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="SiT-B/2,SiT-XL/2")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny dims, SiT-tiny/2, batch 8, 3 steps")
    args = ap.parse_args()
    from accelerate import Accelerator

    smoke = args.smoke or not torch.cuda.is_available()
    dims, models = (TINY, ["SiT-tiny/2"]) if smoke else (REAL, args.models.split(","))
    batch, steps, warmup = (8, 3, 1) if smoke else (args.batch, args.steps, args.warmup)
    accelerator = Accelerator(cpu=smoke, mixed_precision="bf16", dynamo_backend="inductor" if args.compile else "no")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if not smoke else "CPU (smoke: tiny dims)"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    with tempfile.TemporaryDirectory() as tmp:
        cache = synthetic_cache(f"{tmp}/cache.zarr", max(4 * batch, 512), dims=dims)
        print(f"device: {name}; peak bf16 {peak / 1e12 if peak else '?'} TFLOP/s; compile {args.compile}\n")
        print("| model | feed | batch | step ms | img/s | SiT MFU | cache / online |")
        print("|---|---|---|---|---|---|---|")
        for preset in models:
            rows = {feed: largest_batch(accelerator, cache, dims, preset, feed, batch, steps, warmup)
                    for feed in ("cache", "online")}
            for feed, (b, r) in rows.items():
                mfu = f"{100 * r['img_s'] * r['flops'] / peak:.1f} %" if peak else "n/a"
                ratio = rows["cache"][1]["img_s"] / rows["online"][1]["img_s"]
                print(f"| {preset} | {feed} | {b} | {r['step_ms']:.1f} | {r['img_s']:.1f} | {mfu} | "
                      f"{f'{ratio:.2f}x' if feed == 'cache' else ''} |")


if __name__ == "__main__":
    main()
