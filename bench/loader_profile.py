"""Where the loader's CPU goes, per sample: each stage timed on its own (process time, medians).

    python bench/loader_profile.py [--samples 2048] [--repeats 5]

On the synthetic real-size store of bench/loader.py (what `train --method reglue` reads per sample,
64 samples per chunk, warm page cache), stored raw as `reglue extract` writes it now and with zstd-3
on every array (stores made before): the stages of the loader as it is, and of the previous path
(Zarr's read of each chunk span, then two copies: rows into the window, the window's rows into each
batch), rebuilt from the same primitives. Everything runs in the main thread, except the last rows:
the whole `CacheLoader` (background thread, queue, 1 / 4 reader threads) minus the same work done
synchronously is the cost of the thread hand-offs. Pinning (`pin_memory` on CUDA) is not measured on
a machine without CUDA: there the batch buffers are allocated pinned and filled in place, so there is
no pinning copy to measure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from unittest.mock import patch

import numcodecs
import numpy as np
import torch
from loader import cpu_us, read_cache, synthetic_cache
from zarr.codecs import ZstdCodec

from reglue.pipeline import store
from reglue.pipeline.chunkio import SpanReader, _crc32c
from reglue.trainer import data
from reglue.trainer.data import CacheLoader, required_arrays
from reglue.trainer.objective import get_method

BATCH, WINDOW = 256, 512


class NoReads:
    """The cache with reads that do nothing: what is left is the loader's own bookkeeping."""

    def __init__(self, cache):
        self.cache, self.meta = cache, cache.meta

    def valid_indices(self):
        return self.cache.valid_indices()

    def row_spec(self, name):
        return self.cache.row_spec(name)

    def read_into(self, name, start, stop, dest):
        pass


def synchronous(cache, names, batches: int) -> None:
    """The loader's whole read path in this thread: no reader pool, no queue, no read-ahead."""
    loader = CacheLoader(cache, names, BATCH, window=WINDOW)
    stream = loader._rank_batches(0, None, threading.Event(), None)
    for _ in range(batches):
        next(stream)


def profile(cache, names, n: int, repeats: int) -> dict[str, float]:
    C = cache.meta.chunk_size
    rng = np.random.default_rng(0)
    where = [rng.permutation(C) for _ in range(n // C)]  # each chunk's rows to shuffled window slots
    spans = [(k * C, (k + 1) * C) for k in range(n // C)]
    shapes = {name: cache.row_spec(name) for name in names}
    window = {name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in shapes.items()}
    blocks = {name: [cache.array(name)[a:b] for a, b in spans] for name in names}
    readers = {name: SpanReader(cache.array(name)) for name in names}
    blobs = [(readers[name].chunk_file(k).read_bytes(), blocks[name][k]) for name in names for k in range(n // C)
             if readers[name].mode == "decode"]
    decoder = numcodecs.Zstd()
    batches = lambda: [{name: window[name][i:i + BATCH] for name in names} for i in range(0, n, BATCH)]

    def scatter():
        for name in names:
            for (a, _), block, w in zip(spans, blocks[name], where):
                window[name][a + w] = block

    def fresh_buffers():  # every batch in new buffers, as without the recycler
        with patch.object(data, "_REFS_WHEN_FREE", -1):
            synchronous(cache, names, n // BATCH)

    stages = {
        "previous: Zarr's read of each chunk span (file, decode, assembly)":
            lambda: [cache.array(name)[a:b] for name in names for a, b in spans],
        "  of which: the zstd-3 decode alone (into a reused buffer)":
            lambda: [decoder.decode(blob, out=block) for blob, block in blobs],
        "previous: rows into the window (`out[where] = block`)": scatter,
        "previous: window rows into each batch (`.copy()`)": lambda: [{k: v.copy() for k, v in b.items()}
                                                                       for b in batches()],
        "torch conversion (`from_numpy`; both)": lambda: [{k: torch.from_numpy(v) for k, v in b.items()}
                                                          for b in batches()],
        "now: of which the crc32c check of every chunk read": lambda: [_crc32c([b]) for name in names
                                                                     for b in blocks[name]],
        "now: bookkeeping (order, rank slices, spans, buffers; no reads)":
            lambda: synchronous(NoReads(cache), names, n // BATCH),
        "now: whole path, synchronous (reads straight into recycled batch buffers)":
            lambda: synchronous(cache, names, n // BATCH),
        "now: the same with new buffers for every batch (their page faults)": fresh_buffers,
    }
    out = {name: cpu_us(fn, n, repeats) for name, fn in stages.items()}
    for threads in (1, 4):
        runs = [read_cache(cache, names, BATCH, n, WINDOW, threads) for _ in range(repeats)]
        out[f"now: whole CacheLoader, {threads} reader thread(s), steady state"] = float(
            np.median([c / r * 1e6 for _, c, r in runs]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw = synthetic_cache(f"{tmp}/raw.zarr", args.samples)
        zstd = synthetic_cache(f"{tmp}/zstd.zarr", args.samples,
                               codecs={name: (ZstdCodec(level=3, checksum=True),) for name in store.CODECS})
        names = list(required_arrays(get_method("reglue"), raw))
        results = {"raw (now)": profile(raw, names, args.samples, args.repeats),
                   "zstd-3 (before)": profile(zstd, names, args.samples, args.repeats)}
    print(f"{args.samples} samples, batch {BATCH}, window {WINDOW}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; CPU microseconds per sample, medians of {args.repeats}\n")
    print("| stage | " + " | ".join(f"store {k}" for k in results) + " |")
    print("|---|" + "---|" * len(results))
    for stage in next(iter(results.values())):
        print(f"| {stage} | " + " | ".join(f"{r[stage]:.1f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
