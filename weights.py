"""Pretrained weights and downloaded files, one home: the SD-VAE (diffusers), the vision encoder (timm:
DINOv2 with or without registers, DINOv3, CLIP; default DINOv2 ViT-B/14 with registers, the paper's), and
the files fetched once into reglue's cache folder (the FID Inception, the ADM reference batches).

`preset="real"` loads the published weights (HF Hub cache first, then the network unless offline;
or a local copy). `preset="tiny"` builds the same architectures at tiny width with seeded random
weights: reproducible, offline, and NOT for real use (tests and the demo only).

Offline: nothing waits on network retries. Before any download the host is probed once per process
(a few seconds at most); HF_HUB_OFFLINE=1 skips even that. Every error names the file, its source,
the option or environment variable that points at a local copy, and `reglue download`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
"""The encoder the reference caches latents with (edm2 `encoders.py:54`); decoding uses -ema."""
DEFAULT_ENCODER = "vit_base_patch14_reg4_dinov2.lvd142m"
"""timm's copy of torch.hub `dinov2_vitb14_reg` (reference `utils.py:64`)."""
ENCODER_WEIGHTS_ENV = "REGLUE_ENCODER_WEIGHTS"
"""Environment variable naming a local encoder weights file (the original release's or timm's)."""
DINOV2_WEIGHTS_ENV = "REGLUE_DINOV2_WEIGHTS"
"""Its former name, still read (after ENCODER_WEIGHTS_ENV)."""
TINY_SEED = 0
TINY_LABEL = "tiny preset: seeded random weights, NOT for real use"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


NETWORK_TIMEOUT = 3.0
"""Seconds the reachability probe waits (name lookup and TCP connect) before calling a host offline."""
OFFLINE_HINT = ("set HF_HUB_OFFLINE=1 to skip network attempts; `reglue download` fetches every file on a "
                "machine online")


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it at call time as well.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def _reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port opens within NETWORK_TIMEOUT (the name lookup included: it runs
    in a thread, since getaddrinfo has no timeout of its own)."""
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT)
    return bool(ok)


def why_offline(url: str) -> str | None:
    """None when `url`'s host can be reached, else why not (said in every offline error)."""
    if _offline():
        return "HF_HUB_OFFLINE is set"
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not _reachable(parts.hostname or "", port):
        return f"{parts.hostname} cannot be reached (no network?)"
    return None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


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


VAE_DOWNSAMPLE = 8
"""Image side / latent side of an SD-VAE; every latent and patch grid in reglue is derived from it."""


def load_vae(name: str = DEFAULT_VAE, preset: str = "real"):
    """diffusers `AutoencoderKL` in eval mode, fp32. `name`: an HF Hub id or a local folder."""
    if preset == "tiny":
        return _tag(check_vae(tiny_vae(), name), name=name, preset=preset, source=TINY_LABEL, revision=None)
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
        return _tag(check_vae(vae, name), name=name, preset=preset, source=str(Path(name).resolve()), revision=None)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"VAE folder {name} does not exist (--vae takes a Hugging Face id such as "
                                f"{DEFAULT_VAE} or a local diffusers folder)")
    try:
        vae = AutoencoderKL.from_pretrained(name, local_files_only=True)
    except OSError as err:
        # diffusers' own message ("does not appear to have a file named config.json") misleads: say what happened.
        if why := why_offline(hub_endpoint()):
            raise _vae_unavailable(name, why) from None
        try:
            vae = AutoencoderKL.from_pretrained(name)
        except OSError as e:
            raise _vae_unavailable(name, f"the download failed ({e})") from err
    cached = try_to_load_from_cache(name, "config.json")
    return _tag(check_vae(vae, name), name=name, preset=preset, source=f"https://huggingface.co/{name}",
                revision=_revision(cached if isinstance(cached, str) else None))


def check_vae(vae, name: str):
    """Refuse a VAE that is not an SD-VAE-like AutoencoderKL downsampling by 8: any other one would load and
    give latents of the wrong size or meaning without a word."""
    stages = len(getattr(vae.config, "block_out_channels", ()))
    factor = 2 ** (stages - 1) if stages else 0
    if type(vae).__name__ != "AutoencoderKL" or factor != VAE_DOWNSAMPLE:
        raise ValueError(f"VAE {name} is a {type(vae).__name__} that downsamples by {factor}, not an AutoencoderKL "
                         f"that downsamples by {VAE_DOWNSAMPLE} as the SD-VAE does; pass --vae {DEFAULT_VAE} "
                         "(encoding) or stabilityai/sd-vae-ft-ema (decoding), or a local copy of one")
    return vae


def _vae_unavailable(name: str, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"VAE weights {name!r} are not in the local Hugging Face cache and {why}. Pass a local copy with "
        f"--vae DIR (a folder holding its config.json and diffusion_pytorch_model.safetensors, e.g. from "
        f"`hf download {name} --local-dir DIR`), or set HF_HOME to a Hugging Face cache that holds "
        f"https://huggingface.co/{name}; {OFFLINE_HINT}.")


# ---- the vision encoder (DINOv2, DINOv3, CLIP, ... through timm) ------------------------------


@dataclass(frozen=True)
class EncoderArch:
    """What timm says about a vision encoder: its architecture (read from the model built on the meta
    device, so no weights and no memory) and the preprocessing of its pretrained config."""

    name: str
    """Canonical timm id `architecture.tag` (a bare architecture name resolves to its default tag)."""
    architecture: str
    """timm entrypoint, e.g. vit_base_patch16_dinov3."""
    model_class: str
    """timm class: VisionTransformer (DINOv2, CLIP) or Eva (DINOv3)."""
    patch_size: int
    width: int
    """Token width D: the [CLS] token, the REPA target, one compressor layer."""
    depth: int
    """Number of transformer blocks."""
    heads: int
    registers: int
    """Prefix tokens after the [CLS] token (DINOv2-reg4 and DINOv3: 4), dropped from the patch tokens."""
    layer_scale: bool
    """Whether the blocks have LayerScale (the tiny preset sets it to 1.0, as a trained model's is far from 0)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    """Resize filter of the pretrained config (all supported encoders: bicubic)."""
    pretrained_size: int
    """Input side of the pretrained config (DINOv2 518, DINOv3 256, CLIP 224); reglue feeds grid * patch."""
    hf_hub_id: str | None
    hf_hub_filename: str
    url: str | None
    """The original (non-Hub) weights URL, when timm knows one."""
    license: str | None


@functools.cache
def encoder_arch(name: str) -> EncoderArch:
    """Describe the timm encoder `name`; ValueError (naming what works) if timm lacks it or it does
    not fit reglue's contract: a ViT whose tokens go through a final LayerNorm and start with a [CLS] token."""
    import timm
    from timm.models import get_pretrained_cfg

    examples = "e.g. vit_base_patch14_reg4_dinov2.lvd142m, vit_base_patch16_dinov3.lvd1689m, " \
               "vit_large_patch14_clip_224.openai (docs/encoders.md lists them)"
    arch_name = name.split(".", 1)[0]
    if not timm.is_model(arch_name):
        raise ValueError(f"encoder {name!r} is not a timm model; {examples}")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag
        raise ValueError(f"encoder {name!r}: {e} Tags: {timm.list_pretrained(arch_name + '.*')}") from None
    if cfg is None:
        raise ValueError(f"encoder {name!r} has no pretrained config in timm; {examples}")
    with torch.device("meta"):
        model = timm.create_model(arch_name, pretrained=False, num_classes=0)
    why = (not all(hasattr(model, a) for a in ("blocks", "patch_embed", "forward_intermediates")) and "it is not a ViT"
           or getattr(model, "cls_token", None) is None and "it has no [CLS] token"
           or isinstance(getattr(model, "norm", nn.Identity()), nn.Identity) and "its tokens have no final norm"
           or len(set(model.patch_embed.patch_size)) != 1 and "its patches are not square")
    if why:
        raise ValueError(f"encoder {name!r} ({type(model).__name__}) does not fit reglue: {why}; the cache stores "
                         f"the [CLS] token and patch tokens after the final LayerNorm; {examples}")
    return EncoderArch(
        name=f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture, architecture=cfg.architecture,
        model_class=type(model).__name__, patch_size=model.patch_embed.patch_size[0], width=model.embed_dim,
        depth=len(model.blocks), heads=model.blocks[0].attn.num_heads, registers=model.num_prefix_tokens - 1,
        layer_scale=any("gamma" in k for k, _ in model.blocks[0].named_parameters()),
        mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation,
        pretrained_size=cfg.input_size[-1], hf_hub_id=cfg.hf_hub_id or None,
        hf_hub_filename=cfg.hf_hub_filename or "model.safetensors", url=cfg.url or None, license=cfg.license)


def build_encoder(name: str = DEFAULT_ENCODER, img_size: int = 224, **kw) -> nn.Module:
    """The timm model `name` (random weights) at a fixed input size, no head.

    For DINOv2 (`*_reg4_dinov2` is `no_embed_class` with 4 registers: the hub `DinoVisionTransformer`
    with the class slot of the position embedding folded into the CLS token), fixing `img_size` makes
    the 37x37 -> grid position-embedding resample happen once at load (bicubic, antialias:
    `checkpoint_filter_fn`), which is bitwise what the hub model does on every forward (golden
    `dinov2_layers`). `kw` override e.g. embed_dim, depth, num_heads; weight_init="skip" is dropped
    for models that have no such option (their init is cheap next to loading)."""
    import timm

    arch = encoder_arch(name)
    if arch.model_class != "VisionTransformer":
        kw.pop("weight_init", None)
    return timm.create_model(arch.architecture, pretrained=False, img_size=img_size, num_classes=0, **kw)


def tiny_encoder(name: str = DEFAULT_ENCODER, img_size: int = 56) -> nn.Module:
    """`name`'s architecture (patch, depth, [CLS] and registers, rotary or absolute positions) at
    width 32 with 2 heads, seeded; LayerScale 1.0 where the model has LayerScale."""
    arch = encoder_arch(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build_encoder(name, img_size, embed_dim=32, num_heads=2,
                             **({"init_values": 1.0} if arch.layer_scale else {}))


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_encoder_state(state: str | Path | dict, model: nn.Module, name: str | None = None) -> nn.Module:
    """Load an original-format (torch.hub DINOv2 / DINOv3, OpenAI CLIP) or timm-format state dict into a
    timm encoder, strictly, through timm's own converter for the model's class (`checkpoint_filter_fn`:
    e.g. for DINOv2 it drops `mask_token`, renames `register_tokens`, folds the class slot of `pos_embed`
    into `cls_token` and resamples `pos_embed` to the model's grid).

    A file of another architecture is refused with one line naming what does not fit."""
    source = "the state dict" if isinstance(state, dict) else str(state)
    if not isinstance(state, dict):
        state = read_state_file(state)
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    try:  # (quiet: timm's DINOv3 converter prints a line per block when it drops the release's all-zero qkv bias)
        with contextlib.redirect_stdout(io.StringIO()):
            state = importlib.import_module(type(model).__module__).checkpoint_filter_fn(dict(state), model)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"{source} is not a {name} weights file (timm's converter failed: "
                         f"{type(e).__name__}: {e}); pass the file of that encoder") from None
    for key in ("head.weight", "head.bias"):  # a classifier / projection head: reglue reads tokens only
        state.pop(key, None)
    wanted = model.state_dict()
    missing, unexpected = sorted(wanted.keys() - state.keys()), sorted(state.keys() - wanted.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(wanted[k].shape)}" for k in wanted.keys() & state.keys()
              if state[k].shape != wanted[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not hold {name} weights: {len(missing)} missing keys {missing[:2]}, "
                         f"{len(unexpected)} unexpected {unexpected[:2]}, {len(shapes)} of another shape "
                         f"{sorted(shapes)[:2]}; pass the weights file of {name}, or the --encoder it belongs to")
    model.load_state_dict(state, strict=True)
    return model


def load_encoder(name: str = DEFAULT_ENCODER, preset: str = "real", img_size: int = 224,
                 weights: str | Path | None = None) -> nn.Module:
    """The timm encoder `name` at input size `img_size`, eval, fp32, with its published weights
    (`preset="real"`) or the seeded tiny preset.

    Weights, first found: `weights` (a local file), `$REGLUE_ENCODER_WEIGHTS` (or the older
    `$REGLUE_DINOV2_WEIGHTS`), the HF Hub (`timm/<name>`, cache first, then the network unless
    HF_HUB_OFFLINE is set)."""
    arch = encoder_arch(name)
    if preset == "tiny":
        return _tag(tiny_encoder(name, img_size), name=arch.name, preset=preset, source=TINY_LABEL, revision=None)
    if preset != "real":
        raise ValueError(f"unknown weights preset {preset!r}: use 'real' or 'tiny'")
    local = weights or os.environ.get(ENCODER_WEIGHTS_ENV) or os.environ.get(DINOV2_WEIGHTS_ENV)
    path = local or _hub_file(arch)
    model = load_encoder_state(path, build_encoder(arch.name, img_size, weight_init="skip"), arch.name)
    source = str(Path(local).resolve()) if local else f"https://huggingface.co/{arch.hf_hub_id}"
    return _tag(model, name=arch.name, preset=preset, source=source, revision=None if local else _revision(path))


def _hub_file(arch: EncoderArch) -> str:
    from huggingface_hub import hf_hub_download

    if not arch.hf_hub_id:
        raise WeightsUnavailable(f"encoder weights {arch.name!r} are not on the Hugging Face Hub (timm lists "
                                 f"{arch.url or 'no URL'}): pass a local file with --encoder-weights FILE or "
                                 f"{ENCODER_WEIGHTS_ENV}=FILE")
    repo, filename = arch.hf_hub_id, arch.hf_hub_filename
    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except OSError:
        why = why_offline(hub_endpoint())
        if why is None:
            try:
                return hf_hub_download(repo, filename)
            except OSError as e:
                why = f"the download failed ({e})"
    original = f", or the original file {arch.url}" if arch.url else ""
    raise WeightsUnavailable(
        f"encoder weights {arch.name!r} are not in the local Hugging Face cache and {why}. Pass a local copy with "
        f"--encoder-weights FILE or set {ENCODER_WEIGHTS_ENV}=FILE ({filename} of https://huggingface.co/{repo}"
        f"{original}), or set HF_HOME to a Hugging Face cache that holds it (`hf download {repo}` on a machine "
        f"online); {OFFLINE_HINT}.")


# Former names of the functions above (the encoder used to be DINOv2-B only), for code written against them.
DEFAULT_DINOV2 = DEFAULT_ENCODER
build_dinov2 = build_encoder
load_dinov2 = load_encoder
load_dinov2_hub_state = load_encoder_state


# ---- files fetched once into reglue's cache folder (FID Inception, ADM reference batches) -----------

def cache_dir() -> Path:
    """reglue's cache folder: $XDG_CACHE_HOME/reglue (default ~/.cache/reglue)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reglue"


def find_file(name: str, url: str, *, given: str | os.PathLike | None, env: str, option: str, what: str,
              download: bool = True) -> Path:
    """A file found as every downloaded file is: `given` (the file, or a folder holding `name`), else the
    environment variable `env` (likewise), else reglue's cache folder, where it is downloaded once from
    `url` (atomically) when missing and `download`."""
    source = given or os.environ.get(env)
    file = Path(source).expanduser() if source else cache_dir() / name
    if file.is_dir():
        file = file / name
    if file.is_file():
        return file
    if source or not download:
        reason = "it is not there"
    elif why := why_offline(url):
        reason = why
    else:
        try:
            download_file(url, file)
            return file
        except OSError as err:
            reason = f"the download failed ({err})"
    raise WeightsUnavailable(
        f"{what} {file} not found: {reason}. Get {url} and pass it with {option} FILE or set {env}=FILE "
        f"(a folder holding {name} also works), or put it at {cache_dir() / name}; {OFFLINE_HINT}.")


def download_file(url: str, file: Path) -> None:
    """`url` into `file`, with a progress bar; a half-written file never has the final name."""
    from tqdm.auto import tqdm

    file.parent.mkdir(parents=True, exist_ok=True)
    part = file.with_name(file.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
        with tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                  desc=f"downloading {file.name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    os.replace(part, file)
