"""Benchmark of `reglue extract` (a script, not a test). Results: BENCHMARKS.md.

  python bench/extract.py throughput [--full] [--device cuda] ...  extraction img/s vs the bare forward
  python bench/extract.py storage [--full]                         bytes/image per array and codec
  python bench/extract.py chunks                                   read speed vs samples per chunk

`--full` swaps the tiny preset for the full-size architectures (SD-VAE, DINOv2 ViT-B/14-reg) with
random weights: real shapes and FLOPs, not real feature statistics.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc, Zstd
from PIL import Image, ImageFilter

from reglue import weights
from reglue.pipeline import codec
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.pipeline.extract import ExtractConfig, extract_chunks, owned_pending, plan_meta, process_state
from reglue.pipeline.sources import scan
from reglue.pipeline.store import Cache, CacheMeta

REFERENCE_BYTES = 196_608 + 32_896  # reference layout: uncompressed 256^2 PNG + fp32 [8,32,32] .npy
CODECS = {"none": None, "zstd1": Zstd(1), "zstd3": Zstd(3), "zstd9": Zstd(9),
          "blosc-lz4-shuffle": Blosc("lz4", 5, Blosc.SHUFFLE), "blosc-zstd1-shuffle": Blosc("zstd", 1, Blosc.SHUFFLE)}


def make_images(root: Path, n: int) -> Path:
    """ImageNet-like JPEGs (500x375, smooth content, quality 90) in 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (94, 125, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        img.filter(ImageFilter.GaussianBlur(2)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def build_encoder(args, device) -> FeatureEncoder:
    spec = EncoderSpec(preset="real" if args.full else "tiny", resolution=args.resolution, precision=args.precision)
    if not args.full:
        return FeatureEncoder(spec, device)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # SD-VAE layout (diffusers config of stabilityai/sd-vae-ft-mse), random weights
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=256).eval()
    vfm = weights.build_encoder(spec.encoder, img_size=spec.input_size).eval()
    return FeatureEncoder(spec, device, vae=vae, vfm=vfm)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def extract_store(args, work: Path, encoder: FeatureEncoder, state, name: str) -> tuple[Cache, float]:
    """Run the pipelined part of extract (decode -> encode -> write) into a fresh store; returns seconds."""
    cfg = ExtractConfig(str(work / "src"), str(work / name), encoder.spec, layers_limit=args.layers_limit,
                        chunk_size=args.chunk_size, batch_size=args.batch_size, num_workers=args.num_workers)
    sources = scan(cfg.src)
    cache = Cache.create_or_resume(cfg.out, plan_meta(cfg, sources, encoder, None), list(sources.paths))
    seconds = timed(lambda: extract_chunks(cache, owned_pending(cache, "extract", state), sources, encoder,
                                           None, cfg, state), encoder.device)
    return cache, seconds


def throughput(args) -> None:
    state, device = process_state(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "src", args.images)
        encoder = build_encoder(args, device)
        x = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8)
        batches = -(-args.images // args.batch_size)

        def forward_only():  # the limit: the same number of batches, already decoded, nothing stored
            for _ in range(batches):
                encoder.encode(x.to(device), with_layers=False)

        forward_only()  # warm-up
        bare, runs = [], []
        for r in range(args.repeats):  # interleaved, so that both see the same machine load
            bare.append(batches * args.batch_size / timed(forward_only, device))
            _, seconds = extract_store(args, work, encoder, state, f"run{r}.zarr")
            runs.append(args.images / seconds)
        ratio = statistics.median(e / b for e, b in zip(runs, bare))  # per interleaved pair
        print(f"| {'full-size random' if args.full else 'tiny'} | {args.resolution} | {args.batch_size} | "
              f"{args.num_workers} | {statistics.median(bare):.1f} | {statistics.median(runs):.1f} | {ratio:.2f} | "
              f"device {device}, {torch.get_num_threads()} threads, {args.images} images, medians of "
              f"{args.repeats}, load average {os.getloadavg()[0]:.1f} |")


def codec_table(cache: Cache) -> None:
    N = cache.meta.num_samples
    print("| array | dtype | raw B/image | " + " | ".join(CODECS) + " | zstd3 decode MB/s |")
    print("|---|---|---|" + "---|" * (len(CODECS) + 1))
    for name in cache.meta.dtypes:
        values = cache.read(name)
        raw = values.tobytes()
        rows = len(values) or 1
        sizes = []
        for c in CODECS.values():
            if isinstance(c, Blosc):
                c = Blosc(c.cname, c.clevel, c.shuffle, typesize=values.dtype.itemsize)
            sizes.append(len(raw) if c is None else len(c.encode(raw)))
        packed = Zstd(3).encode(raw)
        dec = statistics.median(len(raw) / timed(lambda packed=packed: Zstd(3).decode(packed),
                                                 torch.device("cpu")) / 1e6
                                for _ in range(5))
        per = "per layers row" if name == "layers" else ""
        print(f"| {name} {per} | {values.dtype} | {len(raw) / rows:,.0f} | "
              + " | ".join(f"{s / rows:,.0f}" for s in sizes) + f" | {dec:,.0f} |")
    stored = cache.stored_bytes()
    per_image = {n: b / N for n, b in stored.items()}
    train = sum(per_image[n] for n in ("vae_moments", "cls", "patches", "patches_scale", "labels", "valid"))
    compressed = cache.meta.grid ** 2 * 16 * 2  # c=16 fp16 at the DINO grid, when a compressor is given
    print("\nstored (zstd3, incl. metadata) B/image: " + ", ".join(f"{n} {b:,.0f}" for n, b in per_image.items()))
    print(f"training set (vae_moments+cls+patches+scale+labels+valid) {train:,.0f} B/image; + compressed "
          f"16x{cache.meta.grid}x{cache.meta.grid} fp16 (raw) = {train + compressed:,.0f} B/image; reference "
          f"layout {REFERENCE_BYTES:,} B/image (ratio {(train + compressed) / REFERENCE_BYTES:.2f})")


def storage(args) -> None:
    state, device = process_state(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "src", args.images)
        cache, _ = extract_store(args, work, build_encoder(args, device), state, "store.zarr")
        codec_table(cache)


def chunks(args) -> None:
    """Reading whole shuffled chunks into batches of 256 samples, as the trainer does, for several C."""
    rng = np.random.default_rng(0)
    N, P, D = args.images, 256, 768
    tokens = torch.from_numpy(rng.standard_t(5, (64, P, D)).astype(np.float32))
    q, scale = (t.numpy() for t in codec.encode_tokens(tokens))
    print("| samples/chunk | files per array (ImageNet) | patches read, samples/s | MB/s (stored) |")
    print("|---|---|---|---|")
    for C in args.chunk_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            meta = CacheMeta(num_samples=N, chunk_size=C, resolution=256, latent_channels=4, latent_size=32,
                             vae_scaling_factor=0.18215, dino_dim=D, num_patches=P, grid=16, layers=(8, 9, 10, 11),
                             layers_count=0, num_classes=0, class_names=(), encoders={},
                             patches_encoding=codec.ENCODING,
                             dtypes={"patches": "int8", "patches_scale": "float16"}, source={"sha256": ""}, versions={})
            cache = Cache.create_or_resume(f"{tmp}/c.zarr", meta, [""] * N)
            for k in range(cache.num_chunks):
                s, e = cache.sample_range(k)
                cache.write_chunk("extract", k, {"patches": q[np.arange(s, e) % 64],
                                                 "patches_scale": scale[np.arange(s, e) % 64]})
            order = rng.permutation(cache.num_chunks)
            per_batch = max(256 // C, 1)
            t = time.perf_counter()
            for i in range(0, len(order), per_batch):
                for k in order[i:i + per_batch]:
                    cache.read("patches", *cache.sample_range(int(k)))
                    cache.read("patches_scale", *cache.sample_range(int(k)))
            seconds = time.perf_counter() - t
            stored = sum(cache.stored_bytes().values())
            print(f"| {C} | {-(-1_281_167 // C):,} | {N / seconds:,.0f} | {stored / seconds / 1e6:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["throughput", "storage", "chunks"])
    p.add_argument("--full", action="store_true", help="full-size random-weight models instead of the tiny preset")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 256 full")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--layers-limit", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    args.resolution = args.resolution or (256 if args.full else 64)
    {"throughput": throughput, "storage": storage, "chunks": chunks}[args.what](args)


if __name__ == "__main__":
    main()
