"""`reglue train-compressor`: the DINOv2 norm stats and the semantic compressor, from a cache's `layers`.

The reference computes both online from images (calc_norm_stats.py, train_compressor.py), holding
~0.5 TB of features in RAM for the stats; here both read the stored layers 8..11 rows
(reference-implementation.md §3.2-3.3):
  1. norm stats: per-channel mean and population std over every stored patch token, out of core with
     dask over the Zarr array (blocks of rows, float64 sums), written in the official
     `dino_mean_std_<layers>_<resolution>.pth` format;
  2. the autoencoder: MSE reconstruction in the standardized space, Adam(lr 1e-3), CosineAnnealingLR
     (T_max 100, eta_min 1e-4) stepped per epoch, 25 epochs of 312 steps (the reference's ImageNet
     epoch at global batch 4096, drawn from the stored rows however many they are), global batch 4096
     (capped by the rows stored), BatchNorm, fp32; saved as `compression_model.pth` (official format)
     after the last epoch;
  3. optionally (`fill=True`), `pipeline.extract.fill_compressed` adds the `compressed` features of
     every sample to the cache, which `reglue train --method reglue` needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reglue.pipeline.compressor import (
    EncoderDecoder,
    NormStats,
    compress,
    load_norm_stats,
    save_compressor,
    save_norm_stats,
)
from reglue.pipeline.store import Cache
from reglue.trainer.data import CacheLoader
from reglue.trainer.objective import get_method


@dataclass
class CompressorConfig:
    """One `reglue train-compressor` run; defaults are the reference's (train_compressor.py:321-336)."""

    cache: str
    """Cache with `layers` rows (`reglue extract --layers-limit M`)."""
    out: str
    """Output folder: the norm stats, compression_model.pth, compressor.json."""
    epochs: int = 25
    """Epochs of `steps_per_epoch` optimizer steps (the reference's 25, train_compressor.py:321)."""
    steps_per_epoch: int = 312
    """Optimizer steps per epoch: the reference's ImageNet epoch at global batch 4096 (1,281,167 // 4096).
    An epoch here is that many steps drawn from the stored rows, repeated as needed, so a subset (e.g.
    77,312 rows, 18 batches) still gets the reference's ~7.8K steps; the LR schedule steps once per epoch."""
    global_batch: int = 4096
    """Rows per optimizer step over all processes (capped by the number of stored rows)."""
    lr: float = 1e-3
    """Adam learning rate (no weight decay)."""
    t_max: int = 100
    """CosineAnnealingLR period in epochs (the reference's 100, so 25 epochs only decay 1e-3 -> ~8.8e-4)."""
    eta_min: float = 1e-4
    """CosineAnnealingLR floor."""
    channels: int = 16
    """Compressed channels c (the SiT's feature channels); the REGLUE preset's 16 by default."""
    hidden: int = 256
    """Hidden width of the encoder and decoder (build_channel_list = [L*D, hidden, channels])."""
    seed: int = 0
    """Seed of the init and of the row order."""
    window: int = 4096
    """Loader window in rows (see trainer.data). The store keeps `layers` one row per chunk, so the rows are
    shuffled fully whatever its size; it sets the RAM: each process holds ~window / processes `layers` rows (1.5 MiB
    each at ViT-B, 256 px: ~6 GiB on one process)."""
    block_rows: int = 16
    """Layers rows per dask block for the norm stats (bounds their memory: rows x P x L*D x 8 bytes)."""
    fill: bool = False
    """Then fill the cache's `compressed` features with the new compressor (pipeline.extract.fill_compressed)."""

    def __post_init__(self):
        for name in ("epochs", "steps_per_epoch", "global_batch", "t_max", "channels", "hidden", "window",
                     "block_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")


def norm_stats_path(out: Path, meta) -> Path:
    """The official name, derived from the cache (calc_norm_stats.py:82-90)."""
    return out / f"dino_mean_std_{'_'.join(map(str, meta.layers))}_{meta.resolution}.pth"


def layer_norm_stats(cache: Cache, block_rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (ddof 0) of every stored `layers` token, float64, out of core.

    dask reads `block_rows` rows at a time and merges per-block moments (Chan et al.), so memory is
    a few blocks whatever the number of rows; the reference concatenates ~19.8M x 3072 fp32 values."""
    import dask.array as da

    arr = cache.rows("layers")  # (M, P, C) float16, read through the cache's checked read
    M, P, C = arr.shape
    x = da.from_array(arr, chunks=(block_rows, P, C), meta=np.empty((0, 0, 0), arr.dtype))
    x = x.reshape(M * P, C).astype(np.float64)
    mean, std = da.compute(x.mean(axis=0), x.std(axis=0))
    return np.asarray(mean), np.asarray(std)


def train_compressor(cfg: CompressorConfig) -> Path:
    """Norm stats, then the autoencoder; returns the path of compression_model.pth."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # 1. The cache's layers rows.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train_compressor.py:21-23
    cache = Cache.open(cfg.cache)
    m = cache.meta
    if not m.layers_count:
        raise ValueError(f"{cfg.cache} stores no layers rows; re-extract it with --layers-limit M "
                         "(e.g. 77312, the reference's norm-stats sample) to train a compressor")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 2. Norm stats (process 0), read back by every process.
    stats_path = norm_stats_path(out, m)
    if accelerator.is_main_process:
        save_norm_stats(stats_path, *layer_norm_stats(cache, cfg.block_rows))
    accelerator.wait_for_everyone()
    stats = load_norm_stats(stats_path)

    # 3. The autoencoder on the standardized layers, fp32.
    set_seed(cfg.seed)
    channels = get_method("reglue", feature_channels=cfg.channels, layers=m.layers,
                          compressor_hidden=cfg.hidden).compressor_channel_list(m.dino_dim)
    model = EncoderDecoder(channels)
    batch = min(cfg.global_batch, m.layers_count) // accelerator.num_processes * accelerator.num_processes
    if batch == 0:
        raise ValueError(f"{m.layers_count} layers rows cannot feed {accelerator.num_processes} processes")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Stepped once per epoch (train_compressor.py:246-247, 302).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max, eta_min=cfg.eta_min)
    model, optimizer = accelerator.prepare(model, optimizer)
    # BatchNorm: each process's batch stays a random sample (no per-batch sort). The layers rows are read
    # in their own Zarr chunks (one row each), so every window is a random sample of all the rows: a full
    # shuffle, as the reference's DistributedSampler(shuffle=True) (train_compressor.py:189-208), not
    # 64 chunks of neighbouring rows (~60-100 classes) per batch; the window then only sets the RAM. No
    # read-ahead: a window is about one step's batch (4096 rows each by default), so the `prefetch` queue
    # already reads whole windows ahead and one more would only add its RAM.
    loader = CacheLoader(cache, ("layers",), batch, seed=cfg.seed, rank=accelerator.process_index,
                         world=accelerator.num_processes, window=cfg.window, rows=np.arange(m.layers_count),
                         local_reads=False, chunk_size=cache.array("layers").chunks[0], read_ahead=False,
                         prefetch=1)  # one step's rows are 1.5 MiB each (6 GiB per 4096 on one process)
    # An epoch is the reference's step count, not a pass over the stored rows: a 77,312-row subset at batch
    # 4096 would otherwise get 18 steps per epoch, 17x fewer than the reference's 312 (train_compressor.py).
    history = []
    for epoch in range(cfg.epochs):
        t0, total = time.perf_counter(), torch.zeros((), device=accelerator.device)
        for _ in range(cfg.steps_per_epoch):
            loss = reconstruction_loss(model, next(loader)["layers"].to(accelerator.device), stats)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        schedule.step()
        mean_loss = float(accelerator.reduce(total, "mean")) / cfg.steps_per_epoch  # one sync per epoch
        history.append(mean_loss)
        accelerator.print(f"epoch {epoch + 1}/{cfg.epochs} mse {mean_loss:.5f} lr {schedule.get_last_lr()[0]:.3g} "
                          f"({time.perf_counter() - t0:.1f} s)")
    loader.close()

    # 4. Save after the last epoch. The reference saves at the start of each epoch, before training it,
    #    so its file holds 24 of 25 epochs (train_compressor.py:250-277); this one holds all of them.
    path = out / "compression_model.pth"
    if accelerator.is_main_process:
        save_compressor(path, accelerator.unwrap_model(model).cpu())
        (out / "compressor.json").write_text(json.dumps(
            {"config": asdict(cfg), "channels": channels, "global_batch": batch,
             "steps": cfg.epochs * cfg.steps_per_epoch, "row_passes": loader.epoch, "epoch_mse": history,
             "norm_stats": stats_path.name, "cache": cfg.cache}, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # 5. Optionally fill the cache's compressed features.
    if cfg.fill:
        from reglue.pipeline.extract import fill_compressed
        fill_compressed(cfg.cache, str(path), str(stats_path))
    return path


def reconstruction_loss(model: nn.Module, layers: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """MSE between the standardized map z and decoder(encoder(z)) (train_compressor.py:283-296)."""
    z = compress(nn.Identity(), layers, stats)  # standardized (B, C, g, g): the compress step without the encoder
    recon, _ = model(z)
    return F.mse_loss(recon, z)
