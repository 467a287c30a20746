"""What the cache's safety checks cost (a script, not a test). Results: BENCHMARKS.md.

  python bench/cache_checks.py open [--samples 1281167]  `Cache.open`'s check (every chunk marked and present)
                                                          and reading every done marker, at ImageNet scale
  python bench/cache_checks.py verify [--chunks 16]      re-verifying chunks (what a rerun of a finished store
                                                          reads), in threads vs one thread, full-size shapes
  python bench/cache_checks.py stamps [--images 256]     decoding a source with its stamp (bytes hashed) vs
                                                          without, ImageNet-like JPEGs
  python bench/cache_checks.py read [--chunks 24]        `Cache.read` of whole chunks through the strict store
                                                          (a missing chunk raises) vs zarr's plain store

`open` builds the store's metadata with tiny per-sample shapes and writes its chunk and marker files
directly (empty chunk files: the check only lists them), so it measures bookkeeping, not I/O volume.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from reglue.pipeline import codec
from reglue.pipeline.sources import center_crop, decode_image, read_source, to_rgb
from reglue.pipeline.store import MARKERS, Cache, CacheMeta

DTYPES = {"vae_moments": "float16", "cls": "float32", "patches": "int8", "patches_scale": "float16",
          "labels": "int64", "valid": "bool"}


def meta(samples: int, chunk: int, dino: int, patches: int, latent: int) -> CacheMeta:
    return CacheMeta(num_samples=samples, chunk_size=chunk, resolution=8 * latent, latent_channels=4,
                     latent_size=latent, vae_scaling_factor=0.18215, dino_dim=dino, num_patches=patches,
                     grid=int(patches ** 0.5), layers=(8, 9, 10, 11), layers_count=0, num_classes=1000,
                     class_names=(), encoders={"preset": "bench"}, patches_encoding=codec.ENCODING, dtypes=DTYPES,
                     source={"root": "src", "kind": "classes", "count": samples, "sha256": "0"}, versions={})


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def open_check(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/c.zarr"
        cache = Cache.create_or_resume(url, meta(args.samples, 64, 8, 4, 2), ["x"] * args.samples)
        t = time.perf_counter()
        stamps = {"size": [110_000] * 64, "mtime_ns": [1_700_000_000_000_000_000] * 64,
                  "hash": ["0123456789abcdef"] * 64}  # what extract records per chunk of 64 ImageNet JPEGs
        for k in range(cache.num_chunks):
            for name in DTYPES:
                path = Path(url, cache.chunk_key(name, k))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            marker = Path(url, f"{MARKERS}/extract/{k:07d}")
            marker.mkdir(parents=True)
            attrs = {"chunk": k, "checksums": {n: "0" * 64 for n in DTYPES}, "skipped": [], "sources": stamps}
            (marker / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}))
        cache.update_meta(complete=True)
        build = time.perf_counter() - t
        files = cache.num_chunks * (len(DTYPES) + 1)
        plain = median_time(lambda: Cache.open(url, allow_incomplete=True), args.repeats)
        checked = median_time(lambda: Cache.open(url), args.repeats)
        markers = median_time(lambda: Cache.open(url, allow_incomplete=True).markers("extract"), args.repeats)
        print(f"| {args.samples:,} | {cache.num_chunks:,} | {files:,} | {plain:.2f} | {checked:.2f} | "
              f"{files / max(checked - plain, 1e-9):,.0f} | {markers:.2f} | medians of {args.repeats}, store built "
              f"in {build:.0f} s, load average {os.getloadavg()[0]:.1f} |")


def verify(args) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        m = meta(64 * args.chunks, 64, 768, 256, 32)  # ViT-B/14 at 256 px: the real shapes
        cache = Cache.create_or_resume(f"{tmp}/c.zarr", m, ["x"] * m.num_samples)
        for k in range(cache.num_chunks):
            data = {n: (rng.standard_normal((64, *cache.array(n).shape[1:])) * 40).astype(t) for n, t in DTYPES.items()}
            cache.write_chunk("extract", k, data)
        markers = cache.markers("extract")
        stored = sum(cache.stored_bytes().values())
        rows = []
        for threads in (1, None):
            seconds = median_time(lambda t=threads: cache.verify_chunks("extract", range(cache.num_chunks), markers, t),
                                  args.repeats)
            rows.append(seconds)
        print(f"| {args.chunks} x 64 | {stored / 1e6:,.0f} | {stored / rows[0] / 1e6:,.0f} | "
              f"{stored / rows[1] / 1e6:,.0f} | {rows[0] / rows[1]:.2f} | {os.cpu_count()} cores, medians of "
              f"{args.repeats}, load average {os.getloadavg()[0]:.1f} |")


def stamps(args) -> None:
    from extract import make_images  # bench/extract.py: ImageNet-like JPEGs

    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(make_images(Path(tmp), args.images).rglob("*.jpg"))

        def without():  # the decoding before stamps: PIL opens the path itself
            for p in paths:
                with Image.open(p) as img:
                    img.load()
                    center_crop(to_rgb(img), 256)

        def with_stamp():
            for p in paths:
                decode_image(read_source(p)[0], 256)

        pairs = [(median_time(without, 1), median_time(with_stamp, 1)) for _ in range(args.repeats)]  # interleaved
        a, b = (statistics.median(x) for x in zip(*pairs))
        size = statistics.median(p.stat().st_size for p in paths)
        print(f"| {args.images} | {size / 1e3:.0f} KB | {a / len(paths) * 1e3:.2f} | {b / len(paths) * 1e3:.2f} | "
              f"{statistics.median(y / x for x, y in pairs):.3f} | medians of {args.repeats}, load average "
              f"{os.getloadavg()[0]:.1f} |")


def read(args) -> None:
    from loader import synthetic_cache  # bench/loader.py: a complete cache at the real shapes

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_cache(f"{tmp}/c.zarr", 64 * args.chunks)
        strict, plain = Cache.open(f"{tmp}/c.zarr"), Cache.open(f"{tmp}/c.zarr", allow_incomplete=True)
        names = ("vae_moments", "cls", "patches", "patches_scale", "labels")

        def read_all(cache):
            return lambda: [cache.read(n, *cache.sample_range(k)) for k in range(cache.num_chunks) for n in names]

        pairs = [(median_time(read_all(plain), 1), median_time(read_all(strict), 1)) for _ in range(args.repeats)]
        a, b = (statistics.median(x) for x in zip(*pairs))
        print(f"| {args.chunks} x 64 | {a:.2f} | {b:.2f} | {statistics.median(y / x for x, y in pairs):.3f} | "
              f"medians of {args.repeats} interleaved pairs, load average {os.getloadavg()[0]:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["open", "verify", "stamps", "read"])
    p.add_argument("--samples", type=int, default=1_281_167, help="open: samples (ImageNet-1k train)")
    p.add_argument("--chunks", type=int, default=16, help="verify, read: chunks of 64 samples")
    p.add_argument("--images", type=int, default=256, help="stamps: JPEGs")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    {"open": open_check, "verify": verify, "stamps": stamps, "read": read}[args.what](args)


if __name__ == "__main__":
    main()
