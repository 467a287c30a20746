"""The semantic compressor and the DINOv2 norm stats, with safe loaders for the official files.

REGLUE compresses the four normed DINOv2 layers (8..11, 4 x 768 = 3072 channels on the 16 x 16
patch grid), standardized per channel, to 16 channels with the encoder half of a conv autoencoder
(reference compressor.py; reference-implementation.md §3). Layer keys equal the reference's, so
the official `compression_model.pth` (a DDP state dict, every key prefixed `module.`) loads strictly.

Files are read with `torch.load(weights_only=True)`: tensors, containers and primitives only, plus
the few numpy globals a norm-stats file needs. Nothing else in a pickle is ever executed.

Both files are tied to the encoder features they were made from (model, layers, width, grid):
reglue records that in them where the official readers never look (the norm stats' extra key
`encoder`; the compressor state dict's `_metadata`), and `check_made_for` refuses a file of another
encoder. Files without a record are taken as the official ones, made from DINOv2-B with registers.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reglue.weights import DEFAULT_ENCODER

HF_REPO = "https://huggingface.co/giorgospets/reglue"  # the official compressor and SiT-XL/2 (README:69,128)


# ---- file helpers (one home; trainer.checkpoints uses them too) -------------------------------

class UnsafeFileError(pickle.UnpicklingError, ValueError):
    """A file's pickle names a global outside the allow-list; it was not loaded (a ValueError: the
    command line reports it in one line)."""


def safe_load(path: str | os.PathLike, allowed: Sequence[Any] = (), *, mmap: bool = False,
              hint: str = "") -> Any:
    """`torch.load(weights_only=True)` on CPU with exactly the extra globals in `allowed`.

    A file that is not a torch file (text, truncated, damaged) raises a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. {hint}".strip())
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # not a refused global: a damaged or foreign file
            raise ValueError(f"{path} is not a readable torch file (truncated, damaged or another format: "
                             f"{_first_line(e)}). {hint}".strip()) from None
        raise UnsafeFileError(
            f"refused to load {path}: its pickle needs a global outside the allow-list "
            f"{[getattr(g, '__qualname__', g) for g in allowed]}, and unpickling it could run arbitrary "
            f"code. If you trust the file, re-save its tensors as a plain state dict. "
            f"Details: {_torch_reason(e)}") from None
    except (RuntimeError, EOFError, KeyError, IndexError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch file (truncated, damaged or another format: "
                         f"{type(e).__name__}: {_first_line(e)}). {hint}".strip()) from None


def _first_line(e: BaseException) -> str:
    """The first line of an exception message, cut short (torch's run to many lines)."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _torch_reason(e: BaseException) -> str:
    """What torch's weights-only refusal says beyond its boilerplate (e.g. `unsupported GLOBAL posix.system`)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.removeprefix("WeightsUnpickler error: ").strip() for line in str(e).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith(boiler))[:300] or _first_line(e)


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `<path>.tmp`, then rename: a reader never sees a half-written file (a failed write
    removes the tmp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch_save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save whose failed writes raise the OSError naming the file (ENOSPC on a full disk). torch's
    zip writer swallows its file object's OSError and raises a RuntimeError ("unexpected pos") instead."""

    class Sink:
        def __init__(self, f):
            self.f, self.error = f, None

        def write(self, data):
            try:
                return self.f.write(data)
            except OSError as e:
                self.error = e
                raise

        def flush(self):
            self.f.flush()

    try:
        with open(path, "wb") as f:
            sink = Sink(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


# ---- the network (reference compressor.py) ---------------------------------------------------

class ResidualBlock(nn.Module):
    """relu(bn1(conv1 x)) -> bn2(conv2 .) -> + x -> relu; 3x3 convs (compressor.py:4-21)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))  # (B, C, g, g)
        return torch.relu(self.bn2(self.conv2(out)) + x)  # (B, C, g, g)


class ConvStack(nn.Module):
    """3x3 convs through `channels`, a ResidualBlock after every conv but the last; no activation
    after the first conv and a linear output (compressor.py:24-62). Key prefix `model.`."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if i < len(channels) - 2:
                layers.append(ResidualBlock(c_out))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, channels[0], g, g) -> (B, channels[-1], g, g)


class EncoderDecoder(nn.Module):
    """The autoencoder: `encoder` through `build_channel_list`, `decoder` back through it reversed."""

    def __init__(self, build_channel_list: Sequence[int] = (3072, 256, 16)):
        super().__init__()
        if len(build_channel_list) < 2:
            raise ValueError(f"build_channel_list needs at least [in, out]; got {list(build_channel_list)}")
        self.build_channel_list = list(build_channel_list)
        self.encoder = ConvStack(self.build_channel_list)
        self.decoder = ConvStack(self.build_channel_list[::-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)  # (B, c, g, g)
        return self.decoder(latent), latent  # (B, C, g, g), (B, c, g, g)


def compressor_channels(state: dict[str, torch.Tensor]) -> list[int]:
    """Recover `build_channel_list` from the encoder's conv shapes in a state dict."""
    convs = sorted((int(k.split(".")[2]), v) for k, v in state.items()
                   if k.startswith("encoder.model.") and k.count(".") == 3 and k.endswith(".weight"))
    if not convs:
        raise ValueError("not a compressor state dict: no 'encoder.model.<i>.weight' keys")
    return [convs[0][1].shape[1]] + [w.shape[0] for _, w in convs]


def load_compressor(path: str | os.PathLike) -> EncoderDecoder:
    """The official `compression_model.pth` (or ours, same format) as an eval-mode EncoderDecoder.

    Accepts keys with or without the DDP `module.` prefix; channels are inferred from the shapes. The
    record `save_compressor` wrote (or None) is `model.reglue_record`."""
    state = safe_load(path, hint=f"Download compression_model.pth from {HF_REPO} or train one "
                                 "with `reglue train-compressor`.")
    record = getattr(state, "_metadata", {}).get("", {}).get("reglue")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = EncoderDecoder(compressor_channels(state))
    model.load_state_dict(state, strict=True)
    model.reglue_record = record
    return model.eval()


def save_compressor(path: str | os.PathLike, model: EncoderDecoder, record: dict | None = None) -> None:
    """Write the official format: a plain state dict whose keys carry DDP's `module.` prefix.

    `record` (what the compressor was made from: `{"encoder": CacheMeta.encoder_key(), "norm_stats": sha256}`)
    goes into the state dict's `_metadata`, which torch keeps through save/load and which the official
    loader (train.py:98-114, a strict `load_state_dict` of a copied dict) never sees."""
    state = OrderedDict((f"module.{k}", v.detach().cpu()) for k, v in model.state_dict().items())
    if record is not None:
        state._metadata = {"": {"reglue": record}}
    atomic_save(state, path)


def check_made_for(path: str | os.PathLike, recorded: dict | None, key: dict, where: str) -> None:
    """Refuse norm stats or a compressor made from other features than those at `where` (a cache URL, or
    `--src DIR through --encoder X`) whose key is `key` (store.make_encoder_key), in one line naming both."""
    if recorded == key or (recorded is None and key["encoder"] == DEFAULT_ENCODER):
        return
    fix = "use files made from these features (`reglue train-compressor`)"
    if recorded is None:
        raise ValueError(f"{path} records no encoder, as the official files (made from {DEFAULT_ENCODER}, i.e. "
                         f"dinov2_vitb14_reg) do, but {where} gives features of {describe_key(key)}: {fix}")
    raise ValueError(f"{path} was made from features of {describe_key(recorded)}, but {where} gives features of "
                     f"{describe_key(key)}: {fix}")


def describe_key(key: dict) -> str:
    """`encoder (preset, layers a..b, width D, grid g)` for one-line errors."""
    layers = key.get("layers") or [0]
    span = f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else layers
    return (f"{key.get('encoder')} ({key.get('preset')}, layers {span}, width {key.get('width')}, "
            f"grid {key.get('grid')})")


# ---- norm stats (reference calc_norm_stats.py, train.py:333) --------------------------------

# The official file is `torch.save({'mean': ndarray, 'std': ndarray})` of float32 arrays written by
# NumPy >= 2; rebuilding those arrays needs exactly these globals (and torch's built-in _codecs.encode).
NORM_STATS_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float32DType)


@dataclass(frozen=True)
class NormStats:
    """Per-channel mean and population std of the concatenated normed DINOv2 layers."""

    mean: torch.Tensor
    """(C,) float32, C = len(layers) * dino_dim, channel order [L8 | L9 | L10 | L11]."""
    std: torch.Tensor
    """(C,) float32, strictly positive."""
    encoder: dict | None = None
    """What they were computed from (CacheMeta.encoder_key()); None in the official files."""

    def __post_init__(self):
        for name in ("mean", "std"):
            object.__setattr__(self, name, torch.as_tensor(np.asarray(getattr(self, name)), dtype=torch.float32))
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ValueError(f"norm stats need two (C,) vectors; "
                             f"got {tuple(self.mean.shape)} and {tuple(self.std.shape)}")
        if not bool((self.std > 0).all()):
            raise ValueError("norm stats std must be > 0 in every channel")
        if not bool(self.mean.isfinite().all() & self.std.isfinite().all()):
            raise ValueError("norm stats must be finite in every channel")


def load_norm_stats(path: str | os.PathLike) -> NormStats:
    """The official `dino_mean_std_<layers>_<res>.pth` (or ours, same format), never executing pickle code."""
    d = safe_load(path, NORM_STATS_GLOBALS, hint="The official file for layers 8..11 at 256 px is "
                  "norm_stats/dino_mean_std_8_9_10_11_256.pth in the giorgospets/reglue repository.")
    if not isinstance(d, dict) or not {"mean", "std"} <= d.keys():
        raise ValueError(f"{path} is not a norm-stats file (expected a dict with 'mean' and 'std')")
    return NormStats(d["mean"], d["std"], d.get("encoder"))


def save_norm_stats(path: str | os.PathLike, mean: Any, std: Any, encoder: dict | None = None) -> None:
    """Write the official format: `{'mean', 'std'}` float32 numpy arrays in a torch zip file, plus the
    `encoder` they were computed from (CacheMeta.encoder_key(); the official reader only takes mean and std)."""
    stats = NormStats(mean, std)
    atomic_save({"mean": stats.mean.numpy(), "std": stats.std.numpy(), **({"encoder": encoder} if encoder else {})},
                path)


def compressor_files(compressor: str | os.PathLike, norm_stats: str | os.PathLike | None) -> tuple[Path, Path]:
    """(compression_model.pth, its norm stats): `compressor` is the file, or a `reglue train-compressor`
    folder holding both (then `norm_stats` may be left out)."""
    compressor = Path(compressor)
    if compressor.is_dir():
        folder, compressor = compressor, compressor / "compression_model.pth"
        if not compressor.is_file():
            raise FileNotFoundError(f"{folder} holds no compression_model.pth: finish `reglue train-compressor "
                                    f"--out {folder}` (rerun it to resume), or pass the file")
        if norm_stats is None:
            found = sorted(folder.glob("dino_mean_std_*.pth"))
            if len(found) != 1:
                raise FileNotFoundError(f"{folder} holds {len(found)} dino_mean_std_*.pth files; pass --norm-stats")
            norm_stats = found[0]
    if norm_stats is None:
        raise ValueError(f"{compressor} needs its norm stats: pass --norm-stats dino_mean_std_*.pth")
    return compressor, Path(norm_stats)


# ---- the compress step -----------------------------------------------------------------------

def compress(encoder: nn.Module, layers: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """(B, P, C) multi-layer patch tokens -> (B, c, g, g) compressed features at the DINO grid.

    Standardize per channel, lay the tokens out as a (C, g, g) map, run the frozen encoder
    (reference train.py:333-337). The bilinear upsample to the latent grid is the trainer's."""
    B, P, C = layers.shape
    g = math.isqrt(P)
    if g * g != P or C != stats.mean.numel():
        raise ValueError(f"layers {tuple(layers.shape)} need a square token count and {stats.mean.numel()} "
                         "channels (the norm stats' width)")
    x = (layers.float() - stats.mean.to(layers.device)) / stats.std.to(layers.device)  # (B, P, C)
    x = x.transpose(1, 2).reshape(B, C, g, g)  # (B, C, g, g), token p = row * g + col
    return encoder(x)  # (B, c, g, g)
