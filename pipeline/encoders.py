"""Per-image features: SD-VAE posterior moments and DINOv2 tokens from a batch of uint8 crops.

Exactly the reference's per-image computations:
- VAE (edm2 `encoders.py:72-78`): x/127.5 - 1, encode, keep the posterior mean and std (unscaled).
- DINOv2 (`train.py:36-42`, `:319-330`): x/255, ImageNet-normalize, bicubic resize to
  224*R/256 (align_corners False, no antialias), then `get_intermediate_layers(norm=True)`:
  the last block's CLS and patch tokens (the REPA target) and optionally layers 8..11.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from reglue import weights

VAE_SCALING_FACTOR = 0.18215
"""SD-VAE latent scale (reference `train.py:184-189`); applied by the trainer, never stored."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoders, at which resolution and precision. Every dimension derives from it."""

    preset: str = "real"
    """"real": published weights; "tiny": seeded random tiny models (tests, demo; not for real use)."""
    vae: str = weights.DEFAULT_VAE
    """VAE: HF Hub id or a local diffusers folder."""
    dino: str = weights.DEFAULT_DINOV2
    """DINOv2: timm model name (with registers)."""
    dino_weights: str | None = None
    """Local DINOv2 weights file (hub `.pth` or timm); default: $REGLUE_DINOV2_WEIGHTS or the Hub."""
    resolution: int = 256
    """Crop side R in pixels; a multiple of 16 so that the VAE (/8) and DINOv2 (/14 at 7R/8) tile it."""
    layers: tuple[int, ...] = (8, 9, 10, 11)
    """0-based DINOv2 blocks whose normed patch tokens form `layers` (reference `--interm_layers`)."""
    precision: str = "auto"
    """"fp32", "bf16" or "fp16" autocast for both forwards; "auto": fp16 on CUDA, fp32 elsewhere."""

    def __post_init__(self):
        if self.preset not in ("real", "tiny"):
            raise ValueError(f"preset {self.preset!r}: use 'real' or 'tiny'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {PRECISIONS}")
        if self.resolution <= 0 or self.resolution % 16:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of 16")
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(f"layers {self.layers} must be distinct, increasing, non-negative")
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))

    @classmethod
    def tiny(cls, resolution: int = 64, **kw) -> EncoderSpec:
        """The tiny preset at a small crop: 64 -> latent 8x8, DINOv2 input 56, 4x4 = 16 patches."""
        return cls(preset="tiny", resolution=resolution, **kw)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    @property
    def dino_size(self) -> int:
        # reference train.py:41 resizes to 224*(res//256); 224*res//256 is the same at 256 and 512
        # and also defined below 256 (the tiny preset).
        return 224 * self.resolution // 256

    @property
    def grid(self) -> int:
        return self.dino_size // 14

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "fp16" on CUDA (the reference's DINOv2 autocast, `train.py:303`), else "fp32"."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def preprocess_vae(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,R,R] -> float32 in [-1,1] (edm2 `encoders.py:78`)."""
    return images.to(torch.float32) / 127.5 - 1


def preprocess_dino(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,3,R,R] -> float32 [B,3,size,size], reference `preprocess_raw_image` (`train.py:36-42`).

    Normalize BEFORE the resize, and the resize is bicubic, align_corners False, no antialias.
    """
    x = images.to(torch.float32) / 255.
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    x = (x - mean) / std  # torchvision Normalize: sub_(mean).div_(std)
    return F.interpolate(x, size, mode="bicubic")


class FeatureEncoder:
    """Frozen VAE + DINOv2 on one device; `encode` maps uint8 crops to float32 features, `layers` runs
    DINOv2 alone (compressor training and `fill-compressed` never need the VAE; `with_vae=False` skips it).

    The models come from `weights` per the spec, unless given (`vae`, `dino`: already-built modules,
    e.g. a DINOv2 loaded with other weights for a parity check).
    """

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu", *, vae=None, dino=None,
                 with_vae: bool = True):
        self.spec = spec
        self.device = torch.device(device)
        self.precision = resolve_precision(spec.precision, self.device)
        if vae is None and with_vae:
            vae = weights.load_vae(spec.vae, spec.preset)
        self.vae = vae.to(self.device) if vae is not None else None
        if dino is None:
            dino = weights.load_dinov2(spec.dino, spec.preset, spec.dino_size, spec.dino_weights)
        self.dino = dino.to(self.device)
        depth = len(self.dino.blocks)
        if spec.layers[-1] >= depth:
            raise ValueError(f"layers {spec.layers} exceed the {depth} blocks of {spec.dino}")
        # cls / patches are the LAST block's normed tokens (== hub x_norm_clstoken / patchtokens)
        self.blocks = sorted(set(spec.layers) | {depth - 1})

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def dino_dim(self) -> int:
        return self.dino.embed_dim

    def meta(self) -> dict:
        """Everything a cache records about the encoders (ids, revisions, dims, preprocessing)."""
        s = self.spec
        return {
            "preset": s.preset, "precision": self.precision,
            "vae": dict(getattr(self.vae, "reglue_weights", {})),
            "dino": dict(getattr(self.dino, "reglue_weights", {})),
            "resolution": s.resolution, "latent_channels": self.latent_channels,
            "latent_size": s.latent_size, "vae_scaling_factor": VAE_SCALING_FACTOR,
            "dino_dim": self.dino_dim, "dino_size": s.dino_size, "grid": s.grid,
            "num_patches": s.num_patches, "layers": list(s.layers), "dino_depth": len(self.dino.blocks),
            "preprocessing": {
                "crop": f"ADM center crop to {s.resolution} (edm2 center-crop-dhariwal)",
                "vae": "x/127.5-1; store posterior mean and std, unscaled",
                "dino": f"x/255, ImageNet mean/std, bicubic resize to {s.dino_size} "
                        "(align_corners False, no antialias); tokens after the final LayerNorm",
            },
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor, with_layers: bool = False) -> dict[str, torch.Tensor]:
        """uint8 [B,3,R,R] -> float32 `vae_mean`, `vae_std` [B,zc,h,h], `cls` [B,D], `patches` [B,P,D],
        and with `with_layers` also `layers` [B,P,L*D] (channel order = spec.layers)."""
        images = self._check(images)
        out = self._forward(images, with_layers, self.precision)
        if self.precision != "fp32" and not torch.stack([v.isfinite().all() for v in out.values()]).all():
            # fp16 can overflow where fp32 does not: redo the batch in fp32 rather than store inf/NaN
            out = self._forward(images, with_layers, "fp32")
        return out

    @torch.no_grad()
    def vae_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,3,R,R] -> float32 posterior mean, std [B,zc,h,h] (the VAE alone, fp32 as the reference's
        `encode` step: dataset_tools.py:395,401)."""
        post = self.vae.encode(preprocess_vae(images.to(self.device, non_blocking=True))).latent_dist
        return post.mean.float(), post.std.float()

    @torch.no_grad()
    def layers(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,R,R] -> float32 `layers` [B,P,L*D] (channel order = spec.layers), DINOv2 only: the
        same values as `encode(images, with_layers=True)["layers"]`."""
        images = self._check(images)
        out = self._layers(self._dino(images, self.spec.layers, self.precision))
        if self.precision != "fp32" and not out.isfinite().all():
            out = self._layers(self._dino(images, self.spec.layers, "fp32"))  # as `encode`: fp16 overflow
        return out

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        R = self.spec.resolution
        if images.dtype != torch.uint8 or images.shape[1:] != (3, R, R):
            raise ValueError(f"expected uint8 [B,3,{R},{R}] crops, got {images.dtype} {list(images.shape)}")
        return images.to(self.device, non_blocking=True)

    def _dino(self, images: torch.Tensor, blocks, precision: str) -> dict:
        """block -> (normed patch tokens [B,P,D], normed prefix tokens [B,1+regs,D]) for `blocks`."""
        x_dino = preprocess_dino(images, self.spec.dino_size)            # [B,3,S,S]
        # Only DINOv2 ran under fp16 autocast in the reference (train.py:303-341), so only it takes `precision`.
        autocast = (nullcontext() if precision == "fp32"
                    else torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[precision]))
        with autocast:
            outs = self.dino.get_intermediate_layers(
                x_dino, n=list(blocks), reshape=False, return_prefix_tokens=True, norm=True)
        return dict(zip(blocks, outs))

    def _layers(self, tokens: dict) -> torch.Tensor:
        return torch.cat([tokens[n][0] for n in self.spec.layers], dim=-1).float()  # [B,P,L*D]

    def _forward(self, images: torch.Tensor, with_layers: bool, precision: str) -> dict[str, torch.Tensor]:
        vae_mean, vae_std = self.vae_posterior(images)                   # [B,zc,h,h] each, always fp32
        tokens = self._dino(images, self.blocks, precision)              # block -> ([B,P,D], [B,1+4,D])
        last_patches, last_prefix = tokens[self.blocks[-1]]
        out = {
            "vae_mean": vae_mean, "vae_std": vae_std,
            "cls": last_prefix[:, 0].float(), "patches": last_patches.float(),
        }
        if with_layers:
            out["layers"] = self._layers(tokens)
        return out
