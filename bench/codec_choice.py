"""Per-array codec choice: bytes saved against the CPU of reading them back, measured side by side.

    python bench/codec_choice.py [--samples 1024] [--repeats 5] [--cache CACHE]

For every array the trainer's loader reads per sample (synthetic values shaped and distributed like
the real ones: bench/loader.py `synthetic_rows`) and for `layers` (fp16 rows with per-channel means
and scales spread like DINOv2's), in chunks of 64 samples (`layers`: one row per chunk, as stored):
- stored bytes per sample raw, blosc-lz4 (byte shuffle), zstd-1 and zstd-3, each with the checksum
  that lets a read refuse a damaged chunk (the store's rule): crc32c for raw and blosc, zstd's frame
  checksum; plain raw (no checksum) for reference;
- CPU per sample to get the rows back into a reused buffer from a chunk file in the page cache, as
  `pipeline/chunkio.py` does: one `preadv` and the crc32c when raw, the file read plus the codec's
  decode (and its check) otherwise;
- the loader's own CPU per sample (a `CacheLoader` over a raw synthetic store, 4 reader threads).
Rule (the choice column): a codec is kept when the share of the stored bytes it saves exceeds the share
of the loader's CPU it adds, against raw + crc32c: saved bytes / bytes per sample > added CPU / loader
CPU per sample. A
percent of the disk and network traffic weighs as much as a percent of the cores feeding the GPU.
For `layers` (read by `train-compressor`, one 1.5 MiB row per read) the loader CPU is its raw read.
Synthetic values compress like real ones only roughly: `--cache` measures the first samples (and
`layers` rows) of an extracted store instead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
from loader import REAL, cpu_us, read_cache, synthetic_cache, synthetic_rows

from reglue.pipeline.store import Cache
from reglue.trainer.data import required_arrays
from reglue.trainer.objective import get_method

CODECS = {"raw, no checksum": None, "raw + crc32c": "crc32c",
          "blosc-lz4 + crc32c": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
          "zstd-1 + checksum": numcodecs.Zstd(level=1, checksum=True),
          "zstd-3 + checksum": numcodecs.Zstd(level=3, checksum=True)}
BASE = "raw + crc32c"  # what the others are compared with: the cheapest read that still checks
CHUNK = 64


def synthetic_layers(rng: np.random.Generator, n: int, dims: dict = REAL, layers: int = 4) -> np.ndarray:
    """Normed ViT-B layer tokens: per-channel means ~N(0, 0.5), scales log-normal around 0.8 (DINOv2's
    official norm stats: median std 0.82, max 3.1), a few channels at 8x (its large-magnitude ones)."""
    width = layers * dims["dino_dim"]
    mean = rng.normal(0, 0.5, width).astype(np.float32)
    scale = np.exp(rng.normal(np.log(0.8), 0.4, width)).astype(np.float32)
    scale[rng.choice(width, 8, replace=False)] *= 8
    return (rng.standard_normal((n, dims["num_patches"], width), dtype=np.float32) * scale + mean).astype(np.float16)


def loader_cpu_us(cache, names) -> float:
    """Microseconds of process CPU per sample read by a `CacheLoader` (4 epochs of a 512-sample store)."""
    _, cpu, n = read_cache(cache, names, 256, 2048, 512, 4)
    return cpu / n * 1e6


def measure(values: np.ndarray, rows: int, tmp: Path, repeats: int) -> dict[str, tuple[float, float]]:
    """codec -> (stored bytes per sample, read + decode CPU microseconds per sample)."""
    chunks = [np.ascontiguousarray(values[i:i + rows]) for i in range(0, len(values), rows)]
    out = np.empty(chunks[0].nbytes, np.uint8)
    result = {}
    for name, codec in CODECS.items():
        checked = codec == "crc32c" or isinstance(codec, numcodecs.Blosc)  # + Zarr's crc32c codec, 4 B
        files = []
        for i, chunk in enumerate(chunks):
            data = chunk.tobytes() if codec in (None, "crc32c") else codec.encode(chunk)
            data += b"\0\0\0\0" if checked else b""
            (path := tmp / f"{name}-{i}").write_bytes(data)
            files.append((path, len(data)))
        src = np.empty(max(size for _, size in files), np.uint8)
        raw = codec in (None, "crc32c")

        def read(codec=codec, files=files, src=src, checked=checked, raw=raw):
            for path, size in files:
                fd = os.open(path, os.O_RDONLY)
                os.preadv(fd, [out, src[:4]] if raw and checked else [out] if raw else [src[:size]], 0)
                os.close(fd)
                if checked:
                    crc32c(out if raw else src[:size - 4])
                if not raw:
                    codec.decode(src[:size - 4 * checked], out=out)

        read()  # page cache warm, buffers touched
        result[name] = (sum(size for _, size in files) / len(values), cpu_us(read, len(values), repeats))
    return result


def crc32c(buf: np.ndarray) -> int:
    view = buf.view()
    view.flags.writeable = False  # google_crc32c takes read-only buffers only
    return google_crc32c.value(view)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--layers-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default=None, help="measure on this extracted store's values instead")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = synthetic_rows(rng, 0, args.samples)
    layer_rows = synthetic_layers(rng, args.layers_rows)
    if args.cache:
        real = Cache.open(args.cache)
        rows = {name: real.read(name, 0, args.samples) for name in rows if real.has(name)}
        layer_rows = real.read("layers", 0, args.layers_rows) if real.has("layers") else layer_rows
    with tempfile.TemporaryDirectory() as tmp:
        cache = synthetic_cache(f"{tmp}/cache.zarr", 512)
        names = [name for name in required_arrays(get_method("reglue"), cache) if name in rows]
        loader_cpu = float(np.median([loader_cpu_us(cache, names) for _ in range(args.repeats)]))
        per_sample = {name: measure(rows[name], CHUNK, Path(tmp), args.repeats) for name in names}
        layers = measure(layer_rows, 1, Path(tmp), args.repeats)
    sample_bytes = sum(rows[name][0].nbytes for name in names)
    print(f"loader CPU per sample (raw store, 4 reader threads): {loader_cpu:.1f} us; {sample_bytes:,} B/sample; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| array | codec | B/sample | saved (array) | saved (of all bytes) | read+decode us/sample | "
          "added CPU (of the loader's) | choice |")
    print("|---|---|---|---|---|---|---|---|")
    tables = [(name, per_sample[name], sample_bytes, loader_cpu) for name in names]
    tables.append(("layers (per row)", layers, layers[BASE][0], layers[BASE][1]))
    for name, result, total_bytes, total_cpu in tables:
        raw_bytes, raw_cpu = result[BASE]
        gain = {c: (raw_bytes - b) / total_bytes - (cpu - raw_cpu) / total_cpu for c, (b, cpu) in result.items()}
        candidates = [c for c in gain if c != "raw, no checksum"]  # a read must be able to refuse damage
        best = max(candidates, key=lambda c: gain[c] if c != BASE else 0.0)
        best = best if gain[best] > 0 else BASE
        for codec, (stored, cpu) in result.items():
            print(f"| {name} | {codec} | {stored:,.0f} | {100 * (1 - stored / raw_bytes):.1f} % | "
                  f"{100 * (raw_bytes - stored) / total_bytes:.2f} % | {cpu:.2f} | "
                  f"{100 * (cpu - raw_cpu) / total_cpu:+.1f} % | {'**chosen**' if codec == best else ''} |")


if __name__ == "__main__":
    main()
