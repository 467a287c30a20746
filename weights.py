"""Pretrained weights, one home: the SD-VAE (diffusers) and DINOv2 ViT-B/14 with registers (timm).

`preset="real"` loads the published weights (HF Hub cache first, then the network unless offline;
or a local copy). `preset="tiny"` builds the same architectures at tiny width with seeded random
weights: reproducible, offline, and NOT for real use (tests and the demo only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
"""The encoder the reference caches latents with (edm2 `encoders.py:54`); decoding uses -ema."""
DEFAULT_DINOV2 = "vit_base_patch14_reg4_dinov2.lvd142m"
"""timm's copy of torch.hub `dinov2_vitb14_reg` (reference `utils.py:64`)."""
DINOV2_WEIGHTS_ENV = "REGLUE_DINOV2_WEIGHTS"
"""Environment variable naming a local DINOv2 weights file (hub `.pth` or timm format)."""
TINY_SEED = 0
TINY_LABEL = "tiny preset: seeded random weights, NOT for real use"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it at call time as well.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _revision(path: str | Path | None) -> str | None:
    """The commit of an HF Hub cache snapshot path (`.../snapshots/<commit>/file`), else None."""
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})", str(path or ""))
    return m.group(1) if m else None


def _tag(model: nn.Module, **info) -> nn.Module:
    """Attach provenance (`name`, `preset`, `source`, `revision`, ...) for the cache metadata."""
    model.reglue_weights = info
    return model.eval().requires_grad_(False)


# ---- SD-VAE ----------------------------------------------------------------------------------


SD_VAE_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    latent_channels=4, sample_size=256)
"""The diffusers config of stabilityai/sd-vae-ft-{mse,ema} (their config.json)."""


def build_vae(**overrides):
    """An `AutoencoderKL` with the SD-VAE layout (random weights); `overrides` change the config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**SD_VAE_CONFIG, **overrides})


def tiny_vae():
    """The SD-VAE layout (4 stages -> /8, 4 latent channels) at tiny width, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build_vae(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=64)


def load_vae(name: str = DEFAULT_VAE, preset: str = "real"):
    """diffusers `AutoencoderKL` in eval mode, fp32. `name`: an HF Hub id or a local folder."""
    if preset == "tiny":
        return _tag(tiny_vae(), name=name, preset=preset, source=TINY_LABEL, revision=None)
    if preset != "real":
        raise ValueError(f"unknown weights preset {preset!r}: use 'real' or 'tiny'")
    from diffusers import AutoencoderKL
    from huggingface_hub import try_to_load_from_cache

    if Path(name).is_dir():
        try:
            vae = AutoencoderKL.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise WeightsUnavailable(
                f"VAE folder {name} is not a diffusers AutoencoderKL folder (config.json + "
                f"diffusion_pytorch_model.safetensors): {e}") from e
        return _tag(vae, name=name, preset=preset, source=str(Path(name).resolve()), revision=None)
    try:
        vae = AutoencoderKL.from_pretrained(name, local_files_only=True)
    except OSError as err:
        if _offline():
            raise _vae_unavailable(name, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from err
        try:
            vae = AutoencoderKL.from_pretrained(name)
        except OSError as e:
            raise _vae_unavailable(name, str(e)) from e
    cached = try_to_load_from_cache(name, "config.json")
    return _tag(vae, name=name, preset=preset, source=f"https://huggingface.co/{name}",
                revision=_revision(cached if isinstance(cached, str) else None))


def _vae_unavailable(name: str, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"VAE weights {name!r} (Hugging Face Hub, https://huggingface.co/{name}) are unavailable: "
        f"{why}. Offline, point at a local copy: pass a folder holding its config.json and "
        f"diffusion_pytorch_model.safetensors as the VAE name (e.g. --vae /path/to/sd-vae-ft-mse), "
        f"or fill the Hugging Face cache (HF_HOME) with `hf download {name}` on a machine online.")


# ---- DINOv2 ----------------------------------------------------------------------------------


def build_dinov2(arch: str = "vit_base_patch14_reg4_dinov2", img_size: int = 224, **kw):
    """A timm DINOv2-with-registers ViT (random weights) at a fixed input size.

    timm's `*_reg4_dinov2` models are `no_embed_class` with 4 register tokens, i.e. the hub
    `DinoVisionTransformer` with the class slot of the position embedding folded into the CLS token.
    Fixing `img_size` makes the 37x37 -> grid position-embedding resample happen once at load
    (bicubic, antialias: `checkpoint_filter_fn`), which is bitwise what the hub model does on every
    forward (golden `dinov2_layers` notes). `kw` override e.g. embed_dim, depth, num_heads, or
    weight_init="skip" when a state dict will overwrite every parameter anyway.
    """
    import timm

    return timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **kw)


def tiny_dinov2(img_size: int = 224):
    """ViT/14 with 4 registers, depth 12 (so layers 8..11 exist), width 32, 2 heads, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build_dinov2(img_size=img_size, embed_dim=32, depth=12, num_heads=2, init_values=1.0)


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_dinov2_hub_state(state: str | Path | dict, model: nn.Module) -> nn.Module:
    """Load an official torch.hub DINOv2 state dict (or a timm-format one) into a timm ViT, strictly.

    timm's `checkpoint_filter_fn` converts the hub layout (drops `mask_token`, `register_tokens` ->
    `reg_token`, `cls_token += pos_embed[:, 0]`) and resamples `pos_embed` to the model's grid.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not isinstance(state, dict):
        state = read_state_file(state)
    model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
    return model


def load_dinov2(name: str = DEFAULT_DINOV2, preset: str = "real", img_size: int = 224,
                weights: str | Path | None = None):
    """timm DINOv2 ViT at input size `img_size`, eval, fp32, matching torch.hub `dinov2_vitb14_reg`.

    Weights, first found: `weights` (a local file), `$REGLUE_DINOV2_WEIGHTS`, the HF Hub
    (`timm/<name>`, cache first, then the network unless HF_HUB_OFFLINE is set).
    """
    if preset == "tiny":
        return _tag(tiny_dinov2(img_size), name=name, preset=preset, source=TINY_LABEL, revision=None)
    if preset != "real":
        raise ValueError(f"unknown weights preset {preset!r}: use 'real' or 'tiny'")
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"{name!r} is not a timm model with pretrained weights "
                         f"(the default is {DEFAULT_DINOV2!r})")
    local = weights or os.environ.get(DINOV2_WEIGHTS_ENV)
    path = local or _hub_file(cfg.hf_hub_id, cfg.url, name)
    model = load_dinov2_hub_state(path, build_dinov2(cfg.architecture, img_size, weight_init="skip"))
    source = str(Path(local).resolve()) if local else f"https://huggingface.co/{cfg.hf_hub_id}"
    return _tag(model, name=name, preset=preset, source=source, revision=None if local else _revision(path))


def _hub_file(repo: str, url: str, name: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, "model.safetensors", local_files_only=True)
    except OSError:
        why = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        if not _offline():
            try:
                return hf_hub_download(repo, "model.safetensors")
            except OSError as e:
                why = str(e)
    raise WeightsUnavailable(
        f"DINOv2 weights {name!r} (Hugging Face Hub {repo}, or the official torch.hub file {url}) "
        f"are unavailable: {why}. Offline, point at a local copy: set {DINOV2_WEIGHTS_ENV}=/path/to/"
        f"dinov2_vitb14_reg4_pretrain.pth (the torch.hub file) or /path/to/model.safetensors (the "
        f"timm file), pass it as the DINOv2 weights option, or fill the Hugging Face cache (HF_HOME) "
        f"with `hf download {repo}` on a machine online.")
