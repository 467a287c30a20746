"""The run folder: its layout, its checkpoints, its log and its config.json (trainer.loop writes it).

Resume = run the same command again: the latest complete checkpoint in RUN/checkpoints/ restores
the model, EMA, optimizer, GradScaler, every RNG, the step and the loader position. Run folder:

  RUN/config.json          resolved config, versions, cache summary (written at start)
  RUN/log.jsonl            one line per report and per FID evaluation (rewound to the checkpoint on resume)
  RUN/checkpoints/step-N/  full training state (accelerate save_state) + ema.pt; the last k kept
  RUN/snapshots/ema-N.safetensors (+ ema-N.json)  EMA-only files for sampling (trainer.checkpoints)
  RUN/pca.safetensors      ReDi's PCA, fitted or read from --pca-file once (method redi)
  RUN/samples/grid-N.png   16 EMA samples at fixed noise and classes every --sample-every steps
  RUN/tensorboard/         TensorBoard events

A checkpoint is written into RUN/checkpoints/.tmp-step-N and renamed to step-N once every process has
written, so a folder named step-N is always complete; a run killed mid-save leaves only a tmp folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from reglue.pipeline.compressor import describe_key
from reglue.pipeline.store import Cache
from reglue.trainer.objective import Method
from reglue.trainer.pca import PCA, fit_pca, load_pca_file

if TYPE_CHECKING:
    from reglue.trainer.loop import Plan, TrainConfig

# Fault injection for the resume tests: seconds to sleep after each checkpoint (SIGKILL lands there).
PAUSE_ENV = "REGLUE_PAUSE_AFTER_CHECKPOINT"
# Fields that may change between a run and its resumption (they do not change the trained weights; FID
# sampling draws from per-sample generators and every step reseeds, tests/test_train_fid.py).
RUN_CONTROL = ("max_steps", "log_every", "ckpt_every", "keep_last", "snapshot_every", "sample_every", "sample_steps",
               "prefetch", "trackers", "compile", "fid_every", "fid_num", "fid_ref", "inception", "fid_steps",
               "fid_batch", "vae", "cpu")


# ---- the run folder's name -----------------------------------------------------------------------

def default_run_folder(cache: str, method: str, model: str, init_from: str | None = None) -> str:
    """runs/<method>-<model>-<cache name>[-from-<checkpoint>], relative to the working folder: named by what
    the run is, so that rerunning a command resumes its run and another method, model or starting point
    never lands in it (a same-named cache elsewhere is refused by check_same_run, which compares the cache)."""
    from reglue.trainer.hub import is_hub_source, local_name

    name = cache.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr") or "cache"
    parts = [method, model.replace("/", "-"), name]
    if init_from:
        parts += ["from", local_name(init_from) if is_hub_source(init_from) else Path(init_from.rstrip("/")).stem]
    return str(Path("runs") / "-".join(parts))


def run_outputs(run: Path) -> str:
    """What a run folder holds, for the line a run ends on."""
    found = []
    if ckpt := latest_checkpoint(run):
        found.append(f"checkpoint {ckpt}")
    if snapshots := sorted((run / "snapshots").glob("ema-*")):
        found.append(f"EMA snapshot {snapshots[-1]}")
    if grids := sorted((run / "samples").glob("grid-*.png")):
        found.append(f"grids {grids[-1].parent}/ (last {grids[-1].name})")
    if (run / "tensorboard").is_dir():
        found.append(f"TensorBoard {run / 'tensorboard'}")
    return ", ".join(found) or "no outputs yet"


# ---- config.json --------------------------------------------------------------------------------

def resolved_config(cfg: TrainConfig, plan: Plan, parameters: int) -> dict:
    """config.json: the config, what it resolved to (method, recipe, SiT kwargs), the versions, the cache."""
    import accelerate
    import zarr

    from reglue import __version__
    return {"config": dataclasses.asdict(cfg), "method": dataclasses.asdict(plan.method),
            "recipe": dataclasses.asdict(plan.recipe),
            "model_kwargs": plan.model_kwargs, "parameters": parameters,
            "processes": plan.world, "per_process_batch": plan.per_rank, "micro_batch": plan.micro,
            "accumulation": plan.accum, "arrays": list(plan.arrays), "cache": plan.meta_summary,
            "versions": {"reglue": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "accelerate": accelerate.__version__, "numpy": np.__version__, "zarr": zarr.__version__}}


def check_same_run(run: Path, cfg: TrainConfig, recipe=None) -> None:
    """Refuse to resume a run folder that holds a run of another config (RUN_CONTROL fields may change).
    With the resolved `recipe`, its fields compare as resolved (`--precision fp32` = sit's default)."""
    path = run / "config.json"
    if not path.exists() or latest_checkpoint(run) is None:
        return
    saved = json.loads(path.read_text())
    stored = saved["config"]
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if recipe is not None and "recipe" in saved:
        for key in ("precision", "grad_clip", "flip"):
            stored[key], mine[key] = saved["recipe"][key], getattr(recipe, key)
    diff = config_differences(stored, mine, RUN_CONTROL)
    if diff:
        raise ValueError(f"{run} holds a run with a different config ({'; '.join(diff)}); rerun with the same "
                         "settings or choose another --out")


def config_differences(stored: dict, mine: dict, control: tuple[str, ...]) -> list[str]:
    """`key: stored there, mine now` for every field outside `control` that differs (JSON values)."""
    return [f"{k}: {stored.get(k)!r} there, {mine[k]!r} now" for k in mine
            if k not in control and stored.get(k) != mine[k]]


def check_same_encoder(run: Path, cache: Cache) -> None:
    """Refuse to resume a run on another encoder's features (e.g. a cache re-extracted at the same path with
    --encoder X): the SiT's CLS, REPA and compressed inputs would silently change meaning."""
    path = run / "config.json"
    if not path.exists() or latest_checkpoint(run) is None:
        return
    then, now = json.loads(path.read_text()).get("cache", {}).get("encoder_key"), cache.meta.encoder_key()
    if then is not None and then != now:
        raise ValueError(f"{run} was trained on features of {describe_key(then)}; {cache.url} now holds features of "
                         f"{describe_key(now)}: train the new features into another --out")


# ---- checkpoints --------------------------------------------------------------------------------

def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a tmp folder is never one)."""
    return sorted((run / "checkpoints").glob("step-*"), key=checkpoint_step)


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step-"))


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def save_checkpoint(accelerator, run: Path, step: int, ema_payload) -> Path:
    """accelerate save_state + ema.pt into a tmp folder, renamed once every process has written."""
    root = run / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, scaler, registered objects; RNG of every rank
    if accelerator.is_main_process:
        torch.save(ema_payload(), tmp / "ema.pt")  # trainer.checkpoints.load_model reads this file
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run: Path, keep_last: int) -> None:
    """Keep the last k checkpoints; drop tmp folders a killed run left behind."""
    stale = checkpoints(run)[:-keep_last] + list((run / "checkpoints").glob(".tmp-*"))
    for old in stale:
        shutil.rmtree(old)


# ---- log.jsonl, ReDi's PCA ----------------------------------------------------------------------

def append_log(run: Path, record: dict) -> None:
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def rewind_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the checkpoint by a run that was killed)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def load_or_fit_pca(run: Path, cache: Cache, method: Method, samples: int, accelerator,
                    pca_file: str | None = None) -> PCA | None:
    """ReDi's PCA, made once by process 0 into RUN/pca.safetensors (from `pca_file`, e.g. ReDi's released
    pcs/dino_pca_model.pth, else fitted on the cache's first `samples` images), then read by every process."""
    if method.features != "pca":
        return None
    path = run / "pca.safetensors"
    if accelerator.is_main_process and not path.exists():
        k = method.feature_channels
        pca = load_pca_file(pca_file, k) if pca_file else fit_pca(cache, k, samples, accelerator.device)
        if pca.mean.shape[0] != cache.meta.dino_dim:
            raise ValueError(f"{pca_file} is a PCA of {pca.mean.shape[0]}-dim tokens; {cache.url} holds "
                             f"{cache.meta.dino_dim}-dim DINOv2 tokens")
        path.parent.mkdir(parents=True, exist_ok=True)
        pca.save(path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    accelerator.wait_for_everyone()
    return PCA.load(path)


def hms(seconds: float) -> str:
    """h:mm:ss for the report lines ("?" when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
