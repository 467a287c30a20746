"""`reglue train-compressor`: the DINOv2 norm stats and the semantic compressor, in the official formats.

Two sources of features (trainer/compressor_data.py):
- `src` (the documented ImageNet flow, the reference's recipe, reference-implementation.md §3.2-3.3):
  DINOv2 layers computed from every image each step, as train_compressor.py does; norm stats over the
  first 77,312 images in source order in fp32, as calc_norm_stats.py (or given: `norm_stats`);
- `cache` (cheaper): the cache's stored `layers` rows (`reglue extract --layers-limit M`), norm stats
  over all of them; it prints how its passes compare with the reference's.

The recipe: MSE reconstruction in the standardized space, Adam(lr 1e-3), CosineAnnealingLR(T_max 100,
eta_min 1e-4) stepped per epoch, 25 epochs, global batch 4096, BatchNorm over groups of 512 images
(the reference's per-GPU batch on 8 GPUs, DDP without SyncBN) whatever the process count, fp32 with
TF32. Saved as `compression_model.pth` (official DDP format) after the last epoch.

The run folder (OUT): config.json (the config and the plan, written first), the norm stats
`dino_mean_std_<layers>_<resolution>.pth`, checkpoints/step-N/ (state.safetensors: the autoencoder with
its BatchNorm statistics, Adam's moments, the RNG; state.json: the step, the optimizer's groups, the LR
schedule, the loss history; written to a tmp folder and renamed, no pickle), compression_model.pth and
compressor.json (the report) at the end. Resume = rerun the same command: the latest checkpoint restores
everything and the data position is the step, so the result is bitwise that of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from reglue.pipeline.compressor import (
    EncoderDecoder,
    NormStats,
    check_made_for,
    compress,
    describe_key,
    file_sha256,
    load_norm_stats,
    save_compressor,
    save_norm_stats,
)
from reglue.pipeline.encoders import EncoderSpec, FeatureEncoder
from reglue.pipeline.sources import scan
from reglue.pipeline.store import Cache, digest, make_encoder_key
from reglue.trainer.compressor_data import (
    NORM_STATS_IMAGES,
    REFERENCE_BATCH,
    REFERENCE_IMAGES,
    REFERENCE_STEPS_PER_EPOCH,
    ImageLayers,
    Layout,
    StoredLayers,
    image_norm_stats,
    stored_norm_stats,
    valid_layer_rows,
)
from reglue.trainer.objective import get_method
from reglue.trainer.runfolder import PAUSE_ENV, config_differences, latest_checkpoint, prune_checkpoints

# Fields that may change when a run is resumed: they do not change the trained weights.
RUN_CONTROL = ("fill", "epochs", "ckpt_every", "keep_last", "num_workers", "block_rows")


@dataclass
class CompressorConfig:
    """One `reglue train-compressor` run; defaults are the reference's (train_compressor.py:321-336)."""

    out: str
    """Run folder: config.json, the norm stats, checkpoints/, compression_model.pth, compressor.json."""
    src: str | None = None
    """Images (class tree, flat folder or file list, as `reglue extract`): DINOv2 runs on every image
    each step, the reference's recipe. Give `src` or `cache`."""
    cache: str | None = None
    """Or a cache with `layers` rows (`reglue extract --layers-limit M`): cheaper, fewer distinct images."""
    fill: str | None = None
    """Then add the `compressed` features of this cache (pipeline.extract.fill_compressed: from its
    `layers` rows where it has them, else a DINOv2 pass over its source images; never the VAE again)."""
    spec: EncoderSpec = field(default_factory=lambda: EncoderSpec(precision="fp32"))
    """With `src`: the encoder (`spec.encoder`, its weights, `preset`), resolution, layers and its
    precision (fp32: the reference trains without autocast, train_compressor.py:280-292). The VAE
    fields are unused. With `cache`, the cache's own encoder is used."""
    norm_stats: str | None = None
    """A norm-stats file to use (e.g. the official dino_mean_std_8_9_10_11_256.pth) instead of computing them."""
    norm_stats_images: int = NORM_STATS_IMAGES
    """With `src`: the first this many images, in source order, give the norm stats (calc_norm_stats.py)."""
    epochs: int = 25
    """Epochs (train_compressor.py:321); the LR schedule steps once per epoch."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch. Default: with `src`, one pass over the images (images // global batch,
    drop_last: 312 on ImageNet); with `cache`, the reference's 312, drawn from the stored rows as often
    as needed (a subset of 77,312 rows would otherwise give 18 steps per epoch)."""
    global_batch: int = REFERENCE_BATCH
    """Images per optimizer step over all processes (capped by the images available)."""
    bn_batch: int = 512
    """Images per BatchNorm group: the reference's per-GPU batch (4096 over 8 GPUs, no SyncBN). Each
    process runs its share in groups of this size and accumulates their gradients."""
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
    """Seed of the init and of the data order."""
    num_workers: int = 4
    """DataLoader processes decoding images, per process (`src`)."""
    window: int = 4096
    """`cache`: loader window in rows (trainer.data); only the RAM (~window / processes rows of 1.5 MiB)."""
    block_rows: int = 16
    """`cache`: layers rows read at a time for the norm stats."""
    ckpt_every: int = 100
    """Steps between checkpoints (and one at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""

    def __post_init__(self):
        if (self.src is None) == (self.cache is None):
            raise ValueError("give --src IMAGES (DINOv2 on every image, the reference's recipe) or --cache CACHE "
                             "(its stored layers rows), not both and not neither")
        for name in ("epochs", "global_batch", "bn_batch", "t_max", "channels", "hidden", "window", "block_rows",
                     "ckpt_every", "keep_last", "norm_stats_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive; got {self.steps_per_epoch}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {self.num_workers}")


@dataclass(frozen=True)
class Plan:
    """What the config means for this data and process count."""

    images: int
    """Distinct images the features come from (source images, or valid stored layers rows)."""
    data_sha256: str
    """Which ones: a digest of the source's paths and labels, or of the cache's source and layers rows."""
    global_batch: int
    bn_batch: int
    steps_per_epoch: int
    total_steps: int
    channels: list[int]
    layers: tuple[int, ...]
    resolution: int
    encoder: dict
    """The features' encoder, layers, width and grid (pipeline.store.make_encoder_key), recorded in both files."""

    def describe(self, cfg: CompressorConfig, world: int) -> str:
        drawn = self.total_steps * self.global_batch
        what = "source images" if cfg.src else "stored layers rows"
        line = (f"train-compressor: {cfg.epochs} epochs x {self.steps_per_epoch} steps x {self.global_batch} images "
                f"(BatchNorm groups of {self.bn_batch}, {world} process{'es' * (world > 1)}) = {drawn:,} drawn "
                f"from {self.images:,} {what}: {drawn / self.images:.1f} passes over them")
        reference = (f"the reference: 25 x {REFERENCE_STEPS_PER_EPOCH} x {REFERENCE_BATCH} = "
                     f"{25 * REFERENCE_STEPS_PER_EPOCH * REFERENCE_BATCH:,} over all {REFERENCE_IMAGES:,} ImageNet "
                     f"images, {25 * REFERENCE_STEPS_PER_EPOCH * REFERENCE_BATCH / REFERENCE_IMAGES:.1f} passes")
        if cfg.cache:
            return (f"{line} ({self.images / REFERENCE_IMAGES:.1%} of ImageNet; {reference}; "
                    "--src IMAGES trains on every image as it does)")
        return f"{line} ({reference})"


def make_plan(cfg: CompressorConfig, images: int, data_sha256: str, world: int, encoder: dict,
              resolution: int) -> Plan:
    """The batch (capped by the images, a multiple of the processes), the BatchNorm group, the steps."""
    batch, bn = cfg.global_batch, cfg.bn_batch
    if images < batch:  # a small data set: as much of it per step as whole groups on every process take
        bn = min(bn, images // world)
        if bn == 0:
            raise ValueError(f"{images} images cannot feed {world} processes")
        batch = images // (world * bn) * world * bn
    steps = cfg.steps_per_epoch or (images // batch if cfg.src else REFERENCE_STEPS_PER_EPOCH)
    if cfg.src and steps > images // batch:
        raise ValueError(f"--steps-per-epoch {steps} exceeds the {images // batch} full batches of {batch} in one "
                         f"pass over the {images} images")
    layers = tuple(encoder["layers"])
    channels = get_method("reglue", feature_channels=cfg.channels, layers=layers,
                          compressor_hidden=cfg.hidden).compressor_channel_list(encoder["width"])
    return Plan(images, data_sha256, batch, bn, steps, cfg.epochs * steps, channels, layers, resolution, encoder)


def norm_stats_path(out: Path, layers, resolution: int) -> Path:
    """The official name (calc_norm_stats.py:82-90)."""
    return out / f"dino_mean_std_{'_'.join(map(str, layers))}_{resolution}.pth"


# ---- the run -------------------------------------------------------------------------------------

def train_compressor(cfg: CompressorConfig) -> Path:
    """Norm stats, then the autoencoder (or resume it); returns the path of compression_model.pth."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object

    # 1. Processes. DDP does not broadcast BatchNorm buffers: only process 0's, which the file keeps, matter.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train_compressor.py:1-3
    say, out, world = accelerator.print, Path(cfg.out), accelerator.num_processes

    # 2. The features and the plan.
    if cfg.src:
        sources = scan(cfg.src)
        encoder = FeatureEncoder(cfg.spec, accelerator.device, with_vae=False)
        spec, where = encoder.spec, f"--src {cfg.src} through --encoder {cfg.spec.encoder}"
        key = make_encoder_key(spec.encoder, spec.preset, spec.layers, encoder.width, spec.grid)
        plan = make_plan(cfg, len(sources), digest([sources.paths, sources.labels]), world, key, spec.resolution)
    else:
        cache = Cache.open(cfg.cache)
        m = cache.meta
        if not m.layers_count:
            raise ValueError(f"{cfg.cache} stores no layers rows: train from the images with `reglue train-compressor "
                             f"--src {m.source['root']}` (the reference's recipe; no second VAE pass), or extract "
                             "a cache with --layers-limit M")
        rows, where = valid_layer_rows(cache), cfg.cache
        plan = make_plan(cfg, len(rows), digest([m.source["sha256"], rows.tolist()]), world, m.encoder_key(),
                         m.resolution)
    layout = Layout(plan.global_batch, plan.bn_batch, accelerator.process_index, world)
    say(plan.describe(cfg, world))
    if cfg.fill:
        check_fill_target(cfg.fill, plan, out / "compression_model.pth")  # before hours of training, not after

    # 3. The run folder: the same config or a refusal; config.json first, so that its stats are its own.
    resolved = json.loads(json.dumps({"config": dataclasses.asdict(cfg), "plan": dataclasses.asdict(plan),
                                      "processes": world}))
    check_same_compressor_run(out, resolved)
    accelerator.wait_for_everyone()  # every process has checked before process 0 writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2))

    # 4. Norm stats: given, already computed by this run, or computed now (process 0 writes them); the file
    #    records the features it was computed from, as the compressor will (pipeline.compressor.check_made_for).
    stats_path = norm_stats_path(out, plan.layers, plan.resolution)
    skipped: dict[int, str] = {}
    if cfg.norm_stats:
        stats = load_norm_stats(cfg.norm_stats)
        check_made_for(cfg.norm_stats, stats.encoder, plan.encoder, where)
        if accelerator.is_main_process:
            save_norm_stats(stats_path, stats.mean, stats.std, encoder=plan.encoder)
    elif not stats_path.exists():
        if cfg.src:
            mean, std, skipped = image_norm_stats(sources, encoder, cfg.norm_stats_images, cfg.num_workers, accelerator)
        elif accelerator.is_main_process:
            mean, std = stored_norm_stats(cache, rows, cfg.block_rows)
        if accelerator.is_main_process:
            save_norm_stats(stats_path, mean, std, encoder=plan.encoder)
    accelerator.wait_for_everyone()
    stats = load_norm_stats(stats_path)
    if stats.mean.numel() != plan.channels[0]:
        raise ValueError(f"norm stats {cfg.norm_stats or stats_path} have {stats.mean.numel()} channels; the "
                         f"layers have {plan.channels[0]} (len(layers) x encoder width)")

    # 5. Model, optimizer, schedule; the latest checkpoint, if any.
    torch.manual_seed(cfg.seed)  # the init; nothing else in the loop draws
    model = EncoderDecoder(plan.channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max, eta_min=cfg.eta_min)
    loop = {"step": 0, "epoch_sum": 0.0, "epoch_mse": [], "skipped": {}}
    if (ckpt := latest_checkpoint(out)) is not None:
        loop = load_checkpoint(ckpt, model, optimizer, schedule)
        say(f"resumed from {ckpt} at step {loop['step']}")
    loop["skipped"] |= {str(i): r for i, r in skipped.items()}
    bare_optimizer = optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)

    # 6. The loop: one bar step per optimizer step (rate, ETA); a line per epoch; checkpoints.
    if cfg.src:
        features = ImageLayers(sources, encoder, layout, plan.steps_per_epoch, cfg.seed, cfg.num_workers)
    else:
        features = StoredLayers(cache, layout, cfg.seed, cfg.window, accelerator.device)
    start = loop["step"]
    bar = tqdm(total=plan.total_steps, initial=start, unit="step", desc="train-compressor", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    t0 = time.perf_counter()
    for step, groups in enumerate(features.steps(start, plan.total_steps), start):
        loss = train_step(accelerator, model, optimizer, groups, stats, layout)
        if not math.isfinite(loss):  # before anything of this state is saved
            raise FloatingPointError(f"non-finite reconstruction loss at step {step + 1}; the last checkpoint is "
                                     f"{latest_checkpoint(out) or '(none yet)'}, from which a rerun resumes")
        loop["epoch_sum"] += loss
        loop["step"] = step + 1
        epoch, k = divmod(step + 1, plan.steps_per_epoch)
        bar.set_postfix(epoch=f"{epoch + (k > 0)}/{cfg.epochs}", mse=f"{loss:.4f}",
                        lr=f"{schedule.get_last_lr()[0]:.3g}", refresh=False)
        bar.update()
        if k == 0:  # the epoch's last step
            schedule.step()  # per epoch (train_compressor.py:302)
            loop["epoch_mse"].append(loop["epoch_sum"] / plan.steps_per_epoch)
            loop["epoch_sum"] = 0.0
            bar.write(f"epoch {epoch}/{cfg.epochs} mse {loop['epoch_mse'][-1]:.5f} "
                      f"lr {schedule.get_last_lr()[0]:.3g} ({time.perf_counter() - t0:.1f} s)")
            t0 = time.perf_counter()
        if loop["step"] % cfg.ckpt_every == 0 or loop["step"] == plan.total_steps:
            for part in gather_object([features.skipped]):  # every process's undecodable files
                loop["skipped"] |= {str(i): r for i, r in part.items()}
            if accelerator.is_main_process:
                path = save_checkpoint(out, bare, bare_optimizer, schedule, loop)
                prune_checkpoints(out, cfg.keep_last)
                bar.write(f"checkpoint {path}")
            accelerator.wait_for_everyone()
            time.sleep(float(os.environ.get(PAUSE_ENV, 0)))  # fault injection for the resume test
    bar.close()

    # 7. The file, saved after the last epoch. The reference saves at the start of each epoch, before
    #    training it, so its file holds 24 of 25 epochs (train_compressor.py:250-277); this one holds all.
    path = out / "compression_model.pth"
    if accelerator.is_main_process:
        save_compressor(path, bare, record={"encoder": plan.encoder, "norm_stats": file_sha256(stats_path)})
        skipped = [{"index": int(i), "path": sources.paths[int(i)], "reason": r} for i, r in loop["skipped"].items()]
        (out / "compressor.json").write_text(json.dumps(
            {**resolved, "steps": loop["step"], "passes": loop["step"] * plan.global_batch / plan.images,
             "epoch_mse": loop["epoch_mse"], "norm_stats": stats_path.name, "skipped": skipped}, indent=2))
        done = "already done" if start == plan.total_steps else f"{loop['step']} steps"
        say(f"compressor: {path} ({done})")
    accelerator.wait_for_everyone()
    accelerator.end_training()

    # 8. Optionally fill a cache's compressed features.
    if cfg.fill:
        from reglue.pipeline.extract import fill_compressed
        fill_compressed(cfg.fill, str(path), str(stats_path), num_workers=cfg.num_workers)
    return path


def train_step(accelerator, model, optimizer, groups, stats: NormStats, layout: Layout) -> float:
    """One optimizer step over this process's BatchNorm groups (each its own forward, gradients summed as
    the mean over every group of the global batch, as DDP averages the reference's per-GPU losses).

    BatchNorm running statistics follow group 0 only: the reference's file is rank 0's state dict, whose
    buffers only ever saw rank 0's batch (DDP broadcasts rank 0's buffers, never into rank 0)."""
    from contextlib import nullcontext

    total = torch.zeros((), device=accelerator.device)
    n = layout.groups_per_rank
    for a, layers in enumerate(groups):
        with (accelerator.no_sync(model) if a < n - 1 else nullcontext(),
              nullcontext() if (layout.rank == 0 and a == 0) else frozen_bn_stats(model)):
            loss = reconstruction_loss(model, layers, stats)
            accelerator.backward(loss / n)  # before the restore: autograd checks the buffers' versions
        total += loss.detach() / n
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(total, "mean"))


class frozen_bn_stats:
    """Run BatchNorm with batch statistics but leave its running statistics (and count) as they were."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]

    def __enter__(self):
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in zip(self.buffers, self.saved):
                b.copy_(s)


def reconstruction_loss(model: nn.Module, layers: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """MSE between the standardized map z and decoder(encoder(z)) (train_compressor.py:283-296)."""
    z = compress(nn.Identity(), layers, stats)  # standardized (B, C, g, g): the compress step without the encoder
    recon, _ = model(z)
    return F.mse_loss(recon, z)


# ---- checkpoints: safetensors + JSON, no pickle ------------------------------------------------------

def save_checkpoint(out: Path, model: nn.Module, optimizer, schedule, loop: dict) -> Path:
    """checkpoints/step-N/{state.safetensors, state.json}, written into .tmp-step-N and renamed."""
    root = out / "checkpoints"
    final, tmp = root / f"step-{loop['step']:07d}", root / f".tmp-step-{loop['step']:07d}"
    state = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"optimizer.{i}.{k}": v.cpu() for i, s in state["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({**loop, "param_groups": state["param_groups"],
                                                "schedule": schedule.state_dict()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer, schedule) -> dict:
    """Restore what `save_checkpoint` wrote; returns the loop state (step, loss history, skipped files)."""
    tensors = load_file(path / "state.safetensors")
    info = json.loads((path / "state.json").read_text())
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": info.pop("param_groups")})
    schedule.load_state_dict(info.pop("schedule"))
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda.0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
    return info


def check_fill_target(url: str, plan: Plan, model_file: Path) -> None:
    """Refuse a --fill cache that this compressor could not fill (another encoder, or another compressor's
    features already there)."""
    m = Cache.open(url).meta
    if m.encoder_key() != plan.encoder:
        raise ValueError(f"--fill {url} holds features of {describe_key(m.encoder_key())}; this compressor is trained "
                         f"on {describe_key(plan.encoder)}: fill a cache of that encoder")
    if len(m.layers) * m.dino_dim != plan.channels[0] or m.resolution != plan.resolution:
        raise ValueError(f"--fill {url} holds {m.resolution}-px features of {len(m.layers)} x {m.dino_dim} channels; "
                         f"this compressor takes {plan.resolution}-px {plan.channels[0]}: fill a matching cache")
    if m.compressor and not (model_file.exists() and m.compressor["sha256"] == file_sha256(model_file)):
        raise ValueError(f"--fill {url} already holds compressed features from {m.compressor['file']} "
                         f"(sha256 {m.compressor['sha256'][:12]}...); a cache holds one compressor's features")


def check_same_compressor_run(out: Path, resolved: dict) -> None:
    """Refuse a run folder holding another run (its norm stats and checkpoints would be mixed in)."""
    path = out / "config.json"
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    diff = config_differences(stored["config"], resolved["config"], RUN_CONTROL)
    # The plan follows from the config and the data (e.g. the image count); its step total follows `epochs`.
    diff += config_differences(stored["plan"], resolved["plan"], ("total_steps", *resolved["config"]))
    if diff:
        raise ValueError(f"{out} holds a compressor run with a different config ({'; '.join(diff)}); rerun with "
                         "the same settings or choose another --out")
