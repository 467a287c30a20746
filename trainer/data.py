"""The cache loader: a shuffled, rank-sharded, resumable stream of batches read in contiguous chunk runs.

Order, deterministic from (seed, epoch) and independent of the number of processes:
  1. the store's chunks (runs of `chunk_size` consecutive samples) are shuffled;
  2. consecutive groups of `window_chunks` of them form a window whose valid samples are shuffled,
     stratified so that every batch holds about as many rows of each of the window's chunks;
  3. the epochs' orders are concatenated into one stream; global batch k is stream[kB : (k+1)B],
     sorted by store row, and rank r takes its contiguous slice [r*b, (r+1)*b), b = B / world.
Every valid sample appears exactly once per epoch: nothing is padded or dropped (a batch may straddle
two epochs). The position is the number of stream samples consumed, so a run resumes on any number
of processes. With `flip`, each sample of global batch k takes its VAE posterior of the mirrored crop
(`vae_moments_flip`) with probability 1/2, decided by a hash of (seed, k, store row): the same on any
number of processes and micro-batches, and on resume (SiT's RandomHorizontalFlip, train.py:186).
Sorting within a batch changes nothing in the step (the gradient is the batch mean; SiT
has no batch statistics) but makes each rank's slice a narrow range of rows: with the stratified
window, rank r reads only chunks [r, r+1) * window_chunks / world of each window (test_train_data.py).

The trade-off of the window (`window` samples, rounded to whole chunks, at most the data set): a cache
keeps its sources' order (ImageNet: sorted by class), so one chunk holds one or two classes and a batch
mixes at most `window_chunks` chunks. A full random permutation (the reference's DataLoader shuffle)
would mix the whole data set but needs one random read per sample, i.e. one whole chunk read and checked
(or decoded) per sample (bench/loader.py measures it ~20x slower). The window reads each chunk once per
epoch, as one contiguous span per chunk, and holds this rank's rows of two windows in RAM (~2 * window /
world samples: the window being trained on and the next, read meanwhile; one with `read_ahead=False`): a
larger window mixes more classes per batch (ImageNet at batch 256: 4096 -> ~63 classes per batch, the same
~65 over 16 batches; 65536 -> ~229 and ~672; a full shuffle ~226 and ~984) for more RAM and a longer read
before the first batch (the first step waits for the first window; later windows are read while the
previous one trains, so a window's read stalls training only where it takes longer than training on it).

Batches are assembled without copies: a batch's buffers (pinned on CUDA) are allocated when a window first
holds rows of it, and each chunk span is read once per array straight into them (`Cache.read_into`,
pipeline/chunkio.py: `preadv` into the rows' slots, the chunk's checksum checked); the tensors handed out
are those buffers. CPU buffers are reused once their consumer has dropped every tensor of the batch
(BENCHMARKS.md, "Loader profile").
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from reglue.pipeline.chunkio import Dest
from reglue.pipeline.store import decode_patches
from reglue.trainer.draws import RANDOM, Draws
from reglue.trainer.objective import METHODS, Batch, Method

if TYPE_CHECKING:
    from reglue.trainer.pca import PCA


class Readable(Protocol):
    """What the loader needs of `reglue.pipeline.store.Cache` (besides `meta.chunk_size`, `valid_indices()`)."""

    def row_spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]: ...

    def read_into(self, name: str, start: int, stop: int, dest: Dest) -> None: ...


def epoch_order(rows: np.ndarray, chunk_size: int, window_chunks: int, seed: int,
                epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's permutation of `rows` (sorted store rows): shuffled chunks, then within each window
    a stratified shuffle that spreads every chunk's rows evenly over the window (row j of m in a
    chunk's own random order lands at key (j + U) / m), so any B consecutive samples hold ~B / W rows
    of each of the W chunks. Returns the order and the stream offsets where its windows start."""
    rng = np.random.default_rng([seed, epoch])
    chunk_ids = np.unique(rows // chunk_size)
    starts = np.searchsorted(rows, chunk_ids * chunk_size)
    stops = np.searchsorted(rows, (chunk_ids + 1) * chunk_size)
    order = rng.permutation(len(chunk_ids))
    windows = []
    for i in range(0, len(order), window_chunks):
        members = [rng.permutation(rows[starts[c]:stops[c]]) for c in order[i:i + window_chunks]]
        keys = np.concatenate([(np.arange(len(m)) + rng.random(len(m))) / len(m) for m in members])
        windows.append(np.concatenate(members)[np.argsort(keys, kind="stable")])
    bounds = np.cumsum([0] + [len(w) for w in windows[:-1]])
    return np.concatenate(windows), bounds


def read_rows(cache: Readable, names: Sequence[str], ids: np.ndarray, chunk_size: int,
              pool: ThreadPoolExecutor | None = None) -> dict[str, np.ndarray]:
    """`{name: array[ids]}`, read as one span per chunk touched (see `read_spans`)."""
    out = {name: np.empty((len(ids), *shape), dtype) for name, (shape, dtype) in
           ((name, cache.row_spec(name)) for name in names)}
    read_spans(cache, [out], np.asarray(ids), np.zeros(len(ids), np.int64), np.arange(len(ids)), chunk_size, pool)
    return out


def read_spans(cache: Readable, buffers: Sequence[dict[str, np.ndarray]], ids: np.ndarray, which: np.ndarray,
               slots: np.ndarray, chunk_size: int, pool: ThreadPoolExecutor | None = None,
               stop: threading.Event | None = None) -> None:
    """Row ids[i] of every array into buffers[which[i]][name][slots[i]], straight from the store: one
    `read_into` per array and chunk touched, over the span of its wanted rows (not one read per row,
    unless a chunk is one row), whose rows go to their slots in runs of consecutive slots (a batch is
    sorted by row, so a chunk's rows in it are one run). The spans are read in parallel by `pool` when
    given; once `stop` is set the remaining ones are not (CancelledError), so that closing a loader does
    not wait for a whole window's read."""
    if not len(ids):
        return
    order = np.lexsort((slots, which, ids // chunk_size))
    ids, which, slots = ids[order], which[order], slots[order]
    chunk = ids // chunk_size
    spans = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1], True])  # [spans[i], spans[i+1]): chunk i
    runs = np.flatnonzero(np.r_[True, (chunk[1:] != chunk[:-1]) | (which[1:] != which[:-1])
                                | (slots[1:] != slots[:-1] + 1), True])  # runs of consecutive slots

    def read(i: int) -> None:
        if stop is not None and stop.is_set():
            raise CancelledError("the loader was closed")
        lo, hi = spans[i], spans[i + 1]
        start, end = int(ids[lo:hi].min()), int(ids[lo:hi].max()) + 1
        edges = runs[np.searchsorted(runs, lo):np.searchsorted(runs, hi) + 1]
        for name in buffers[0]:
            dest = [(buffers[which[a]][name][slots[a]:slots[a] + b - a], ids[a:b] - start)
                    for a, b in zip(edges[:-1], edges[1:])]
            cache.read_into(name, start, end, dest)

    if pool is None:
        for i in range(len(spans) - 1):
            read(i)
        return
    futures = [pool.submit(read, i) for i in range(len(spans) - 1)]
    try:
        for f in futures:
            f.result()
    finally:
        for f in futures:
            f.cancel()


FLIP_STREAM = 0x666C6970  # "flip": keeps the flip draws apart from any other use of (seed, step)


def flip_draws(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """bool per store row: whether that sample takes its mirrored view at global batch `step` (p = 1/2).

    A splitmix64 hash of the row under a (seed, step) key: each sample's draw depends on nothing else."""
    key = np.random.SeedSequence([seed, step, FLIP_STREAM]).generate_state(1, np.uint64)[0]
    z = np.asarray(rows, np.uint64) ^ key
    z = z + np.uint64(0x9E3779B97F4A7C15)  # splitmix64 (Steele et al. 2014); uint64 arithmetic wraps
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(63)).astype(bool)


def pick_views(batch: dict[str, torch.Tensor], seed: int, step: int) -> dict[str, torch.Tensor]:
    """`vae_moments` overwritten in place, per sample, by `vae_moments_flip` where `flip_draws` says so
    (which is dropped)."""
    flip = flip_draws(seed, step, batch["index"].numpy())
    mirrored = batch.pop("vae_moments_flip")
    np.copyto(batch["vae_moments"].numpy(), mirrored.numpy(), where=flip[:, None, None, None])
    return batch


def _map_ahead(pool: ThreadPoolExecutor, fn, items: Sequence, ahead: int) -> Iterator:
    """`pool.map(fn, items)` with at most `ahead` calls in flight or done but not yet consumed
    (Executor.map submits every call at once, so decoded blocks could pile up)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _one_ahead(items: Iterator, executor: ThreadPoolExecutor) -> Iterator:
    """The endless iterator `items`, its next item computed by `executor` (one thread) while the caller
    uses the current one: double buffering, at most one item ahead."""
    future = executor.submit(next, items)
    while True:
        current, future = future, executor.submit(next, items)  # runs once `current` is done
        yield current.result()


class CacheLoader:
    """Batches `{name: tensor[b, ...], "index": int64[b]}` of this rank, produced by a background thread.

    `rows` are the store rows to draw from (default: the cache's valid samples); `state_dict()` holds
    the position of the consumed batches (not the prefetched ones). `local_reads` sorts each global
    batch by row (see the module doc); turn it off for a model with batch statistics (BatchNorm),
    whose per-process statistics would otherwise see a narrow range of rows. `chunk_size` is the read
    and shuffle unit in rows (default: the cache's chunk size); 1 makes every window a random sample of
    all the rows, i.e. a full shuffle, for arrays stored one row per chunk (`layers`). `read_ahead` reads
    the next window while the current one's batches are used, so that training does not stall for a
    window's read at every window boundary, for twice the RAM (two windows of rows, not one); the batches
    are the same either way. `flip` (names holding `vae_moments` and `vae_moments_flip`) delivers each
    sample's chosen view as `vae_moments` (`pick_views`)."""

    def __init__(self, cache, names: Sequence[str], global_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, window: int = 4096, prefetch: int = 4, threads: int = 4,
                 rows: np.ndarray | None = None, pin_memory: bool = False, local_reads: bool = True,
                 chunk_size: int | None = None, read_ahead: bool = True, flip: bool = False):
        if global_batch % world:
            raise ValueError(f"the global batch ({global_batch}) must be divisible by the number of "
                             f"processes ({world}); change --global-batch or the process count")
        self.cache, self.names = cache, tuple(names)
        self._specs = {name: cache.row_spec(name) for name in self.names}  # row shape and dtype
        self.rows = np.sort(np.asarray(cache.valid_indices() if rows is None else rows, dtype=np.int64))
        if len(self.rows) == 0:
            raise ValueError("the cache has no valid samples to train on")
        self.chunk_size = int(chunk_size or cache.meta.chunk_size)
        self.window_chunks = max(1, window // self.chunk_size)
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.prefetch, self.threads, self.pin_memory, self.local_reads = prefetch, threads, pin_memory, local_reads
        self.read_ahead, self.flip = read_ahead, flip
        if flip and not {"vae_moments", "vae_moments_flip"} <= set(self.names):
            raise ValueError("flip needs both `vae_moments` and `vae_moments_flip` among the arrays read")
        self.position = 0  # stream samples consumed, a multiple of global_batch
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> float:
        return self.position / len(self.rows)

    def state_dict(self) -> dict:
        epoch, offset = divmod(self.position, len(self.rows))
        return {"position": self.position, "epoch": epoch, "offset": offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.position = int(state["position"])

    # ---- the stream ----------------------------------------------------------------------------

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._orders:  # keep the previous epoch: a batch may straddle the boundary
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self.rows, self.chunk_size, self.window_chunks, self.seed, epoch)
        return self._orders[epoch]

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Store rows at global stream positions."""
        epochs, offsets = np.divmod(positions, len(self.rows))
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            out[epochs == e] = self._order(int(e))[0][offsets[epochs == e]]
        return out

    def rank_slice(self, k: int) -> np.ndarray:
        """This rank's stream positions of global batch k, in the batch's order (sorted by store row)."""
        B, b = self.global_batch, self.global_batch // self.world
        positions = np.arange(k * B, (k + 1) * B)
        if self.local_reads:
            positions = positions[np.lexsort((positions, self.rows_at(positions)))]
        return positions[self.rank * b:(self.rank + 1) * b]

    def _windows(self, start: int) -> Iterator[tuple[int, int]]:
        """Global stream positions [lo, hi) of every window from `start` on."""
        n = len(self.rows)
        epoch = start // n
        while True:
            bounds = self._order(epoch)[1]
            for lo, hi in zip(bounds, [*bounds[1:], n]):
                if epoch * n + hi > start:
                    yield max(epoch * n + lo, start), epoch * n + hi
            epoch += 1

    def _rank_batches(self, start: int, pool: ThreadPoolExecutor, stop: threading.Event,
                      ahead: ThreadPoolExecutor | None) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slices of the global batches from stream position `start` on, forever, read window
        by window (by `ahead` while the previous window's batches are used, when given)."""
        windows = self._filled_batches(start, pool, stop)
        for filled in _one_ahead(windows, ahead) if ahead else windows:
            filled.reverse()
            while filled:  # out of the list as handed on: the consumer alone holds a batch once it has it
                yield filled.pop()

    def _filled_batches(self, start: int, pool: ThreadPoolExecutor,
                        stop: threading.Event) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Per window from `start` on, the batches its read completes, in order. Each batch is allocated
        (pinned with `pin_memory`) when a window first holds rows of it and its rows are read straight
        into it; a batch that straddles two windows waits in `open_` for the rest of its rows. So a rank
        holds the batches of ~one window (~window / world samples), and of two with read-ahead (the window
        in use and the next, being read); a batch's buffers are reused once its consumer drops it."""
        per_window = -(-self.window_chunks * self.chunk_size // self.global_batch) + 1
        recycler = _Recycler((1 + self.read_ahead) * per_window + self.prefetch + 2)
        open_: dict[int, _OpenBatch] = {}
        for lo, hi in self._windows(start):
            ks = range(lo // self.global_batch, -(-hi // self.global_batch))
            for k in ks:
                if k not in open_:
                    open_[k] = self._new_batch(self.rank_slice(k), recycler)
            wanted = [np.flatnonzero((open_[k].positions >= lo) & (open_[k].positions < hi)) for k in ks]
            read_spans(self.cache, [open_[k].arrays for k in ks],
                       np.concatenate([open_[k].tensors["index"].numpy()[w] for k, w in zip(ks, wanted)]),
                       np.repeat(np.arange(len(ks)), [len(w) for w in wanted]), np.concatenate(wanted),
                       self.chunk_size, pool, stop)
            for k, w in zip(ks, wanted):
                open_[k].missing -= len(w)
            yield [open_.pop(k).tensors for k in ks if open_[k].missing == 0]

    def _new_batch(self, positions: np.ndarray, recycler: _Recycler) -> _OpenBatch:
        """Buffers for this rank's rows at stream `positions` (pinned with `pin_memory`), their store rows
        in `index`."""
        shapes = {name: ((len(positions), *shape), dtype) for name, (shape, dtype) in self._specs.items()}
        if self.pin_memory:  # torch's pinned allocator reuses blocks once no copy from them is running
            tensors = {name: torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True)
                       for name, (shape, dtype) in shapes.items()}
        else:
            tensors = {name: torch.from_numpy(a) for name, a in recycler.get(shapes).items()}
        index = torch.from_numpy(self.rows_at(positions))
        tensors["index"] = index.pin_memory() if self.pin_memory else index
        arrays = {name: tensors[name].numpy() for name in self._specs}
        return _OpenBatch(positions, tensors, arrays, len(positions))

    def _worker(self, start: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            # Exits in reverse order: the read-ahead thread (a read stops at `stop`) before the pool it uses.
            reader = ThreadPoolExecutor(1, thread_name_prefix="reglue-read-ahead") if self.read_ahead else None
            with ThreadPoolExecutor(self.threads, thread_name_prefix="reglue-read") as pool, reader or nullcontext():
                for step, batch in enumerate(self._rank_batches(start, pool, stop, reader), start // self.global_batch):
                    if self.flip:
                        batch = pick_views(batch, self.seed, step)
                    if not _offer(out, batch, stop):
                        return
        except BaseException as e:  # handed to the consumer, which re-raises it (unless it closed us)
            _offer(out, e, stop)

    def __iter__(self) -> CacheLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._worker, args=(self.position, self._queue, self._stop),
                                            daemon=True, name="reglue-cache-loader")
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.position += self.global_batch
        return item

    def close(self) -> None:
        """Stop the prefetch thread; the next `next()` restarts it at `position`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def _offer(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` in `out` unless `stop` is set first (a full queue whose consumer has closed the loader)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


@dataclass
class _OpenBatch:
    """A batch being read: this rank's stream positions, its tensors (with `index`), numpy views of the
    arrays' tensors, and how many of its rows are still to be read."""

    positions: np.ndarray
    tensors: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    missing: int


class _Recycler:
    """CPU batch buffers, handed out again once their consumer has let go of them.

    A fresh large array costs a page fault per page at its first write: that was most of the loader's
    CPU (BENCHMARKS.md, "Loader profile"). A set of arrays is reused only when nothing but this list
    refers to any of them, i.e. every tensor and view made of the batch is gone (reference counts), so
    a batch that its consumer still holds is never overwritten. Pinned batches do without this: torch's
    pinned allocator caches blocks itself, and knows when a copy from one is still running."""

    def __init__(self, limit: int):
        self.sets: list[dict[str, np.ndarray]] = []  # most recently handed out last
        self.limit = limit  # sets tracked: about the most in use at once (two windows' batches and the queue)

    def get(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        for i, arrays in enumerate(self.sets):
            if all(sys.getrefcount(a) <= _REFS_WHEN_FREE for a in arrays.values()) and all(
                    arrays[name].shape == shape for name, (shape, _) in shapes.items()):
                self.sets.append(self.sets.pop(i))
                return arrays
        arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}
        self.sets.append(arrays)
        if len(self.sets) > self.limit:
            self.sets.pop(0)  # no longer tracked: freed whenever its consumer drops it
        return arrays


def _refs_when_free() -> int:
    """What `_Recycler.get` counts for an array that only its set refers to (the same expression)."""
    arrays = {"a": np.empty(1)}
    return max(sys.getrefcount(a) for a in arrays.values())


_REFS_WHEN_FREE = _refs_when_free()


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


# ---- from stored values to the objective's Batch ----------------------------------------------

PATCH_ARRAYS = ("patches", "patches_scale")
"""The last-layer patch tokens in their stored encoding (pipeline.store.decode_patches)."""


def required_arrays(method: Method, cache, flip: bool = False) -> tuple[str, ...]:
    """The arrays a method reads (with `flip`, the mirrored VAE moments too), after checking the cache has
    them (a clear error naming the fix)."""
    if flip and not cache.has("vae_moments_flip"):
        raise ValueError(f"method {method.name!r} trains with random horizontal flips (its paper's recipe: SiT "
                         f"train.py:186) but {cache.url} has no mirrored VAE moments: extract a cache with them "
                         "(`reglue extract SRC --out NEW --flip`), or pass --no-flip to train without flips")
    names = ["vae_moments", "labels"] + (["vae_moments_flip"] if flip else [])
    needs = {"cls": method.cls, "patches": method.repa or method.features == "pca",
             "compressed": method.features == "compressed"}
    src = cache.meta.source.get("root", "IMAGES")  # the images the cache was extracted from
    fixes = {"compressed": f"add them with `reglue train-compressor --src {src} --out compressor/ --fill {cache.url}` "
                           "(or, with an existing compressor, `reglue fill-compressed --cache CACHE --compressor "
                           "compression_model.pth --norm-stats dino_mean_std_*.pth`)",
             "patches": "re-extract the cache with the last-layer patch tokens",
             "cls": "re-extract the cache with the [CLS] token"}
    for name in ("vae_moments", "labels", "cls", "patches", "compressed"):
        if needs.get(name, True) and not cache.has(name):
            raise ValueError(f"method {method.name!r} needs the cache's {name!r} features, which {cache.url} "
                             f"lacks: {fixes.get(name, 're-extract the cache')}; or choose a method that "
                             "does without them (sit needs only the VAE moments)")
    names += [n for n in ("cls", "compressed") if needs[n]]
    return tuple(names) + (PATCH_ARRAYS if needs["patches"] else ())


def layers_for(method: Method, cache) -> Method:
    """The method with the cache's DINOv2 layer set, from which its compressed features were computed
    (`meta.layers`), after checking that the cached REPA and CLS targets are those the reference takes: the
    last block of that set (train.py:319-330). A layer set other than the preset's must match the cache's."""
    if method.features != "compressed":
        return method
    cached, preset = tuple(cache.meta.layers), METHODS.get(method.name)
    if method.layers != cached:
        if preset is None or method.layers != preset.layers:
            raise ValueError(f"method {method.name!r} asks for DINOv2 blocks {method.layers} but the compressed "
                             f"features of {cache.url} were computed from blocks {cached}: extract a cache with "
                             f"that layer set and fill its compressed features, or use layers={cached}")
        method = replace(method, layers=cached)
    target = cache.meta.encoder_depth - 1  # cls/patches: the encoder's last block
    if (method.cls or method.repa) and cached[-1] != target:
        raise ValueError(f"method {method.name!r} takes its REPA target and CLS token from the last block of its "
                         f"layer set, block {cached[-1]} (reference train.py:319-330), but {cache.url} holds them "
                         f"for block {target} only: extract a cache whose layer set ends in block {target}, or "
                         "turn REPA and the CLS token off for this ablation (repa=False, cls=False)")
    return method


def prepare_batch(raw: dict[str, torch.Tensor], method: Method, meta, device: torch.device,
                  pca: PCA | None = None, draws: Draws = RANDOM) -> Batch:
    """Raw stored rows -> the objective's Batch on `device`, in the model's units: the stored encodings
    decoded (`decode_rows`), then `batch_from_rows`, which draws the VAE posterior sample from `draws`."""
    return batch_from_rows(decode_rows(raw, device), method, meta, pca, draws)


def decode_rows(raw: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Stored rows on `device` with the patch tokens decoded to float32 (`patches` [B, P, D]); the other
    arrays as stored (fp16 moments and compressed features are upcast where they are used)."""
    rows = {k: v.to(device, non_blocking=True) for k, v in raw.items() if k not in (*PATCH_ARRAYS, "index")}
    if "patches" in raw:
        rows["patches"] = decode_patches(raw["patches"].to(device, non_blocking=True),
                                         raw["patches_scale"].to(device, non_blocking=True))  # (B, P, D)
    return rows


def batch_from_rows(rows: dict[str, torch.Tensor], method: Method, meta, pca: PCA | None = None,
                    draws: Draws = RANDOM) -> Batch:
    """Decoded rows (`decode_rows`: vae_moments, labels, and cls / patches / compressed as the method
    reads them) -> the Batch train.py:290-340 builds. `meta` gives vae_scaling_factor, num_classes and
    latent_size (a cache's meta)."""
    mean, std = rows["vae_moments"].float().chunk(2, dim=1)  # (B, zc, h, h) each
    # A fresh posterior sample every step, then the SD scaling factor (reference train.py:52-59, 184-189).
    latent = (mean + std * draws.posterior(mean)) * meta.vae_scaling_factor
    labels = rows["labels"].long()
    labels = torch.where(labels < 0, meta.num_classes, labels)  # unlabelled -> the null class id
    h = meta.latent_size
    cls = rows["cls"].float() if "cls" in rows else None  # (B, D)
    patches = rows.get("patches")  # (B, P, D)
    features = None
    if method.features == "compressed":
        features = rows["compressed"].float()  # (B, c, g, g)
    elif method.features == "pca":
        features = pca.project(patches)  # (B, k, g, g)
    if features is not None:
        # Compressed after, upsampled to the latent grid at load time (reference train.py:338-339, which
        # hard-codes 32; here h comes from the cache, so other resolutions work).
        features = F.interpolate(features, size=(h, h), mode="bilinear", align_corners=False)  # (B, c, h, h)
    repa_target = None
    if method.repa:
        # [CLS; patches] when the SiT has a CLS slot, whose projector output covers it (train.py:326-330).
        repa_target = torch.cat([cls.unsqueeze(1), patches], dim=1) if method.cls else patches
    return Batch(latent=latent, labels=labels, features=features, cls=cls if method.cls else None,
                 repa_target=repa_target)
