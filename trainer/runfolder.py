"""The run folder: its layout, its checkpoints, its log and its config.json (trainer.loop writes it).

Resume = run the same command again: the latest complete checkpoint in RUN/checkpoints/ restores
the model, EMA, optimizer, GradScaler, every RNG, the step and the loader position. Run folder:

  RUN/config.json          resolved config, versions, cache summary (written at start)
  RUN/.reglue-train.lock   held by the run using the folder (reglue.lock)
  RUN/log.jsonl            one line per report and per FID evaluation (rewound to the checkpoint on resume)
  RUN/checkpoints/step-N/  full training state (trainer.statefiles, manifest last); the last k kept
  RUN/snapshots/ema-N.safetensors (+ ema-N.json)  EMA-only files for sampling (trainer.checkpoints)
  RUN/pca.safetensors      ReDi's PCA, fitted or read from --pca-file once (method redi)
  RUN/samples/grid-N.png   16 EMA samples at fixed noise and classes every --sample-every steps
  RUN/tensorboard/         TensorBoard events

A checkpoint is written into RUN/checkpoints/.tmp-step-N, sealed with a manifest (the sha256 of every
file) and renamed to step-N once every process has written, so a folder named step-N is complete; a run
killed or out of disk space mid-save leaves only a tmp folder. Resume loads only a checkpoint whose
manifest verifies, reading no pickled code (model.safetensors, optimizer.pt and rng-R.pt through the
weights-only loader, state.json, ema.pt); a damaged newer one is set aside as damaged-step-N, saying so.
The run's location is not part of its identity: a moved or copied run folder resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from reglue.lock import Lock
from reglue.pipeline.compressor import describe_key
from reglue.pipeline.store import Cache
from reglue.trainer.checkpoints import EMA_FILE
from reglue.trainer.objective import Method
from reglue.trainer.pca import PCA, fit_pca, load_pca_file
from reglue.trainer.statefiles import DamagedState, read, rng_state, seal, set_rng_state, verify, write

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
            "cache_location": cache_location(cfg.cache),
            "versions": {"reglue": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "accelerate": accelerate.__version__, "numpy": np.__version__, "zarr": zarr.__version__}}


def cache_location(url: str) -> str:
    """A cache's location for comparing runs: a local path resolved (relative or absolute alike), a URL as is."""
    if "://" in url and not url.startswith("file://"):
        return url
    return str(Path(url.removeprefix("file://")).resolve())


def refuse_foreign(run: Path) -> None:
    """Refuse an --out that holds something other than a reglue run, as `extract` refuses a foreign store:
    a file, or a folder with visible entries and no run config.json. Nothing is touched."""
    if not run.exists() and not run.is_symlink():
        return
    if run.is_dir() and (_run_config(run) is not None or not any(not p.name.startswith(".") for p in run.iterdir())):
        return
    what = "a folder that is not a reglue run folder (no config.json of a run)" if run.is_dir() else "not a folder"
    raise FileExistsError(f"{run} exists and is {what}; nothing was changed. Choose another --out, or remove it "
                          "yourself")


def _run_config(run: Path) -> dict | None:
    """config.json of a reglue run in `run`, or None."""
    try:
        doc = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("config"), dict) and "reglue" in doc.get("versions", {})
    return doc if ok else None


def check_same_run(run: Path, cfg: TrainConfig, recipe=None) -> None:
    """Refuse to resume a run folder that holds a run of another config (RUN_CONTROL fields may change).
    With the resolved `recipe`, its fields compare as resolved (`--precision fp32` = sit's default).

    The run's own location (`out`) is not compared: a moved or copied run folder resumes. The cache
    is compared by resolved location, so a relative and an absolute path of one cache are the same."""
    if latest_checkpoint(run) is None:
        return
    saved = _run_config(run)
    if saved is None:
        raise ValueError(f"{run / 'config.json'} is missing or unreadable beside checkpoints; restore it, or choose "
                         "another --out")
    stored = saved["config"]
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if recipe is not None and "recipe" in saved:
        for key in ("precision", "grad_clip", "flip"):
            stored[key], mine[key] = saved["recipe"][key], getattr(recipe, key)
    diff = config_differences(stored, mine, (*RUN_CONTROL, "out", "cache"))
    there, here = saved.get("cache_location", stored.get("cache")), cache_location(cfg.cache)
    if there != here:
        diff.append(f"cache: {there!r} there, {here!r} now")
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


# ---- the folder's lock ----------------------------------------------------------------------------

_held: dict[str, Lock] = {}  # run folders this process holds


def hold_run(run: Path) -> None:
    """Lock `run` for this process (reglue.lock: a second `reglue train` on it stops at once, naming this one;
    the lock of a killed run is free). A lock this process still holds from a `train` call that raised is
    released first: this process is the one using the folder now."""
    key = str(run.resolve())
    if key in _held:
        _held.pop(key).release()
    _held[key] = Lock(run, "train").acquire()


def release_run(run: Path) -> None:
    lock = _held.pop(str(run.resolve()), None)
    if lock is not None:
        lock.release()


# ---- checkpoints --------------------------------------------------------------------------------

def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a tmp folder is never one; whether they verify is `resume`'s).
    Only folders named step-<digits>: `reglue sample` writes step-N-<settings>.npz beside a checkpoint."""
    found = [p for p in (run / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step-"))


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def newest_intact(run: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (what a rerun resumes from), or None."""
    return next((c for c in reversed(checkpoints(run)) if verify(c) is None), None)


def save_checkpoint(accelerator, run: Path, step: int, *, model, optimizer, loop_state: dict, ema_payload) -> Path:
    """Every process's state files into a tmp folder (trainer.statefiles; no pickled objects), the manifest
    last, then the rename to step-N once every process has written. A failed write (a full disk) removes
    the tmp folder on the main process and raises: no step-N folder is ever half-written."""
    root = run / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        write(tmp, f"rng-{accelerator.process_index}.pt", rng_state())  # every process: its own generators
        if main:
            write(tmp, "model.safetensors", accelerator.unwrap_model(model, keep_torch_compile=False).state_dict())
            write(tmp, "optimizer.pt", optimizer.state_dict())
            write(tmp, EMA_FILE, ema_payload())  # trainer.checkpoints.load_model reads this file
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            write(tmp, "state.json", {"step": step, **loop_state, "scaler": scaler})
        accelerator.wait_for_everyone()
        if main:
            seal(tmp, step=step, processes=accelerator.num_processes)
    except OSError:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(ckpt: Path, accelerator, *, model, optimizer, ema, loader) -> int:
    """Restore what `save_checkpoint` wrote (every file through the weights-only or JSON readers); the step."""
    accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(read(ckpt, "model.safetensors"))
    optimizer.load_state_dict(read(ckpt, "optimizer.pt"))
    ema.load_state_dict(read(ckpt, EMA_FILE)["ema"])
    state = read(ckpt, "state.json")
    loader.load_state_dict(state["loader"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = f"rng-{accelerator.process_index}.pt"
    if (ckpt / rng).exists():  # absent when resumed with more processes (the draws are reseeded per step)
        set_rng_state(read(ckpt, rng))
    return int(state["step"])


def resume(accelerator, run: Path, load: Callable[[Path], int]) -> int:
    """Load the newest checkpoint that verifies and loads, on every process; its step (0 without one).

    The main process verifies the manifest before any file is read. Damaged checkpoints newer than the
    one resumed are set aside as damaged-step-N, saying so; when none is intact nothing is changed and
    the error names each problem."""
    found, problems = checkpoints(run), []
    for ckpt in reversed(found):
        problem = verify(ckpt) if accelerator.is_main_process else None
        if _everyone(accelerator, problem is None):
            try:
                step = load(ckpt)
            except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:  # UnsafeFileError, DamagedState
                problem = f"cannot be loaded: {e}"
            if _everyone(accelerator, problem is None):
                _set_aside(accelerator, problems, ckpt)
                return step
        problems.append((ckpt, problem or "another process could not load it"))
    if problems:
        raise DamagedState(f"no checkpoint in {run / 'checkpoints'} is intact ("
                           + "; ".join(f"{c.name}: {p}" for c, p in problems)
                           + "); nothing was changed. Restore a good copy, or move the checkpoints folder away "
                           "to start over")
    return 0


def _everyone(accelerator, ok: bool) -> bool:
    """True when `ok` holds on every process."""
    failed = torch.tensor(0.0 if ok else 1.0, device=accelerator.device)
    return float(accelerator.reduce(failed, "sum")) == 0


def _set_aside(accelerator, problems: list[tuple[Path, str]], resumed: Path) -> None:
    for ckpt, problem in problems:
        aside = ckpt.with_name(f"damaged-{ckpt.name}")
        if accelerator.is_main_process:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)
        accelerator.print(f"warning: checkpoint {ckpt} is damaged ({problem}); set aside as {aside.name}, "
                          f"resuming from {resumed.name}")
    accelerator.wait_for_everyone()


def prune_checkpoints(run: Path, keep_last: int) -> None:
    """Keep the last k checkpoints; drop tmp folders a killed run left behind (damaged-* stay for the user)."""
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
