"""Model files: our EMA snapshot for sampling, and safe import of the official REGLUE checkpoint.

Every file is read with `torch.load(weights_only=True)` (pipeline.compressor.safe_load): tensors,
dicts, lists, tuples and primitives, plus an explicit allow-list of globals. The only global allowed
here is `argparse.Namespace`, which the official checkpoint pickles as its `args` (train.py:381); it
is rebuilt as a plain attribute bag, with no code of its own run. Any other global is refused.

Formats:
- ours (snapshot or training checkpoint): a dict with `format: "reglue"`, `model_kwargs` (SiT
  kwargs), `method` (Method fields), `meta` (latent_channels, resolution, vae_scaling_factor, ...),
  `step`, and `ema` (the EMA state dict). A training checkpoint folder (trainer.runfolder) holds this
  payload as `ema.pt` next to Accelerate's state; `load_model` accepts the folder.
- official: `{'model', 'ema', 'opt', 'args': argparse.Namespace, 'steps'}` (train.py:376-387),
  whose state-dict keys equal our SiT's, so it loads strictly with no mapping.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reglue.pipeline.compressor import atomic_save, safe_load
from reglue.trainer.models import SiT, preset_kwargs, sit_kwargs_from_reference
from reglue.trainer.objective import Method, get_method, reference_lam_schedule

FORMAT = "reglue"
FORMAT_VERSION = 1
SAFE_GLOBALS = (argparse.Namespace,)  # the official checkpoint's `args`; nothing else
REQUIRED_META = ("latent_channels", "resolution", "vae_scaling_factor")
EMA_FILE = "ema.pt"  # the snapshot payload inside a training checkpoint folder
PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class ModelInfo:
    """What a sampler needs to know about a loaded model."""

    method: Method
    """The method it was trained with (features kind and channels, CLS, REPA)."""
    latent_channels: int
    """VAE latent channels at the front of the model's input (the rest are features)."""
    feature_channels: int
    """Semantic channels after the latent (0 for sit / repa / reg)."""
    cls_dim: int | None
    """Width of the CLS token state, or None without one."""
    num_classes: int
    """Class count; the null (unconditional) label is this id."""
    resolution: int
    """Image side in pixels."""
    vae_scaling_factor: float
    """Latent = VAE posterior sample times this (0.18215 for SD-VAE)."""
    step: int
    """Optimizer steps the weights have seen."""
    model_kwargs: dict
    """The SiT kwargs, preset widths included, that rebuild the model."""
    meta: dict
    """The metadata saved with the weights (for an official checkpoint: its args as a dict)."""


def snapshot_payload(model: SiT, *, model_kwargs: dict, method: Method, step: int, meta: dict) -> dict:
    """The dict `save_snapshot` writes (and a training checkpoint folder holds as EMA_FILE).

    `model` is the EMA; `model_kwargs` must rebuild it (`SiT(**model_kwargs)`); `meta` holds plain
    values (numbers, strings, None, lists, dicts) and at least REQUIRED_META."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"snapshot meta lacks {missing} (needed to sample from it)")
    _check_plain(meta, "meta")
    implied = (meta["latent_channels"] + method.feature_channels, method.cls, method.repa)
    if (model.in_channels, model.cls_dim is not None, bool(model.z_dims)) != implied:
        raise ValueError(f"the model (in_channels={model.in_channels}, cls_dim={model.cls_dim}, z_dims={model.z_dims}) "
                         f"does not match method {method}")
    return {"format": FORMAT, "version": FORMAT_VERSION, "model_kwargs": dict(model_kwargs),
            "method": asdict(method), "step": int(step), "meta": dict(meta),
            "ema": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def _check_plain(value, where: str) -> None:
    """Refuse at save time what the safe loader would refuse at load time (e.g. a Path)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}; snapshot metadata must be plain values "
                        "(str, int, float, bool, None, list, tuple, dict)")


def save_snapshot(path: str | os.PathLike, model: SiT, *, model_kwargs: dict, method: Method, step: int,
                  meta: dict) -> None:
    """Write the small EMA-only file sampling reads, atomically (tmp file, then rename)."""
    atomic_save(snapshot_payload(model, model_kwargs=model_kwargs, method=method, step=step, meta=meta), path)


def load_model(path: str | os.PathLike) -> tuple[SiT, ModelInfo]:
    """The EMA weights of our snapshot / training checkpoint folder or of an official checkpoint,
    strictly loaded into an eval-mode SiT on the CPU, and what they are."""
    path = Path(path)
    if path.is_dir():
        path = path / EMA_FILE
    ckpt = safe_load(path, SAFE_GLOBALS, mmap=True, hint="Pass a snapshot written by `reglue train` or "
                     "an official REGLUE checkpoint (https://huggingface.co/giorgospets/reglue).")
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        kwargs, method, meta = ckpt["model_kwargs"], Method.from_dict(ckpt["method"]), ckpt["meta"]
        step, latent_channels = ckpt["step"], meta["latent_channels"]
        kwargs = {**kwargs, "z_dims": tuple(kwargs.get("z_dims", ()))}
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace) and "ema" in ckpt:
        kwargs, method, meta = _official_config(ckpt["args"], ckpt["ema"])
        step, latent_channels = ckpt["steps"], 4  # the reference's VAE channels are fixed (train.py:169)
    else:
        raise ValueError(f"{path} is neither a reglue snapshot nor an official REGLUE checkpoint "
                         "({'model','ema','opt','args','steps'})")
    with torch.device("meta"):  # no init work; the weights arrive with load_state_dict(assign=True)
        model = SiT(**kwargs)
    model.load_state_dict(ckpt["ema"], strict=True, assign=True)
    info = ModelInfo(method=method, latent_channels=latent_channels,
                     feature_channels=model.in_channels - latent_channels, cls_dim=model.cls_dim,
                     num_classes=model.num_classes, resolution=meta["resolution"],
                     vae_scaling_factor=meta["vae_scaling_factor"], step=int(step), model_kwargs=kwargs, meta=meta)
    return model.eval(), info


def _official_config(args: argparse.Namespace, ema: dict) -> tuple[dict, Method, dict]:
    """SiT kwargs, method and meta of an official checkpoint, from its args (train.py:155-170) and
    the projector widths in its weights (z_dims = the DINOv2 width, train.py:160)."""
    a = vars(args)
    z_dims = [ema[f"projectors.{i}.4.weight"].shape[0] for i in range(len(ema)) if f"projectors.{i}.4.weight" in ema]
    reference = dict(input_size=a["resolution"] // 8, num_classes=a["num_classes"], in_channels=4 + a["feat_channels"],
                     z_dims=z_dims, encoder_depth=a["encoder_depth"], qk_norm=a.get("qk_norm", False))
    kwargs = {**preset_kwargs(a["model"]), **sit_kwargs_from_reference(reference)}
    layers = a["interm_layers"]  # a list once train.py:174 has parsed it, the raw "8,9,10,11" before
    layers = [int(x) for x in layers.split(",")] if isinstance(layers, str) else layers
    hidden = int(str(a["encoder_channel_list"]).split(",")[1])
    # The run's lambda: the reference applies its XL schedule when "XL" is in the model name (train.py:349-354).
    method = get_method("reglue", feature_channels=a["feat_channels"], layers=tuple(layers), compressor_hidden=hidden,
                        lam_schedule=reference_lam_schedule(a["model"], a["lam"]), w_cls=a["cls"],
                        w_proj=a["proj_coeff"], path=a.get("path_type", "linear"),
                        weighting=a.get("weighting", "uniform"))
    meta = {"resolution": a["resolution"], "vae_scaling_factor": 0.18215, "latent_channels": 4, "official_args": a}
    return kwargs, method, meta

