"""The Accelerate training loop: `train(TrainConfig)` trains one of the five methods from a cache.

Resume = run the same command again: the newest intact checkpoint restores the model, EMA, optimizer,
GradScaler, every RNG, the step and the loader position, reading no pickled code. The run folder's
layout, its checkpoints, log, config.json and lock live in trainer.runfolder.

Randomness: before each micro-batch the global RNGs are seeded from (seed, step, global micro-batch
index), so the posterior sample, t, the noise and the label dropout of every sample depend only on
the global and micro batch sizes, not on how many processes share the work, and resuming is exact.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from reglue.pipeline.store import Cache
from reglue.trainer.checkpoints import save_snapshot, snapshot_payload
from reglue.trainer.data import CacheLoader, layers_for, prepare_batch, required_arrays
from reglue.trainer.draws import RANDOM, Draws
from reglue.trainer.ema import EMA
from reglue.trainer.generate import DECODE_VAE
from reglue.trainer.inception import Inception
from reglue.trainer.metrics import Reference, load_reference
from reglue.trainer.models import SiT, count_parameters, preset_kwargs
from reglue.trainer.objective import XL_LAM_SCHEDULE, Batch, Method, get_method, loss_terms, sit_io
from reglue.trainer.pca import REDI_PCA_SAMPLES
from reglue.trainer.recipes import RECIPES, Recipe, encoder_note, get_recipe
from reglue.trainer.runfolder import (
    PAUSE_ENV,
    append_log,
    check_same_encoder,
    check_same_run,
    checkpoints,
    default_run_folder,
    hms,
    hold_run,
    load_checkpoint,
    load_or_fit_pca,
    newest_intact,
    prune_checkpoints,
    refuse_foreign,
    release_run,
    resolved_config,
    resume,
    rewind_log,
    run_outputs,
    save_checkpoint,
)

TERMS = ("loss", "latent", "feature", "cls", "proj")


@dataclass
class TrainConfig:
    """Everything `reglue train` needs; defaults are the reference's (reference-implementation.md §6), and the
    recipe fields (precision, grad_clip, flip, encoder_depth, dino_drop_prob) default to None = the method's
    paper's (trainer.recipes.RECIPES; the SiT preset for encoder_depth); a value overrides it."""

    cache: str
    """URL or path of the feature cache (`reglue extract`)."""
    out: str = ""
    """Run folder; rerunning with the same folder resumes from its latest checkpoint. Default
    runs/<method>-<model>-<cache name> (plus -from-<checkpoint> with init_from): the same command resumes
    the same run, and another method, model or cache never lands in it."""
    method: str = "reglue"
    """sit | repa | reg | redi | reglue (trainer.objective.METHODS)."""
    model: str = "SiT-B/2"
    """SiT preset (trainer.models.SIT_PRESETS); widths from the preset, input dims from the cache."""
    max_steps: int = 400_000
    """Optimizer steps to train for (the paper's SiT-B/2 results are at 400K; the reference default is 1M)."""
    global_batch: int = 256
    """Samples per optimizer step over all processes (train.sh:16); the same whatever the process count."""
    micro_batch: int | None = None
    """Samples per forward pass on one process; None = global_batch / processes (no accumulation).
    The result depends on (global_batch, micro_batch), not on the number of processes."""
    lr: float = 1e-4
    """AdamW learning rate, constant, no warmup (train.py:209-215)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: the reference's AdamW is Adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = None
    """Max global grad norm (accelerator.clip_grad_norm_, unscaled first; train.py:363-365); None = the
    method's (1.0 for repa, reg, reglue; none for sit, redi), 0 = no clipping."""
    flip: bool | None = None
    """Random horizontal flips (needs `reglue extract --flip`); None = the method's (sit only)."""
    encoder_depth: int | None = None
    """SiT block whose output REPA aligns; None = the preset's (4 for S/B, 8 for L/XL)."""
    dino_drop_prob: float | None = None
    """ReDi's representation dropout probability (methods with semantic channels); None = the method's (0)."""
    ema_decay: float = 0.9999
    """EMA decay, applied after every optimizer step from step 1, starting from a copy."""
    xl_lam_schedule: bool = False
    """Apply the reference's hidden SiT-XL feature-loss schedule (lambda x0.5 from 250K, x0.25 from
    500K; train.py:349-354), which it keys on "XL" in the model name. Off: lambda stays 1, and an XL
    reglue run prints a warning at start (the other methods' papers never had this schedule)."""
    precision: Literal["bf16", "fp16", "fp32"] | None = None
    """Autocast precision: bf16, fp16 with a GradScaler (the reference's), or fp32; None = the method's
    (bf16 for repa, reg, reglue; fp32 for sit, redi)."""
    tf32: bool = True
    """Allow TF32 matmuls and convolutions on CUDA (reference --allow-tf32)."""
    compile: bool = False
    """torch.compile the SiT (inductor)."""
    seed: int = 0
    """Seed of the model init, the data order and every per-step draw."""
    log_every: int = 100
    """Steps between reports (console line, log.jsonl, trackers); the only host syncs of the loop."""
    ckpt_every: int = 10_000
    """Steps between full checkpoints (train.py --checkpointing-steps 10000)."""
    keep_last: int = 2
    """Full checkpoints kept (older ones are deleted after a new one is complete)."""
    snapshot_every: int = 50_000
    """Steps between EMA-only snapshots in RUN/snapshots (all kept)."""
    sample_every: int = 50_000
    """Steps between sample grids RUN/samples/grid-N.png from the EMA (16 images, fixed noise and
    classes, the paper's SDE sampler, decoded with the ft-EMA VAE); 0 = never (then no VAE is loaded)."""
    sample_steps: int = 250
    """SDE steps of the grid sampler (eval.sh: 250)."""
    vae: str = DECODE_VAE
    """Decoding VAE of the grids and of FID during training (HF id or local diffusers folder); the reference
    decodes with ft-EMA (generate.py --vae ema), as `reglue sample` does."""
    fid_every: int = 0
    """Steps between FID-Nk evaluations of the EMA on every process (trainer.evaluate.fid_during_training:
    `reglue sample`'s per-sample seeds, balanced labels); 0 = never (then no reference or Inception is loaded)."""
    fid_num: int = 10_000
    """Samples per FID evaluation, split over the processes (logged as FID-10K; FID is biased upward at
    small N, so compare only values of equal N)."""
    fid_ref: str | None = None
    """Reference statistics npz for FID during training: `reglue fid-ref` output or an ADM batch; default
    $REGLUE_FID_REF, then the ADM batch for the cache's resolution, found as `reglue fid` finds it."""
    inception: str | None = None
    """inception-2015-12-05.pt (file or folder) for FID; default $REGLUE_INCEPTION_WEIGHTS, then the reglue
    cache folder, as `reglue fid`."""
    fid_steps: int = 250
    """SDE steps of the FID sampler; its other settings are the default preset eval-sh (SamplerConfig())."""
    fid_batch: int = 64
    """Samples per model batch per process during FID (eval.sh: 64; guidance doubles the forward batch)."""
    window: int = 65536
    """Loader shuffle window in samples, rounded to whole cache chunks and capped by the data (see trainer.data).
    ImageNet's class-sorted layout at batch 256: 65536 mixes ~229 classes per batch and ~672 over 16
    batches (a full shuffle: ~226 and ~984; 4096: ~63 and ~65). RAM: each process holds ~2 x window /
    processes samples of the arrays it reads, the window being trained on and the next, read meanwhile
    (~225 KB each for reglue: ~28 GB on 1 process, ~3.6 GB per process on 8); the first step waits for
    the first window's read."""
    prefetch: int = 4
    """Batches the loader thread reads ahead."""
    pca_samples: int = REDI_PCA_SAMPLES
    """Method redi: fit the PCA on the first this many images in sorted order (calc_pca.py: 302 x 256)."""
    pca_file: str | None = None
    """Method redi: use this PCA instead of fitting one: ReDi's released pcs/dino_pca_model.pth or a
    reglue pca.safetensors."""
    trackers: tuple[str, ...] = ("tensorboard",)
    """Trackers, comma-separated: tensorboard (RUN/tensorboard), wandb (needs `pip install wandb`; project
    $WANDB_PROJECT or reglue, run named after the run folder); empty for none. Each gets the resolved
    config, the losses, lr and img/s, the sample grids and FID."""
    init_from: str | None = None
    """Start a new run from this checkpoint's EMA weights (our snapshot or checkpoint folder, an official
    REGLUE checkpoint, or hf://owner/repo/file): model and EMA start from them, the optimizer and the step
    count from scratch. The model the config builds must be the checkpoint's. Used only at step 0."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present (tests)."""

    def __post_init__(self):
        self.betas, self.trackers = tuple(self.betas), tuple(self.trackers)
        if self.precision not in (None, "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32; got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off); got {self.grad_clip}")
        if self.encoder_depth is not None and self.encoder_depth < 1:
            raise ValueError(f"encoder_depth must be >= 1; got {self.encoder_depth}")
        for name in ("max_steps", "global_batch", "log_every", "ckpt_every", "keep_last", "snapshot_every",
                     "sample_steps", "window", "prefetch", "pca_samples", "fid_steps", "fid_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("sample_every", "fid_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off); got {getattr(self, name)}")
        # Optimizer settings: checked here, before anything is created on disk.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if not (self.weight_decay >= 0 and self.adam_eps > 0 and all(0 <= b < 1 for b in self.betas)
                and len(self.betas) == 2):
            raise ValueError(f"need weight_decay >= 0, adam_eps > 0 and two betas in [0, 1); got {self.weight_decay}, "
                             f"{self.adam_eps}, {self.betas}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if not self.out:
            self.out = default_run_folder(self.cache, self.method, self.model, self.init_from)
        if self.fid_num < 2:
            raise ValueError(f"fid_num must be >= 2 (a covariance needs 2 samples); got {self.fid_num}")
        if self.micro_batch is not None and (self.micro_batch <= 0 or self.global_batch % self.micro_batch):
            raise ValueError(f"micro_batch ({self.micro_batch}) must divide global_batch ({self.global_batch})")
        unknown = set(self.trackers) - {"tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"unknown trackers {sorted(unknown)}; choose from tensorboard, wandb")
        if "wandb" in self.trackers and importlib.util.find_spec("wandb") is None:
            raise ValueError("the wandb tracker needs `pip install wandb` (or `pip install reglue[wandb]`)")


# ---- the plan: everything derived from the config, the cache and the process count --------------

@dataclass(frozen=True)
class Plan:
    """What the config means for this cache and process count."""

    method: Method
    """The method preset (with the XL lambda schedule and dropout when asked for, the cache's layer set)."""
    recipe: Recipe
    """Its paper's training recipe with the config's overrides (precision, clipping, flips)."""
    model_kwargs: dict = field(repr=False)
    """SiT kwargs: the preset's widths plus the input size and channels, CLS and REPA dims of the cache."""
    arrays: tuple[str, ...]
    """Cache arrays the loader reads for this method."""
    meta_summary: dict = field(repr=False)
    """The cache facts recorded in config.json and in every EMA file."""
    world: int
    """Number of processes."""
    per_rank: int
    """Samples per process per step (global batch / world)."""
    micro: int
    """Samples per forward pass."""
    accum: int
    """Micro-batches per step and process (per_rank / micro)."""


def resolve_recipe(cfg: TrainConfig) -> Recipe:
    """The method's paper's recipe (trainer.recipes) with the config's overrides."""
    return get_recipe(cfg.method).override(precision=cfg.precision, grad_clip=cfg.grad_clip, flip=cfg.flip)


def make_plan(cfg: TrainConfig, cache: Cache, world: int) -> Plan:
    """Derive the method, its recipe, the SiT kwargs and the batch split; refuse what the cache cannot feed."""
    overrides = {"lam_schedule": XL_LAM_SCHEDULE} if cfg.xl_lam_schedule else {}
    if cfg.dino_drop_prob is not None:
        overrides["dino_drop_prob"] = cfg.dino_drop_prob
    m = cache.meta
    method, recipe = layers_for(get_method(cfg.method, **overrides), cache), resolve_recipe(cfg)
    if recipe.flip and method.uses_dino:
        raise ValueError(f"method {method.name!r} cannot train with flips: its DINOv2 inputs and targets are cached "
                         "for the unflipped crop only, and none of REPA, REG, ReDi or REGLUE flips (their "
                         "dataset.py has none; ReDi's flip transform is unused, train_redi.py:228-235); drop --flip")
    arrays = required_arrays(method, cache, recipe.flip)
    io = sit_io(method, latent_channels=m.latent_channels, latent_size=m.latent_size, dino_dim=m.dino_dim,
                compressed_channels=m.compressed_channels)
    depth = {"encoder_depth": cfg.encoder_depth} if cfg.encoder_depth else {}
    model_kwargs = {**preset_kwargs(cfg.model), **depth, **io, "num_classes": m.num_classes}
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} is not divisible by the {world} processes")
    per_rank = cfg.global_batch // world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"micro_batch {micro} must divide the per-process batch {per_rank} "
                         f"(global {cfg.global_batch} / {world} processes)")
    summary = {"url": cache.url, "num_samples": m.num_samples, "valid": int(len(cache.valid_indices())),
               "resolution": m.resolution, "latent": [m.latent_channels, m.latent_size, m.latent_size],
               "vae_scaling_factor": m.vae_scaling_factor, "dino_dim": m.dino_dim, "num_patches": m.num_patches,
               "compressed_channels": m.compressed_channels, "compressor": m.compressor,
               "num_classes": m.num_classes, "encoders": m.encoders, "encoder_key": m.encoder_key(),
               "chunk_size": m.chunk_size}
    return Plan(method, recipe, model_kwargs, arrays, summary, world, per_rank, micro, per_rank // micro)


def recipe_line(plan: Plan) -> str:
    """The resolved recipe in one line, printed at the start of every run and of --dry-run."""
    m, k = plan.method, plan.model_kwargs
    lam = ", ".join(f"{v:g}" + (f" from step {s:,}" if s else "") for s, v in m.lam_schedule)
    parts = [plan.recipe.summary(), f"lambda {lam}" if m.features != "none" else None,
             f"REPA after block {k['encoder_depth']}" if m.repa else None,
             f"representation dropout {m.dino_drop_prob:g}" if m.dino_drop_prob else None]
    return (f"recipe {m.name}: " + ", ".join(p for p in parts if p)
            + (f" (follows {plan.recipe.source})" if plan.recipe.source else ""))


def xl_lam_warning(cfg: TrainConfig, method: Method) -> str | None:
    """One line when an XL run of a method whose paper's code had the XL lambda schedule (REGLUE's: it applies
    it to any model with "XL" in its name, train.py:349-354) leaves it off; here it is an explicit choice."""
    recipe = RECIPES.get(method.name)
    if "XL" not in cfg.model or method.features == "none" or cfg.xl_lam_schedule or not (recipe and recipe.xl_lam_rule):
        return None
    return (f"warning: {cfg.model} with method {method.name}: the reference halves the feature-loss weight lambda "
            "at step 250K and quarters it at 500K for XL models (train.py:349-354); this run keeps lambda = 1. "
            "Pass --xl-lam-schedule (TrainConfig.xl_lam_schedule=True) to match the reference.")


# ---- the step counter and the per-micro-batch seed ----------------------------------------------

class Progress:
    """Optimizer steps taken (saved in the checkpoint's state.json next to the loader position)."""

    def __init__(self):
        self.step = 0


def micro_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit seed for global micro-batch `micro` of optimizer step `step`."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---- the loop -----------------------------------------------------------------------------------

def train(cfg: TrainConfig, dry_run: bool = False) -> dict:
    """Train (or resume) the run in `cfg.out`; with `dry_run`, print the resolved config and return it."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    # 1. Cache and plan: every dimension from the cache's meta, the method, its recipe and the preset.
    run = Path(cfg.out)
    state = PartialState(cpu=cfg.cpu or not torch.cuda.is_available())  # the process count; no precision yet
    say = state.print
    cache = Cache.open(cfg.cache)
    plan = make_plan(cfg, cache, state.num_processes)
    for line in (f"run folder: {run}", recipe_line(plan), xl_lam_warning(cfg, plan.method),
                 encoder_note(plan.method.name, plan.recipe, cache.meta, plan.method.uses_dino)):
        if line and state.is_main_process:
            print(line, file=sys.stderr if dry_run else sys.stdout)  # --dry-run's stdout: the JSON alone
    if dry_run:
        resolved = resolved_config(cfg, plan, count_parameters(cfg.model, **plan.model_kwargs))
        say(json.dumps(resolved, indent=2, default=str))
        return resolved

    # 2. The run folder, checked before anything is written (--out a file or a folder of other things, a
    # run of another config), then locked (a second `reglue train` on it stops here, in seconds); the
    # Accelerator in the recipe's precision; config.json, the folder's mark as a run folder.
    refuse_foreign(run)
    check_same_run(run, cfg, plan.recipe)
    check_same_encoder(run, cache)
    take_folder(state, run)
    resolved = resolved_config(cfg, plan, count_parameters(cfg.model, **plan.model_kwargs))
    precision = plan.recipe.precision
    accelerator = Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision={"fp32": "no"}.get(precision, precision),
        log_with=make_trackers(cfg, run) or None, project_dir=str(run),
        dynamo_backend="inductor" if cfg.compile else "no")
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        (run / "config.json").write_text(json.dumps(resolved, indent=2, default=str))

    # 3. Model (or the --init-from weights), EMA (a copy), optimizer, loader; PCA for ReDi.
    set_seed(cfg.seed)  # model init only; every step reseeds (micro_seed)
    model = SiT(**plan.model_kwargs).train()
    if cfg.init_from and not checkpoints(run):  # a new run from another's weights; a resumed one has its own
        say(init_weights(model, cfg.init_from, plan))
    ema = EMA(model, cfg.ema_decay).to(accelerator.device)
    optimizer = make_optimizer(cfg, model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = CacheLoader(cache, plan.arrays, cfg.global_batch, seed=cfg.seed, rank=accelerator.process_index,
                         world=plan.world, window=cfg.window, prefetch=cfg.prefetch,
                         pin_memory=accelerator.device.type == "cuda", flip=plan.recipe.flip)
    progress = Progress()
    pca = load_or_fit_pca(run, cache, plan.method, cfg.pca_samples, accelerator, cfg.pca_file)

    # 4. Resume from the newest intact checkpoint (its manifest verified first; no pickled code is read);
    # a run already at max_steps says so and stops.
    progress.step = resume(accelerator, run, lambda ckpt: load_checkpoint(
        ckpt, accelerator, model=model, optimizer=optimizer, ema=ema, loader=loader))
    if progress.step:
        say(f"resumed from {run / 'checkpoints' / f'step-{progress.step:07d}'} at step {progress.step}")
    if progress.step >= cfg.max_steps:
        say(f"already done: {run} is at step {progress.step} of {cfg.max_steps}; {run_outputs(run)} "
            "(raise --max-steps to train on)")
        if accelerator.is_main_process:
            release_run(run)
        return resolved
    # Evaluation inputs fail early (a missing VAE, reference or Inception file), not at the first grid or FID.
    vae = (load_grid_vae(cfg, cache, accelerator.device)
           if cfg.fid_every or (cfg.sample_every and accelerator.is_main_process) else None)
    fid_inputs = load_fid_inputs(cfg, cache, accelerator) if cfg.fid_every else None
    start = progress.step
    if accelerator.is_main_process:
        rewind_log(run / "log.jsonl", start)
    accelerator.init_trackers(tracker_project(), config=tracker_config(resolved))

    # What the snapshots record: the cache facts and the training config (`reglue export` reads both).
    snapshot_meta = {**plan.meta_summary, "latent_channels": cache.meta.latent_channels,
                     "train": json.loads(json.dumps(resolved["config"]))}
    ema_payload = lambda: snapshot_payload(ema.model, model_kwargs=plan.model_kwargs, method=plan.method,
                                           step=progress.step, meta=snapshot_meta)
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)  # the EMA follows its parameters
    make_batch = lambda raw, draws: prepare_batch(raw, plan.method, cache.meta, accelerator.device, pca, draws)

    # 5. The loop: one iteration per optimizer step; every phase but the step is interval-gated.
    sums = torch.zeros(len(TERMS) + 1, device=accelerator.device)  # loss terms + grad norm, on device
    bad_step = torch.full((), -1, device=accelerator.device)  # first step with a non-finite loss
    timer = (time.perf_counter(), start)
    while True:
        step = progress.step
        done = step >= cfg.max_steps
        due = lambda every, step=step, done=done: every > 0 and step != start and (step % every == 0 or done)
        # 5.1 Health: nothing is reported or saved past a non-finite loss (a host sync, when due).
        if any(due(k) for k in (cfg.log_every, cfg.sample_every, cfg.fid_every, cfg.snapshot_every, cfg.ckpt_every)):
            raise_if_non_finite(accelerator, bad_step, run)
        # 5.2 Report: the loop's other host sync.
        if due(cfg.log_every):
            timer = report(accelerator, run, cfg, sums, step, timer, loader.epoch, optimizer.param_groups[0]["lr"])
            sums.zero_()
        # 5.3 FID-Nk of the EMA, every process sampling its share, and 5.4 the sample grid; their time is
        # left out of the next img/s.
        t0 = time.perf_counter()
        if due(cfg.fid_every):
            log_fid(accelerator, run, cfg, ema.model, vae, fid_inputs, cache.meta, step)
        if due(cfg.sample_every) and accelerator.is_main_process:
            grid = save_sample_grid(run / "samples" / f"grid-{step:07d}.png", ema.model, vae, cache.meta, cfg)
            log_image(accelerator, "samples/grid", grid, step)
        timer = (timer[0] + time.perf_counter() - t0, timer[1])
        # 5.4 EMA snapshot, for sampling.
        if due(cfg.snapshot_every) and accelerator.is_main_process:
            save_snapshot(run / "snapshots" / f"ema-{step:07d}.safetensors", ema.model, model_kwargs=plan.model_kwargs,
                          method=plan.method, step=step, meta=snapshot_meta)
        # 5.5 Full checkpoint (atomic), then prune.
        if due(cfg.ckpt_every):
            path = save_checkpoint(accelerator, run, step, model=model, optimizer=optimizer, ema_payload=ema_payload,
                                   loop_state={"loader": loader.state_dict()})
            if accelerator.is_main_process:
                prune_checkpoints(run, cfg.keep_last)
            say(f"checkpoint {path}")
            time.sleep(float(os.environ.get(PAUSE_ENV, 0)))
        # 5.6 Done?
        if done:
            break
        # 5.7 One optimizer step, then the EMA.
        terms, grad_norm = train_step(accelerator, model, optimizer, next(loader), make_batch, plan, cfg.seed,
                                      plan.recipe.grad_clip, step)
        ema.update(bare)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(terms[0]), step + 1, bad_step)
        sums += torch.cat([terms, grad_norm.reshape(1)])
        progress.step = step + 1
    loader.close()
    accelerator.end_training()
    if accelerator.is_main_process:
        release_run(run)
    say(f"trained {run} to step {progress.step}: {run_outputs(run)}")
    return resolved


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The reference's optimizer (train.py:209-215): AdamW, constant learning rate, no warmup."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def train_step(accelerator, model, optimizer, raw: dict, make_batch: Callable[[dict, Draws], Batch], plan: Plan,
               seed: int, grad_clip: float | None, step: int,
               draws: Draws = RANDOM) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this process's share `raw` of a global batch, in `plan.accum` micro-batches
    (train.py:343-367): `make_batch(rows, draws)` (posterior sample), the loss (t, noise, CLS noise, label
    dropout), backward, `clip_grad_norm_`, AdamW. `step` counts the steps already taken (train.py's
    global_step). Every draw comes from `draws` (trainer.draws), after the global RNGs are seeded for
    this micro-batch.

    Returns the loss terms (TERMS order, averaged over micro-batches) and the grad norm before clipping;
    `grad_clip` None = no clipping."""
    terms = torch.zeros(len(TERMS), device=accelerator.device)
    for a in range(plan.accum):
        torch.manual_seed(micro_seed(seed, step, accelerator.process_index * plan.accum + a))
        batch = make_batch({k: v[a * plan.micro:(a + 1) * plan.micro] for k, v in raw.items()}, draws)
        # Gradients are all-reduced once, on the last micro-batch.
        with accelerator.no_sync(model) if a < plan.accum - 1 else nullcontext():
            out = loss_terms(model, batch, plan.method, step, draws)
            accelerator.backward(out["loss"] / plan.accum)
        terms += torch.stack([out[k].detach() for k in TERMS]) / plan.accum
    # The total norm before clipping. No clipping (SiT, ReDi) still measures it for the log: clipping at
    # inf scales by exactly 1.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), math.inf if grad_clip is None else grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm


# ---- helpers of the loop ------------------------------------------------------------------------

def init_weights(model: SiT, source: str, plan: Plan) -> str:
    """Load the EMA weights of `source` into the fresh `model` (train --init-from); refuse another model."""
    from reglue.trainer.checkpoints import load_model

    start, info = load_model(source)
    plain = lambda v: json.loads(json.dumps(v, default=list))
    diff = [f"{k}: {info.model_kwargs[k]!r} there, {v!r} here" for k, v in plan.model_kwargs.items()
            if k in info.model_kwargs and plain(info.model_kwargs[k]) != plain(v)]
    try:
        if diff:
            raise ValueError("; ".join(diff))
        model.load_state_dict(start.state_dict(), strict=True)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"--init-from {source} holds another model than this run builds ({first}); use its "
                         "method, model and a cache of the same encoders") from None
    return f"initialized from {source} (its EMA at step {info.step}; the optimizer and step count start afresh)"


def load_grid_vae(cfg: TrainConfig, cache: Cache, device: torch.device):
    """The decoding VAE of the grids and FID (cfg.vae, ft-EMA by default), in the cache's weights preset."""
    from reglue.weights import load_vae
    vae = load_vae(cfg.vae, preset=cache.meta.encoders["preset"])
    if vae.config.latent_channels != cache.meta.latent_channels:
        raise ValueError(f"VAE {cfg.vae} has {vae.config.latent_channels} latent channels, the cache "
                         f"{cfg.cache} {cache.meta.latent_channels}; pass the VAE it was made with (--vae)")
    return vae.to(device)


def load_fid_inputs(cfg: TrainConfig, cache: Cache, accelerator) -> tuple[Reference, Inception]:
    """(reference statistics, Inception) for FID during training, on every process; the reference is found as
    `reglue fid` finds it (fid_ref, $REGLUE_FID_REF, the ADM batch for the cache's resolution)."""
    from reglue.trainer.evaluate import reference_file

    with accelerator.local_main_process_first():  # a missing file is downloaded once per node
        ref = reference_file(cfg.fid_ref, cache.meta.resolution, cache.meta.num_classes)
        return load_reference(ref), Inception(cfg.inception, accelerator.device)


def make_trackers(cfg: TrainConfig, run: Path) -> list:
    """Tracker objects: TensorBoard in RUN/tensorboard; wandb in project $WANDB_PROJECT or "reglue", the run
    named after its folder and resumed under the id kept in RUN/trackers.json."""
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    if "tensorboard" in cfg.trackers:
        trackers.append(TensorBoardTracker("tensorboard", run))
    if "wandb" in cfg.trackers:
        ids, run_id = run / "trackers.json", None
        if PartialState().is_main_process:  # only process 0 starts a tracker
            if not ids.exists():
                run.mkdir(parents=True, exist_ok=True)
                ids.write_text(json.dumps({"wandb_id": os.urandom(8).hex()}))
            run_id = json.loads(ids.read_text())["wandb_id"]
        trackers.append(WandBTracker(tracker_project(), name=run.name, id=run_id, resume="allow", dir=str(run)))
    return trackers


def tracker_project() -> str:
    return os.environ.get("WANDB_PROJECT", "reglue")


def tracker_config(resolved: dict, prefix: str = "") -> dict:
    """config.json flattened to the scalars trackers take ("config/lr": 1e-4, "method/name": "reglue", ...)."""
    flat = {}
    for key, value in resolved.items():
        if isinstance(value, dict):
            flat |= tracker_config(value, f"{prefix}{key}/")
        else:
            plain = type(value) in (bool, int, float, str)  # not a subclass such as torch's TorchVersion
            flat[f"{prefix}{key}"] = value if plain else str(value) if isinstance(value, str) else json.dumps(value)
    return flat


def log_image(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """One uint8 HWC image to every tracker (TensorBoard's Images tab, a wandb Image)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step=step)


def log_fid(accelerator, run: Path, cfg: TrainConfig, model: SiT, vae, fid_inputs: tuple[Reference, Inception],
            meta, step: int) -> float:
    """FID-Nk of the EMA `model` (call on every process): print it, append {step, fid, fid_num,
    fid_seconds, time} to log.jsonl, log `eval/FID-10K` to the trackers; returns the seconds it took."""
    from reglue.trainer.evaluate import fid_during_training
    from reglue.trainer.sampling import SamplerConfig

    reference, inception = fid_inputs
    t0 = time.perf_counter()
    result = fid_during_training(model, num=cfg.fid_num, reference=reference, inception=inception, vae=vae,
                                 latent_channels=meta.latent_channels, scaling_factor=meta.vae_scaling_factor,
                                 sampler=SamplerConfig(num_steps=cfg.fid_steps), seed=cfg.seed,
                                 batch_size=cfg.fid_batch, accelerator=accelerator)
    seconds = time.perf_counter() - t0
    accelerator.print(f"step {step:>7}/{cfg.max_steps} {result['name']} {result['fid']:.4f} ({hms(seconds)})")
    accelerator.log({f"eval/{result['name']}": result["fid"]}, step=step)
    if accelerator.is_main_process:
        append_log(run, {"step": step, "fid": result["fid"], "fid_num": cfg.fid_num, "fid_seconds": seconds,
                         "time": round(time.time(), 3)})
    return seconds


def save_sample_grid(path: Path, model: SiT, vae, meta, cfg: TrainConfig, count: int = 16) -> np.ndarray:
    """16 EMA samples at fixed noise and classes (sample i depends on (seed, i) only, as `reglue sample`),
    tiled into RUN/samples/grid-N.png; returns the grid image (uint8 HWC)."""
    from PIL import Image

    from reglue.trainer.generate import generate_images, tile
    from reglue.trainer.sampling import SamplerConfig
    device = next(model.parameters()).device
    images, _ = generate_images(model, vae.to(device), list(range(count)), seed=cfg.seed,
                                latent_channels=meta.latent_channels, scaling_factor=meta.vae_scaling_factor,
                                sampler=SamplerConfig(num_steps=cfg.sample_steps), labels="balanced", device=device)
    grid = tile(images.numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def raise_if_non_finite(accelerator, bad_step: torch.Tensor, run: Path) -> None:
    bad = int(accelerator.reduce(bad_step.clone(), "max"))
    if bad >= 0:
        last_good = newest_intact(run)  # verified now: never a damaged one, which a rerun would not resume from
        raise FloatingPointError(
            f"non-finite loss at step {bad}; training stopped before saving anything after it. The last good "
            f"checkpoint is {last_good or '(none yet)'}; rerunning resumes from it (lower the lr, use bf16/fp32, "
            "or check the cache for NaN values with `reglue cache verify`)")


def take_folder(state, run: Path) -> None:
    """Lock the run folder on the main process (runfolder.hold_run); every process learns the outcome."""
    from accelerate.utils import reduce

    error = None
    if state.is_main_process:
        try:
            hold_run(run)
        except OSError as e:
            error = e
    failed = reduce(torch.tensor(float(error is not None), device=state.device), "sum")
    if error is not None:
        raise error
    if float(failed):
        raise FileExistsError(f"{run} could not be taken by the main process (see its error)")


def report(accelerator, run: Path, cfg: TrainConfig, sums: torch.Tensor, step: int, timer: tuple[float, int],
           epoch: float, lr: float) -> tuple[float, int]:
    """Reduce the accumulated terms (the loop's host sync), print a line, append log.jsonl, log trackers."""
    t0, step0 = timer
    now = time.perf_counter()
    means = (accelerator.reduce(sums.clone(), "mean") / max(step - step0, 1)).tolist()
    values = dict(zip(TERMS + ("grad_norm",), means))
    img_s = (step - step0) * cfg.global_batch / max(now - t0, 1e-9)
    eta = (cfg.max_steps - step) * cfg.global_batch / max(img_s, 1e-9)
    accelerator.print(f"step {step:>7}/{cfg.max_steps} ep {epoch:6.2f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in values.items())
                      + f" | {img_s:8.1f} img/s ETA {hms(eta)}")
    accelerator.log({f"train/{k}": v for k, v in values.items()} | {"train/img_per_s": img_s, "train/lr": lr},
                    step=step)
    if accelerator.is_main_process:
        append_log(run, {"step": step, "epoch": epoch, **values, "lr": lr, "img_per_s": img_s,
                         "time": round(time.time(), 3)})
    return now, step
