"""The cache's bookkeeping at ImageNet-1k and ImageNet-21K scale: time and peak RAM of each step.

    python bench/scale.py [--samples 1281167 14197122] [--dir DIR] [--write-sample 2000]

For each sample count N, a store whose per-sample arrays are tiny (those `--method sit` reads, one
value each: every cost measured here is per sample, per chunk or per file, not per byte) but whose
sample count, chunk count (64 samples per chunk) and source listing are those of the data set: a
text file list of N paths in class folders (1,000 classes for ImageNet-1k, 21,841 for ImageNet-21K),
and, up to `--tree-max` samples, the same as a real class-folder tree of empty files. Steps, as
`reglue extract`, `reglue cache` and `reglue train` run them:
- scan the listing; plan (the listing's digest, the metadata); create the store (arrays, `paths`);
- chunk ownership of rank 0 of 8 and of 64 processes, on the fresh store and once every chunk is done;
- `write_chunk` (arrays + done marker) timed on `--write-sample` chunks; the other chunks' files are
  then written directly (the same bytes: each array's chunk file and the marker's zarr.json), as setup;
- list the done markers, read them all, re-verify one chunk; `complete` (process 0's wait for every
  marker, the skipped list, the metadata); `cache info`; `cache verify` of the whole store, and its
  speed per GB on a real-size store (bench/loader.py's synthetic one);
- the loader: open (valid rows), the epoch order, this rank's slice of a batch for 8 and 64 ranks,
  the first batch; resume: the first batch from a position mid-way through epoch 3.
Reported per step: wall seconds, process CPU seconds, and peak RAM above the RSS before the step
(Linux: VmHWM after resetting it through /proc/self/clear_refs). The disk holds ~5 files per chunk
(~4.5 GB at ImageNet-21K, 4 KB blocks) plus the tree; check `df -h` first; all is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from loader import synthetic_cache
from loader_profile import NoReads

from reglue.pipeline.chunkio import SpanReader
from reglue.pipeline.extract import owned_pending
from reglue.pipeline.sources import scan
from reglue.pipeline.store import MARKERS, Cache, CacheMeta, digest, info, merge_skipped, verify
from reglue.trainer.data import CacheLoader

CHUNK, BATCH, WINDOW = 64, 256, 4096
TINY = dict(resolution=8, latent_channels=1, latent_size=1, dino_dim=1, num_patches=1, grid=1)
DTYPES = {"vae_moments": "float16", "labels": "int64", "valid": "bool"}  # what `--method sit` reads


class Rank:
    """What `owned_pending` needs of accelerate's PartialState."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world

    def wait_for_everyone(self) -> None:
        pass


def rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def measure(rows: list, step: str, fn, *args):
    """Run `fn(*args)`, append (step, wall s, CPU s, peak RAM MiB above the start) to `rows`; return its value."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = rss_kib()
    except OSError:
        base = None
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = None
    if base is not None:
        hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
        peak = (hwm - base) / 1024
    rows.append((step, wall, cpu, peak))
    print(f"  {step}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak +{peak if peak is None else round(peak)} MiB",
          flush=True)
    return out


def listing(n: int) -> tuple[list[str], list[int], int]:
    """ImageNet-like relative paths and labels, sorted by class: 1,000 classes up to 2M samples, else 21,841."""
    classes = 1000 if n <= 2_000_000 else 21841
    labels = (np.arange(n, dtype=np.int64) * classes) // n
    paths = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(labels.tolist())]
    return paths, labels.tolist(), classes


def write_list(root: Path, paths: list[str], labels: list[int]) -> Path:
    path = root / "train.txt"
    with open(path, "w") as f:
        for i in range(0, len(paths), 65536):
            f.write("".join(f"{p} {label}\n" for p, label in zip(paths[i:i + 65536], labels[i:i + 65536])))
    return path


def write_tree(root: Path, paths: list[str]) -> Path:
    """The class-folder tree, every image an empty file."""
    tree = root / "tree"
    made = set()
    for p in paths:
        folder = p.split("/", 1)[0]
        if folder not in made:
            (tree / folder).mkdir(parents=True)
            made.add(folder)
        os.close(os.open(tree / p, os.O_CREAT | os.O_WRONLY))
    return tree


def plan(sources, classes: int) -> CacheMeta:
    n = len(sources)
    return CacheMeta(num_samples=n, chunk_size=CHUNK, vae_scaling_factor=0.18215, layers=(8, 9, 10, 11),
                     layers_count=0, num_classes=classes, class_names=tuple(f"n{c:08d}" for c in range(classes)),
                     encoders={"preset": "scale"}, patches_encoding="int8-hadamard", dtypes=DTYPES,
                     source={"root": str(sources.root), "kind": sources.kind, "count": n,
                             "sha256": digest([sources.paths, sources.labels])}, versions={}, **TINY)


def write_chunks(cache: Cache, chunks: range) -> None:
    zeros = {name: np.zeros((CHUNK, *cache.array(name).shape[1:]), dtype) for name, dtype in DTYPES.items()}
    zeros["valid"][:] = True
    for k in chunks:
        start, stop = cache.sample_range(k)
        cache.write_chunk("extract", k, {name: v[:stop - start] for name, v in zeros.items()})


def write_chunk_files(cache: Cache, chunks: range) -> None:
    """Setup: the files `write_chunk` leaves, copied from chunk 0's (every chunk holds the same values)
    and written directly: each array's chunk file and the done marker's zarr.json."""
    root, last = Path(cache.url), cache.num_chunks - 1
    write_chunks(cache, range(last, last + 1))
    readers = {name: SpanReader(cache.array(name)) for name in DTYPES}
    files = {k: {name: r.chunk_file(k).read_bytes() for name, r in readers.items()} for k in (0, last)}
    markers = {k: cache.marker("extract", k) for k in (0, last)}
    for k in chunks:
        if k == last:
            continue
        for name, r in readers.items():
            path = r.chunk_file(k)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[0][name])
        marker = root / MARKERS / "extract" / f"{k:07d}"
        marker.mkdir(parents=True, exist_ok=True)
        attrs = {**markers[0], "chunk": k}
        (marker / "zarr.json").write_text(json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"}))


def complete(cache: Cache) -> None:
    """Process 0 at the end of extract (`extract.finish`): every chunk marked, the skipped list merged,
    the store complete."""
    markers = cache.markers("extract")
    if missing := [k for k in range(cache.num_chunks) if k not in markers]:
        raise SystemExit(f"{len(missing)} chunks are not marked")
    cache.update_meta(skipped=merge_skipped(markers.values()), complete=True)


def open_for_training(url: str) -> Cache:
    cache = Cache.open(url)
    cache.valid_indices()
    return cache


def first_batch(cache: Cache, world: int, position: int = 0) -> None:
    loader = CacheLoader(NoReads(cache), ["labels"], BATCH, world=world, window=WINDOW, read_ahead=False)
    loader.position = position
    next(loader)
    loader.close()


def scale(n: int, root: Path, args, rows: list) -> None:
    paths, labels, classes = listing(n)
    list_file = write_list(root, paths, labels)
    del paths, labels
    sources = measure(rows, "scan the source listing (text file list)", scan, list_file)
    if n <= args.tree_max:
        tree = write_tree(root, list(sources.paths))
        measure(rows, "scan the source listing (class-folder tree)", scan, tree)
        shutil.rmtree(tree)
    meta = measure(rows, "plan: the listing's digest and the metadata", plan, sources, classes)
    url = str(root / "cache.zarr")
    cache = measure(rows, "create the store (arrays, `paths`)", Cache.create_or_resume, url, meta, list(sources.paths))
    del sources
    for world in (8, 64):
        measure(rows, f"chunk ownership, fresh store (rank 0 of {world})", owned_pending, cache, "extract",
                Rank(0, world))
    sample = range(min(args.write_sample, cache.num_chunks))
    measure(rows, f"`write_chunk` x {len(sample)} (arrays + done marker)", write_chunks, cache, sample)
    write_chunk_files(cache, range(len(sample), cache.num_chunks))
    measure(rows, "list the done markers (`missing_chunks`)", cache.missing_chunks, "extract")
    markers = measure(rows, "read every done marker (`markers`)", cache.markers, "extract")
    measure(rows, "re-verify one chunk against its marker", cache.verify_chunk, "extract", 1, markers[1])
    del markers
    for world in (8, 64):
        measure(rows, f"chunk ownership, every chunk done (rank 0 of {world})", owned_pending, cache, "extract",
                Rank(0, world))
    measure(rows, "`complete` (process 0: all marked, skipped list, metadata)", complete, cache)
    measure(rows, "`cache info`", info, url)
    problems = measure(rows, "`cache verify` (whole store)", verify, url)
    if problems:
        raise SystemExit(f"verify found {len(problems)} problems: {problems[:3]}")
    cache = measure(rows, "loader: open the store, its valid rows", open_for_training, url)
    loader = CacheLoader(NoReads(cache), ["labels"], BATCH, window=WINDOW)
    measure(rows, "loader: epoch order (one epoch)", loader._order, 0)
    for world in (8, 64):
        loader = CacheLoader(NoReads(cache), ["labels"], BATCH, world=world, window=WINDOW)
        loader._order(0)
        measure(rows, f"loader: rank slice of one batch (1 of {world} ranks)", loader.rank_slice, 7)
        measure(rows, f"loader: first batch, no reads (rank 0 of {world})", first_batch, cache, world)
    position = (3 * n + n // 2) // BATCH * BATCH
    measure(rows, "resume: first batch at a position mid-epoch 3 (rank 0 of 8)", first_batch, cache, 8, position)


def verify_speed(root: Path, rows: list) -> None:
    """`cache verify` seconds per GB stored, on a real-size store (what the per-chunk cost adds to)."""
    cache = synthetic_cache(str(root / "real.zarr"), 1024)
    gb = sum(cache.stored_bytes().values()) / 1e9
    measure(rows, f"`cache verify`, real-size store ({gb:.2f} GB; per GB below)", verify, cache.url)
    step, wall, cpu, peak = rows[-1]
    rows.append(("`cache verify` per GB stored (same run)", wall / gb, cpu / gb, peak))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[1_281_167, 14_197_122])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--write-sample", type=int, default=2000, help="chunks written through `write_chunk`")
    ap.add_argument("--tree-max", type=int, default=1_300_000, help="largest N also scanned as a folder tree")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows: list = []
        print("real-size store", flush=True)
        verify_speed(Path(tmp), rows)
        results["per GB"] = rows
        for n in args.samples:
            print(f"N = {n:,} ({-(-n // CHUNK):,} chunks)", flush=True)
            folder = Path(tmp) / str(n)
            folder.mkdir()
            results[n] = []
            scale(n, folder, args, results[n])
            shutil.rmtree(folder)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; wall s / CPU s / peak RAM MiB above "
          f"the step's start; chunks of {CHUNK}, batch {BATCH}, window {WINDOW}\n")
    sizes = [n for n in results if n != "per GB"]
    print("| step | " + " | ".join(f"N = {n:,} ({-(-n // CHUNK):,} chunks)" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    cell = lambda r: f"{r[1]:.2f} / {r[2]:.2f} / {'n/a' if r[3] is None else f'{r[3]:.0f}'}"
    for step in dict.fromkeys(r[0] for n in sizes for r in results[n]):
        print(f"| {step} | " + " | ".join(next((cell(r) for r in results[n] if r[0] == step), "")
                                          for n in sizes) + " |")
    for r in results["per GB"]:
        print(f"| {r[0]} | {cell(r)} |")


if __name__ == "__main__":
    main()
