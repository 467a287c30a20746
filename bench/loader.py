"""Loader throughput: the cache loader vs the reference's data layout, side by side in one run.

    python bench/loader.py [--samples 2048] [--batch 256] [--per-sample 512] [--threads 1 2 4] [--repeats 3]

Both read the same number of samples at ViT-B / 256 px sizes (synthetic values):
- cache: a Zarr store made with the store API (`Cache.create_or_resume` + `write_chunk`, with the codecs
  `reglue extract` writes: `store.CODECS`) holding what `reglue train --method reglue` reads per sample:
  vae_moments fp16 [8,32,32], cls fp32 [768], patches int8 [256,768] + scale fp16 [256],
  compressed fp16 [16,16,16], labels; read by `trainer.data.CacheLoader` (window of chunks,
  background thread, 1 / 2 / 4 reader threads); the same data in a store written with zstd-3 on every
  array (the codec of stores made before per-array codecs, which still read); and, for contrast,
  one random `read` per sample and array.
- reference: what its `CustomDataset` reads (reference dataset.py:64-80): one uncompressed 256^2 PNG
  (edm2 `compress_level=0`) and one fp32 `.npy` [8,32,32] per image, in a shuffled order, decoded
  with PIL (pyspng when installed, as the reference) and collated into batches. No DINOv2 here: in the
  reference the per-step DINOv2 + compressor forward comes on top of this (bench/train_step.py).
Reported: samples/s (wall) and samples per CPU-second (process time of all threads, i.e. per core:
less sensitive than wall time to other jobs on the machine); for the loader, samples are those its
threads read (it reads up to a window ahead of the consumer), timed in its steady state: after the
batches of its first two windows, whose buffers a run allocates once and then reuses. Each row is the
median of `--repeats` runs, run in turn; the ratio is the median of each repeat's ratio to that
repeat's reference. The loader's first batches are checked against one `Cache.read` per row (the
batch stream is the store's rows in the loader's order). Files are freshly written, so both read from
the page cache (warm); cold-disk numbers need a drop of the page cache, which this script does not do.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from PIL import Image
from zarr.codecs import ZstdCodec

from reglue.pipeline import store
from reglue.pipeline.store import Cache, CacheMeta, digest
from reglue.trainer.data import CacheLoader, required_arrays
from reglue.trainer.objective import get_method

REAL = dict(resolution=256, latent_channels=4, latent_size=32, dino_dim=768, num_patches=256, grid=16,
            compressed_channels=16)
TINY = dict(resolution=64, latent_channels=4, latent_size=8, dino_dim=32, num_patches=16, grid=4,
            compressed_channels=16)


def synthetic_cache(url: str, n: int, chunk: int = 64, seed: int = 0, dims: dict = REAL,
                    codecs: dict | None = None) -> Cache:
    """A complete cache (no `layers`) of `dims` sizes with random values, written through the store API
    with `store.CODECS`, or with `codecs` (array name -> compressors) in their place."""
    dtypes = {"vae_moments": "float16", "cls": "float32", "patches": "int8", "patches_scale": "float16",
              "labels": "int64", "valid": "bool", "compressed": "float16"}
    paths = [f"class{i % 1000:04d}/img{i:08d}.png" for i in range(n)]
    meta = CacheMeta(num_samples=n, chunk_size=chunk, vae_scaling_factor=0.18215, layers=(8, 9, 10, 11),
                     layers_count=0, num_classes=1000, class_names=tuple(f"class{i:04d}" for i in range(1000)),
                     encoders={"preset": "synthetic"}, patches_encoding="int8-hadamard", dtypes=dtypes,
                     source={"root": "synthetic", "kind": "list", "count": n, "sha256": digest(paths)},
                     versions={}, **dims)
    with patch.dict(store.CODECS, codecs or {}):
        cache = Cache.create_or_resume(url, meta, paths)
    rng = np.random.default_rng(seed)
    for k in range(cache.num_chunks):
        start, stop = cache.sample_range(k)
        cache.write_chunk("extract", k, synthetic_rows(rng, start, stop, dims))
    cache.update_meta(complete=True)
    return Cache.open(url)


def synthetic_rows(rng: np.random.Generator, start: int, stop: int, dims: dict = REAL) -> dict[str, np.ndarray]:
    """Random values of samples [start, stop), in the stored dtypes, shaped like the real features."""
    b = stop - start
    zc, h, D, P, g, c = (dims[k] for k in ("latent_channels", "latent_size", "dino_dim", "num_patches", "grid",
                                           "compressed_channels"))
    normal = lambda shape, sd: rng.standard_normal(shape, dtype=np.float32) * sd
    moments = np.concatenate([normal((b, zc, h, h), 1), rng.uniform(0.05, 0.5, (b, zc, h, h))], 1)
    # int8 of a rotated (near-Gaussian) token with an absmax scale: ~|q| <= 127, sd ~ 40
    patches = np.clip(normal((b, P, D), 40), -127, 127).astype(np.int8)
    return {"vae_moments": moments.astype(np.float16), "cls": normal((b, D), 1), "patches": patches,
            "patches_scale": rng.uniform(0.01, 0.05, (b, P)).astype(np.float16),
            "compressed": normal((b, c, g, g), 1).astype(np.float16),
            "labels": np.arange(start, stop) % 1000, "valid": np.ones(b, bool)}


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
        self.cache, self.meta, self.rows, self.lock = cache, cache.meta, 0, threading.Lock()

    def valid_indices(self):
        return self.cache.valid_indices()

    def row_spec(self, name):
        return self.cache.row_spec(name)

    def read_into(self, name, start, stop, dest):
        if name == "vae_moments":
            with self.lock:  # reader threads
                self.rows += sum(len(offsets) for _, offsets in dest)
        self.cache.read_into(name, start, stop, dest)


def read_cache(cache: Cache, names, batch: int, samples: int, window: int, threads: int,
               steady: bool = True) -> tuple[float, float, int]:
    """(wall s, CPU s, samples read) of a `CacheLoader` delivering `samples`; `steady`: timed after the
    batches of its first two windows (+ the queue), whose buffers a run allocates once and then reuses
    (fresh pages cost a page fault each; BENCHMARKS.md, "Loader profile"), else from its start."""
    counted = Counted(cache)
    loader = CacheLoader(counted, names, batch, window=window, threads=threads)
    per_window = min(window, len(loader.rows)) // batch + 1
    for _ in range(2 * per_window + loader.prefetch if steady else 0):
        next(loader)
    counted.rows = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(samples // batch):
        next(loader)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    loader.close()
    return wall, cpu, counted.rows


def read_per_sample(cache: Cache, names, batch: int, samples: int) -> int:
    """One random `read` per sample and array: what a plain random-access Dataset over the store does."""
    order = np.random.default_rng(0).permutation(cache.meta.num_samples)[:samples // batch * batch]
    for b in range(len(order) // batch):
        rows = [{name: cache.read(name, i, i + 1) for name in names} for i in order[b * batch:(b + 1) * batch]]
        {name: np.concatenate([r[name] for r in rows]) for name in names}
    return len(order)


def check_stream(cache: Cache, names, batch: int, batches: int = 4) -> None:
    """The loader's first batches are the store's rows at their `index`, read one `Cache.read` per row."""
    loader = CacheLoader(cache, names, batch)
    for _ in range(batches):
        got = next(loader)
        for name in names:
            want = np.concatenate([cache.read(name, i, i + 1) for i in got["index"].numpy()])
            if not np.array_equal(got[name].numpy(), want):
                raise SystemExit(f"the loader's {name!r} rows differ from the store's")
    loader.close()


def cpu_us(fn, samples: int, repeats: int) -> float:
    """Median process CPU of `fn()` over `repeats` runs, in microseconds per sample."""
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return float(np.median(times)) / samples * 1e6


def timed(fn, *args) -> tuple[float, float, int]:
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--per-sample", type=int, default=512, help="samples for the one-read-per-sample row")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="reader thread counts to run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every row; the table shows medians")
    ap.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        cache = synthetic_cache(str(Path(tmp) / "cache.zarr"), args.samples)
        zstd = synthetic_cache(str(Path(tmp) / "zstd.zarr"), args.samples,
                               codecs={name: (ZstdCodec(level=3, checksum=True),) for name in store.CODECS})
        pairs = reference_layout(Path(tmp) / "reference", args.samples)
        print(f"wrote {args.samples} samples in three layouts in {time.perf_counter() - t0:.0f} s; "
              f"cache {sum(cache.stored_bytes().values()) / args.samples / 1024:.0f} KiB/sample "
              f"(zstd-3 everywhere: {sum(zstd.stored_bytes().values()) / args.samples / 1024:.0f}), "
              f"reference {sum(p.stat().st_size + q.stat().st_size for p, q in pairs) / args.samples / 1024:.0f} "
              f"KiB/sample; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        names = required_arrays(get_method("reglue"), cache)
        check_stream(cache, names, args.batch)
        check_stream(zstd, names, args.batch)
        print("batch stream: the loader's batches equal one `Cache.read` per row (both stores)")
        reference = "reference PNG + npy (dataset.py)"
        runs = {reference: lambda: timed(read_reference, pairs, args.batch)}
        for threads in args.threads:
            runs[f"cache, CacheLoader (window 4096, {threads} reader threads)"] = (
                lambda t=threads: read_cache(cache, names, args.batch, 3 * args.samples, 4096, t))
        runs["cache, CacheLoader from its start (window 4096, 4 threads; allocating its buffers)"] = (
            lambda: read_cache(cache, names, args.batch, 3 * args.samples, 4096, 4, steady=False))
        runs["cache, CacheLoader (window 512, 4 reader threads)"] = (
            lambda: read_cache(cache, names, args.batch, 3 * args.samples, 512, 4))
        runs["zstd-3 store (earlier codec), CacheLoader (window 4096, 4 threads)"] = (
            lambda: read_cache(zstd, names, args.batch, 3 * args.samples, 4096, 4))
        runs["cache, one read per sample"] = lambda: timed(read_per_sample, cache, names, args.batch, args.per_sample)
        results = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                results[name].append(run())
    base = [n / cpu for _, cpu, n in results[reference]]
    print(f"\n| reader | samples | wall s | samples/s | samples per CPU-s | vs reference (per CPU-s) |  "
          f"(medians of {args.repeats})")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        wall, per_cpu = np.median([w for w, _, _ in rows]), [n / cpu for _, cpu, n in rows]
        ratio = np.median([p / r for p, r in zip(per_cpu, base)])
        n = int(np.median([n for _, _, n in rows]))
        print(f"| {name} | {n} | {wall:.2f} | {n / wall:.0f} | {np.median(per_cpu):.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
