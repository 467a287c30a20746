"""The `reglue` command line: a thin typer layer. Each command builds a config dataclass and calls
one function in `pipeline/` or `trainer/`."""

from __future__ import annotations

import errno
from contextlib import contextmanager

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature cache.")
app.add_typer(cache_app, name="cache")


@contextmanager
def _clear_errors():
    """Input mistakes (missing source, wrong --out, incompatible store, weights unavailable offline)
    print one line naming the file and the fix, and exit 1; anything else is a bug and keeps its traceback."""
    from reglue.weights import WeightsUnavailable

    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError, WeightsUnavailable) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except OSError as e:  # a full disk or quota is the user's to fix, not a bug
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fix = "" if "rerun" in str(e) else "; free space and rerun the same command (work already finished is kept)"
        typer.echo(f"error: {e}{fix}", err=True)
        raise typer.Exit(1) from None


def parse_layers(layers: str | None) -> tuple[int, ...] | None:
    """`--layers 8,9,10,11` -> (8, 9, 10, 11); None keeps the encoder's default (its last four blocks)."""
    if layers and not all(n.strip().isdigit() for n in layers.split(",")):
        raise ValueError(f"--layers {layers!r}: give comma-separated block indices, e.g. 8,9,10,11")
    return tuple(int(n) for n in layers.split(",")) if layers else None


# ---- extract / cache (pipeline) -------------------------------------------------------------

@app.command("extract")
def extract_command(
    src: str = typer.Argument(..., help="Image folder (one sub-folder per class, or flat) or a text file list."),
    out: str = typer.Option("", help="Cache URL: a folder or an fsspec URL. Default: cache/<src name>.zarr."),
    preset: str = typer.Option("real", help=("real: published weights. "
                                             "tiny: seeded random tiny models, NOT for real use.")),
    resolution: int = typer.Option(256, help="Center-crop side in pixels (multiple of 16)."),
    layers_limit: int = typer.Option(0, help=("Keep the compressor layers (DINOv2-B: 8..11, 1.5 MiB/image) for "
                                              "this many evenly spread images (for `train-compressor --cache`; the "
                                              "default flow trains it with --src).")),
    compressor: str | None = typer.Option(None, help=("compression_model.pth: "
                                                      "store compressed features for every image.")),
    norm_stats: str | None = typer.Option(None, help="dino_mean_std_*.pth of that compressor."),
    precision: str = typer.Option("auto", help="auto (fp16 on CUDA, else fp32), fp32, bf16 or fp16."),
    vae: str | None = typer.Option(None, help=("VAE: HF id or local diffusers folder "
                                               "(default stabilityai/sd-vae-ft-mse).")),
    encoder: str | None = typer.Option(None, "--encoder", "--dino", metavar="TIMM_ID", help=(
        "Vision encoder, a timm id: DINOv2 (default vit_base_patch14_reg4_dinov2.lvd142m), DINOv3 "
        "(vit_base_patch16_dinov3.lvd1689m), CLIP (vit_large_patch14_clip_224.openai); docs/encoders.md.")),
    encoder_weights: str | None = typer.Option(None, "--encoder-weights", "--dino-weights", metavar="FILE", help=(
        "Local encoder weights file (the original release's or timm's).")),
    layers: str | None = typer.Option(None, metavar="I,J,...", help=(
        "0-based encoder blocks for the compressor (default: the last four, 8,9,10,11 for a 12-block ViT).")),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    num_workers: int | None = typer.Option(None, help=("DataLoader processes decoding images (default: this "
                                                       "process's share of the CPU cores - 1, at most 8).")),
    chunk_size: int | None = typer.Option(None, help=("Samples per chunk (unit of storage and resume) "
                                                      "(default 64, chosen by measurement).")),
    device: str | None = typer.Option(None, help="Torch device (default: this process's GPU, else the CPU)."),
    flip: bool = typer.Option(False, help=("Also store the VAE posterior of the mirrored crop (+16 KB/image), "
                                           "for recipes that flip (method sit).")),
) -> None:
    """Turn an image folder into a feature cache. Rerun the same command to resume; launch with
    `accelerate launch` or `torchrun` for several processes (docs/extract.md)."""
    from reglue.pipeline.encoders import EncoderSpec
    from reglue.pipeline.extract import DEFAULT_CHUNK_SIZE, ExtractConfig, extract

    with _clear_errors():
        models = {k: v for k, v in dict(vae=vae, encoder=encoder, encoder_weights=encoder_weights).items() if v}
        spec = EncoderSpec(preset=preset, resolution=resolution, precision=precision, layers=parse_layers(layers),
                           **models)
        chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size  # 0 is refused, not the default
        extract(ExtractConfig(src, out, spec, layers_limit, compressor, norm_stats, chunk_size, batch_size,
                              num_workers, device, flip))


@cache_app.command("info")
def cache_info_command(cache: str = typer.Argument(..., help="Cache URL.")) -> None:
    """Arrays (shape, dtype, chunks, codec, bytes per image), counts, config and progress."""
    from reglue.pipeline.store import info

    with _clear_errors():
        typer.echo(info(cache))


@cache_app.command("verify")
def cache_verify_command(cache: str = typer.Argument(..., help="Cache URL.")) -> None:
    """Re-hash every chunk against its done marker; exit 1 naming each damaged or missing chunk and the fix."""
    from reglue.pipeline.store import repair_advice, verify

    with _clear_errors():
        problems = verify(cache)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        typer.echo(f"to repair: {repair_advice(problems)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{cache}: every chunk verifies")


# ---- models (trainer.models) ----------------------------------------------------------------

@app.command("models")
def models_command(
    method: str = typer.Option("reglue", help="Method whose inputs size the model: sit, repa, reg, redi, reglue."),
    latent_channels: int = typer.Option(4, help="VAE latent channels (4 for SD-VAE)."),
    resolution: int = typer.Option(256, help="Image side in pixels; the latent side is resolution / 8."),
    dino_dim: int = typer.Option(768, help="DINOv2 width (768 for ViT-B/14): CLS token and REPA target."),
) -> None:
    """Print the SiT presets and their parameter counts (incl. the frozen pos_embed) for a method."""
    from reglue.trainer.models import preset_table
    from reglue.trainer.objective import get_method, sit_io

    with _clear_errors():
        m = get_method(method)
        io = sit_io(m, latent_channels=latent_channels, latent_size=resolution // 8, dino_dim=dino_dim,
                    compressed_channels=m.feature_channels if m.features == "compressed" else 0)
    typer.echo(f"method {m.name}: {io}")
    typer.echo(preset_table(**io))


# ---- train-compressor / train (trainer.loop) ------------------------------------------------

@app.command("train-compressor")
def train_compressor_command(
    out: str = typer.Option(..., help=("Run folder: norm stats, checkpoints, compression_model.pth; rerun the "
                                       "same command to resume.")),
    src: str | None = typer.Option(None, help=("Images, as for `extract`: the encoder runs on every image each step "
                                               "(the reference's recipe).")),
    cache: str | None = typer.Option(None, help=("Or a cache's stored layers rows (extract --layers-limit M): "
                                                 "cheaper, fewer distinct images.")),
    fill: str | None = typer.Option(None, help=("Then add the compressed features of this cache "
                                                "(as `reglue fill-compressed`; no VAE pass).")),
    norm_stats: str | None = typer.Option(None, help=("Use this dino_mean_std_*.pth (e.g. the official file) "
                                                      "instead of computing it.")),
    norm_stats_images: int = typer.Option(77_312, help=("--src: the norm stats come from the first this many "
                                                        "images in source order (calc_norm_stats.py).")),
    epochs: int = typer.Option(25, help="Epochs; the LR schedule steps once per epoch (reference: 25)."),
    steps_per_epoch: int | None = typer.Option(None, help=("Steps per epoch (default: --src: images // batch, "
                                                           "312 on ImageNet; --cache: the reference's 312).")),
    global_batch: int = typer.Option(4096, help="Images per step over all processes (capped by the images)."),
    bn_batch: int = typer.Option(512, help="Images per BatchNorm group (the reference's per-GPU 512 of 8 GPUs)."),
    channels: int = typer.Option(16, help="Compressed channels (the SiT's feature channels)."),
    preset: str = typer.Option("real", help="--src: real (published DINOv2) or tiny (random weights, tests only)."),
    resolution: int = typer.Option(256, help="--src: center-crop side in pixels."),
    encoder: str | None = typer.Option(None, "--encoder", "--dino", metavar="TIMM_ID", help=(
        "--src: the vision encoder, a timm id, as for `extract` (default vit_base_patch14_reg4_dinov2.lvd142m).")),
    encoder_weights: str | None = typer.Option(None, "--encoder-weights", "--dino-weights", metavar="FILE", help=(
        "--src: local encoder weights file (the original release's or timm's).")),
    layers: str | None = typer.Option(None, metavar="I,J,...", help=(
        "--src: 0-based encoder blocks (default: the last four, 8,9,10,11 for a 12-block ViT).")),
    precision: str = typer.Option("fp32", help="--src: encoder precision during training (fp32: the reference's)."),
    num_workers: int = typer.Option(4, help="--src: DataLoader processes decoding images, per process."),
    window: int = typer.Option(4096, help="--cache: loader window in rows (the RAM: ~window/processes rows)."),
    ckpt_every: int = typer.Option(100, help="Steps between checkpoints (and one at the end)."),
    seed: int = typer.Option(0, help="Seed of the init and the data order."),
) -> None:
    """Norm stats and the semantic compressor in the official formats: on every image (--src, the
    reference's recipe) or on a cache's stored layers (--cache). Rerun the same command to resume."""
    from reglue.pipeline.encoders import EncoderSpec
    from reglue.trainer.compressor_train import CompressorConfig, train_compressor

    with _clear_errors():
        models = {k: v for k, v in dict(encoder=encoder, encoder_weights=encoder_weights).items() if v}
        spec = EncoderSpec(preset=preset, resolution=resolution, precision=precision, layers=parse_layers(layers),
                           **models)
        cfg = CompressorConfig(out, src=src, cache=cache, fill=fill, spec=spec, norm_stats=norm_stats,
                               norm_stats_images=norm_stats_images, epochs=epochs, steps_per_epoch=steps_per_epoch,
                               global_batch=global_batch, bn_batch=bn_batch, channels=channels,
                               num_workers=num_workers, window=window, ckpt_every=ckpt_every, seed=seed)
        try:
            train_compressor(cfg)
        except FloatingPointError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None


@app.command("fill-compressed")
def fill_compressed_command(
    cache: str = typer.Option(..., help="Complete cache to add `compressed` features to."),
    compressor: str = typer.Option(..., help=("compression_model.pth (ours or the official one), or a "
                                              "`train-compressor --out` folder.")),
    norm_stats: str | None = typer.Option(None, help="Its dino_mean_std_*.pth (found in a compressor folder)."),
    src: str | None = typer.Option(None, help=("Image source root, "
                                               "when samples without layers rows need a DINOv2 pass.")),
) -> None:
    """Compress every sample's features into the cache (from stored layers, else a DINOv2 pass; never the VAE)."""
    from reglue.pipeline.compressor import compressor_files
    from reglue.pipeline.extract import fill_compressed

    with _clear_errors():
        model, stats = compressor_files(compressor, norm_stats)
        fill_compressed(cache, str(model), str(stats), src=src)  # prints its summary


@app.command("train")
def train_command(
    cache: str = typer.Option(..., help="Feature cache (reglue extract)."),
    out: str = typer.Option(..., help="Run folder; rerun the same command to resume from its latest checkpoint."),
    method: str = typer.Option("reglue", help="sit | repa | reg | redi | reglue."),
    model: str = typer.Option("SiT-B/2", help=("SiT preset: SiT-S/2, SiT-B/2, SiT-L/2, SiT-XL/2 (and /4, /8), "
                                               "SiT-tiny/2.")),
    max_steps: int = typer.Option(400_000, help="Optimizer steps."),
    global_batch: int = typer.Option(256, help="Samples per step over all processes."),
    micro_batch: int | None = typer.Option(None, help="Samples per forward per process (gradient accumulation)."),
    precision: str | None = typer.Option(None, help=("bf16 | fp16 (GradScaler, the reference's) | fp32; "
                                                     "default: the method's recipe (--dry-run prints it).")),
    grad_clip: float | None = typer.Option(None, help="Max grad norm; 0 = off; default: the method's recipe."),
    flip: bool | None = typer.Option(None, "--flip/--no-flip", help=("Random horizontal flips (extract --flip); "
                                                                     "default: the method's recipe (sit flips).")),
    encoder_depth: int | None = typer.Option(None, help="SiT block REPA aligns; default: the preset's (B 4, XL 8)."),
    dino_drop_prob: float | None = typer.Option(None, help="ReDi's representation dropout (redi; default 0)."),
    pca_file: str | None = typer.Option(None, help=("redi: PCA file instead of a fit (ReDi's "
                                                    "pcs/dino_pca_model.pth or a pca.safetensors).")),
    pca_samples: int | None = typer.Option(None, help=("redi: fit the PCA on the first N images (default "
                                                       "302 x 256 = 77,312, as ReDi's calc_pca.py).")),
    compile: bool = typer.Option(False, help="torch.compile the SiT."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (constant)."),
    window: int = typer.Option(65536, help=("Loader shuffle window in samples (RAM: ~2*window/processes "
                                            "samples, ~225 KB each for reglue; the next window is read ahead).")),
    xl_lam_schedule: bool = typer.Option(False, help=("The reference's hidden SiT-XL lambda schedule "
                                                      "(x0.5 at 250K, x0.25 at 500K).")),
    seed: int = typer.Option(0, help="Seed of init, data order and every draw."),
    log_every: int = typer.Option(100, help="Steps between reports."),
    ckpt_every: int = typer.Option(10_000, help="Steps between full checkpoints."),
    snapshot_every: int = typer.Option(50_000, help="Steps between EMA snapshots."),
    sample_every: int = typer.Option(50_000, help=("Steps between 16-image sample grids from the EMA "
                                                   "(0: none, no VAE).")),
    fid_every: int = typer.Option(0, help="Steps between FID evaluations of the EMA on all processes (0: none)."),
    fid_num: int = typer.Option(10_000, help="Samples per FID evaluation (FID-10K)."),
    fid_ref: str | None = typer.Option(None, help="Reference npz for FID: `reglue fid-ref` output or the ADM batch."),
    inception: str | None = typer.Option(None, help="inception-2015-12-05.pt (else $REGLUE_INCEPTION_WEIGHTS)."),
    keep_last: int = typer.Option(2, help="Full checkpoints kept."),
    trackers: str = typer.Option("tensorboard", help="Comma list of tensorboard, wandb; empty for none."),
    dry_run: bool = typer.Option(False, help="Print the resolved recipe and config and exit."),
) -> None:
    """Train SiT with one of the five methods from a cache (Accelerate: `accelerate launch` for several GPUs)."""
    from reglue.trainer.loop import TrainConfig, train

    with _clear_errors():
        cfg = TrainConfig(cache, out, method, model, max_steps, global_batch, micro_batch, lr=lr, window=window,
                          precision=precision, grad_clip=grad_clip, flip=flip, encoder_depth=encoder_depth,
                          dino_drop_prob=dino_drop_prob, pca_file=pca_file,
                          **({"pca_samples": pca_samples} if pca_samples else {}),
                          compile=compile, xl_lam_schedule=xl_lam_schedule, seed=seed,
                          log_every=log_every, ckpt_every=ckpt_every, snapshot_every=snapshot_every,
                          sample_every=sample_every, keep_last=keep_last, fid_every=fid_every, fid_num=fid_num,
                          fid_ref=fid_ref, inception=inception, trackers=tuple(t for t in trackers.split(",") if t))
        try:
            train(cfg, dry_run=dry_run)
        except FloatingPointError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None


# ---- sample / fid (trainer.sampling, trainer.metrics) ---------------------------------------

@app.command("sample")
def sample_command(
    checkpoint: str = typer.Argument(..., help="Our snapshot/checkpoint or an official REGLUE checkpoint."),
    preset: str = typer.Option("eval-sh", help=("Evaluation preset: eval-sh (the released eval.sh), paper-nocfg, "
                                                "paper-xl-160ep, paper-xl-80ep (docs/sampling.md). Every sampler "
                                                "option (--num, --mode ... --precision) not given is the preset's.")),
    num: int | None = typer.Option(None, "--num", "-n", help="Number of images (default: the preset's, 50K)."),
    out: str = typer.Option(None, help="Output .npz (arr_0 uint8 NHWC, arr_1 labels); default beside the checkpoint."),
    batch_size: int = typer.Option(64, help="Samples per batch per process."),
    seed: int = typer.Option(0, help="Sample i depends on (seed, i) only, whatever the process count."),
    labels: str = typer.Option("random", help="random (the reference) or balanced (index % classes)."),
    mode: str | None = typer.Option(None, help="sde (the reference Euler-Maruyama) or ode."),
    num_steps: int | None = typer.Option(None, help="SDE steps (NFE) or ODE steps."),
    ode_solver: str | None = typer.Option(None, help="euler or heun (ODE only)."),
    cfg_scale: float | None = typer.Option(None, help="CFG scale on latent+feature drift (<= 1: off)."),
    cls_cfg_scale: float | None = typer.Option(None, help="CFG scale of the CLS drift (0: conditional)."),
    guidance_low: float | None = typer.Option(None, help="Guide when guidance_low <= t <= guidance_high."),
    guidance_high: float | None = typer.Option(None, help="Upper end of the guidance interval (t=1: noise)."),
    vae_cfg: bool | None = typer.Option(None, help=("Guide the latent channels only: the reference's "
                                                     "--vae_cfg (c + s(c - u)); for a redi model ReDi's "
                                                     "--cfg-vae (u + s(c - u)).")),
    precision: str | None = typer.Option(None, help="Model precision: fp32 (reference parity) or bf16 (autocast)."),
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", help="Decoder VAE: HF id or local folder."),
    vae_preset: str | None = typer.Option(None, help=("real, or tiny (random weights, tests only); default: "
                                                      "the preset the model's cache was made with.")),
    png_dir: str = typer.Option(None, help="Also write <png_dir>/<index:06d>.png."),
    grid: int = typer.Option(64, help="Grid image of the first N samples beside the npz (0: none)."),
    part_size: int = typer.Option(1024, help="Samples per resumable part (a multiple of batch-size)."),
    cpu: bool = typer.Option(False, help="Run on the CPU."),
) -> None:
    """Generate images into an ADM-evaluator .npz; resumable; distributed under accelerate/torchrun."""
    from reglue.trainer.generate import GenerateConfig, generate
    from reglue.trainer.sampling import resolve_preset

    with _clear_errors():
        sampler, num = resolve_preset(preset, num=num, mode=mode, num_steps=num_steps, cfg_scale=cfg_scale,
                                      cls_cfg_scale=cls_cfg_scale, guidance_low=guidance_low,
                                      guidance_high=guidance_high, vae_cfg=vae_cfg, ode_solver=ode_solver,
                                      precision=precision)
        path = generate(GenerateConfig(checkpoint=checkpoint, out=out, num=num, batch_size=batch_size, seed=seed,
                                       labels=labels, sampler=sampler, vae=vae, vae_preset=vae_preset,
                                       png_dir=png_dir, grid=grid, part_size=part_size, cpu=cpu))
    typer.echo(f"samples: {path}")


@app.command("fid")
def fid_command(
    source: str = typer.Argument(..., help="SAMPLES.npz, or a checkpoint to sample first (with --preset)."),
    ref: str = typer.Option(..., help="Reference npz: ADM VIRTUAL_imagenet256_labeled.npz or `fid-ref` output."),
    inception: str = typer.Option(None, help="inception-2015-12-05.pt (default $REGLUE_INCEPTION_WEIGHTS, cache)."),
    preset: str = typer.Option("eval-sh", help="Evaluation preset when SOURCE is a checkpoint (as `reglue sample`)."),
    num: int | None = typer.Option(None, help="Images to sample when SOURCE is a checkpoint (default: the preset's)."),
    seed: int = typer.Option(0, help="Sampling seed when SOURCE is a checkpoint."),
    sfid: bool = typer.Option(True, help="Compute sFID (if the reference has mu_s/sigma_s)."),
    precision_recall: bool = typer.Option(True, help="Compute precision/recall (if the reference has images)."),
    batch_size: int = typer.Option(100, help="Images per Inception batch."),
    out: str = typer.Option(None, help="Metrics JSON; default <samples>.metrics.json."),
    vae_preset: str | None = typer.Option(None, help=("real, or tiny (tests only), when sampling; default: "
                                                      "the preset the model's cache was made with.")),
    cpu: bool = typer.Option(False, help="Run on the CPU."),
) -> None:
    """FID (+ sFID, IS, precision/recall) with the ADM protocol; writes a metrics JSON."""
    from reglue.trainer.evaluate import FidConfig, evaluate_source
    from reglue.trainer.generate import GenerateConfig
    from reglue.trainer.sampling import resolve_preset

    with _clear_errors():
        sampler, num = resolve_preset(preset, num=num)
        gen = None if source.endswith(".npz") else GenerateConfig(checkpoint=source, num=num, seed=seed,
                                                                  sampler=sampler, vae_preset=vae_preset, cpu=cpu)
        result = evaluate_source(FidConfig(samples=source, ref=ref, inception=inception, batch_size=batch_size,
                                           sfid=sfid, precision_recall=precision_recall, out=out, cpu=cpu), gen)
    if result:
        typer.echo(result["summary"])


@app.command("fid-ref")
def fid_ref_command(
    source: str = typer.Argument(..., help="npz with arr_0 (e.g. the ADM batch), an image folder, or a cache."),
    out: str = typer.Option(..., help="Output reference npz (mu, sigma, mu_s, sigma_s, acts)."),
    resolution: int = typer.Option(256, help="ADM center-crop size for image folders."),
    num: int = typer.Option(None, help="Use the first NUM images (default all)."),
    acts: int = typer.Option(10_000, help="Pool features kept for precision/recall (ADM: 10K)."),
    inception: str = typer.Option(None, help="inception-2015-12-05.pt, as for `fid`."),
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", help="Decoder for a cache source."),
    vae_preset: str = typer.Option("real", help="real, or tiny (tests only)."),
    batch_size: int = typer.Option(100, help="Images per batch."),
    cpu: bool = typer.Option(False, help="Run on the CPU."),
) -> None:
    """Reference statistics for `reglue fid` from images (an npz keeps its own mu/sigma)."""
    from reglue.trainer.evaluate import RefConfig, reference_stats

    with _clear_errors():
        path = reference_stats(RefConfig(source=source, out=out, resolution=resolution, num=num, acts=acts,
                                         inception=inception, vae=vae, vae_preset=vae_preset,
                                         batch_size=batch_size, cpu=cpu))
    typer.echo(f"reference statistics: {path}")



# ---- export (trainer.checkpoints) -----------------------------------------------------------

@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="Snapshot, training checkpoint folder or official checkpoint."),
    fmt: str = typer.Option(..., "--format", help=("official: the official REGLUE checkpoint layout (model, ema, "
                                                      "args) for its generate.py; safetensors: EMA weights + JSON "
                                                      "config for `reglue sample`.")),
    out: str = typer.Option(..., help="Output file (.pt for official, .safetensors for safetensors)."),
) -> None:
    """Share a trained model: in the official code's checkpoint format, or as safetensors + JSON config."""
    from reglue.trainer.checkpoints import export_model

    with _clear_errors():
        path, note = export_model(checkpoint, fmt, out)
    typer.echo(f"exported {path}: {note}")


# ---- demo -----------------------------------------------------------------------------------

@app.command("demo")
def demo_command(
    out: str = typer.Option("demo", help="Folder for everything the demo writes; rerun to resume."),
    method: str = typer.Option("reglue", help="Method trained: sit | repa | reg | redi | reglue."),
    steps: int = typer.Option(60, help="SiT optimizer steps."),
) -> None:
    """The whole flow (extract -> train-compressor -> train -> sample -> fid) on a built-in tiny
    default: synthetic images and seeded random-weight tiny models. Offline, minutes on a CPU."""
    from reglue.demo import DemoConfig, run_demo

    with _clear_errors():
        run_demo(DemoConfig(out=out, method=method, steps=steps))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
