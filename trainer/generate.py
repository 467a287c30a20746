"""`reglue sample`: images from a checkpoint into an ADM-evaluator `.npz`, distributed and resumable.

Sample i is a function of (seed, i) only: its label, initial latent and CLS noise, and every SDE
draw come from its own generator seeded by (seed, i). Work is cut into fixed parts of indices
(independent of the process count) and parts are dealt to processes, so each model batch holds the
same samples on 1 or N processes and sample i is identical either way (on one device type; CPU and
CUDA generators differ). The reference instead seeds `global_seed * world_size + rank`, so its
samples change with the GPU count (generate.py:53-59).

Each finished part is written as `<out>.parts/part-NNNNN.npz`; a rerun skips finished parts, then
the parts are merged into `<out>` (`arr_0` uint8 [N,H,W,3], `arr_1` int64 labels, as the ADM
reference batch, and `config`: the sampling record) and removed.

Never stale: the record (`sample_record`) holds everything the pixels depend on, the checkpoint's
sha256 included. A rerun whose record differs from the one in an existing `<out>` (or its parts) is
refused; the default name carries the settings that change pixels (a hash of the less common ones),
so a rerun with other settings samples into a new file.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from reglue.trainer.npz import write_npz
from reglue.trainer.sampling import SamplerConfig, decode, sample

DECODE_VAE = "stabilityai/sd-vae-ft-ema"  # the reference decodes with ft-EMA (generate.py:97, --vae ema)


# ---- per-sample randomness --------------------------------------------------------------------

def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Sample `index`'s own generator; SeedSequence mixes (seed, index) into a 64-bit seed."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


class PerSampleNoise:
    """A `torch.randn_like` whose row b comes from generator b (the `noise` of sampling.py)."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype)
                            for g in self.generators])


@torch.no_grad()
def generate_images(model, vae, indices: list[int], *, seed: int, latent_channels: int, scaling_factor: float,
                    sampler: SamplerConfig = SamplerConfig(), labels: str = "random",
                    device: torch.device | str = "cpu",
                    vae_cfg_rule: str = "reglue") -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [B,H,W,3] and labels [B] (on the CPU) for sample indices, one model batch.

    Per sample, in order from its generator: the label (randint, as the reference's random labels;
    replaced by index % num_classes when `labels="balanced"`), the initial latent [C,h,h] and the CLS
    state [D], both float32 N(0,1) like generate.py:130-132, then the SDE noise. `vae_cfg_rule` is the
    model's method's (ModelInfo.method.vae_cfg_rule): what `sampler.vae_cfg` means for it."""
    if labels not in ("random", "balanced"):
        raise ValueError(f"labels must be 'random' or 'balanced'; got {labels!r}")
    device = torch.device(device)
    size = model.grid * model.patch_size
    gens = [sample_generator(seed, i, device) for i in indices]
    # An unconditional model (a cache of a flat folder: num_classes 0) has only the null id, 0 =
    # num_classes; guiding null against null would only double the forwards, so guidance is off.
    classes = max(model.num_classes, 1)
    if model.num_classes == 0:
        sampler = replace(sampler, cfg_scale=1.0, cls_cfg_scale=0.0)
    y, x, cls = [], [], []
    for i, g in zip(indices, gens):
        label = torch.randint(classes, (), generator=g, device=device)
        y.append(torch.tensor(i % classes, device=device) if labels == "balanced" else label)
        x.append(torch.randn(model.in_channels, size, size, generator=g, device=device))
        if model.cls_dim is not None:
            cls.append(torch.randn(model.cls_dim, generator=g, device=device))
    y = torch.stack(y)
    x0, _ = sample(model, torch.stack(x), y, torch.stack(cls) if cls else None, sampler,
                   latent_channels=latent_channels, noise=PerSampleNoise(gens), vae_cfg_rule=vae_cfg_rule)
    return decode(vae, x0, latent_channels, scaling_factor).cpu(), y.cpu()


# ---- `reglue sample` ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateConfig:
    """`reglue sample`: what to generate and where."""

    checkpoint: str
    """Our snapshot / training checkpoint, an official REGLUE checkpoint, or one on the Hugging Face Hub
    (hf://owner/repo/file.pt, or owner/repo holding one checkpoint; downloaded once, trainer.hub)."""
    out: str | None = None
    """Output `.npz`; default `<checkpoint stem>-<mode><steps>-cfg<scale>-seed<seed>-<num>[-<hash>].npz` beside
    it (in the current folder for a Hub checkpoint), the hash of the other settings that change pixels when
    any differs from its default."""
    num: int = 50_000
    """Number of images (ADM protocol: 50K)."""
    batch_size: int = 64
    """Samples per model batch per process (eval.sh: 64); guidance doubles the forward batch."""
    seed: int = 0
    """Global seed; sample i depends on (seed, i) only."""
    labels: Literal["random", "balanced"] = "random"
    """"random" (the reference: uniform labels) or "balanced" (index % num_classes, 50 per class at 50K)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler and guidance settings (defaults: the `eval-sh` preset, the released eval.sh)."""
    vae: str = DECODE_VAE
    """VAE used to decode (HF id or local folder)."""
    vae_preset: Literal["real", "tiny"] | None = None
    """"real" weights, or "tiny" random weights (tests only); None: the preset of the cache the model was
    trained on, from its snapshot's metadata (official checkpoints: real)."""
    png_dir: str | None = None
    """Also write `<png_dir>/<index:06d>.png` (the reference's naming)."""
    grid: int = 64
    """Write a grid image of the first `grid` samples beside the npz, `<out>.grid.png` (0 = none)."""
    part_size: int = 1024
    """Samples per resumable part file; a multiple of batch_size."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present (tests, CI)."""
    tf32: bool = True
    """Allow TF32 matmuls on GPU, as the reference (generate.py --tf32, default on)."""

    def __post_init__(self):
        if self.num < 1 or self.batch_size < 1 or self.part_size % self.batch_size:
            raise ValueError(f"need num >= 1 and part_size a multiple of batch_size; got num={self.num}, "
                             f"batch_size={self.batch_size}, part_size={self.part_size}")

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        from reglue.trainer.hub import is_hub_source, local_name

        s = self.sampler
        ckpt = Path(local_name(self.checkpoint)) if is_hub_source(self.checkpoint) else Path(self.checkpoint)
        name = f"{ckpt.stem}-{s.mode}{s.num_steps}-cfg{s.cfg_scale:g}-seed{self.seed}-{self.num}"
        other = self._other_pixel_settings()
        if other != GenerateConfig(checkpoint=self.checkpoint)._other_pixel_settings():
            name += "-" + hashlib.sha256(json.dumps(other, sort_keys=True).encode()).hexdigest()[:8]
        return ckpt.with_name(name + ".npz")

    @property
    def grid_path(self) -> Path | None:
        return self.out_path.with_suffix(".grid.png") if self.grid else None

    def _other_pixel_settings(self) -> dict:
        """What changes the pixels besides the checkpoint and the settings spelled out in the default name."""
        sampler = {k: v for k, v in asdict(self.sampler).items() if k not in ("mode", "num_steps", "cfg_scale")}
        return {"sampler": sampler, "labels": self.labels, "vae": self.vae, "vae_preset": self.vae_preset,
                "tf32": self.tf32}


# Recorded, and compared for the parts of an unfinished output only: they decide which samples share a
# model batch, which moves the last bits of a GPU's results, not what the samples are.
BATCHING = ("batch_size", "part_size")


def sample_record(cfg: GenerateConfig, checkpoint_sha256: str, device: str) -> dict:
    """Everything the samples are a function of (plus BATCHING), as flat plain values."""
    return json.loads(json.dumps({"checkpoint": str(cfg.checkpoint), "checkpoint_sha256": checkpoint_sha256,
                                  "device": device, "num": cfg.num, "seed": cfg.seed, "labels": cfg.labels,
                                  **asdict(cfg.sampler), "vae": cfg.vae, "vae_preset": cfg.vae_preset,
                                  "tf32": cfg.tf32, **{k: getattr(cfg, k) for k in BATCHING}}))


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of the weights sampled: a snapshot file's, or a training checkpoint folder's ema.pt (which
    must match its manifest)."""
    from reglue.trainer.checkpoints import EMA_FILE
    from reglue.trainer.hub import resolve_checkpoint
    from reglue.trainer.statefiles import DamagedState, manifest, sha256, verify

    path = resolve_checkpoint(path)  # a Hub checkpoint: its cached copy (downloaded once)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if problem := verify(path, [EMA_FILE]):
            raise DamagedState(f"checkpoint {path} is damaged ({problem}); sample another checkpoint")
        return manifest(path)["files"][EMA_FILE]["sha256"]
    return sha256(path)


def recorded(out: Path) -> dict | None:
    """The sampling record inside a finished npz, or None when it has none."""
    try:
        with zipfile.ZipFile(out) as zf:
            if "config.npy" not in zf.namelist():
                return None
        with np.load(out) as z:
            return json.loads(str(z["config"][0]))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{out} exists but is not a readable sample batch ({e}); delete it or choose another "
                         "--out") from None


def _differences(there: dict, here: dict, skip: tuple[str, ...] = ()) -> list[str]:
    return [f"{k}: {there.get(k)!r} there, {here.get(k)!r} now" for k in here
            if k not in skip and k != "checkpoint" and there.get(k) != here.get(k)]


def generate(cfg: GenerateConfig) -> Path:
    """Generate cfg.num images with every process of the current (Accelerate) launch; returns the npz."""
    from accelerate import Accelerator

    from reglue import weights
    from reglue.trainer.checkpoints import load_model, weights_preset

    acc = Accelerator(cpu=cfg.cpu)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    out, parts = cfg.out_path, _parts_dir(cfg.out_path)
    record = sample_record(cfg, checkpoint_sha256(cfg.checkpoint), acc.device.type)
    if out.exists():
        there = recorded(out)
        if there is None:
            raise FileExistsError(f"{out} exists and records no sampling configuration (not written by this "
                                  "`reglue sample`), so it cannot be trusted to be these samples; delete it or "
                                  "choose another --out")
        if diff := _differences(there, record, BATCHING):
            raise FileExistsError(f"{out} holds samples of another configuration ({'; '.join(diff)}); choose "
                                  "another --out, or delete it")
        acc.print(f"{out} exists with this configuration; nothing to do")
        return out
    model, info = load_model(cfg.checkpoint)
    sampler = replace(cfg.sampler, path=info.method.path)  # the SDE's score follows the model's training path
    vae = weights.load_vae(cfg.vae, cfg.vae_preset or weights_preset(info))
    if vae.config.latent_channels != info.latent_channels:
        raise ValueError(f"VAE {cfg.vae} has {vae.config.latent_channels} latent channels but {cfg.checkpoint} was "
                         f"trained on {info.latent_channels}; pass the VAE its cache was made with (--vae)")
    model, vae = model.to(acc.device), vae.to(acc.device)
    if acc.is_main_process:
        _claim_parts_dir(parts, record)
    acc.wait_for_everyone()
    todo = [k for k in range(math.ceil(cfg.num / cfg.part_size)) if not _part_file(parts, k).exists()]
    acc.wait_for_everyone()  # every process has listed the parts before any is written
    mine = todo[acc.process_index::acc.num_processes]
    count = sum(len(_part_indices(cfg, k)) for k in mine)
    with tqdm(total=count, desc="sampling", unit="img", disable=not acc.is_local_main_process) as bar:
        for k in mine:
            images, labels = [], []
            for batch in _batches(_part_indices(cfg, k), cfg.batch_size):
                img, y = generate_images(model, vae, batch, seed=cfg.seed, latent_channels=info.latent_channels,
                                         scaling_factor=info.vae_scaling_factor, sampler=sampler,
                                         labels=cfg.labels, device=acc.device,
                                         vae_cfg_rule=info.method.vae_cfg_rule)
                images.append(img.numpy())
                labels.append(y.numpy())
                bar.update(len(batch))
            _write_part(parts, k, np.concatenate(images), np.concatenate(labels), _part_indices(cfg, k), cfg.png_dir)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _merge(parts, out, cfg, record)
    acc.wait_for_everyone()
    return out


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _part_indices(cfg: GenerateConfig, k: int) -> list[int]:
    return list(range(k * cfg.part_size, min((k + 1) * cfg.part_size, cfg.num)))


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part_file(parts: Path, k: int) -> Path:
    return parts / f"part-{k:05d}.npz"


def _claim_parts_dir(parts: Path, record: dict) -> None:
    """Create the parts folder, or check that its parts were made with this same record (batching included)."""
    parts.mkdir(parents=True, exist_ok=True)
    stamp = parts / "config.json"
    if stamp.exists():
        try:
            there = json.loads(stamp.read_text())
        except ValueError:
            there = {}
        if diff := _differences(there, record):
            raise ValueError(f"{parts} holds parts made with another configuration ({stamp}: {'; '.join(diff)}); "
                             "delete the folder or choose another --out")
    stamp.write_text(json.dumps(record, indent=1))


def _write_part(parts: Path, k: int, images: np.ndarray, labels: np.ndarray, indices: list[int],
                png_dir: str | None) -> None:
    if png_dir:
        from PIL import Image

        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for i, img in zip(indices, images):
            Image.fromarray(img).save(Path(png_dir) / f"{i:06d}.png")
    write_npz(_part_file(parts, k), {"images": (images.shape, np.uint8, [images]),
                                     "labels": (labels.shape, np.int64, [labels])})


def _merge(parts: Path, out: Path, cfg: GenerateConfig, record: dict) -> None:
    """The parts into `out` with the record as its `config` member (the grid first: `out` existing means done)."""
    files = [_part_file(parts, k) for k in range(math.ceil(cfg.num / cfg.part_size))]
    with np.load(files[0]) as z:
        hw = z["images"].shape[1:]

    def column(key: str):
        for f in files:
            with np.load(f) as z:
                yield z[key]

    text = np.array([json.dumps(record)])
    write_npz(out, {"arr_0": ((cfg.num, *hw), np.uint8, column("images")),
                    "arr_1": ((cfg.num,), np.int64, column("labels")),
                    "config": (text.shape, text.dtype, [text])})
    if cfg.grid:  # the first `grid` samples, across as many parts as they span
        first, need = [], cfg.grid
        for images in column("images"):
            first.append(images[:need])
            need -= len(first[-1])
            if need <= 0:
                break
        save_grid(np.concatenate(first), cfg.grid_path)
    shutil.rmtree(parts)


def tile(images: np.ndarray) -> np.ndarray:
    """Tile uint8 [N,H,W,3] images into one near-square grid image (uint8 HWC), row by row."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, img in enumerate(images):
        canvas[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return canvas


def save_grid(images: np.ndarray, path: str | Path) -> Path:
    """Tile uint8 [N,H,W,3] images into a near-square grid PNG."""
    from PIL import Image

    Image.fromarray(tile(images)).save(path)
    return Path(path)
