"""Per-image features: SD-VAE posterior moments and the vision encoder's tokens from a batch of uint8 crops.

Exactly the reference's per-image computations (with its encoder, DINOv2-B with registers):
- VAE (edm2 `encoders.py:72-78`): x/127.5 - 1, encode, keep the posterior mean and std (unscaled).
- encoder (`train.py:36-42`, `:319-330`): x/255, normalize with the encoder's mean/std, resize to
  the encoder's input (bicubic, align_corners False, no antialias), then the tokens of the chosen
  blocks through the final LayerNorm (`get_intermediate_layers(norm=True)`): the last block's [CLS]
  and patch tokens (the REPA target) and optionally the compressor's layers (default: the last four).

Any timm ViT with a [CLS] token and a final norm works (weights.encoder_arch): DINOv2 S/B/L/G with
or without registers, DINOv3, CLIP. Its mean/std and resize filter come from its timm pretrained
config; its input side is grid x patch with grid = R/16 (the SiT/2 token grid that REPA aligns with
token by token): DINOv2 /14 at 256 px -> 224 (the reference's 224*R/256), DINOv3 /16 -> 256, no resize.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F

from reglue import weights

VAE_SCALING_FACTOR = 0.18215
"""SD-VAE latent scale (reference `train.py:184-189`); applied by the trainer, never stored."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LEGACY_SPEC_KEYS = {"dino": "encoder", "dino_weights": "encoder_weights"}
"""EncoderSpec fields of caches written before the encoder was a choice."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoders, at which resolution and precision. Every dimension derives from it."""

    preset: Literal["real", "tiny"] = "real"
    """"real": published weights; "tiny": seeded random tiny models (tests, demo; not for real use)."""
    vae: str = weights.DEFAULT_VAE
    """VAE: HF Hub id or a local diffusers folder."""
    encoder: str = weights.DEFAULT_ENCODER
    """Vision encoder: a timm id (`architecture.tag`; a bare architecture means its default tag)."""
    encoder_weights: str | None = None
    """Local encoder weights file (original release or timm); default: $REGLUE_ENCODER_WEIGHTS or the Hub."""
    resolution: int = 256
    """Crop side R in pixels; a multiple of 16 so that the VAE (/8) and the encoder's R/16 grid tile it."""
    layers: tuple[int, ...] | None = None
    """0-based blocks whose normed patch tokens form `layers` (reference `--interm_layers`); default: the
    encoder's last four blocks (8..11 for a 12-block ViT, the paper's)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """"fp32", "bf16" or "fp16" autocast for the encoder; "auto": fp16 on CUDA, fp32 elsewhere."""

    def __post_init__(self):
        if self.preset not in ("real", "tiny"):
            raise ValueError(f"preset {self.preset!r}: use 'real' or 'tiny'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {PRECISIONS}")
        if self.resolution <= 0 or self.resolution % 16:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of 16")
        arch = weights.encoder_arch(self.encoder)
        object.__setattr__(self, "encoder", arch.name)  # canonical id: the store records one name per encoder
        layers = tuple(range(arch.depth - 4, arch.depth)) if self.layers is None else tuple(int(n) for n in self.layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"layers {layers} must be distinct, increasing, non-negative")
        object.__setattr__(self, "layers", layers)  # checked against the built model's depth (FeatureEncoder)

    @classmethod
    def tiny(cls, resolution: int = 64, **kw) -> EncoderSpec:
        """The tiny preset at a small crop: 64 -> latent 8x8, a 4x4 = 16-patch grid."""
        return cls(preset="tiny", resolution=resolution, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderSpec:
        """The spec a cache recorded (`meta.encoders["spec"]`), also from caches of older reglue."""
        d = {LEGACY_SPEC_KEYS.get(k, k): v for k, v in d.items()}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def arch(self) -> weights.EncoderArch:
        return weights.encoder_arch(self.encoder)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    @property
    def grid(self) -> int:
        # The SiT/2 token grid (latent R/8, patch 2): REPA aligns token i with patch i.
        return self.resolution // 16

    @property
    def input_size(self) -> int:
        # grid x patch: reference train.py:41 resizes to 224*(res//256) for /14, the same at 256 and 512.
        return self.grid * self.arch.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def preprocessing(self) -> dict:
        """The encoder's input transform, as recorded in the cache (its values come from timm's config)."""
        a, resize = self.arch, self.input_size != self.resolution
        return {"scale": "x/255", "mean": list(a.mean), "std": list(a.std), "order": "normalize, then resize",
                "resize": {"size": self.input_size, "mode": a.interpolation, "align_corners": False,
                           "antialias": False} if resize else None,
                "tokens": "block outputs through the final LayerNorm; [CLS] = prefix token 0, "
                          f"{a.registers} register tokens dropped"}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "fp16" on CUDA (the reference's DINOv2 autocast, `train.py:303`), else "fp32"."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def preprocess_vae(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,R,R] -> float32 in [-1,1] (edm2 `encoders.py:78`)."""
    return images.to(torch.float32) / 127.5 - 1


def preprocess_encoder(images: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """uint8 [B,3,R,R] -> float32 [B,3,S,S], S = spec.input_size: reference `preprocess_raw_image`
    (`train.py:36-42`) with the encoder's mean, std and filter.

    Normalize BEFORE the resize (the reference's DINOv2 order; REPA resizes CLIP input first, which
    differs by float rounding only), and the resize has align_corners False and no antialias; none
    when S = R (e.g. DINOv3 /16 at 256 px)."""
    a = spec.arch
    x = images.to(torch.float32) / 255.
    mean = torch.tensor(a.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(a.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    x = (x - mean) / std  # torchvision Normalize: sub_(mean).div_(std)
    if spec.input_size == spec.resolution:
        return x
    return F.interpolate(x, spec.input_size, mode=a.interpolation)


class FeatureEncoder:
    """Frozen VAE + vision encoder on one device; `encode` maps uint8 crops to float32 features, `layers`
    runs the encoder alone (compressor training and `fill-compressed` never need the VAE; `with_vae=False`
    skips it).

    The models come from `weights` per the spec, unless given (`vae`, `vfm`: already-built modules,
    e.g. a DINOv2 loaded with other weights for a parity check).
    """

    def __init__(self, spec: EncoderSpec, device: str | torch.device = "cpu", *, vae=None, vfm=None,
                 with_vae: bool = True):
        self.spec = spec
        self.device = torch.device(device)
        self.precision = resolve_precision(spec.precision, self.device)
        if vae is None and with_vae:
            vae = weights.load_vae(spec.vae, spec.preset)
        self.vae = vae.to(self.device) if vae is not None else None
        if vfm is None:
            vfm = weights.load_encoder(spec.encoder, spec.preset, spec.input_size, spec.encoder_weights)
        self.vfm = vfm.to(self.device)
        depth = len(self.vfm.blocks)
        if spec.layers[-1] >= depth:
            raise ValueError(f"--layers {','.join(map(str, spec.layers))} exceed the {depth} blocks "
                             f"(0..{depth - 1}) of {spec.encoder}")
        # cls / patches are the LAST block's normed tokens (== hub x_norm_clstoken / patchtokens)
        self.blocks = sorted(set(spec.layers) | {depth - 1})

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def width(self) -> int:
        return self.vfm.embed_dim

    def meta(self) -> dict:
        """Everything a cache records about the encoders (ids, revisions, architecture, dims, preprocessing)."""
        s, a = self.spec, self.spec.arch
        return {
            "preset": s.preset, "precision": self.precision,
            "vae": dict(getattr(self.vae, "reglue_weights", {})),
            "encoder": {**getattr(self.vfm, "reglue_weights", {}), "architecture": a.architecture,
                        "class": a.model_class, "patch_size": a.patch_size, "width": self.width,
                        "depth": len(self.vfm.blocks), "cls_token": True, "registers": a.registers,
                        "license": a.license},
            "resolution": s.resolution, "latent_channels": self.latent_channels,
            "latent_size": s.latent_size, "vae_scaling_factor": VAE_SCALING_FACTOR,
            "width": self.width, "input_size": s.input_size, "grid": s.grid,
            "num_patches": s.num_patches, "layers": list(s.layers),
            "preprocessing": {
                "crop": f"ADM center crop to {s.resolution} (edm2 center-crop-dhariwal)",
                "vae": "x/127.5-1; store posterior mean and std, unscaled",
                "encoder": s.preprocessing(),
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
        """uint8 [B,3,R,R] -> float32 `layers` [B,P,L*D] (channel order = spec.layers), the encoder only:
        the same values as `encode(images, with_layers=True)["layers"]`."""
        images = self._check(images)
        out = self._layers(self._tokens(images, self.spec.layers, self.precision))
        if self.precision != "fp32" and not out.isfinite().all():
            out = self._layers(self._tokens(images, self.spec.layers, "fp32"))  # as `encode`: fp16 overflow
        return out

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        R = self.spec.resolution
        if images.dtype != torch.uint8 or images.shape[1:] != (3, R, R):
            raise ValueError(f"expected uint8 [B,3,{R},{R}] crops, got {images.dtype} {list(images.shape)}")
        return images.to(self.device, non_blocking=True)

    def _tokens(self, images: torch.Tensor, blocks, precision: str) -> dict:
        """block -> (normed patch tokens [B,P,D], normed prefix tokens [B,1+regs,D]) for `blocks`."""
        x_enc = preprocess_encoder(images, self.spec)                    # [B,3,S,S]
        # Only DINOv2 ran under fp16 autocast in the reference (train.py:303-341), so only the encoder takes
        # `precision`; the VAE always encodes in fp32.
        autocast = (nullcontext() if precision == "fp32"
                    else torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[precision]))
        with autocast:  # timm's get_intermediate_layers(n, reshape=False, return_prefix_tokens, norm) is this call
            outs = self.vfm.forward_intermediates(
                x_enc, indices=list(blocks), return_prefix_tokens=True, norm=True, output_fmt="NLC",
                intermediates_only=True)
        return dict(zip(blocks, outs))

    def _layers(self, tokens: dict) -> torch.Tensor:
        return torch.cat([tokens[n][0] for n in self.spec.layers], dim=-1).float()  # [B,P,L*D]

    def _forward(self, images: torch.Tensor, with_layers: bool, precision: str) -> dict[str, torch.Tensor]:
        vae_mean, vae_std = self.vae_posterior(images)                   # [B,zc,h,h] each, always fp32
        tokens = self._tokens(images, self.blocks, precision)            # block -> ([B,P,D], [B,1+regs,D])
        last_patches, last_prefix = tokens[self.blocks[-1]]
        out = {
            "vae_mean": vae_mean, "vae_std": vae_std,
            "cls": last_prefix[:, 0].float(), "patches": last_patches.float(),
        }
        if with_layers:
            out["layers"] = self._layers(tokens)
        return out
