"""Loader throughput: the cache loader vs the reference's data layout, in one run on one machine.

    python bench/loader.py [--samples 2048] [--batch 256] [--dir DIR]

Both read the same number of samples at ViT-B / 256 px sizes (synthetic values):
- cache: a Zarr store made with the store API (`Cache.create_or_resume` + `write_chunk`, zstd as
  `reglue extract` writes it) holding what `reglue train --method reglue` reads per sample:
  vae_moments fp16 [8,32,32], cls fp32 [768], patches int8 [256,768] + scale fp16 [256],
  compressed fp16 [16,16,16], labels; read by `trainer.data.CacheLoader` (window of chunks,
  background thread), and, for contrast, by one random `read` per sample and array.
- reference: what its `CustomDataset` reads (reference dataset.py:64-80): one uncompressed 256^2 PNG
  (edm2 `compress_level=0`) and one fp32 `.npy` [8,32,32] per image, in a shuffled order, decoded
  with PIL (pyspng when installed, as the reference) and collated into batches. No DINOv2 here: in the
  reference the per-step DINOv2 + compressor forward comes on top of this (bench/train_step.py).
Reported: samples/s (wall) and samples per CPU-second (process time of all threads, i.e. per core);
for the loader, samples are those its thread read (it reads up to a window ahead of the consumer).
Files are freshly written, so both read from the page cache (warm); cold-disk numbers need a drop of
the page cache, which this script does not do.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reglue.pipeline.store import Cache, CacheMeta, digest
from reglue.trainer.data import CacheLoader, read_rows, required_arrays
from reglue.trainer.objective import get_method

REAL = dict(resolution=256, latent_channels=4, latent_size=32, dino_dim=768, num_patches=256, grid=16,
            compressed_channels=16)
TINY = dict(resolution=64, latent_channels=4, latent_size=8, dino_dim=32, num_patches=16, grid=4,
            compressed_channels=16)


def synthetic_cache(url: str, n: int, chunk: int = 64, seed: int = 0, dims: dict = REAL) -> Cache:
    """A complete cache (no `layers`) of `dims` sizes with random values, written through the store API."""
    dtypes = {"vae_moments": "float16", "cls": "float32", "patches": "int8", "patches_scale": "float16",
              "labels": "int64", "valid": "bool", "compressed": "float16"}
    paths = [f"class{i % 1000:04d}/img{i:08d}.png" for i in range(n)]
    meta = CacheMeta(num_samples=n, chunk_size=chunk, vae_scaling_factor=0.18215, layers=(8, 9, 10, 11),
                     layers_count=0, num_classes=1000, class_names=tuple(f"class{i:04d}" for i in range(1000)),
                     encoders={"preset": "synthetic"}, patches_encoding="int8-hadamard", dtypes=dtypes,
                     source={"root": "synthetic", "kind": "list", "count": n, "sha256": digest(paths)},
                     versions={}, **dims)
    cache = Cache.create_or_resume(url, meta, paths)
    rng = np.random.default_rng(seed)
    zc, h, D, P, g, c = (dims[k] for k in ("latent_channels", "latent_size", "dino_dim", "num_patches", "grid",
                                           "compressed_channels"))
    for k in range(cache.num_chunks):
        start, stop = cache.sample_range(k)
        b = stop - start
        moments = np.concatenate([rng.normal(0, 1, (b, zc, h, h)), rng.uniform(0.05, 0.5, (b, zc, h, h))], 1)
        cache.write_chunk("extract", k, {
            "vae_moments": moments.astype(np.float16), "cls": rng.normal(0, 1, (b, D)).astype(np.float32),
            # int8 of a rotated (near-Gaussian) token with an absmax scale: ~|q| <= 127, sd ~ 40
            "patches": np.clip(rng.normal(0, 40, (b, P, D)), -127, 127).astype(np.int8),
            "patches_scale": rng.uniform(0.01, 0.05, (b, P)).astype(np.float16),
            "compressed": rng.normal(0, 1, (b, c, g, g)).astype(np.float16),
            "labels": np.arange(start, stop) % 1000, "valid": np.ones(b, bool)})
    cache.update_meta(complete=True)
    return Cache.open(url)


def reference_layout(root: Path, n: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """edm2-style `images/{i//1000:05d}/img{i:08d}.png` (uncompressed) + `vae-sd/.../img-mean-std-*.npy`."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        png = root / "images" / f"{i // 1000:05d}" / f"img{i:08d}.png"
        npy = root / "vae-sd" / f"{i // 1000:05d}" / f"img-mean-std-{i:08d}.npy"
        png.parent.mkdir(parents=True, exist_ok=True)
        npy.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(png, compress_level=0)
        np.save(npy, rng.normal(0, 1, (8, 32, 32)).astype(np.float32))
        pairs.append((png, npy))
    return pairs


def decode_png(data: bytes) -> np.ndarray:
    try:
        import pyspng  # the reference's fast path (dataset.py:70-73)
        return pyspng.load(data)
    except ImportError:
        return np.array(Image.open(io.BytesIO(data)))


def read_reference(pairs, batch: int, seed: int = 0) -> int:
    """CustomDataset.__getitem__ + default collate, in a shuffled order (shuffle=True, drop_last)."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    seen = 0
    for b in range(len(order) // batch):
        images, feats = [], []
        for i in order[b * batch:(b + 1) * batch]:
            png, npy = pairs[i]
            images.append(torch.from_numpy(decode_png(png.read_bytes()).transpose(2, 0, 1)))  # CHW uint8
            feats.append(torch.from_numpy(np.load(npy)))
        torch.stack(images), torch.stack(feats)
        seen += batch
    return seen


class Counted:
    """The cache, counting the `vae_moments` rows read: the loader thread reads ahead, so the samples
    it read (not the ones consumed) are what its CPU time paid for."""

    def __init__(self, cache: Cache):
        self.cache, self.meta, self.rows = cache, cache.meta, 0

    def valid_indices(self):
        return self.cache.valid_indices()

    def read(self, name, start, stop):
        self.rows += (stop - start) * (name == "vae_moments")
        return self.cache.read(name, start, stop)


def read_cache(cache: Cache, names, batch: int, samples: int, window: int) -> int:
    counted = Counted(cache)
    loader = CacheLoader(counted, names, batch, window=window)
    for _ in range(samples // batch):
        next(loader)
    loader.close()
    return counted.rows


def read_per_sample(cache: Cache, names, batch: int, samples: int) -> int:
    """One random `read` per sample and array: what a plain random-access Dataset over the store does."""
    order = np.random.default_rng(0).permutation(cache.meta.num_samples)[:samples // batch * batch]
    for b in range(len(order) // batch):
        rows = [read_rows(cache, names, np.array([i]), cache.meta.chunk_size) for i in order[b * batch:(b + 1) * batch]]
        {name: np.concatenate([r[name] for r in rows]) for name in names}
    return len(order)


def timed(fn, *args) -> tuple[float, float, int]:
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--per-sample", type=int, default=512, help="samples for the one-read-per-sample row")
    ap.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        cache = synthetic_cache(str(Path(tmp) / "cache.zarr"), args.samples)
        pairs = reference_layout(Path(tmp) / "reference", args.samples)
        print(f"wrote {args.samples} samples in both layouts in {time.perf_counter() - t0:.0f} s; "
              f"cache {sum(cache.stored_bytes().values()) / args.samples / 1024:.0f} KiB/sample, reference "
              f"{sum(p.stat().st_size + q.stat().st_size for p, q in pairs) / args.samples / 1024:.0f} KiB/sample")
        names = required_arrays(get_method("reglue"), cache)
        rows = {
            "reference PNG + npy (dataset.py)": timed(read_reference, pairs, args.batch),
            "cache, CacheLoader (window 4096)": timed(read_cache, cache, names, args.batch, 3 * args.samples, 4096),
            "cache, CacheLoader (window 512)": timed(read_cache, cache, names, args.batch, 3 * args.samples, 512),
            "cache, one read per sample": timed(read_per_sample, cache, names, args.batch, args.per_sample),
        }
    base = rows["reference PNG + npy (dataset.py)"]
    print("\n| reader | samples | wall s | samples/s | samples per CPU-s | vs reference (per CPU-s) |")
    print("|---|---|---|---|---|---|")
    for name, (wall, cpu, n) in rows.items():
        print(f"| {name} | {n} | {wall:.2f} | {n / wall:.0f} | {n / cpu:.0f} | "
              f"{(n / cpu) / (base[2] / base[1]):.2f}x |")


if __name__ == "__main__":
    main()
