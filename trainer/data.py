"""The cache loader: a shuffled, rank-sharded, resumable stream of batches read in contiguous chunk runs.

Order, deterministic from (seed, epoch) and independent of the number of processes:
  1. the store's chunks (runs of `chunk_size` consecutive samples) are shuffled;
  2. consecutive groups of `window_chunks` of them form a window whose valid samples are shuffled;
  3. the epochs' orders are concatenated into one stream; global batch k is stream[kB : (k+1)B] and
     rank r takes its contiguous slice [r*b, (r+1)*b), b = B / world.
Every valid sample appears exactly once per epoch: nothing is padded or dropped (a batch may straddle
two epochs). The position is the number of stream samples consumed, so a run resumes on any number
of processes.

The trade-off of the window (`window` samples, rounded to whole chunks): a cache keeps its sources'
order (ImageNet: sorted by class), so one chunk holds one or two classes and a batch mixes at most
`window_chunks` chunks. A full random permutation (the reference's DataLoader shuffle) would mix the
whole data set but needs one random read per sample, i.e. one whole compressed chunk read and decoded
per sample. The window reads each chunk once per epoch as one contiguous read and holds this rank's
rows of a window in RAM (window / world samples). Every rank reads the window's chunks (the OS page
cache serves one node's ranks from one disk read); in exchange the batch sequence does not depend on
the number of processes.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reglue.pipeline.store import decode_patches
from reglue.trainer.objective import Batch, Method

if TYPE_CHECKING:
    from reglue.trainer.pca import PCA


class Readable(Protocol):
    """What the loader needs of `reglue.pipeline.store.Cache`."""

    def read(self, name: str, start: int, stop: int) -> np.ndarray: ...


def epoch_order(rows: np.ndarray, chunk_size: int, window_chunks: int, seed: int,
                epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's permutation of `rows` (sorted store rows): shuffled chunks, shuffled within windows.

    Returns the order and the stream offsets where its windows start."""
    rng = np.random.default_rng([seed, epoch])
    chunk_ids = np.unique(rows // chunk_size)
    starts = np.searchsorted(rows, chunk_ids * chunk_size)
    stops = np.searchsorted(rows, (chunk_ids + 1) * chunk_size)
    order = rng.permutation(len(chunk_ids))
    windows = [np.concatenate([rows[starts[c]:stops[c]] for c in order[i:i + window_chunks]])
               for i in range(0, len(order), window_chunks)]
    bounds = np.cumsum([0] + [len(w) for w in windows[:-1]])
    return np.concatenate([rng.permutation(w) for w in windows]), bounds


def read_rows(cache: Readable, names: Sequence[str], ids: np.ndarray, chunk_size: int) -> dict[str, np.ndarray]:
    """`{name: array[ids]}` read as one contiguous span per chunk touched (never one read per row)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    cuts = np.flatnonzero(np.diff(sorted_ids // chunk_size)) + 1
    spans = list(zip(np.split(order, cuts), np.split(sorted_ids, cuts)))
    out = {}
    for name in names:
        for i, (where, rows) in enumerate(spans):
            block = cache.read(name, int(rows[0]), int(rows[-1]) + 1)
            if i == 0:
                out[name] = np.empty((len(ids), *block.shape[1:]), block.dtype)
            out[name][where] = block if len(rows) == len(block) else block[rows - rows[0]]  # one copy
    return out


class CacheLoader:
    """Batches `{name: tensor[b, ...], "index": int64[b]}` of this rank, produced by a background thread.

    `rows` are the store rows to draw from (default: the cache's valid samples); `state_dict()` holds
    the position of the consumed batches (not the prefetched ones)."""

    def __init__(self, cache, names: Sequence[str], global_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, window: int = 4096, prefetch: int = 4, rows: np.ndarray | None = None,
                 pin_memory: bool = False):
        if global_batch % world:
            raise ValueError(f"the global batch ({global_batch}) must be divisible by the number of "
                             f"processes ({world}); change --global-batch or the process count")
        self.cache, self.names = cache, tuple(names)
        self.rows = np.sort(np.asarray(cache.valid_indices() if rows is None else rows, dtype=np.int64))
        if len(self.rows) == 0:
            raise ValueError("the cache has no valid samples to train on")
        self.chunk_size = int(cache.meta.chunk_size)
        self.window_chunks = max(1, window // self.chunk_size)
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.position = 0  # stream samples consumed, a multiple of global_batch
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

    def _rank_batches(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's slices of the global batches from stream position `start` on, forever."""
        n, B, b = len(self.rows), self.global_batch, self.global_batch // self.world
        epoch, offset = divmod(start, n)
        carry: dict[str, np.ndarray] | None = None  # fewer than b rows left over from the last window
        while True:
            order, bounds = epoch_order(self.rows, self.chunk_size, self.window_chunks, self.seed, epoch)
            for lo, hi in zip(bounds, [*bounds[1:], n]):
                if hi <= offset:
                    continue
                p = np.arange(max(lo, offset), hi)
                ids = order[p[(epoch * n + p) % B // b == self.rank]]
                if not len(ids):
                    continue
                rows = {**read_rows(self.cache, self.names, ids, self.chunk_size), "index": ids}
                if carry is not None:  # complete the straddling batch; the window itself is not copied
                    need = b - len(carry["index"])
                    carry = {k: np.concatenate([carry[k], v[:need]]) for k, v in rows.items()}
                    rows = {k: v[need:] for k, v in rows.items()}
                    if len(carry["index"]) < b:
                        continue
                    yield carry
                full = len(rows["index"]) // b * b
                for i in range(0, full, b):
                    yield {k: v[i:i + b] for k, v in rows.items()}
                carry = {k: v[full:] for k, v in rows.items()}
            epoch, offset = epoch + 1, 0

    def _worker(self, start: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self._rank_batches(start):
                tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
                if self.pin_memory:
                    tensors = {k: v.pin_memory() for k, v in tensors.items()}
                while not stop.is_set():
                    try:
                        out.put(tensors, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            out.put(e)

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


# ---- from stored values to the objective's Batch ----------------------------------------------

PATCH_ARRAYS = ("patches", "patches_scale")
"""The last-layer patch tokens in their stored encoding (pipeline.store.decode_patches)."""


def required_arrays(method: Method, cache) -> tuple[str, ...]:
    """The arrays a method reads, after checking the cache has them (a clear error naming the fix)."""
    names = ["vae_moments", "labels"]
    needs = {"cls": method.cls, "patches": method.repa or method.features == "pca",
             "compressed": method.features == "compressed"}
    fixes = {"compressed": "run `reglue train-compressor --cache CACHE --out DIR` and then "
                           "`reglue fill-compressed --cache CACHE --compressor DIR` to add them",
             "patches": "re-extract the cache with the last-layer patch tokens",
             "cls": "re-extract the cache with the [CLS] token"}
    for name in ("vae_moments", "labels", "cls", "patches", "compressed"):
        if needs.get(name, True) and not cache.has(name):
            raise ValueError(f"method {method.name!r} needs the cache's {name!r} features, which {cache.url} "
                             f"lacks: {fixes.get(name, 're-extract the cache')}; or choose a method that "
                             "does without them (sit needs only the VAE moments)")
    names += [n for n in ("cls", "compressed") if needs[n]]
    return tuple(names) + (PATCH_ARRAYS if needs["patches"] else ())


def prepare_batch(raw: dict[str, torch.Tensor], method: Method, meta, device: torch.device,
                  pca: PCA | None = None) -> Batch:
    """Raw stored rows -> the objective's Batch on `device`, in the model's units.

    Draws the VAE posterior sample with the global RNG of `device` (the loop seeds it per micro-batch)."""
    get = lambda name: raw[name].to(device, non_blocking=True)
    mean, std = get("vae_moments").float().chunk(2, dim=1)  # (B, zc, h, h) each
    # A fresh posterior sample every step, then the SD scaling factor (reference train.py:52-59, 184-189).
    latent = (mean + std * torch.randn_like(mean)) * meta.vae_scaling_factor
    labels = get("labels").long()
    labels = torch.where(labels < 0, meta.num_classes, labels)  # unlabelled -> the null class id
    h = meta.latent_size
    cls = get("cls").float() if "cls" in raw else None  # (B, D)
    patches = decode_patches(get("patches"), get("patches_scale")) if "patches" in raw else None  # (B, P, D)
    features = None
    if method.features == "compressed":
        features = get("compressed").float()  # (B, c, g, g)
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
