"""Model files: our EMA snapshot for sampling, safe import of the official REGLUE checkpoint, and export.

Every pickled file is read with `torch.load(weights_only=True)` (pipeline.compressor.safe_load):
tensors, dicts, lists, tuples and primitives, plus an explicit allow-list of globals. The only global
allowed here is `argparse.Namespace`, which the official checkpoint pickles as its `args` (train.py:381);
it is rebuilt as a plain attribute bag, with no code of its own run. Any other global is refused.

Formats:
- snapshot (`RUN/snapshots/ema-N.safetensors`, and `reglue export --format safetensors`): the EMA
  weights as safetensors, the config (`format: "reglue"`, `model_kwargs` (SiT kwargs), `method`
  (Method fields), `meta` (latent_channels, resolution, vae_scaling_factor, the cache's encoders,
  the training config, ...), `step`) as JSON in the file's header, and the same JSON beside it
  (`ema-N.json`) to read. No pickle at all.
- training checkpoint folder (trainer.runfolder): the same config plus `ema` (the state dict) as a
  torch file `ema.pt` next to the rest of the training state; `load_model` accepts the folder once its
  manifest vouches for `ema.pt` (trainer.statefiles).
- official: `{'model', 'ema', 'opt', 'args': argparse.Namespace, 'steps'}` (train.py:376-387),
  whose state-dict keys equal our SiT's, so it loads strictly with no mapping; `reglue export
  --format official` writes it (without `opt`) for the official generate.py.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reglue.pipeline.compressor import atomic_save, safe_load
from reglue.pipeline.store import encoder_record
from reglue.trainer.models import SIT_PRESETS, SiT, preset_kwargs, sit_kwargs_from_reference
from reglue.trainer.objective import Method, get_method, reference_lam_schedule

FORMAT = "reglue"
FORMAT_VERSION = 1
SAFE_GLOBALS = (argparse.Namespace,)  # the official checkpoint's `args`; nothing else
REQUIRED_META = ("latent_channels", "resolution", "vae_scaling_factor")
EMA_FILE = "ema.pt"  # the snapshot payload inside a training checkpoint folder
SNAPSHOT_SUFFIX = ".safetensors"
HEADER_KEY = "reglue"  # the safetensors header entry holding the JSON config
PLAIN = (str, int, float, bool, type(None))
EXPORT_FORMATS = ("official", "safetensors")


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


def snapshot_config(model: SiT, *, model_kwargs: dict, method: Method, step: int, meta: dict) -> dict:
    """Everything but the weights that sampling needs to rebuild `model` (the EMA): checked, plain values.

    `model_kwargs` must rebuild it (`SiT(**model_kwargs)`); `meta` holds plain values (numbers, strings,
    None, lists, dicts) and at least REQUIRED_META."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"snapshot meta lacks {missing} (needed to sample from it)")
    _check_plain(meta, "meta")
    implied = (meta["latent_channels"] + method.feature_channels, method.cls, method.repa)
    if (model.in_channels, model.cls_dim is not None, bool(model.z_dims)) != implied:
        raise ValueError(f"the model (in_channels={model.in_channels}, cls_dim={model.cls_dim}, z_dims={model.z_dims}) "
                         f"does not match method {method}")
    return {"format": FORMAT, "version": FORMAT_VERSION, "model_kwargs": dict(model_kwargs),
            "method": asdict(method), "step": int(step), "meta": dict(meta)}


def snapshot_payload(model: SiT, **config) -> dict:
    """The config plus the EMA state dict: what a training checkpoint folder holds as EMA_FILE."""
    return {**snapshot_config(model, **config), "ema": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


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


def save_snapshot(path: str | os.PathLike, model: SiT, **config) -> Path:
    """Write the EMA-only file sampling reads: safetensors with the JSON config in its header, and the
    same JSON beside it (`<stem>.json`), each atomically (tmp file, then rename). The training loop's
    snapshots and `reglue export --format safetensors` both come from here. Keyword arguments: those
    of `snapshot_config`."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SNAPSHOT_SUFFIX:
        raise ValueError(f"a snapshot is a {SNAPSHOT_SUFFIX} file; got {path}")
    text = json.dumps(snapshot_config(model, **config), indent=1)
    # clone: safetensors refuses tensors that share storage (a view of another entry)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, write in ((path, lambda tmp: save_file(tensors, str(tmp), metadata={HEADER_KEY: text})),
                          (path.with_suffix(".json"), lambda tmp: tmp.write_text(text + "\n"))):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)
    return path


def load_model(path: str | os.PathLike) -> tuple[SiT, ModelInfo]:
    """The EMA weights of our snapshot / training checkpoint folder or of an official checkpoint,
    strictly loaded into an eval-mode SiT on the CPU, and what they are. `path` may name a checkpoint on the
    Hugging Face Hub (hf://owner/repo/file or owner/repo; trainer.hub)."""
    from reglue.trainer.hub import resolve_checkpoint
    from reglue.trainer.statefiles import DamagedState, verify

    path = resolve_checkpoint(path)
    if path.is_dir():
        if problem := verify(path, [EMA_FILE]):
            raise DamagedState(f"checkpoint {path} is damaged ({problem}); use another checkpoint or snapshot")
        path = path / EMA_FILE
    if path.suffix == SNAPSHOT_SUFFIX:
        ckpt = _read_safetensors(path)
    else:
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


def _read_safetensors(path: Path) -> dict:
    """A snapshot's config and `ema` tensors; a safetensors file without our header is refused."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Pass a snapshot written by `reglue train` or `reglue export`.")
    try:
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(HEADER_KEY)
        ema = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated: write it "
                         "again") from None
    if header is None:
        raise ValueError(f"{path} has no reglue config in its header: it is not a snapshot written by `reglue train` "
                         "or `reglue export --format safetensors`")
    return {**json.loads(header), "ema": ema}


def weights_preset(info: ModelInfo) -> str:
    """"tiny" for a model trained on a tiny-preset cache (its latents only decode with the tiny VAE), else "real"."""
    return (info.meta.get("encoders") or {}).get("preset", "real")


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
    # `reglue_meta`: what `reglue export --format official` adds (the official code ignores it).
    meta = {**(a.get("reglue_meta") or {}), "resolution": a["resolution"], "vae_scaling_factor": 0.18215,
            "latent_channels": 4, "official_args": a}
    return kwargs, method, meta


# ---- export ---------------------------------------------------------------------------------------

# parse_args defaults of the official train.py (giorgospets/reglue train.py:420-482), `interm_layers`
# already split as train.py:179 does; `export_official` fills in the run's values.
OFFICIAL_TRAIN_ARGS = dict(
    output_dir="exps", exp_name="reglue-export", logging_dir="logs", report_to="wandb", sampling_steps=10000,
    resume_step=0, model=None, num_classes=1000, encoder_depth=8, fused_attn=True, qk_norm=False, ops_head=16,
    data_dir="../data/imagenet256", resolution=256, batch_size=8, allow_tf32=False, mixed_precision="fp16",
    epochs=1400, max_train_steps=1000000, checkpointing_steps=10000, gradient_accumulation_steps=1,
    learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-08,
    max_grad_norm=1.0, seed=0, num_workers=4, path_type="linear", prediction="v", cfg_prob=0.1,
    enc_type="dinov2-vit-b", proj_coeff=0.5, weighting="uniform", legacy=False, cls=0.03, norm_stats=None,
    encoder_channel_list=None, interm_layers=None, feat_channels=None, compression_model_path=None, lam=1.0,
    subset=-1)
OFFICIAL_MODELS = tuple(f"SiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8))  # models/sit.py SiT_models
# timm's DINOv2-with-registers ids -> the official --enc-type, which loads dinov2_vit{s,b,l,g}14_reg (utils.py:60-64)
OFFICIAL_ENC_TYPES = {f"vit_{size}_patch14_reg4_dinov2.lvd142m": f"dinov2-vit-{size[0]}"
                      for size in ("small", "base", "large", "giant")}


def export_model(src: str | os.PathLike, fmt: str, out: str | os.PathLike) -> tuple[Path, str]:
    """`reglue export`: the model file `src` (anything `load_model` reads) as `fmt` at `out`.

    Returns the path written and one line on how to use it."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    model, info = load_model(src)
    out = Path(out)
    if fmt == "safetensors":
        save_snapshot(out, model, model_kwargs=info.model_kwargs, method=info.method, step=info.step, meta=info.meta)
        return out, f"EMA weights + JSON config; sample with `reglue sample {out}`"
    raw, note = _raw_weights(Path(src), model)
    args = official_args(model, info)
    atomic_save({"model": raw, "ema": model.state_dict(), "args": args, "steps": info.step}, out)
    official = "" if args.model in OFFICIAL_MODELS else f" (the official SiT_models has no {args.model}: reglue only)"
    return out, (f"official layout, {note}{official}; sample with the official code: python generate.py --ckpt {out} "
                 f"--model {args.model} --resolution {args.resolution} --num-classes {args.num_classes} "
                 f"--encoder-depth {args.encoder_depth} --projector-embed-dims {model.z_dims[0]} --cls {model.cls_dim} "
                 "--mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.9")


def official_args(model: SiT, info: ModelInfo) -> argparse.Namespace:
    """The `args` the official train.py would have pickled for this run (its own, for an official file)."""
    m, kw = info.method, info.model_kwargs
    if "official_args" in info.meta:
        return argparse.Namespace(**info.meta["official_args"])
    # The official SiT always has the CLS token and one projector of the CLS width (sit.py:217-219), 4 latent
    # channels and the compressed features (train.py:166-175).
    if (m.features, m.cls, m.repa, info.latent_channels) != ("compressed", True, True, 4) or \
            len(model.z_dims) != 1 or model.cls_dim != model.z_dims[0]:
        raise ValueError(f"the official code trains and samples REGLUE models only (compressed features, CLS token, "
                         f"REPA, 4 latent channels); this is method {m.name!r} with {info.latent_channels} latent "
                         "channels: export it with --format safetensors")
    names = [n for n, p in SIT_PRESETS.items() if all(kw.get(k) == v for k, v in p.items() if k != "encoder_depth")]
    if not names:
        raise ValueError(f"the SiT {kw} is no preset the official code can rebuild: export it with "
                         "--format safetensors")
    train, meta = info.meta.get("train") or {}, info.meta
    compressor = meta.get("compressor") or {}
    key = encoder_record(meta.get("encoders") or {}).get("name")
    run = dict(
        model=names[0], num_classes=info.num_classes, encoder_depth=kw["encoder_depth"], resolution=info.resolution,
        feat_channels=info.feature_channels, interm_layers=list(m.layers),
        encoder_channel_list=",".join(map(str, compressor.get("channels") or m.compressor_channel_list(model.cls_dim))),
        lam=m.lam_schedule[0][1], cls=m.w_cls, proj_coeff=m.w_proj, cfg_prob=kw.get("class_dropout_prob", 0.1),
        qk_norm=kw.get("qk_norm", False), path_type=m.path, weighting=m.weighting,
        enc_type=OFFICIAL_ENC_TYPES.get(key, key or OFFICIAL_TRAIN_ARGS["enc_type"]),
        compression_model_path=compressor.get("file"), norm_stats=(compressor.get("norm_stats") or {}).get("file"))
    # the training recipe, from the TrainConfig the snapshot records (`meta["train"]`), where it has the field
    betas = train.get("betas") or (None, None)
    recipe = dict(batch_size=train.get("global_batch"), learning_rate=train.get("lr"), adam_beta1=betas[0],
                  adam_beta2=betas[1], adam_weight_decay=train.get("weight_decay"), adam_epsilon=train.get("adam_eps"),
                  max_grad_norm=train.get("grad_clip"), seed=train.get("seed"), max_train_steps=train.get("max_steps"),
                  checkpointing_steps=train.get("ckpt_every"), allow_tf32=train.get("tf32"),
                  mixed_precision={"fp32": "no"}.get(train.get("precision"), train.get("precision")),
                  exp_name=Path(train.get("out") or "").name or None)
    run |= {k: v for k, v in recipe.items() if v is not None}
    return argparse.Namespace(**{**OFFICIAL_TRAIN_ARGS, **run, "reglue_meta": meta})


def _raw_weights(src: Path, ema: SiT) -> tuple[dict, str]:
    """The non-EMA weights of a training checkpoint folder (its model.safetensors), else the EMA's."""
    from safetensors.torch import load_file

    from reglue.trainer.statefiles import DamagedState, verify

    state = ema.state_dict()
    file = src / "model.safetensors" if src.is_dir() else None
    if file is None or not file.is_file():
        return state, "`model` = the EMA weights (a snapshot holds only those)"
    if problem := verify(src, [file.name]):
        raise DamagedState(f"checkpoint {src} is damaged ({problem}); export another checkpoint")
    raw = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in load_file(str(file)).items()}
    if raw.keys() != state.keys() or any(raw[k].shape != v.shape for k, v in state.items()):
        raise ValueError(f"{file} does not hold the weights of the SiT in {src / EMA_FILE}")
    return raw, "`model` = the trained weights, `ema` = their EMA"

