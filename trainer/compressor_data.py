"""The compressor's training features and norm stats: DINOv2 layers computed from the images, as the
reference trains it, or stored `layers` rows of a cache (a cheaper subset).

Batch layout (reference train_compressor.py:161-208; reference-implementation.md §3.2). The reference's
8 GPUs each take 512 images of a `DistributedSampler(shuffle=True, seed)`: torch.randperm(N) seeded
`seed + epoch`, rank r taking the indices r, r + 8, r + 16, ... in batches of 512 with drop_last. So its
global batch k is order[kB:(k+1)B] (B = 4096) and its rank r holds batch[r::8]. Here the global batch is
the same, split into G = B / bn_batch BatchNorm groups, group g = batch[g::G]: with the default 512, group
g is exactly the batch of the reference's rank g, whatever the number of processes. Process r of W
computes groups [r G/W, (r+1) G/W), each its own forward (its own batch statistics, no SyncBN, as DDP
there), and accumulates their gradients (`trainer.compressor_train`). An epoch is N // B steps (drop_last;
ImageNet: 312).

set_epoch: the reference never calls `train_sampler.set_epoch` (baselines.md, "REGLUE itself"), so each of
its 25 epochs replays epoch 0's order and leaves out the same N - 312 x 4096 images. That is a bug; here
epoch e uses `seed + e`, as DistributedSampler does once set_epoch(e) is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from reglue.pipeline.encoders import FeatureEncoder
from reglue.pipeline.sources import ImageDataset, SourceList
from reglue.pipeline.store import Cache, layer_sample_indices
from reglue.trainer.data import CacheLoader, _map_ahead

REFERENCE_IMAGES = 1_281_167
"""ImageNet-1k train images, the reference's compressor data (reference-implementation.md §3.2)."""
REFERENCE_BATCH = 4096
REFERENCE_STEPS_PER_EPOCH = REFERENCE_IMAGES // REFERENCE_BATCH  # 312
NORM_STATS_BATCH = 256
"""calc_norm_stats.py:96-101: global batch 256, `shuffle=False`, breaking after batch 301: the first
302 x 256 = 77,312 images in sorted order (reference-implementation.md §3.3)."""
NORM_STATS_IMAGES = 302 * NORM_STATS_BATCH


@dataclass(frozen=True)
class Layout:
    """How one step's global batch is split into BatchNorm groups and processes."""

    global_batch: int
    bn_batch: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"the global batch ({self.global_batch}) must be divisible by the {self.world} "
                             "processes; change --global-batch or the process count")
        if self.per_rank % self.bn_batch:
            raise ValueError(f"--bn-batch {self.bn_batch} must divide the per-process batch {self.per_rank} "
                             f"(global {self.global_batch} / {self.world} processes)")

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def groups(self) -> int:
        return self.global_batch // self.bn_batch

    @property
    def groups_per_rank(self) -> int:
        return self.per_rank // self.bn_batch

    def rank_groups(self, batch: np.ndarray) -> list[np.ndarray]:
        """This process's BatchNorm groups of a global batch, group g = batch[g::G]."""
        first = self.rank * self.groups_per_rank
        return [batch[g::self.groups] for g in range(first, first + self.groups_per_rank)]


def sampler_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """DistributedSampler(shuffle=True, seed)'s permutation after set_epoch(epoch) (torch/utils/data/distributed.py)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


class GroupSampler:
    """DataLoader `batch_sampler`: this process's BatchNorm groups of every step in [start, stop), in order."""

    def __init__(self, n: int, layout: Layout, steps_per_epoch: int, seed: int, start: int, stop: int):
        self.n, self.layout, self.steps_per_epoch, self.seed = n, layout, steps_per_epoch, seed
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.layout.groups_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        order, order_epoch, B = None, -1, self.layout.global_batch
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = sampler_order(self.n, self.seed, epoch), epoch
            yield from (g.tolist() for g in self.layout.rank_groups(order[k * B:(k + 1) * B]))


def quiet() -> torch.Generator:
    """A DataLoader's own generator: its worker seed is drawn from here, not from the global RNG, which then
    holds exactly what a run restores (the decoding itself draws nothing)."""
    return torch.Generator().manual_seed(0)


# ---- the two feature sources: per step, this process's groups as float32 layers [b, P, C] on the device

class ImageLayers:
    """The reference's features: DINOv2 layers of every image, computed on the fly (decoding in DataLoader
    workers, the ADM crop and the reference preprocessing of pipeline/sources.py and pipeline/encoders.py).

    A file that does not decode is left out of its group (the group is smaller) and listed in `skipped`."""

    def __init__(self, sources: SourceList, encoder: FeatureEncoder, layout: Layout, steps_per_epoch: int,
                 seed: int, num_workers: int):
        self.sources, self.encoder, self.layout = sources, encoder, layout
        self.steps_per_epoch, self.seed, self.num_workers = steps_per_epoch, seed, num_workers
        self.skipped: dict[int, str] = {}

    def steps(self, start: int, stop: int) -> Iterator[Iterator[torch.Tensor]]:
        """Per step in [start, stop): an iterator over this process's groups (consume it before the next step)."""
        if start >= stop:
            return
        sampler = GroupSampler(len(self.sources), self.layout, self.steps_per_epoch, self.seed, start, stop)
        batches = iter(torch.utils.data.DataLoader(
            ImageDataset(self.sources, self.encoder.spec.resolution), batch_sampler=sampler,
            num_workers=self.num_workers, pin_memory=self.encoder.device.type == "cuda", generator=quiet()))
        for _ in range(start, stop):
            yield (self._layers(next(batches)) for _ in range(self.layout.groups_per_rank))

    def _layers(self, batch) -> torch.Tensor:
        index, images, ok, reasons = batch
        self.skipped.update({int(i): r for i, good, r in zip(index, ok, reasons) if not good})
        if not ok.any():
            raise ValueError(f"no image of a BatchNorm group decodes (first: {self.sources.path(int(index[0]))}: "
                             f"{reasons[0]}); remove the bad files or raise --bn-batch")
        return self.encoder.layers(images[ok])  # [b, P, L*D] float32


class StoredLayers:
    """The cheaper option: the cache's `layers` rows of valid samples, drawn by `trainer.data.CacheLoader`
    (one row per Zarr chunk, so every window is a random sample of all the rows: a full shuffle)."""

    def __init__(self, cache: Cache, layout: Layout, seed: int, window: int, device: torch.device):
        self.layout, self.device, self.skipped = layout, device, {}
        self.rows = valid_layer_rows(cache)
        # No read-ahead: a window is about one step's batch (4096 rows), so the `prefetch` queue already reads
        # whole windows ahead and one more would only add its RAM (1.5 MiB per row at ViT-B, 256 px).
        self.loader = CacheLoader(cache, ("layers",), layout.global_batch, seed=seed, rank=layout.rank,
                                  world=layout.world, window=window, rows=self.rows, local_reads=False,
                                  chunk_size=cache.array("layers").chunks[0], read_ahead=False, prefetch=1)

    def steps(self, start: int, stop: int) -> Iterator[Iterator[torch.Tensor]]:
        bn = self.layout.bn_batch
        self.loader.load_state_dict({"position": start * self.layout.global_batch})
        try:
            for _ in range(start, stop):
                share = next(self.loader)["layers"]  # [per_rank, P, C] float16
                yield (share[a * bn:(a + 1) * bn].to(self.device).float() for a in range(self.layout.groups_per_rank))
        finally:
            self.loader.close()


def valid_layer_rows(cache: Cache) -> np.ndarray:
    """The `layers` rows of samples that decoded (the rows of skipped samples hold zeros, not features)."""
    index = layer_sample_indices(cache.meta.num_samples, cache.meta.layers_count)
    return np.flatnonzero(cache.read("valid")[index])


# ---- norm stats ------------------------------------------------------------------------------------

class Moments:
    """Per-channel count, mean and sum of squared deviations in float64, merged batch by batch (Chan et
    al.), so memory is one batch whatever the count (the reference holds all ~19.8M x 3072 values)."""

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., C]."""
        x = x.reshape(-1, x.shape[-1]).to(self.mean.device, torch.float64)
        mean = x.mean(0)
        self.merge(len(x), mean, ((x - mean) ** 2).sum(0))

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total

    def gathered(self, accelerator) -> Moments:
        """Every process's moments merged in rank order (call on every process)."""
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device),
                            self.mean, self.m2])[None]
        out = Moments(len(self.mean), self.mean.device)
        for row in accelerator.gather(packed):
            n, mean, m2 = row.split([1, len(self.mean), len(self.mean)])
            out.merge(int(n.item()), mean, m2)
        return out

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population std (ddof 0, calc_norm_stats.py:76-79)."""
        if self.n == 0:
            raise ValueError("no features to compute the norm stats from")
        return self.mean.cpu().numpy(), (self.m2 / self.n).sqrt().cpu().numpy()


def image_norm_stats(sources: SourceList, encoder: FeatureEncoder, count: int, num_workers: int,
                     accelerator) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """calc_norm_stats.py: the patch tokens of the first `count` images in source order (shuffle=False), in
    fp32 (the reference's default Accelerator); every process takes every W-th batch of 256."""
    encoder = FeatureEncoder(dataclasses.replace(encoder.spec, precision="fp32"), encoder.device,
                             vfm=encoder.vfm, with_vae=False)
    count = min(count, len(sources))
    batches = [list(range(i, min(i + NORM_STATS_BATCH, count))) for i in range(0, count, NORM_STATS_BATCH)]
    mine = batches[accelerator.process_index::accelerator.num_processes]
    moments, skipped = Moments(len(encoder.spec.layers) * encoder.width, encoder.device), {}
    loader = torch.utils.data.DataLoader(ImageDataset(sources, encoder.spec.resolution), batch_sampler=mine,
                                         num_workers=num_workers if mine else 0, generator=quiet())
    rank = f"[rank {accelerator.process_index}/{accelerator.num_processes}]"
    with tqdm(total=sum(map(len, mine)), unit="img", desc=f"norm stats {rank}",
              disable=not accelerator.is_main_process) as bar:
        for index, images, ok, reasons in loader:
            skipped.update({int(i): r for i, good, r in zip(index, ok, reasons) if not good})
            if ok.any():
                moments.update(encoder.layers(images[ok]))  # [b, P, C] fp32
            bar.update(len(index))
    skipped = {i: r for part in gather_object([skipped]) for i, r in part.items()}
    return *moments.gathered(accelerator).result(), skipped


def stored_norm_stats(cache: Cache, rows: np.ndarray, block_rows: int = 16,
                      threads: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over every patch token of the given `layers` rows, read `block_rows`
    consecutive rows at a time by a few threads (float64; memory: a few blocks)."""
    rows = np.asarray(rows)
    spans = [rows[i:i + block_rows] for i in range(0, len(rows), block_rows)]
    moments = Moments(cache.array("layers").shape[-1])
    read = lambda span: cache.read("layers", int(span[0]), int(span[-1]) + 1)[span - span[0]]
    with ThreadPoolExecutor(threads, thread_name_prefix="reglue-norm-stats") as pool:
        for block in _map_ahead(pool, read, spans, threads):
            moments.update(torch.from_numpy(block))
    return moments.result()
