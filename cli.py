"""The `reglue` command line: a thin typer layer. Each command builds a config dataclass and calls one
function in `pipeline/` or `trainer/`; the dataclass fields are its options (options.py: the help of an
option is its field's docstring), so a new field is a new option with nothing to repeat here.

Names shared by every command: `--cpu` (run on the CPU), `--weights real|tiny` (published or tiny
random weights), `-n/--num` (how many images), `--precision` (fp32, bf16, fp16, auto where it applies),
`--vae` (a Hugging Face id or a local diffusers folder), `--cache` (a cache that a command reads to make
something else; `reglue cache info|verify CACHE` take it as their argument).
"""

from __future__ import annotations

import dataclasses
import errno
from contextlib import contextmanager
from functools import partial

import typer

from reglue.demo import DemoConfig
from reglue.options import choice_enum, fields_as_options, read_config_file
from reglue.pipeline.encoders import EncoderSpec
from reglue.pipeline.extract import ExtractConfig
from reglue.trainer.compressor_train import CompressorConfig
from reglue.trainer.evaluate import FidConfig, RefConfig
from reglue.trainer.generate import GenerateConfig
from reglue.trainer.loop import TrainConfig
from reglue.trainer.models import SIT_PRESETS
from reglue.trainer.objective import METHODS
from reglue.trainer.sampling import DEFAULT_PRESET, EVAL_PRESETS, SamplerConfig, resolve_preset

HELP = """REGLUE (arXiv 2512.16636) in two stages: extract SD-VAE latents and DINOv2 features of every image
once into a Zarr cache, then train SiT from the cache with any of five methods (sit, repa, reg, redi,
reglue), sample it and score it by the ADM protocol.

\b
The flow, in order (rerun any command to resume it):
  reglue extract imagenet/ --out cache/     images -> feature cache
  reglue train-compressor --src imagenet/ --out compressor/ --fill cache/
  reglue train --cache cache/               -> runs/reglue-SiT-B-2-cache/
  reglue sample CKPT                        50K images, eval.sh's sampler
  reglue fid CKPT                           FID-50K, ADM reference batch

Offline, on tiny random-weight models, in minutes on a CPU: `reglue demo`. Each command's --help has
an example; docs/ has the details."""

NAMES = {"num": ("--num", "-n"), "vae_preset": ("--weights",)}
"""One name per concept: the real | tiny weights preset is --weights everywhere (EncoderSpec.preset too)."""
options = partial(fields_as_options, names=NAMES, choices={"method": list(METHODS), "model": list(SIT_PRESETS)})
CPU = typer.Option(False, "--cpu", help="Run on the CPU even when a GPU is present.")

app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP, rich_markup_mode=None)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature cache.", rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from reglue import __version__

        typer.echo(f"reglue {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


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


def _make(cls: type, given: dict, **fixed):
    """cls(**fixed, **given), naming any required option left out (typer cannot require it: a --config file
    may hold it)."""
    values = {**given, **fixed}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**values)


def _end(line: str) -> None:
    """The line a command ends on (what it made and where), once per launch."""
    from accelerate import PartialState

    PartialState().print(line)


# ---- extract / cache (pipeline) -------------------------------------------------------------

@app.command("extract")
@options(EncoderSpec, into="spec", names={**NAMES, "preset": ("--weights",)})
@options(ExtractConfig, into="given", skip=("device",))
def extract_command(given: dict, spec: dict,
                    src: str = typer.Argument(..., metavar="IMAGES", help=(
                        "Image folder (one sub-folder per class, or flat) or a text file list.")),
                    cpu: bool = CPU) -> None:
    """Turn an image folder into a feature cache. Rerun the same command to resume; launch with
    `accelerate launch` or `torchrun` for several processes (docs/extract.md).

    Example: reglue extract imagenet/train --out cache/ --layers-limit 77312"""
    from reglue.pipeline.extract import extract

    with _clear_errors():
        cfg = _make(ExtractConfig, given, src=src, spec=EncoderSpec(**spec), **({"device": "cpu"} if cpu else {}))
        summary = extract(cfg)
    _end(f"cache: {summary.url} ({summary.valid} of {summary.num_samples} images, "
         f"{'complete' if summary.complete else 'INCOMPLETE: rerun to finish'})")


@cache_app.command("info")
def cache_info_command(cache: str = typer.Argument(..., metavar="CACHE", help="Cache URL.")) -> None:
    """Arrays (shape, dtype, chunks, codec, bytes per image), counts, config and progress.

    Example: reglue cache info cache/"""
    from reglue.pipeline.store import info

    with _clear_errors():
        typer.echo(info(cache))


@cache_app.command("verify")
def cache_verify_command(cache: str = typer.Argument(..., metavar="CACHE", help="Cache URL.")) -> None:
    """Re-hash every chunk against its done marker; exit 1 naming each damaged or missing chunk and the fix.

    Example: reglue cache verify cache/"""
    from reglue.pipeline.store import repair_advice, verify

    with _clear_errors():
        problems = verify(cache)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        typer.echo(f"to repair: {repair_advice(problems)}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{cache}: every chunk verifies")


app.add_typer(cache_app, name="cache")


# ---- train-compressor / fill-compressed / train (trainer.loop) ------------------------------

@app.command("train-compressor")
@options(EncoderSpec, into="spec", names={**NAMES, "preset": ("--weights",)}, skip=("vae",),
         defaults={"precision": "fp32"})
@options(CompressorConfig, into="given")
def train_compressor_command(given: dict, spec: dict) -> None:
    """Norm stats and the semantic compressor in the official formats: on every image (--src, the
    reference's recipe) or on a cache's stored layers (--cache). Rerun the same command to resume.

    Example: reglue train-compressor --src imagenet/ --out compressor/ --fill cache/"""
    from reglue.trainer.compressor_train import train_compressor

    with _clear_errors():
        try:
            path = train_compressor(_make(CompressorConfig, given, spec=EncoderSpec(**spec)))
        except FloatingPointError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    _end(f"compressor: {path} (its norm stats beside it)" + (f"; compressed features in {given['fill']}"
                                                             if given.get("fill") else ""))


@app.command("fill-compressed")
def fill_compressed_command(
    cache: str = typer.Option(..., metavar="CACHE", help="Complete cache to add `compressed` features to."),
    compressor: str = typer.Option(..., metavar="FILE|DIR", help=(
        "compression_model.pth (ours or the official one), or a `train-compressor --out` folder.")),
    norm_stats: str | None = typer.Option(None, metavar="FILE", help=(
        "Its dino_mean_std_*.pth (found in a compressor folder).")),
    src: str | None = typer.Option(None, metavar="IMAGES", help=("Image source root, when samples without "
                                                                 "layers rows need a DINOv2 pass.")),
    cpu: bool = CPU,
) -> None:
    """Compress every sample's features into the cache (from stored layers, else a DINOv2 pass; never the VAE).

    Example: reglue fill-compressed --cache cache/ --compressor compression_model.pth --norm-stats
    dino_mean_std_8_9_10_11_256.pth"""
    from reglue.pipeline.compressor import compressor_files
    from reglue.pipeline.extract import fill_compressed

    with _clear_errors():
        model, stats = compressor_files(compressor, norm_stats)
        summary = fill_compressed(cache, str(model), str(stats), src=src, device="cpu" if cpu else None)
    _end(f"compressed features: {summary.url} ({'complete' if summary.complete else 'INCOMPLETE: rerun'})")


@app.command("train")
@options(TrainConfig, into="given")
def train_command(
    given: dict,
    config: str | None = typer.Option(None, "--config", metavar="FILE", help=(
        "A config in JSON or YAML: the output of --dry-run, or a mapping of the options below by field name "
        "(fid_every: 50000). Options given on the command line override it.")),
    dry_run: bool = typer.Option(False, "--dry-run", help=("Print the resolved config (JSON, on stdout) and exit; "
                                                          "it is a --config file as it stands.")),
) -> None:
    """Train SiT with one of the five methods from a cache; rerun the same command to resume. Several GPUs:
    `accelerate launch --num_processes 8 -m reglue.cli train ...`.

    Example: reglue train --cache cache/ --model SiT-XL/2 --xl-lam-schedule"""
    from reglue.trainer.loop import train

    with _clear_errors():
        base = read_config_file(config, TrainConfig) if config else {}
        cfg = _make(TrainConfig, {**base, **given})
        try:
            train(cfg, dry_run=dry_run)
        except FloatingPointError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None


@app.command("models")
def models_command(
    method: choice_enum("method", METHODS) = typer.Option(
        "reglue", help="Method whose inputs size the model."),
    latent_channels: int = typer.Option(4, help="VAE latent channels (4 for SD-VAE)."),
    resolution: int = typer.Option(256, help="Image side in pixels; the latent side is resolution / 8."),
    dino_dim: int = typer.Option(768, help="DINOv2 width (768 for ViT-B/14): CLS token and REPA target."),
) -> None:
    """Print the SiT presets and their parameter counts (incl. the frozen pos_embed) for a method.

    Example: reglue models --method repa"""
    from reglue.trainer.models import preset_table
    from reglue.trainer.objective import get_method, sit_io

    m = get_method(method.value)
    io = sit_io(m, latent_channels=latent_channels, latent_size=resolution // 8, dino_dim=dino_dim,
                compressed_channels=m.feature_channels if m.features == "compressed" else 0)
    typer.echo(f"method {m.name}: {io}")
    typer.echo(preset_table(**io))


# ---- sample / fid / fid-ref (trainer.generate, trainer.evaluate) ----------------------------

PRESET = typer.Option(DEFAULT_PRESET, help=(
    "Evaluation preset: the sampling settings and count behind a published number (docs/sampling.md, 'Evaluation "
    "presets'); every sampler option and -n given here replaces the preset's value."))


def _sampling(preset: str, given: dict, sampler: dict, **fixed) -> GenerateConfig:
    """GenerateConfig of the preset, with the options given over it."""
    sampler, num = resolve_preset(preset, num=given.pop("num", None), **sampler)
    return _make(GenerateConfig, given, num=num, sampler=sampler, **fixed)


@app.command("sample")
@options(SamplerConfig, into="sampler", skip=("path",))
@options(GenerateConfig, into="given")
def sample_command(
    given: dict, sampler: dict,
    checkpoint: str = typer.Argument(..., metavar="CKPT", help=(
        "Our snapshot or checkpoint folder, an official REGLUE checkpoint, or one on the Hugging Face Hub "
        "(hf://owner/repo/file.pt, or owner/repo holding one checkpoint; downloaded once).")),
    preset: choice_enum("preset", EVAL_PRESETS) = PRESET,
    cpu: bool = CPU,
) -> None:
    """Generate images into an ADM-evaluator .npz and a grid of the first ones; resumable; distributed under
    accelerate/torchrun.

    Example: reglue sample runs/reglue-SiT-B-2-cache/snapshots/ema-0400000.safetensors --preset paper-nocfg"""
    from reglue.trainer.generate import generate

    with _clear_errors():
        cfg = _sampling(preset.value, given, sampler, checkpoint=checkpoint, cpu=cpu)
        path = generate(cfg)
    grid = f", grid {cfg.grid_path}" if cfg.grid_path and cfg.grid_path.exists() else ""
    _end(f"samples: {path} ({cfg.num} images){grid}")


@app.command("fid")
@options(SamplerConfig, into="sampler", skip=("path",))
@options(GenerateConfig, into="gen", skip=("checkpoint", "out", "png_dir", "grid", "part_size", "tf32"))
@options(FidConfig, into="given", skip=("samples",))
def fid_command(
    given: dict, gen: dict, sampler: dict,
    source: str = typer.Argument(..., metavar="SOURCE", help=(
        "SAMPLES.npz, or a checkpoint (as for `reglue sample`) to sample first: 50K images with the "
        "--preset's settings (eval.sh's by default) unless told.")),
    preset: choice_enum("preset", EVAL_PRESETS) = PRESET,
    cpu: bool = CPU,
) -> None:
    """FID (+ sFID, IS, precision/recall) by the ADM protocol; writes a metrics JSON. Without --ref: the ADM
    reference batch for the samples' resolution ($REGLUE_FID_REF, else reglue's cache folder, else
    downloaded once).

    Example: reglue fid runs/reglue-SiT-B-2-cache/snapshots/ema-0400000.safetensors --preset paper-nocfg"""
    from reglue.trainer.evaluate import evaluate_source

    with _clear_errors():
        gen_cfg = None if source.endswith(".npz") else _sampling(preset.value, gen, sampler, checkpoint=source,
                                                                   cpu=cpu)
        result = evaluate_source(_make(FidConfig, given, samples=source, cpu=cpu), gen_cfg)
    if result:
        _end(result["summary"] + (f" -> {result['file']}" if "file" in result else ""))


@app.command("fid-ref")
@options(RefConfig, into="given")
def fid_ref_command(
    given: dict,
    source: str = typer.Argument(..., metavar="SOURCE", help=(
        "npz with arr_0 (e.g. the ADM batch), an image folder, or a cache.")),
    cpu: bool = CPU,
) -> None:
    """Reference statistics for `reglue fid` from images (an npz keeps its own mu/sigma).

    Example: reglue fid-ref imagenet/val --out ref-val.npz --resolution 256"""
    from reglue.trainer.evaluate import reference_stats

    with _clear_errors():
        path = reference_stats(_make(RefConfig, given, source=source, cpu=cpu))
    _end(f"reference statistics: {path}")


# ---- export (trainer.checkpoints) -----------------------------------------------------------

@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., metavar="CKPT", help=(
        "Snapshot, training checkpoint folder or official checkpoint.")),
    fmt: choice_enum("format", ["official", "safetensors"]) = typer.Option(..., "--format", help=(
        "official: the official REGLUE checkpoint layout (model, ema, args) for its generate.py; safetensors: "
        "EMA weights + JSON config for `reglue sample`.")),
    out: str = typer.Option(..., metavar="FILE", help="Output file (.pt for official, .safetensors for safetensors)."),
) -> None:
    """Share a trained model: in the official code's checkpoint format, or as safetensors + JSON config.

    Example: reglue export runs/reglue-SiT-B-2-cache/snapshots/ema-0400000.safetensors --format official --out
    reglue-b2-400k.pt"""
    from reglue.trainer.checkpoints import export_model

    with _clear_errors():
        path, note = export_model(checkpoint, fmt.value, out)
    _end(f"exported {path}: {note}")


# ---- download / demo ------------------------------------------------------------------------

@app.command("download")
def download_command(
    to: str | None = typer.Option(None, "--to", metavar="DIR", help=(
        "A folder to gather everything in (to copy to an offline cluster); default: the Hugging Face cache "
        "and reglue's cache folder, where the commands look anyway.")),
    resolution: list[int] = typer.Option([256], "--resolution", help="ADM reference batches to fetch (256, 512)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files, their sources and places; fetch nothing."),
) -> None:
    """Fetch every weight file the real flow needs (the SD-VAEs, DINOv2, the FID Inception, the ADM reference
    batch) and print the environment that makes every command use them offline.

    Example: reglue download --to weights/"""
    from reglue.download import download

    with _clear_errors():
        for line in download(to, tuple(resolution), dry_run=dry_run):
            typer.echo(line)


@app.command("demo")
@options(DemoConfig, into="given")
def demo_command(given: dict) -> None:
    """The whole flow (extract -> train-compressor -> train -> sample -> fid) on a built-in tiny
    default: synthetic images and seeded random-weight tiny models. Offline, minutes on a CPU.

    Example: reglue demo --method repa"""
    from reglue.demo import run_demo

    with _clear_errors():
        run_demo(_make(DemoConfig, given))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
