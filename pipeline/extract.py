"""`reglue extract`: an image source -> a feature cache (layout and markers: pipeline/store.py).

Per image, as the reference computes it online (reference-implementation.md §1-2): ADM center
crop, SD-VAE posterior mean and std, the vision encoder's (default DINOv2-B with registers) last-layer
CLS and patch tokens (the REPA target, token-encoded by pipeline/codec.py); for `layers_limit` evenly
spread samples the normed compressor layers (8..11 for ViT-B); given a compressor and its norm stats,
the compressed features of every image; with `flip`, also the VAE posterior of the mirrored crop (SiT
flips the crop, train.py:184-186; LightningDiT caches both views), so that a flipping recipe samples a
fresh posterior of either view every step.

How a run is organised (docs/extract.md):
- The unit of work is a chunk of C samples. Process r of W (accelerate launch / torchrun) owns the
  chunks k = r (mod W). Batches never cross a chunk, so W processes compute exactly the batches
  of one process and store the same bytes.
- DataLoader workers decode, the device encodes in batches, a thread writes finished chunks.
- Each process holds its lock on the store (`reglue.lock`), so a second command on the same store
  stops at once naming the holder.
- A chunk's done marker is written after all its arrays, with the sha256 of each and a stamp (size,
  mtime, content hash) of each source file as read; a rerun first re-verifies the marked chunks
  and re-stats their sources, redoes those that fail or whose sources changed, and rewrites the
  unmarked ones, so a kill at any moment loses at most the chunks in flight and a rerun repairs.
- At the end each process verifies the chunks it wrote against their markers; process 0 waits (on
  the markers, not on a collective, so ranks with unequal work never time out) until every chunk
  is marked, and only then records the store as complete.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from reglue.lock import Lock
from reglue.pipeline import codec
from reglue.pipeline.compressor import (
    NormStats,
    check_made_for,
    compress,
    file_sha256,
    load_compressor,
    load_norm_stats,
)
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.pipeline.sources import BadImage, ImageDataset, SourceList, file_stamp, read_source, scan
from reglue.pipeline.store import (
    Cache,
    CacheMeta,
    chunks_of_rank,
    digest,
    layer_sample_indices,
    merge_skipped,
    refuse_foreign,
)

DEFAULT_CHUNK_SIZE = 64
"""Samples per chunk; measured in BENCHMARKS.md (read throughput vs file count)."""
TEST_DELAY_ENV = "REGLUE_EXTRACT_TEST_DELAY"
"""Seconds to sleep after each batch, so that a test can SIGKILL a run half-way."""
WRITE_QUEUE = 2
"""Finished chunks waiting for the writer thread; bounds host memory (2 x C x ~0.2 MB at ViT-B)."""


def default_workers() -> int:
    """DataLoader decode processes when not given: the cores this process may use (its share of the
    node's processes), less one for the process itself, at most 8; torch warns above the core count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1) - 1))


@dataclass(frozen=True)
class ExtractConfig:
    """One `reglue extract` run."""

    src: str
    """Image source: a class-folder tree (label = sorted folder index), a flat folder, or a file list."""
    out: str = ""
    """Cache URL (a local folder or any fsspec URL). Default: cache/<source name>.zarr."""
    spec: EncoderSpec = field(default_factory=EncoderSpec)
    """Encoders, resolution, layers and precision (pipeline/encoders.py); preset "tiny" for tests."""
    layers_limit: int = 0
    """Keep layers 8..11 (1.5 MiB/image at ViT-B) for this many evenly spread samples; 0 = none."""
    compressor: str | None = None
    """Compressor checkpoint (official `compression_model.pth` format): store `compressed` for every image."""
    norm_stats: str | None = None
    """Its norm stats (official `dino_mean_std_*.pth` format); required with `compressor`."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Samples per chunk: the unit of storage, of work per process and of resume."""
    batch_size: int = 64
    """Images per forward pass."""
    num_workers: int | None = None
    """DataLoader processes decoding images (0 = decode in the main process); default `default_workers()`."""
    device: str | None = None
    """Torch device; default: this process's accelerator (cuda:<local rank>) or the CPU."""
    flip: bool = False
    """Also store `vae_moments_flip`, the VAE posterior of the horizontally mirrored crop (one more VAE
    encode per image, +16 KB/image), for recipes that flip (method sit)."""

    def __post_init__(self):
        if not self.out:
            object.__setattr__(self, "out", str(Path("cache") / f"{Path(self.src).stem}.zarr"))
        if self.num_workers is None:
            object.__setattr__(self, "num_workers", default_workers())
        if self.layers_limit < 0:
            raise ValueError(f"layers_limit {self.layers_limit} must be >= 0")
        if (self.compressor is None) != (self.norm_stats is None):
            raise ValueError("--compressor and --norm-stats go together: the compressor's input is the "
                             "layers standardized with the norm stats it was trained with")
        for name in ("chunk_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ExtractSummary:
    """What a run did, as process 0 sees it."""

    url: str
    num_samples: int
    valid: int
    written: int
    """Samples this process wrote in this run (0 when resuming a finished store)."""
    skipped: tuple[dict, ...]
    seconds: float
    stored_bytes: int
    complete: bool

    def __str__(self) -> str:
        rate = self.written / max(self.seconds, 1e-9)
        lines = [f"{self.url}: {self.num_samples} samples, {self.valid} valid, {len(self.skipped)} skipped; "
                 f"wrote {self.written} in {self.seconds:.1f} s ({rate:.1f} img/s); "
                 f"{self.stored_bytes:,} B stored = {self.stored_bytes / max(self.num_samples, 1):,.0f} B/image; "
                 f"{'complete' if self.complete else 'INCOMPLETE'}"]
        return "\n".join(lines + [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped])


# ---- the compressor --------------------------------------------------------------------------

@dataclass(frozen=True)
class Compressor:
    """The frozen compressor encoder with its norm stats and where both came from."""

    encoder: torch.nn.Module
    stats: NormStats
    provenance: dict

    @classmethod
    def load(cls, path: str, norm_stats: str, meta: CacheMeta, url: str, stage: str) -> Compressor:
        """The pair for the features of the cache `url` with metadata `meta`: refused (one line) when either
        file was made from another encoder's features, or the compressor with other norm stats."""
        model, stats = load_compressor(path), load_norm_stats(norm_stats)
        key, in_channels = meta.encoder_key(), len(meta.layers) * meta.dino_dim
        check_made_for(norm_stats, stats.encoder, key, url)
        check_made_for(path, (model.reglue_record or {}).get("encoder"), key, url)
        channels = model.build_channel_list
        if channels[0] != in_channels or stats.mean.numel() != in_channels:
            raise ValueError(f"compressor {path} takes {channels[0]} channels and norm stats {norm_stats} have "
                             f"{stats.mean.numel()}; the cache's layers have {in_channels} (len(layers) x width)")
        provenance = {"stage": stage, "file": Path(path).name, "sha256": file_sha256(path), "channels": channels,
                      "norm_stats": {"file": Path(norm_stats).name, "sha256": file_sha256(norm_stats)}}
        paired = (model.reglue_record or {}).get("norm_stats")
        if paired and paired != provenance["norm_stats"]["sha256"]:
            raise ValueError(f"compressor {path} was trained with other norm stats than {norm_stats} (sha256 "
                             f"{paired[:12]}..., this file {provenance['norm_stats']['sha256'][:12]}...): pass the "
                             "dino_mean_std_*.pth written beside it")
        return cls(model.encoder, stats, provenance)

    @torch.no_grad()
    def __call__(self, layers16: torch.Tensor) -> torch.Tensor:
        # Input is the fp16-rounded layers (what `layers` stores), so that fill_compressed gives the
        # same values from stored rows as extract does; the reference runs this block under fp16
        # autocast (train.py:303-337), so fp16 inputs are within its own precision.
        self.encoder.to(layers16.device)
        return compress(self.encoder, layers16.float(), self.stats).half()  # [B, c, g, g]

    def same_as(self, other: dict | None) -> bool:
        return bool(other) and all(other[k] == self.provenance[k] for k in ("sha256", "channels", "norm_stats"))


# ---- planning --------------------------------------------------------------------------------

def process_state(device: str | None) -> tuple[PartialState, torch.device]:
    """This process's rank/world (Accelerate; a plain `python` run is rank 0 of 1) and device."""
    # cpu=True on a machine without CUDA makes torchrun ranks join over gloo instead of each
    # believing it is alone.
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return state, torch.device(device) if device else state.device


def package_versions() -> dict:
    return {p: version(p) for p in ("reglue", "torch", "timm", "diffusers", "zarr", "numpy", "pillow")}


def plan_meta(cfg: ExtractConfig, sources: SourceList, encoder: FeatureEncoder,
              comp: Compressor | None) -> CacheMeta:
    """The store's metadata, every dimension taken from the encoders."""
    e = encoder.meta()
    q, scale = codec.encode_tokens(torch.zeros(1, e["num_patches"], e["width"]))
    dtypes = {"vae_moments": "float16", "cls": "float32", "patches": str(q.dtype).removeprefix("torch."),
              "patches_scale": str(scale.dtype).removeprefix("torch."), "labels": "int64", "valid": "bool"}
    if cfg.flip:
        dtypes["vae_moments_flip"] = "float16"
    layers_count = min(cfg.layers_limit, len(sources))
    if layers_count:
        dtypes["layers"] = "float16"
    if comp:
        dtypes["compressed"] = "float16"
    return CacheMeta(
        num_samples=len(sources), chunk_size=cfg.chunk_size, resolution=e["resolution"],
        latent_channels=e["latent_channels"], latent_size=e["latent_size"],
        vae_scaling_factor=e["vae_scaling_factor"], dino_dim=e["width"], num_patches=e["num_patches"],
        grid=e["grid"], layers=tuple(e["layers"]), layers_count=layers_count,
        num_classes=sources.num_classes, class_names=sources.class_names,
        encoders=e | {"spec": dataclasses.asdict(cfg.spec)}, patches_encoding=codec.ENCODING, dtypes=dtypes,
        source={"root": str(Path(sources.root).resolve()), "kind": sources.kind, "count": len(sources),
                "sha256": digest([sources.paths, sources.labels]), "empty_classes": list(sources.empty_classes)},
        versions=package_versions(), compressed_channels=comp.provenance["channels"][-1] if comp else 0,
        compressor=comp.provenance if comp else None)


def open_store(url: str, meta: CacheMeta, paths: list[str], state: PartialState) -> Cache:
    """Process 0 creates (or checks and reopens) the store; the others wait for it, then check it too."""
    if state.is_main_process:
        return Cache.create_or_resume(url, meta, paths)
    return wait_for(lambda: Cache.create_or_resume(url, meta, paths, create=False), FileNotFoundError)


def wait_for(attempt, retry_on: type[Exception], what: str = ""):
    """Poll `attempt` until it stops raising `retry_on` (a file-based barrier: no collective that
    could time out, and a crashed process is ended by the launcher, which also ends this one)."""
    delay = 0.1
    while True:
        try:
            return attempt()
        except retry_on as e:
            if what and delay >= 10:
                print(f"waiting for {what}: {e}", flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


@contextmanager
def store_lock(url: str, state: PartialState) -> Iterator[None]:
    """Hold this process's lock on the store, then wait until every process holds its own: a second
    command on the same store stops at its first process that meets a live holder, before any process
    touches the store (the others wait here until the launcher ends them)."""
    with Lock(url, f"store-rank{state.process_index}"):
        state.wait_for_everyone()
        yield


def owned_pending(cache: Cache, namespace: str, state: PartialState, sources: SourceList | None = None) -> list[int]:
    """This process's chunks to (re)compute: those without a done marker, and those whose marked data
    fails verification or whose source files changed since they were read (their markers are deleted).
    Ends with a barrier, so that process 0's final wait sees every marker this deletes."""
    markers = cache.markers(namespace)
    owned = list(chunks_of_rank(cache.num_chunks, state.process_index, state.num_processes))
    done = {k: markers[k] for k in owned if k in markers}
    changed = changed_sources(cache, sources, done) if sources is not None else {}
    damaged = cache.verify_chunks(namespace, [k for k in done if k not in changed], done)
    tag = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
    if changed:
        files = sorted({p for paths in changed.values() for p in paths})
        print(f"{tag}{cache.url}: {len(files)} source files changed since they were extracted ({', '.join(files[:5])}"
              f"{', ...' if len(files) > 5 else ''}): re-extracting chunks {sorted(changed)}", flush=True)
    for k, reason in sorted(damaged.items()):
        print(f"{tag}{cache.url}: {namespace} chunk {k} fails verification ({reason}): recomputing it", flush=True)
    for k in [*changed, *damaged]:
        cache.delete_marker(namespace, k)
        if k in changed and "compressed" in cache.written_arrays().get("compressed", ()):
            cache.delete_marker("compressed", k)  # computed from the old image: `fill-compressed` redoes it
    state.wait_for_everyone()
    return [k for k in owned if k not in done or k in changed or k in damaged]


def changed_sources(cache: Cache, sources: SourceList, markers: dict[int, dict]) -> dict[int, list[str]]:
    """Chunk -> its source files that changed since the chunk was extracted: one stat per file; the bytes
    are hashed only where size or time differ (a copy or `touch` that keeps the content is no change).
    Chunks marked by a reglue that recorded no stamps cannot be checked and count as unchanged."""
    checks = [(k, cache.sample_range(k)[0] + j, stamp) for k, marker in markers.items() if "sources" in marker
              for j, stamp in enumerate(zip(*(marker["sources"][f] for f in ("size", "mtime_ns", "hash"))))]

    def changed(check) -> bool:
        _, i, (size, mtime, digest_) = check
        path = sources.path(i)
        if file_stamp(path) == (size, mtime):
            return False
        try:
            return read_source(path)[1][2] != digest_
        except BadImage:  # readable then, not now (or the other way round)
            return True

    with ThreadPoolExecutor(16) as pool:  # stat latency on network file systems
        flags = list(pool.map(changed, checks))
    out: dict[int, list[str]] = {}
    for (k, i, _), flag in zip(checks, flags):
        if flag:
            out.setdefault(k, []).append(sources.paths[i])
    return out


# ---- the pipeline: loader -> device -> writer thread ------------------------------------------

def chunk_batches(sources: SourceList, resolution: int, needed: dict[int, np.ndarray], batch_size: int,
                  num_workers: int, state: PartialState, desc: str | None) -> Iterator[tuple[int, Iterator]]:
    """(k, batches of chunk k) in chunk order; every batch is (index, uint8 images, ok, reasons, stamps)
    of at most `batch_size` samples of one chunk, decoded in DataLoader workers; stamps are the files'
    (sizes, mtimes_ns, hashes) as read. A bar counts the images decoded unless `desc` is None."""
    indices = [int(i) for ids in needed.values() for i in ids]
    batches, counts, pos = [], [], 0  # batches hold positions in `indices`
    for ids in needed.values():
        n = len(ids)
        batches += [list(range(pos + i, pos + min(i + batch_size, n))) for i in range(0, n, batch_size)]
        counts.append(-(-n // batch_size))
        pos += n
    loader = iter(torch.utils.data.DataLoader(
        ImageDataset(sources, resolution, indices, stamps=True), batch_sampler=batches,
        num_workers=num_workers if indices else 0, pin_memory=torch.cuda.is_available()))
    bar = tqdm(total=len(indices), unit="img", desc=desc, disable=desc is None or not state.is_main_process,
               smoothing=0.1)
    delay = float(os.environ.get(TEST_DELAY_ENV, 0))

    def take(n: int) -> Iterator:
        for _ in range(n):
            batch = next(loader)
            yield batch
            bar.update(len(batch[0]))
            time.sleep(delay)

    for k, n in zip(needed, counts):
        yield k, take(n)
    bar.close()


class ChunkWriter:
    """Writes finished chunks from a thread behind a bounded queue, so that the device keeps working."""

    def __init__(self, cache: Cache, namespace: str):
        self.cache, self.namespace, self.error, self.failed = cache, namespace, None, None
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.thread = threading.Thread(target=self._run, name=f"reglue-{namespace}-writer", daemon=True)
        self.thread.start()
        self.written = 0

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    k, data, extra = item
                    self.cache.write_chunk(self.namespace, k, data, **extra)
                except BaseException as e:  # re-raised in the main thread
                    self.error, self.failed = e, k

    def submit(self, k: int, data: dict[str, np.ndarray], **extra) -> None:
        self._raise()
        self.queue.put((k, data, extra))
        start, stop = self.cache.sample_range(k)
        self.written += stop - start

    def _raise(self) -> None:
        e = self.error
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"{e.strerror}: writing chunk {self.failed} to {self.cache.url} failed; free "
                                   "space and rerun the same command (finished chunks are kept)") from e
        if e is not None:
            raise RuntimeError(f"writing chunk {self.failed} to {self.cache.url} failed: {e}") from e

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        # Also on an error: chunks already queued are whole, so finishing them keeps their work.
        self.queue.put(None)
        self.thread.join()
        if exc[0] is None:
            self._raise()


def finish(cache: Cache, namespace: str, written: list[int], state: PartialState) -> dict[int, dict]:
    """Verify the chunks this process wrote; on process 0 wait until every chunk is marked. Returns markers."""
    markers = cache.markers(namespace)
    bad = []
    for k, reason in sorted(cache.verify_chunks(namespace, written, markers).items()):
        cache.delete_marker(namespace, k)
        bad.append(f"chunk {k}: {reason}")
    if bad:
        raise RuntimeError(f"{cache.url}: {len(bad)} chunks failed verification and will be recomputed by "
                           f"rerunning the same command: {'; '.join(bad[:10])}")
    if not state.is_main_process:
        return markers

    def all_marked() -> dict[int, dict]:  # every marker read once per try (221,831 files at ImageNet-21K)
        markers = cache.markers(namespace)
        if missing := [k for k in range(cache.num_chunks) if k not in markers]:
            raise TimeoutError(f"{len(missing)} chunks not done yet (first: {missing[:8]})")
        return markers

    return wait_for(all_marked, TimeoutError, what="the other processes")


# ---- extract ---------------------------------------------------------------------------------

def encode_batch(encoder: FeatureEncoder, images: torch.Tensor, with_layers: bool,
                 comp: Compressor | None, flip: bool = False) -> dict[str, np.ndarray]:
    """Stored values for a batch of good crops, by array name."""
    f = encoder.encode(images, with_layers=with_layers or comp is not None)
    q, scale = codec.encode_tokens(f["patches"])
    out = {"vae_moments": torch.cat([f["vae_mean"], f["vae_std"]], dim=1).half(),  # [B, 2zc, h, h]
           "cls": f["cls"], "patches": q, "patches_scale": scale}
    if flip:  # the crop mirrored left-right, as RandomHorizontalFlip after the crop (SiT train.py:184-186)
        out["vae_moments_flip"] = torch.cat(encoder.vae_posterior(images.flip(-1)), dim=1).half()
    if "layers" in f:
        out["layers"] = f["layers"].half()  # [B, P, L*D]
        if comp:
            out["compressed"] = comp(out["layers"])  # [B, c, g, g]
    return {k: v.cpu().numpy() for k, v in out.items()}


def extract_chunks(cache: Cache, chunks: list[int], sources: SourceList, encoder: FeatureEncoder,
                   comp: Compressor | None, cfg: ExtractConfig, state: PartialState) -> int:
    """Compute and write `chunks`; returns the number of samples written."""
    m = cache.meta
    dtypes = cache.meta.identity()["dtypes"]  # what extract writes (not `compressed` added by a later fill)
    layer_index = layer_sample_indices(m.num_samples, m.layers_count)
    labels = np.asarray(sources.labels, dtype=np.int64)
    needed = {k: np.arange(*cache.sample_range(k)) for k in chunks}
    with ChunkWriter(cache, "extract") as writer:
        for k, batches in chunk_batches(sources, m.resolution, needed, cfg.batch_size, cfg.num_workers,
                                        state, f"extract [rank {state.process_index}/{state.num_processes}]"):
            (start, stop), (j0, j1) = cache.sample_range(k), cache.layer_rows(k)
            rows = {name: (j1 - j0 if name == "layers" else stop - start) for name in dtypes}
            chunk = {name: np.zeros((n, *cache.array(name).shape[1:]), dtypes[name]) for name, n in rows.items()}
            chunk["labels"][:] = labels[start:stop]
            skipped, stamps = [], {"size": [0] * (stop - start), "mtime_ns": [0] * (stop - start),
                                   "hash": [""] * (stop - start)}
            for index, images, ok, reasons, (sizes, mtimes, hashes) in batches:
                index, ok = index.numpy(), ok.numpy()
                for i, size, mtime, h in zip(index - start, sizes.tolist(), mtimes.tolist(), hashes):
                    stamps["size"][i], stamps["mtime_ns"][i], stamps["hash"][i] = size, mtime, h
                chunk["valid"][index - start] = ok
                skipped += [{"index": int(i), "path": sources.paths[i], "reason": r}
                            for i, good, r in zip(index, ok, reasons) if not good]
                if not ok.any():
                    continue
                good = index[ok]
                j = np.searchsorted(layer_index, good)  # the layers row of each good sample, if it has one
                keeps = j < len(layer_index)
                keeps[keeps] = layer_index[j[keeps]] == good[keeps]
                out = encode_batch(encoder, images[torch.from_numpy(ok)], keeps.any(), comp, cfg.flip)
                for name in chunk.keys() & out.keys() - {"layers"}:
                    chunk[name][good - start] = out[name]
                if keeps.any():
                    chunk["layers"][j[keeps] - j0] = out["layers"][keeps]
            writer.submit(k, chunk, skipped=skipped, sources=stamps)
    return writer.written


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Run (or resume, or repair, or confirm) the extraction of `cfg.src` into `cfg.out`."""
    t0 = time.perf_counter()
    sources = scan(cfg.src)
    refuse_foreign(cfg.out)  # before loading any weights: a wrong --out fails in a second
    state, device = process_state(cfg.device)
    with store_lock(cfg.out, state):  # a second extract on this store stops here, naming the holder
        encoder = FeatureEncoder(cfg.spec, device)
        comp = None
        if cfg.compressor:
            comp = Compressor.load(cfg.compressor, cfg.norm_stats, plan_meta(cfg, sources, encoder, None), cfg.out,
                                   "extract")
        cache = open_store(cfg.out, plan_meta(cfg, sources, encoder, comp), list(sources.paths), state)
        pending = owned_pending(cache, "extract", state, sources)
        written = extract_chunks(cache, pending, sources, encoder, comp, cfg, state)
        markers = finish(cache, "extract", pending, state)
        skipped = merge_skipped(markers.values())
        if state.is_main_process and (not cache.meta.complete or skipped != cache.meta.skipped):
            cache.update_meta(skipped=skipped, complete=True)
        summary = summarize(cache, written, time.perf_counter() - t0)
    state.print(summary)
    return summary


def summarize(cache: Cache, written: int, seconds: float) -> ExtractSummary:
    return ExtractSummary(cache.url, cache.meta.num_samples, int(cache.read("valid").sum()), written,
                          cache.meta.skipped, seconds, sum(cache.stored_bytes().values()), cache.meta.complete)


# ---- fill_compressed -------------------------------------------------------------------------

def fill_compressed(cache_url: str, compressor: str, norm_stats: str, *, src: str | None = None,
                    batch_size: int = 64, num_workers: int | None = None, device: str | None = None) -> ExtractSummary:
    """Add `compressed` [N, c, g, g] to a complete cache: from the stored `layers` rows where there are
    some, else by a DINOv2 pass over the source images (`src` overrides the recorded root; the VAE is
    never run again).

    Resumable like `extract` (its own marker namespace "compressed"), and a rerun repairs chunks that
    fail verification; the array becomes visible (`cache.has("compressed")`) only once every chunk is
    verified."""
    t0 = time.perf_counter()
    state, device = process_state(device)
    with store_lock(cache_url, state):
        cache = Cache.open(cache_url, mode="r+", allow_incomplete=True)
        cache.require_complete()
        cache.require_intact(["extract"])  # the inputs; `compressed` chunks are verified below
        m = cache.meta
        comp = Compressor.load(compressor, norm_stats, m, cache_url, "fill")
        if m.compressed_channels and not comp.same_as(m.compressor):
            raise ValueError(f"{cache_url} already holds compressed features from {m.compressor}; "
                             "extract a new cache for another compressor")
        if m.compressed_channels and m.compressor.get("stage") != "fill":
            return summarize(cache, 0, time.perf_counter() - t0)  # written (and repaired) by extract
        if state.is_main_process:
            cache.prepare_fill(comp.provenance)
        wait_for(lambda: cache.check_fill(comp.provenance), FileNotFoundError)
        chunks = owned_pending(cache, "compressed", state)
        workers = default_workers() if num_workers is None else num_workers
        written = fill_chunks(cache, chunks, comp, src, batch_size, workers, device, state)
        finish(cache, "compressed", chunks, state)
        if state.is_main_process and not m.compressed_channels:
            cache.update_meta(compressed_channels=comp.provenance["channels"][-1], compressor=comp.provenance,
                              dtypes=m.dtypes | {"compressed": "float16"})
        summary = summarize(cache, written, time.perf_counter() - t0)
    state.print(summary)
    return summary


def fill_chunks(cache: Cache, chunks: list[int], comp: Compressor, src: str | None, batch_size: int,
                num_workers: int, device: torch.device, state: PartialState) -> int:
    m = cache.meta
    layer_index = layer_sample_indices(m.num_samples, m.layers_count)
    valid = cache.read("valid")
    sources = SourceList(Path(src or m.source["root"]), tuple(cache.source_paths()),
                         tuple(int(x) for x in cache.read("labels")))
    extracted = cache.markers("extract")
    needed = {}
    for k in chunks:
        start, stop = cache.sample_range(k)
        ids = np.arange(start, stop)
        needed[k] = ids[valid[start:stop] & ~np.isin(ids, layer_index[slice(*cache.layer_rows(k))])]
    encoder = None
    if any(len(v) for v in needed.values()):
        # The encoder only, at the cache's own precision: the VAE moments are already stored, never recomputed.
        spec = EncoderSpec.from_dict(m.encoders["spec"])
        encoder = FeatureEncoder(dataclasses.replace(spec, precision=m.encoders["precision"]), device,
                                 with_vae=False)
    shape = (comp.provenance["channels"][-1], m.grid, m.grid)
    # The bar counts rows (samples) filled, whether from stored layers or from a second DINOv2 pass.
    bar = tqdm(total=sum(stop - start for start, stop in map(cache.sample_range, chunks)), unit="row",
               desc=f"fill-compressed [rank {state.process_index}/{state.num_processes}]",
               disable=not state.is_main_process, smoothing=0.1)
    with bar, ChunkWriter(cache, "compressed") as writer:
        for k, batches in chunk_batches(sources, m.resolution, needed, batch_size, num_workers, state, None):
            (start, stop), (j0, j1) = cache.sample_range(k), cache.layer_rows(k)
            out = np.zeros((stop - start, *shape), np.float16)
            rows = layer_index[j0:j1]
            keep = valid[rows]
            if keep.any():
                layers = torch.from_numpy(cache.read("layers", j0, j1)[keep]).to(device)
                out[rows[keep] - start] = comp(layers).cpu().numpy()
            recorded = extracted.get(k, {}).get("sources")
            for index, images, ok, reasons, (_, _, hashes) in batches:
                if bad := np.flatnonzero(~ok.numpy()).tolist():
                    raise ValueError(f"{sources.path(int(index[bad[0]]))} decoded at extract time but not now "
                                     f"({reasons[bad[0]]}): the source changed")
                for i, h in zip(index.tolist(), hashes):
                    if recorded and recorded["hash"][i - start] not in ("", h):
                        raise ValueError(f"{sources.path(i)} changed since it was extracted; rerun the same "
                                         "`reglue extract` command first (it re-extracts the changed chunks)")
                layers = encoder.layers(images).half()
                out[index.numpy() - start] = comp(layers).cpu().numpy()
            writer.submit(k, {"compressed": out})
            bar.update(stop - start)
    return writer.written
